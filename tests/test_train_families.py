"""`python -m aniso_fast.train --family vsdm|vsmd`: options, both VSDM rules, resume, DDP, checkpoints that build,
export and sample as their family.

Tiny runs on 8x8 one-channel images (tests/test_train.py's data and network) for a handful of steps.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from aniso_fast.store import checkpoint as ckpt
from aniso_fast import store
from aniso_fast.training import config as train_config
from aniso_fast.training import trainer as train
from aniso_fast.processes import phase_space, vsdm
from aniso_fast.processes.vsdm import VSDMProcess

from test_ddp import _free_port
from test_train import NET, make_npz

torch.set_num_threads(1)
FORWARD = ["--forward-every", "2", "--forward-paths", "2", "--forward-path-steps", "3", "--forward-steps", "2"]


@pytest.fixture
def npz(tmp_path):
    return make_npz(tmp_path / "tiny.npz")


def fam_argv(data, out, family="vsdm", steps=4, *extra) -> list[str]:
    return ["--family", family, "--data", str(data), "--out", str(out), "--steps", str(steps), "--batch", "4",
            "--no-progress", "--sample-every", "0", "--snapshot-every", "0", "--rampup-kimg", "0", "--lr", "1e-3",
            "--basis", "dct", "--dct-bands", "3", *NET, *map(str, extra)]


def _process_state(trainer: train.Trainer) -> dict:
    out = {f"net.{k}": v.detach().clone() for k, v in trainer.net.state_dict().items()}
    out["process"] = trainer.process_param.detach().clone()
    return out


@pytest.mark.parametrize("argv, match", [
    (["--stage", "aniso", "--family", "vsdm"], "--stage: only with --family core"),
    (["--family", "core"], "--stage: required with --family core"),
    (["--family", "vsmd", "--vsdm-rule", "alternate"], "--vsdm-rule: only with --family vsdm"),
    (["--family", "vsmd", "--zeta", "0"], r"--zeta: expected a damping ratio in \(0, 1\]"),
    (["--family", "vsmd", "--zeta", "1.01"], "--zeta"),
    (["--family", "vsmd", "--zeta", "nan"], "--zeta"),
    (["--family", "vsdm", "--zeta", "1"], "--zeta: only with --family vsmd, got --zeta 1.0 with --family vsdm"),
    (["--family", "vsdm", "--beta-max", "0"], "--beta-max: expected a finite number > 0"),
    (["--family", "vsdm", "--beta-max", "inf"], "--beta-max"),
    (["--family", "vsdm", "--forward-every", "0"], "--forward-every"),
    (["--family", "vsdm", "--vsdm-rule", "trajectory", "--forward-every", "5"],
     "--forward-every: only with --family vsdm --vsdm-rule alternate or --family vsmd, got --forward-every 5"),
    (["--family", "vsmd", "--forward-paths", "0"], "--forward-paths"),
    (["--family", "vsdm", "--vsmd-head", "denoiser"], "--vsmd-head: only with --family vsmd"),
    (["--family", "vsmd", "--sigma-data", "0.5"], "--sigma-data: only with --family vsmd --vsmd-head velocity, "
                                                  "got --sigma-data 0.5 with --family vsmd --vsmd-head denoiser"),
    (["--family", "vsdm", "--sb-zeta", "-1"], "--sb-zeta"),
])
def test_family_options_are_checked_before_any_work(tmp_path, argv, match):
    """Issue 12/13 bad input: each option only where it applies, in range; nothing is read or written."""
    base = ["--data", str(tmp_path / "none.npz"), "--out", str(tmp_path / "run")]
    with pytest.raises(ValueError, match=match):
        train_config.config_from_argv(base + argv)
    assert not (tmp_path / "run").exists()


def test_family_defaults():
    a = train_config.config_from_argv(["--family", "vsdm", "--data", "x", "--out", "/tmp/never-written"])
    assert (a.vsdm_rule, a.beta_max, a.forward_every, a.forward_paths, a.sb_zeta, a.basis) == \
        ("alternate", 20.0, 50, 64, 0.75, "dct")
    b = train_config.config_from_argv(["--family", "vsmd", "--data", "x", "--out", "/tmp/never-written"])
    assert (b.beta_max, b.zeta, b.vsdm_rule, b.vsmd_head, b.sigma_data) == (10.0, 1.0, None, "denoiser", None)
    c = train_config.config_from_argv(["--family", "vsdm", "--vsdm-rule", "trajectory", "--data", "x", "--out", "/t/n"])
    assert (c.forward_every, c.loss_c, c.reduction) == (None, 0.5, "sum")


def test_vsdm_alternate_moves_the_rates_only_in_forward_updates(tmp_path, npz):
    """Rule (a): DSM steps leave the rates bit-identical; each forward update moves them; logged as forward_loss."""
    args = train_config.parse_args(fam_argv(npz, tmp_path / "run", "vsdm", 3, *FORWARD, "--glr", "1e-2"))
    trainer = train.Trainer(args)
    start = trainer.process_param.detach().clone()
    record = trainer.train_step()  # step 1: no forward update
    assert torch.equal(trainer.process_param, start) and "forward_loss" not in record
    record = trainer.train_step()  # step 2: the forward update
    assert "forward_loss" in record and torch.isfinite(torch.tensor(record["forward_loss"]))
    moved = trainer.process_param.detach().clone()
    assert not torch.equal(moved, start)
    trainer.train_step()
    assert torch.equal(trainer.process_param, moved)


def test_vsdm_trajectory_rule_learns_rates_with_the_network(tmp_path, npz):
    """Rule (b): the trajectory loss with the estimator on the VE view moves the rates at every step."""
    args = train_config.parse_args(fam_argv(npz, tmp_path / "run", "vsdm", 2, "--vsdm-rule", "trajectory",
                                            "--glr", "1e-2"))
    trainer = train.Trainer(args)
    start = trainer.process_param.detach().clone()
    record = trainer.train_step()
    assert record["grad_norm_schedule"] > 0 and not torch.equal(trainer.process_param, start)


@pytest.mark.parametrize("family", ["vsdm", "vsmd"])
def test_resume_is_bit_identical(tmp_path, npz, family):
    """4 steps in one go == 2 steps, then --resume to 4 (forward updates at steps 2 and 4 included)."""
    common = [*FORWARD, "--glr", "1e-2", "--snapshot-every", "2", "--decay-start-kimg", "inf"]  # lr set by step
    full = train.run(train_config.parse_args(fam_argv(npz, tmp_path / "a", family, 4, *common)))
    train.run(train_config.parse_args(fam_argv(npz, tmp_path / "b", family, 2, *common)))
    resumed = train.run(train_config.parse_args(fam_argv(npz, tmp_path / "b", family, 4, *common, "--resume")))
    a, b = _process_state(full), _process_state(resumed)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_a_vsmd_checkpoint_from_before_vsmd_head_resumes_as_the_velocity_head(tmp_path, npz):
    """Checkpoints written before --vsmd-head hold VSMD's velocity head and no `vsmd_head` argument: they resume
    with --vsmd-head velocity, and the default (denoiser) is named as the mismatch."""
    train.run(train_config.parse_args(fam_argv(npz, tmp_path / "run", "vsmd", 1, "--vsmd-head", "velocity")))
    path = ckpt.latest_checkpoint(tmp_path / "run")
    tensors, meta = ckpt.load_checkpoint(path)
    del meta["args"]["vsmd_head"]
    path.unlink()
    ckpt.save_checkpoint(path, tensors, meta)
    with pytest.raises(ckpt.CheckpointError, match="vsmd_head: checkpoint has 'velocity', this run has 'denoiser'"):
        train.run(train_config.parse_args(fam_argv(npz, tmp_path / "run", "vsmd", 2, "--resume")))
    trainer = train.run(train_config.parse_args(fam_argv(npz, tmp_path / "run", "vsmd", 2, "--resume",
                                                  "--vsmd-head", "velocity")))
    assert trainer.step == 2


def test_vsdm_checkpoint_builds_exports_and_samples(tmp_path, npz, monkeypatch):
    """The checkpoint names its family; build_model gives the VSDM process; the export keeps it; the PF-ODE and
    Euler-Maruyama samplers run on the shipped file."""
    train.run(train_config.parse_args(fam_argv(npz, tmp_path / "run", "vsdm", 2, *FORWARD, "--class-schedules")))
    path = ckpt.latest_checkpoint(tmp_path / "run")
    tensors, meta = ckpt.load_checkpoint(path)
    assert meta["family"] == "vsdm" and meta["stage"] is None
    model, process = store.build_model(tensors, meta)
    assert isinstance(process, VSDMProcess) and process.num_classes == 3
    assets = tmp_path / "assets"
    assets.mkdir()
    (assets / "manifest.json").write_text('{"format": "aniso_fast.manifest/1", "models": {}}\n')
    monkeypatch.setenv(store.ASSETS_ENV, str(assets))
    store.export_model(path, "tiny-vsdm")
    assert store.shipped_models()["tiny-vsdm"]["family"] == "vsdm"
    stored = store.StoredModel.open("tiny-vsdm")
    model, process = stored.load()
    assert isinstance(process, VSDMProcess) and stored.info["family"] == "vsdm"
    x, labels, _ = vsdm.sample_ode(process, model, [0, 1], 5)
    y, _, _ = vsdm.sample_em(process, model, [0, 1], 4)
    assert x.shape == y.shape == (2, 1, 8, 8) and torch.isfinite(x).all() and torch.isfinite(y).all()


def test_vsmd_starts_from_a_core_network_with_its_phase_space_twin(tmp_path, npz):
    """--family vsmd --init-from a core checkpoint: the network and its EMA become VelocityScoreNets whose x weights
    are the source's (velocity inputs zero); c starts at 0 and the alternating rule moves it."""
    from aniso_fast.processes.velocity import VelocityScoreNet
    from aniso_fast.processes.vsmd import VSMDProcess

    core = ["--stage", "edm", "--data", str(npz), "--out", str(tmp_path / "edm"), "--steps", "1", "--batch", "4",
            "--no-progress", "--sample-every", "0", *NET]
    train.run(train_config.parse_args(core))
    source = ckpt.latest_checkpoint(tmp_path / "edm")
    args = train_config.parse_args(fam_argv(npz, tmp_path / "run", "vsmd", 2, *FORWARD, "--init-from", source,
                                     "--vsmd-head", "velocity"))
    trainer = train.Trainer(args)
    assert isinstance(trainer.net, VelocityScoreNet) and isinstance(trainer.ema.module, VelocityScoreNet)
    assert isinstance(trainer.process, VSMDProcess)
    ema = ckpt.strip_prefix("ema", ckpt.load_checkpoint(source)[0])
    conv = "enc.8x8_conv.weight"
    torch.testing.assert_close(trainer.ema.module.net.state_dict()[conv][:, :1], ema[conv])
    assert not trainer.ema.module.net.state_dict()[conv][:, 1:].any()
    trainer.train_step()
    record = trainer.train_step()
    assert "forward_loss" in record and trainer.process.c.abs().max() > 0


