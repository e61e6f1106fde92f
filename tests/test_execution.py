"""The network's execution policy (`networks.execution`): how --precision auto resolves, fp16 refused off CUDA,
bf16 only inside the network (every family's), bf16 sampling close to fp32, training under bf16 (and the fp16
scaler path) with float32 master weights and EMA, torch.compile of the network alone (one graph for a run whose
last batch is partial), and the Python API against the CLI."""
import argparse

import numpy as np
import pytest
import torch

import aniso_fast
from aniso_fast import sample
from aniso_fast.geometry.bases import DCTBasis
from aniso_fast.geometry.schedules import MatrixSchedule
from aniso_fast.networks import execution
from aniso_fast.networks.execution import FP32, Execution, ExecutedNetwork, execute, network_of, resolve_execution
from aniso_fast.networks.precond import AnisoPrecond
from aniso_fast.networks.unet import SongUNet
from aniso_fast.processes import registry
from aniso_fast.processes.velocity import VelocityScoreNet
from aniso_fast.processes.vsdm import VSDMProcess
from aniso_fast.processes.vsmd import VSMDProcess
from aniso_fast.sampling import resolve_sampler

pytestmark = pytest.mark.usefixtures("one_thread")

BF16 = Execution("bf16")


def _unet(in_channels=1, label_dim=2, seed=0):
    torch.manual_seed(seed)
    return SongUNet(img_resolution=8, in_channels=in_channels, out_channels=1, label_dim=label_dim,
                    model_channels=8, channel_mult=[1, 1], num_blocks=1, attn_resolutions=[4], dropout=0.0).eval()


# ---- the rules ----

@pytest.mark.parametrize("flags,expected", [({"amx_bf16", "avx512f"}, "bf16"), ({"avx512_bf16"}, "bf16"),
                                            ({"avx512f", "avx2"}, "fp32"), (set(), "fp32")])
def test_auto_is_bf16_where_the_cpu_has_bf16_products(monkeypatch, flags, expected):
    monkeypatch.setattr(execution, "cpu_flags", lambda: frozenset(flags))
    assert execution.resolve_precision("auto", "cpu") == expected
    assert execution.resolve_precision(None, "cpu") == expected
    assert resolve_execution("cpu").precision == expected
    assert execution.resolve_precision("fp32", "cpu") == "fp32" and execution.resolve_precision("bf16", "cpu") == "bf16"


@pytest.mark.parametrize("supported,expected", [(True, "bf16"), (False, "fp32")])
def test_auto_on_cuda_follows_the_gpu(monkeypatch, supported, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: supported)
    monkeypatch.setattr(execution, "cpu_flags", lambda: frozenset())  # the CPU's flags do not matter on CUDA
    assert execution.resolve_precision("auto", "cuda") == expected
    assert execution.resolve_precision("fp16", "cuda:0") == "fp16"  # fp16: CUDA only
    assert execution.resolve_memory_format("auto", "cuda") == "channels_last"
    assert execution.resolve_compile("reduce-overhead", "cuda") == "reduce-overhead"


def test_cpu_refusals_and_defaults():
    with pytest.raises(ValueError, match=r"^--precision: fp16 runs on CUDA only"):
        execution.resolve_precision("fp16", "cpu")
    with pytest.raises(ValueError, match=r"^--precision: expected one of auto, fp32, bf16, fp16"):
        execution.resolve_precision("half", "cpu")
    with pytest.raises(ValueError, match=r"^--compile: reduce-overhead"):
        execution.resolve_compile("reduce-overhead", "cpu")
    with pytest.raises(ValueError, match=r"^--memory-format"):
        execution.resolve_memory_format("nhwc", "cpu")
    assert execution.resolve_memory_format("auto", "cpu") == "channels_last"  # measured faster (bench/RESULTS.md)
    parser = argparse.ArgumentParser()
    execution.add_options(parser, sampling=False)  # training's options: no --memory-format, so contiguous
    assert execution.from_args(parser.parse_args([]), "cpu").memory_format == "contiguous"
    assert execution.resolve_compile(True, "cpu") == "default" and execution.resolve_compile(False, "cpu") is None
    with pytest.raises(ValueError, match="--precision"):
        aniso_fast.load("gmm-fmnist", device="cpu", precision="fp16")
    with pytest.raises(ValueError, match="--precision"):
        aniso_fast.load("gmm-fmnist", device="cpu").sample(2, nfe=3, precision="fp16")


