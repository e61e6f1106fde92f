"""The process-family registry (issue 22): a fourth family defined in this file alone trains, stores, loads and
samples through the public paths, and every family option is refused by every family (and variant) that does
not take it, before anything is written."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from aniso_fast import sample as sample_cli
from aniso_fast.processes import registry
from aniso_fast.processes.family import Family, Option
from aniso_fast.sampling import seeded_noise
from aniso_fast.store import checkpoint as ckpt
from aniso_fast import store
from aniso_fast.training import config as train_config
from aniso_fast.training import trainer as train
from aniso_fast.utils import figures

from test_train import make_npz

torch.set_num_threads(1)


class ToyProcess(nn.Module):
    """x_t = x0 + s(t) eps with s(t) = sigma_max t e^{scale}: one learned scale per class."""

    def __init__(self, num_subspaces: int, num_classes: int | None = None, sigma_max: float = 10.0):
        super().__init__()
        self.num_subspaces, self.num_classes, self.sigma_max, self.T = num_subspaces, num_classes, sigma_max, 1.0
        self.scale = nn.Parameter(torch.zeros(num_classes or 1, 1))

    def config(self) -> dict:
        return {"num_subspaces": self.num_subspaces, "num_classes": self.num_classes, "sigma_max": self.sigma_max}

    def sigma(self, t):
        return self.sigma_max * t * self.scale.mean().exp()


class ToyNet(nn.Module):
    """A 3x3 convolution that predicts the noise from the noised image and its noise level."""

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0):
        super().__init__()
        self.cfg = dict(img_resolution=img_resolution, in_channels=in_channels, out_channels=out_channels,
                        label_dim=label_dim)
        self.conv = nn.Conv2d(in_channels + 1, out_channels, 3, padding=1)

    def config(self) -> dict:
        return dict(self.cfg)

    def forward(self, x, sigma):
        level = sigma.reshape(-1, 1, 1, 1).expand(x.shape[0], 1, *x.shape[2:]).to(x.dtype)
        return self.conv(torch.cat([x / (1 + sigma.reshape(-1, 1, 1, 1)), level], 1))


class ToyModel(nn.Module):
    def __init__(self, net, basis, process):
        super().__init__()
        self.net, self.basis, self.process, self.num_classes = net, basis, process, None
        self.image_shape = (net.cfg["out_channels"], net.cfg["img_resolution"], net.cfg["img_resolution"])


class ToyFamily(Family):
    name = "toy"
    help = "a test's toy VE process"
    options = (Option("toy_sigma_max", "toy: the largest noise level (default 10)", float, example=("5",)),)

    def option_defaults(self, cfg):
        return {"toy_sigma_max": 10.0, "glr": 1e-3}

    def check_options(self, cfg):
        if not cfg.toy_sigma_max > 0:
            raise ValueError(f"--toy-sigma-max: expected a number > 0, got {cfg.toy_sigma_max}")

    def new_process(self, cfg, num_subspaces, num_classes):
        return ToyProcess(num_subspaces, num_classes, cfg.toy_sigma_max)

    def process_from_config(self, config):
        return ToyProcess(**config)

    def new_network(self, cfg, net_config):
        return ToyNet(net_config["img_resolution"], net_config["in_channels"], net_config["out_channels"])

    def network_from_config(self, net_config):
        return ToyNet(**net_config)

    def wrap(self, net, basis, process, precond_config=None):
        return ToyModel(net, basis, process)

    def loss(self, cfg, model, process):
        def loss(x0, labels, gen):
            t = 0.1 + 0.9 * torch.rand(x0.shape[0], generator=gen, device=x0.device)
            eps = torch.randn(x0.shape, generator=gen, device=x0.device)
            s = process.sigma(t)
            return (model.net(x0 + s.reshape(-1, 1, 1, 1) * eps, s) - eps).square().mean(), {}
        return loss

    def plot_process(self, process, path, title, class_names=None):
        figures.plot_subspace_values(process.scale.detach(), path, title, "scale", class_names=class_names)

    def owns(self, process):
        return isinstance(process, ToyProcess)

    def check_sampler(self, plan):
        if (plan.solver, plan.grid) != ("euler", "uniform_t"):
            raise ValueError(f"solver: a toy model samples with euler on uniform_t, got {plan.solver!r}")

    def default_sampler(self, solver=None, grid=None):
        return solver or "euler", grid or "uniform_t"

    def run_sampler(self, model, process, plan, seeds, labels, *, fitted, device, progress):
        ts = torch.linspace(1.0, 0.0, plan.steps + 1)
        with torch.no_grad():
            sig = process.sigma(ts)
            x = seeded_noise(list(seeds), model.image_shape, device=device) * sig[0]
            for i in range(plan.steps):  # the PF-ODE dx/dsigma = eps(x, sigma)
                x = x + (sig[i + 1] - sig[i]) * model.net(x, sig[i].expand(x.shape[0]))
        return x, labels, {"nfe": plan.nfe, "solver": plan.solver, "grid": plan.grid}


@pytest.fixture
def toy():
    family = registry.register(ToyFamily())
    yield family
    registry.unregister(family.name)


def test_a_toy_family_from_this_file_trains_stores_loads_and_samples(tmp_path, toy, monkeypatch):
    """One module (this file) and one `register` call: the trainer, the checkpoint, build_model, export, the
    registry's sampler and the sample CLI all take the toy family."""
    data = make_npz(tmp_path / "tiny.npz", labels=False)
    out = tmp_path / "run"
    args = train_config.parse_args(["--family", "toy", "--toy-sigma-max", "5", "--data", str(data), "--out", str(out),
                                    "--steps", "3", "--batch", "4", "--no-progress", "--sample-every", "3",
                                    "--sample-nfe", "4", "--basis", "iso", "--rampup-kimg", "0"])
    trainer = train.run(args)
    assert trainer.step == 3 and (out / "samples-00000003.png").exists() and (out / "schedule-00000003.png").exists()
    assert trainer.process_param.grad is None and trainer.process.scale.abs().sum() > 0  # the process learned

    path = ckpt.latest_checkpoint(out)
    tensors, meta = ckpt.load_checkpoint(path)
    assert meta["family"] == "toy" and meta["schedule_config"]["sigma_max"] == 5.0
    model, process = store.build_model(tensors, meta)
    assert isinstance(process, ToyProcess) and torch.equal(process.scale, trainer.process.scale.detach().cpu())
    assert registry.family_of_process(process) is toy

    plan = toy.resolve_sampler("euler", "uniform_t", None, 4)
    x, _, info = registry.run_sampler(model, process, plan, [0, 1])
    assert x.shape == (2, 1, 8, 8) and info["nfe"] == 4 and torch.isfinite(x).all()
    with pytest.raises(ValueError, match="^solver: a toy model"):
        toy.resolve_sampler("heun", "uniform_t", None, 5)

    assets = tmp_path / "assets"
    assets.mkdir()
    (assets / "manifest.json").write_text('{"format": "aniso_fast.manifest/1", "models": {}}\n')
    monkeypatch.setenv(store.ASSETS_ENV, str(assets))
    store.export_model(path, "tiny-toy", net_dtype="float32")
    stored = store.StoredModel.open("tiny-toy")
    shipped, shipped_process = stored.load()
    assert stored.info["family"] == "toy" and json.loads((assets / "manifest.json").read_text())["models"]["tiny-toy"][
        "family"] == "toy"
    y, _, _ = registry.run_sampler(shipped, shipped_process, plan, [0, 1])
    assert torch.equal(x, y)

    png = tmp_path / "samples"
    assert sample_cli.main(["--model", "tiny-toy", "--nfe", "4", "--count", "2", "--outdir", str(png),
                            "--no-progress"]) == 0
    assert len(list(png.glob("tiny-toy_*_euler-euler_uniform_t_nfe4_seeds0-1.png"))) == 1

    resumed = train.run(train_config.parse_args([*map(str, [
        "--family", "toy", "--toy-sigma-max", "5", "--data", data, "--out", out, "--steps", "4", "--batch", "4",
        "--no-progress", "--sample-every", "0", "--basis", "iso", "--rampup-kimg", "0", "--resume"])]))
    assert resumed.step == 4