def test_vsmd_denoiser_head_starts_from_the_core_network_unchanged(tmp_path, npz):
    """--family vsmd (the denoiser head by default) --init-from a core checkpoint: the network and its EMA are the
    source's C-channel SongUNet as they are, inside phase_space.VSMDDenoiser, and the shipped model rebuilds it."""
    from aniso_fast.processes.phase_space import VSMDDenoiser

    core = ["--stage", "edm", "--data", str(npz), "--out", str(tmp_path / "edm"), "--steps", "1", "--batch", "4",
            "--no-progress", "--sample-every", "0", *NET]
    train.run(train_config.parse_args(core))
    source = ckpt.latest_checkpoint(tmp_path / "edm")
    args = train_config.parse_args(fam_argv(npz, tmp_path / "run", "vsmd", 2, *FORWARD, "--init-from", source))
    trainer = train.Trainer(args)
    assert isinstance(trainer.loss_model, VSMDDenoiser) and trainer.precond_config == {"head": "denoiser"}
    ema = ckpt.strip_prefix("ema", ckpt.load_checkpoint(source)[0])
    for name, value in trainer.ema.module.state_dict().items():
        torch.testing.assert_close(value, ema[name])
    trainer.train_step()
    record = trainer.train_step()
    assert "forward_loss" in record and trainer.process.c.abs().max() > 0
    trainer.save_checkpoint()
    model, _ = store.build_model(*ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "run")))
    assert isinstance(model, VSMDDenoiser)