# ---- only the network runs in low precision, for every family's model ----

def _models():
    """(name, model, call): one model per family and head, and a call of it on a batch of 3."""
    basis, labels = DCTBasis(8, 8, 3), torch.tensor([0, 1, 1])
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    g = torch.tensor([[0.5, 2.0]], dtype=torch.float64).expand(3, -1)
    core = AnisoPrecond(_unet(), basis)
    vsdm = registry.get("vsdm").wrap(_unet(), basis, VSDMProcess(2))
    vsmd = VSMDProcess(2)
    z = torch.cat([x, torch.randn_like(x)], dim=1).float()
    t = torch.full((3,), 0.5, dtype=torch.float64)
    denoiser = registry.get("vsmd").wrap(_unet(), basis, vsmd, {"head": "denoiser"})
    velocity = registry.get("vsmd").wrap(VelocityScoreNet(_unet(in_channels=2)), basis, vsmd, {"sigma_data": 0.5})
    return [("core", core, lambda m: m.flow(x, g, labels)), ("vsdm", vsdm, lambda m: m.denoise(x, g, labels)),
            ("vsmd-denoiser", denoiser, lambda m: m(z, t, labels)), ("vsmd-velocity", velocity, lambda m: m(z, t, labels))]


@pytest.mark.parametrize("name", ["core", "vsdm", "vsmd-denoiser", "vsmd-velocity"])
def test_only_the_network_runs_in_bf16_for_every_family(name):
    _, model, call = next(m for m in _models() if m[0] == name)
    inner = network_of(model)
    seen = []
    hook = inner.register_forward_hook(lambda mod, args, out: seen.append((args[0].dtype, out.dtype)))
    convs = []
    first_conv = next(m for m in inner.modules() if m.__class__.__name__ == "Conv2d")
    conv_hook = first_conv.register_forward_hook(lambda mod, args, out: convs.append(out.dtype))
    with torch.no_grad():
        want = call(model)
        execute(model, BF16)
        assert isinstance(model.net, ExecutedNetwork) and network_of(model) is inner
        got = call(model)
        execute(model, FP32)  # back to the network itself
        assert network_of(model) is inner and not isinstance(model.net, ExecutedNetwork)
        again = call(model)
    hook.remove(), conv_hook.remove()
    assert convs == [torch.float32, torch.bfloat16, torch.float32]  # the convolutions ran in bf16 under the policy
    assert seen[1] == (torch.float32, torch.bfloat16)  # fed float32; its raw output bf16 (autocast) ...
    assert got.dtype == want.dtype  # ... and what the model returns keeps the model's dtype
    assert torch.equal(again, want)
    rel = float((got.double() - want.double()).norm() / want.double().norm())
    assert 0 < rel < 0.05, rel


def _sample(model, schedule, execution_, steps=None):
    execute(model, execution_)
    plan = resolve_sampler("heun", "uniform_t", "mid", 5)
    dtypes = []
    x, _, _ = registry.run_sampler(model, schedule, plan, [0, 1, 2, 3], torch.tensor([0, 1, 0, 1]),
                                   callback=lambda d: dtypes.append(d["x"].dtype))
    return x, dtypes


def test_bf16_sampling_is_close_to_fp32_and_the_solver_state_keeps_its_dtype():
    model, schedule = AnisoPrecond(_unet(), DCTBasis(8, 8, 3)), MatrixSchedule(2)
    combine_dtypes = []
    original = model.basis.combine

    def spy(u, *args, **kwargs):
        combine_dtypes.append(u.dtype)
        return original(u, *args, **kwargs)

    model.basis.combine = spy
    with torch.no_grad():
        x32, d32 = _sample(model, schedule, FP32)
        ops32, combine_dtypes[:] = list(combine_dtypes), []
        x16, d16 = _sample(model, schedule, BF16)
    assert d16 == d32 and set(d32) <= {torch.float32, torch.float64}  # the solver state: as in fp32
    assert combine_dtypes == ops32 and torch.bfloat16 not in combine_dtypes  # the subspace ops: as in fp32
    assert x16.dtype == x32.dtype
    rel = float((x16.double() - x32.double()).norm() / x32.double().norm())
    assert 0 < rel < 0.05, rel


# ---- training: float32 master weights, autocast forward and backward ----

