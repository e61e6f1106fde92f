import importlib.util
import os
import sys
import types

# Triton kernels run under the interpreter on machines without a GPU (CI); set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")


import numpy  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import aniso_fast.training.trainer  # noqa: E402
from aniso_fast.networks.gmm import GaussianMixture  # noqa: E402
from aniso_fast.geometry.schedules import MatrixSchedule  # noqa: E402


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
    """k_diffusion/sampling.py on its own, the solver oracle: the package __init__ imports heavy optional deps, and
    its utils.py needs torchvision, so sampling.py runs against a stub package holding the one helper it uses."""
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None:
        pytest.skip("k-diffusion is not installed (bash scripts/setup.sh --test)")
    pkg = types.ModuleType("_kdiffusion_oracle")
    pkg.__path__ = []
    pkg.utils = types.ModuleType("_kdiffusion_oracle.utils")
    pkg.utils.append_dims = lambda x, n: x[(...,) + (None,) * (n - x.ndim)]
    sys.modules.setdefault("_kdiffusion_oracle", pkg)
    sys.modules.setdefault("_kdiffusion_oracle.utils", pkg.utils)
    path = os.path.join(spec.submodule_search_locations[0], "sampling.py")
    mod_spec = importlib.util.spec_from_file_location("_kdiffusion_oracle.sampling", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module