def test_init_from_refuses_a_family_it_cannot_start_from(tmp_path, npz):
    """A VSDM checkpoint cannot start a core or VSMD run (only a core network starts another family)."""
    train.run(train_config.parse_args(fam_argv(npz, tmp_path / "run", "vsdm", 1)))
    path = ckpt.latest_checkpoint(tmp_path / "run")
    argv = ["--stage", "iso", "--data", str(npz), "--out", str(tmp_path / "core"), "--init-from", str(path)]
    with pytest.raises(ValueError, match="a vsdm model cannot start a --family core run"):
        train.Trainer(train_config.parse_args(argv))


def _rank(rank: int, world: int, port: int, args: list, result: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    torch.save(_process_state(train.run(train_config.parse_args(args))), f"{result}.rank{rank}.pt")


@pytest.mark.parametrize("family", ["vsdm", "vsmd"])
def test_alternating_rule_under_ddp_matches_one_process(tmp_path, npz, family):
    """Two gloo ranks (each simulating half of the forward paths) end identical, and equal one process with twice
    the accumulation, up to summation order: the forward update's gradient is averaged over ranks."""
    common = ["--grad-accum", "2", *FORWARD, "--glr", "1e-2", "--class-schedules", "--device", "cpu"]
    mp.start_processes(_rank, args=(2, _free_port(), fam_argv(npz, tmp_path / "ddp", family, 2, *common),
                                    str(tmp_path / "ddp")), nprocs=2, start_method="fork")
    r0, r1 = (torch.load(tmp_path / f"ddp.rank{r}.pt") for r in range(2))
    common[1] = "4"
    single = _process_state(train.run(train_config.parse_args(fam_argv(npz, tmp_path / "one", family, 2, *common))))
    for name in r0:
        assert torch.equal(r0[name], r1[name]), name
        # float32 summation order only: VSDM's DSM weights beta / sigma^2 make the gradients large (max |diff|
        # measured 2e-7 on weights of size 0.1; the process parameter agrees to 1e-8)
        torch.testing.assert_close(r0[name], single[name], rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(single["process"], torch.zeros_like(single["process"])), "the process did not move"


def test_pixel_basis_gives_one_rate_per_pixel(tmp_path, npz):
    """--basis pixel: K = C*H*W subspaces, and scaling by per-subspace values is the elementwise product (VSDM's
    image code: one OU rate per pixel)."""
    from aniso_fast.geometry.bases import PCABasis

    basis = PCABasis.pixels((2, 3, 3))
    x = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    s = torch.rand(4, basis.num_subspaces, dtype=torch.float64)
    assert basis.num_subspaces == 18
    torch.testing.assert_close(basis.scale(x, s), x * s.reshape(4, 2, 3, 3))
    args = train_config.parse_args(fam_argv(npz, tmp_path / "run", "vsdm", 1, "--basis", "pixel"))
    trainer = train.Trainer(args)
    assert trainer.process.rates.shape == (1, 64)


def test_vsdm_sample_ode_takes_the_families_sampler_rule(tmp_path, npz):
    """vsdm.sample_ode called directly refuses what the vsdm family's `check_sampler` refuses (the Karras grid ignores the
    process), with the same one-line error."""
    train.run(train_config.parse_args(fam_argv(npz, tmp_path / "run", "vsdm", 1)))
    model, process = store.build_model(*ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "run")))
    with pytest.raises(ValueError, match="^grid: 'karras' ignores the process"):
        vsdm.sample_ode(process, model, [0], 5, grid="karras")