def _trainer(tmp_path, precision, stage="aniso"):
    from test_train import make_npz

    from aniso_fast.training import config, trainer

    npz = make_npz(tmp_path / "tiny.npz")
    args = config.config_from_argv([
        "--stage", stage, "--data", str(npz), "--out", str(tmp_path / precision), "--steps", "2", "--batch", "4",
        "--model-channels", "8", "--channel-mult", "1,1", "--basis", "dct", "--dct-bands", "3", "--no-progress",
        "--sample-every", "0", "--plot-every", "0", "--rampup-kimg", "0", "--lr", "1e-3", "--dropout", "0",
        "--precision", "bf16" if precision == "fp16" else precision])
    args.precision = precision  # fp16 is CUDA only at the command line; its scaler path is device-agnostic code
    return trainer.Trainer(args)


@pytest.mark.parametrize("stage,precision", [("aniso", "bf16"), ("iso", "fp16")])
def test_a_training_step_under_low_precision_keeps_float32_weights(tmp_path, stage, precision):
    ref, low = _trainer(tmp_path, "fp32", stage), _trainer(tmp_path, precision, stage)
    assert torch.equal(next(ref.net.parameters()), next(low.net.parameters()))  # the same start
    seen = []
    conv = next(m for m in low.net.modules() if m.__class__.__name__ == "Conv2d")
    conv.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
    before = [p.detach().clone() for p in low.net.parameters()]
    r32, rlow = ref.train_step(), low.train_step()
    assert seen and set(seen) == {execution._DTYPES[precision]}  # the network ran in the low precision
    for p, b in zip(low.net.parameters(), before):
        assert p.dtype == torch.float32 and (p.grad is None or p.grad.dtype == torch.float32)
    assert any(not torch.equal(p, b) for p, b in zip(low.net.parameters(), before))  # it stepped
    assert all(t.dtype == torch.float32 for t in low.ema.module.state_dict().values() if t.is_floating_point())
    assert low.process_param.dtype == ref.process_param.dtype
    assert rlow["precision"] == precision and r32["precision"] == "fp32"
    assert ("loss_scale" in rlow) == (precision == "fp16") and np.isfinite(rlow["loss"])
    assert rlow["loss"] == pytest.approx(r32["loss"], rel=0.05)
    state, meta = low.state()
    assert all(t.dtype == torch.float32 for k, t in state.items() if k.startswith(("net.", "ema.")))
    assert meta["args"]["precision"] == precision


def test_train_precision_is_checked_and_resolved(tmp_path, monkeypatch):
    from aniso_fast.training import config

    base = ["--stage", "edm", "--data", "x.npz", "--out", str(tmp_path / "run")]
    assert config.config_from_argv(base).precision == "fp32"  # train's default: no training-quality check of bf16
    monkeypatch.setattr(execution, "cpu_flags", lambda: frozenset({"amx_bf16"}))
    assert config.config_from_argv([*base, "--precision", "auto", "--device", "cpu"]).precision == "bf16"
    with pytest.raises(ValueError, match="^--precision: fp16 runs on CUDA only"):
        config.config_from_argv([*base, "--precision", "fp16", "--device", "cpu"])
    aniso = ["--stage", "aniso", *base[2:], "--precision", "fp16"]
    with pytest.raises(ValueError, match="^--precision: fp16 gives NaN in the aniso stage's schedule-gradient"):
        config.config_from_argv(aniso)  # the family's rule comes first: it holds on CUDA too
    (tmp_path / "nan").mkdir()
    unchecked = _trainer(tmp_path / "nan", "fp16", "aniso")  # past the rule: what it prevents
    assert np.isnan(unchecked.train_step()["loss"])
    assert "precision" in config.RESUME_FREE


# ---- torch.compile of the network alone ----

def _compiled_run(backend, monkeypatch, cache):
    monkeypatch.setattr(execution, "COMPILE_BACKEND", backend)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(cache))  # not the user's cache
    torch._dynamo.reset()
    net = _unet()
    wrapped = ExecutedNetwork(net, Execution(compile="default"))
    gen = torch.Generator().manual_seed(3)
    x, noise = torch.randn(6, 1, 8, 8, generator=gen), torch.randn(6, generator=gen)
    onehot = torch.nn.functional.one_hot(torch.arange(6) % 2, 2).float()
    from torch._dynamo.utils import counters

    counters.clear()
    with torch.no_grad():
        full, partial = wrapped(x, noise, onehot), wrapped(x[:4], noise[:4], onehot[:4])
        eager = net(x, noise, onehot)
    return full, partial, eager, counters["stats"]["unique_graphs"]