def _variant_argv(family, variant) -> list[str]:
    return ["--family", family.name, *([f"--{family.variant.replace('_', '-')}", variant] if family.variant else [])]


def test_every_family_option_is_refused_where_it_does_not_apply(tmp_path, toy):
    """Walk every (option, family, variant) of the registry: an option the family's variant takes is accepted with
    its example value, any other is a one-line error naming the option, and nothing is written."""
    out = tmp_path / "run"
    base = ["--data", str(tmp_path / "none.npz"), "--out", str(out)]
    checked = {"taken": 0, "refused": 0}
    for family in registry.FAMILIES.values():
        for variant in family.variants():
            for option, _ in registry.options().values():
                given = [option.flag, *option.example]
                if option.name == family.variant:
                    continue  # the variant option is the variant itself
                argv = base + _variant_argv(family, variant) + given
                cfg = train_config.config_from_argv(_variant_argv(family, variant) + base)
                if option.name in family.option_defaults(cfg):
                    train_config.config_from_argv(argv)
                    checked["taken"] += 1
                    continue
                with pytest.raises(ValueError) as err:
                    train_config.config_from_argv(argv)
                message = str(err.value)
                assert message.startswith(f"{option.flag}: only with --family ") and "\n" not in message, message
                assert f"got {option.flag}" in message and f"with --family {family.name}" in message, message
                checked["refused"] += 1
    assert not out.exists()
    assert checked["taken"] >= 20 and checked["refused"] >= 40, checked


@pytest.mark.parametrize("extra, option", [
    (["--family", "vsdm", "--vsdm-rule", "alternate", "--no-estimator"], "--no-estimator"),
    (["--family", "vsmd", "--loss-c", "0.3"], "--loss-c"),
    (["--family", "vsdm", "--reduction", "sum"], "--reduction"),
    (["--family", "vsmd", "--num-knots", "7"], "--num-knots"),
    (["--family", "vsmd", "--vsmd-head", "velocity", "--sample-nfe", "4"], "--sample-nfe"),
    (["--family", "vsmd", "--vsmd-head", "velocity", "--sample-nfe", "2"], "--sample-nfe"),
])
def test_the_issues_ignored_options_exit_2_before_anything_is_written(tmp_path, capsys, extra, option):
    """Issue 22: each of these trained silently (or failed after writing args.json and log.jsonl)."""
    data = make_npz(tmp_path / "tiny.npz")
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        train.main(["--data", str(data), "--out", str(out), "--steps", "1", "--batch", "4", "--no-progress", *extra])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {option}: ") and "\n" not in err, err
    assert not out.exists()