def test_vsmd_checkpoint_and_export_keep_the_gaussian_skip(tmp_path, npz, monkeypatch):
    """--sigma-data reaches VSMDPrecond in training, in the checkpoint and in the shipped file (0: VSMD's form);
    the shipped model samples with Heun and Euler-Maruyama."""
    from aniso_fast.processes import vsmd

    for sigma, expect in (("0.7", 0.7), ("0", None)):
        out = tmp_path / f"run{sigma}"
        trainer = train.run(train_config.parse_args(fam_argv(npz, out, "vsmd", 1, "--vsmd-head", "velocity",
                                                      "--sigma-data", sigma)))
        assert trainer.loss_model.sigma_data == expect
        tensors, meta = ckpt.load_checkpoint(ckpt.latest_checkpoint(out))
        assert store.build_model(tensors, meta)[0].sigma_data == expect
    assets = tmp_path / "assets"
    assets.mkdir()
    (assets / "manifest.json").write_text('{"format": "aniso_fast.manifest/1", "models": {}}\n')
    monkeypatch.setenv(store.ASSETS_ENV, str(assets))
    store.export_model(ckpt.latest_checkpoint(tmp_path / "run0.7"), "tiny-vsmd")
    stored = store.StoredModel.open("tiny-vsmd")
    model, process = stored.load()
    assert model.sigma_data == 0.7 and stored.info["family"] == "vsmd"
    x, _, _ = phase_space.sample_ode(process, model, [0, 1], 5)
    y, _, _ = vsmd.sample_em(process, model, [0, 1], 4)
    assert x.shape == y.shape == (2, 1, 8, 8) and torch.isfinite(x).all() and torch.isfinite(y).all()
