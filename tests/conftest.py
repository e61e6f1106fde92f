import os

# Triton kernels run under the interpreter on machines without a GPU (CI); set before triton is imported. On a GPU,
# `TRITON_INTERPRET=0 python -m pytest --device cuda tests/test_ops.py ...` runs them compiled (scripts/gpu_check.sh).
os.environ.setdefault("TRITON_INTERPRET", "1")


import numpy  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import aniso_fast.training.trainer  # noqa: E402
from aniso_fast.networks.gmm import GaussianMixture  # noqa: E402
from aniso_fast.geometry.schedules import MatrixSchedule  # noqa: E402
from helpers import kdiffusion_sampling  # noqa: E402

DEVICES = ("cpu", "cuda")
# the op backends the device-parametrised op tests run per device (the reference backend through the dispatch
# checks the plumbing; the float64 reference is always computed on the CPU)
DEVICE_BACKENDS = {"cpu": ("reference", "cpp"), "cuda": ("reference", "cuda", "triton")}


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu", choices=DEVICES,
                     help="device of the op tests' tensors (tests that take `device_backend`: test_ops.py, "
                          "test_block_ops.py, test_ops_autograd.py): cpu runs the reference and cpp backends, cuda "
                          "the reference, cuda and triton backends on the GPU (skipped without one)")


def pytest_generate_tests(metafunc):
    """`device_backend`: (device, backend) for each backend available on the --device; a skipped case with the
    reason where none can run (no CUDA device, or no backend built for it)."""
    if "device_backend" not in metafunc.fixturenames:
        return
    from aniso_fast import ops

    unavailable = ops.backends()["unavailable"]
    device = metafunc.config.getoption("device")
    if device == "cuda" and not torch.cuda.is_available():
        params = [pytest.param(None, marks=pytest.mark.skip(reason="--device cuda: no CUDA device on this machine"),
                               id="cuda-unavailable")]
    else:
        params = [pytest.param((device, b), id=f"{device}-{b}") for b in DEVICE_BACKENDS[device]
                  if device not in unavailable.get(b, {})]
        if not params:
            params = [pytest.param(None, marks=pytest.mark.skip(reason=f"no op backend available for {device}"),
                                   id=f"{device}-none")]
    metafunc.parametrize("device_backend", params)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors on a shared 2-core machine: OpenMP threads only contend (10x slower, 100x for the dense
    matrix_exp references). Files that want it say `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def gmm():
    """A small exact Gaussian mixture (6x6, two subspaces, three components) for the solver tests."""
    return GaussianMixture.toy(channels=1, height=6, width=6, bands=(2,), num_components=3, seed=1)


@pytest.fixture(scope="module")
def aniso_schedule():
    """A K = 2 schedule whose second subspace differs from the first, so the solver tests are anisotropic."""
    sched = MatrixSchedule(2)
    with torch.no_grad():
        sched.psi[0, 1] += 0.3 * torch.randn(sched.psi.shape[-1], generator=torch.Generator().manual_seed(0),
                                             dtype=torch.float64)
    return sched


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, one_thread):
    """A 2-step class-conditional run on 8x8 data with a per-class PCA basis (float64 V in the checkpoint); its data
    set is `tiny.npz` two folders up (64 uint8 images, labels 0 and 1)."""
    root = tmp_path_factory.mktemp("tiny")
    gen = torch.Generator().manual_seed(0)
    images = (torch.rand(64, 1, 8, 8, generator=gen) * 255).to(torch.uint8).numpy()
    numpy.savez(root / "tiny.npz", images=images, labels=numpy.arange(64) % 2)
    argv = ["--stage", "iso", "--data", str(root / "tiny.npz"), "--out", str(root / "run"), "--steps", "2",
            "--batch", "8", "--model-channels", "8", "--channel-mult", "1,1", "--basis", "pca", "--pca-rank", "16",
            "--pca-per", "class", "--class-schedules", "--no-progress", "--sample-every", "0", "--plot-every", "0"]
    assert aniso_fast.training.trainer.main(argv) == 0
    return sorted((root / "run").glob("checkpoint-*.safetensors"))[-1]


@pytest.fixture
def assets(tmp_path, monkeypatch):
    """A temporary registry (an empty manifest), so that no test writes into the package's assets."""
    import json

    from aniso_fast import store

    folder = tmp_path / "assets"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({"format": store.MANIFEST_FORMAT, "models": {}}))
    monkeypatch.setenv(store.ASSETS_ENV, str(folder))
    return folder


@pytest.fixture(scope="session")
def kdiffusion():
    """k_diffusion/sampling.py on its own, the solver oracle (`helpers.kdiffusion_sampling`)."""
    module = kdiffusion_sampling()
    if module is None:
        pytest.skip("k-diffusion is not installed (bash scripts/setup.sh --test)")
    return module