def test_compile_wraps_the_network_once_and_pads_the_last_batch(monkeypatch, tmp_path):
    full, partial, eager, graphs = _compiled_run("aot_eager", monkeypatch, tmp_path)
    assert graphs == 1  # the partial batch (4 of 6) ran on the same graph, padded
    assert partial.shape == (4, 1, 8, 8)
    assert torch.allclose(full, eager, atol=1e-5) and torch.allclose(partial, eager[:4], atol=1e-5)



def test_the_compile_cache_lives_under_the_users_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    assert execution.compile_cache_dir() == tmp_path / "aniso_fast" / "inductor"
    from torch._inductor.runtime.cache_dir_utils import cache_dir, default_cache_dir

    assert cache_dir() == str(tmp_path / "aniso_fast" / "inductor")  # where inductor now writes
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())  # what inductor sets on import: not a choice
    assert execution.compile_cache_dir() == tmp_path / "aniso_fast" / "inductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))  # the user's own: kept
    assert execution.compile_cache_dir() == tmp_path / "mine"


@pytest.mark.slow
def test_inductor_output_equals_eager(monkeypatch, tmp_path):
    """The real compiler (inductor, C++ on the CPU), cold (a fresh cache folder): 80 s of CPU time, 143 s wall on
    this project's shared 2-core machine, hence slow."""
    full, partial, eager, graphs = _compiled_run("inductor", monkeypatch, tmp_path / "inductor")
    assert graphs == 1
    assert torch.allclose(full, eager, atol=1e-4) and torch.allclose(partial, eager[:4], atol=1e-4)


# ---- the Python API and the CLI ----

def test_api_matches_the_cli_under_bf16(tiny_checkpoint, tmp_path, capsys):
    assert sample.main(["--model", str(tiny_checkpoint), "--seeds", "0-4", "--nfe", "5", "--format", "npz",
                        "--outdir", str(tmp_path), "--no-progress", "--device", "cpu", "--precision", "bf16",
                        "--batch", "2"]) == 0
    captured = capsys.readouterr()
    cli = np.load(captured.out.strip())
    assert "bf16" in captured.err
    pipe = aniso_fast.load(str(tiny_checkpoint), device="cpu")
    out = pipe.sample(5, nfe=5, output="uint8", precision="bf16", batch=2)
    assert np.array_equal(out.images.numpy(), cli["images"])
    assert out.info["precision"] == "bf16" and out.info["compile"] is None
    assert out.info["memory_format"] == "channels_last"  # memory format auto: channels_last
    fp32, bf16 = (pipe.sample(5, nfe=5, precision=p, batch=2) for p in ("fp32", "bf16"))
    assert fp32.info["precision"] == "fp32" and not torch.equal(fp32.images, bf16.images)
    assert aniso_fast.load("gmm-fmnist", device="cpu").sample(2, nfe=3).info["precision"] is None  # no network


def test_a_model_that_calls_its_own_network():
    """The exact mixture has no network: left as it is. A model without set_network cannot run the trainer's
    network under a policy: refused rather than silently run in fp32."""
    from aniso_fast import store

    mixture, _ = store.StoredModel.open("gmm-fmnist").load()
    assert execute(mixture, BF16) is mixture and network_of(mixture) is None

    class Own(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

    net = _unet()
    model = Own(net)
    assert execute(model, FP32, network=net) is model  # fp32 on its own network: nothing to change
    with pytest.raises(ValueError, match="^--precision: a Own calls its network itself"):
        execute(model, BF16, network=net)


def test_channels_last_gives_the_network_its_output():
    net = _unet()
    gen = torch.Generator().manual_seed(4)
    x, noise = torch.randn(3, 1, 8, 8, generator=gen), torch.randn(3, generator=gen)
    onehot = torch.nn.functional.one_hot(torch.arange(3) % 2, 2).float()
    with torch.no_grad():
        eager = net(x, noise, onehot)
        out = ExecutedNetwork(net, Execution(memory_format="channels_last"))(x, noise, onehot)
    assert any(p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
               for p in net.parameters())  # the weights went channels_last
    assert out.is_contiguous() and out.dtype == torch.float32  # handed back contiguous, for the subspace ops
    assert torch.allclose(out, eager, atol=1e-5)
