"""Training CLI: options, validation before training, optimisation rules, outputs, the init chain.

Everything runs on 8x8 one-channel images with a SongUNet of 8 base channels for a handful of steps.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from aniso_fast.processes.core_family import STAGE_LOSSES
from aniso_fast.store import checkpoint as ckpt
from aniso_fast.training import checkpointing, optim
from aniso_fast.training import config as train_config
from aniso_fast.training import trainer as train
from aniso_fast.training.ema import ema_beta

from test_edm_pickle import fake_edm  # noqa: F401  (fixture: a small network pickle in EDM's format)

torch.set_num_threads(1)  # the test machine's cores are shared: one thread per process is much faster there
NET = ["--model-channels", "8", "--channel-mult", "1,2", "--attn-resolutions", "4"]


# ---- tiny data ----

def make_npz(path: Path, n: int = 24, classes: int = 3, size: int = 8, labels: bool = True, seed: int = 0,
             label_values=None) -> Path:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes if label_values is None else np.resize(np.asarray(label_values), n)
    base = np.linspace(0, 255, size * size).reshape(size, size)
    x = np.stack([np.roll(base, int(k) * 2, axis=1) for k in y]) + rng.normal(0, 20, (n, size, size))
    arrays = {"images": np.clip(x, 0, 255).astype(np.uint8)}
    if labels:
        arrays["labels"] = y.astype(np.int64)
    np.savez(path, **arrays)
    return path


@pytest.fixture
def npz(tmp_path) -> Path:
    return make_npz(tmp_path / "tiny.npz")


def argv(data, out, stage="aniso", steps=2, *extra):
    return ["--stage", stage, "--data", str(data), "--out", str(out), "--steps", str(steps), "--batch", "4",
            "--no-progress", "--sample-every", "0", "--snapshot-every", "0", "--rampup-kimg", "0", "--lr", "1e-3",
            *NET, *map(str, extra)]


def make_trainer(args_list) -> train.Trainer:
    return train.Trainer(train_config.parse_args(args_list))


# ---- pure pieces ----

def test_lr_factor_warms_up_completely_then_holds_then_halves():
    f = lambda kimg: optim.lr_factor(int(kimg * 1000), rampup_kimg=10, decay_start_kimg=600, decay_halflife_kimg=150)
    assert f(5) == pytest.approx(0.5)
    assert f(10) == 1.0 and f(300) == 1.0 and f(600) == 1.0  # the warm-up finishes (unlike METHOD §10.3)
    assert f(750) == pytest.approx(0.5) and f(900) == pytest.approx(0.25)
    assert optim.lr_factor(1, 0, math.inf, 1) == 1.0


def test_ema_beta_half_life_in_images_and_rampup():
    # after halflife / batch steps the initial weights keep half their weight
    beta = ema_beta(batch=100, nimg=10 ** 9, halflife_kimg=1.0)
    assert beta ** 10 == pytest.approx(0.5)
    # EDM's ramp-up: half-life limited to ratio x images seen
    assert ema_beta(100, nimg=1000, halflife_kimg=500, rampup_ratio=0.05) == pytest.approx(0.5 ** (100 / 50))


def test_class_masked_adam_is_adam_per_class_and_freezes_absent_classes():
    torch.manual_seed(0)
    psi = torch.nn.Parameter(torch.randn(3, 2, 5, dtype=torch.float64))
    ref = [torch.nn.Parameter(psi.detach()[s].clone()) for s in range(3)]
    opt = optim.ClassMaskedAdam([psi], lr=1e-2)
    refs = [torch.optim.Adam([p], lr=1e-2) for p in ref]
    plan = [[1, 1, 1], [1, 0, 1], [0, 0, 1], [1, 1, 1]]
    for present in plan:
        grad = torch.randn_like(psi)
        psi.grad = grad.clone()
        before = {k: v.clone() for k, v in opt.state[psi].items()} if opt.state[psi] else None
        psi_before = psi.detach().clone()
        opt.step(torch.tensor(present, dtype=torch.bool))
        for s, on in enumerate(present):
            if on:  # one torch Adam per class, stepped only when the class is present (METHOD §8)
                ref[s].grad = grad[s].clone()
                refs[s].step()
                torch.testing.assert_close(psi.detach()[s], ref[s].detach(), rtol=1e-13, atol=1e-15)
            else:
                assert torch.equal(psi.detach()[s], psi_before[s])
                for key in ("exp_avg", "exp_avg_sq", "step"):
                    assert torch.equal(opt.state[psi][key][s], before[key][s])
    assert opt.state[psi]["step"].tolist() == [3, 2, 4]


def test_help_documents_every_option():
    parser = train_config.build_parser()
    text = parser.format_help()
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{action.option_strings} has no help"
            assert action.option_strings[0] in text
    for opt in ("--stage", "--basis", "--dct-bands", "--pca-rank", "--pca-per", "--pca-clusters", "--class-schedules",
                "--init-from", "--edm-pickle", "--lr", "--glr", "--rampup-kimg", "--ema-halflife-kimg",
                "--ema-rampup-ratio", "--grad-accum", "--resume", "--sample-every"):
        assert opt in text


# ---- clear errors before any training step ----

@pytest.mark.parametrize("case, match", [
    ("missing", "does not exist"),
    ("malformed", "not a readable npz"),
    ("bands", "--dct-bands 9 does not fit 8x8"),
    ("nolabels", "--class-schedules needs class labels"),
    ("batch", "divisible by --grad-accum"),
    ("pca_nolabels", "--pca-per class needs class labels"),
])
def test_errors_before_training(tmp_path, npz, case, match):
    data, extra = npz, []
    if case == "missing":
        data = tmp_path / "nope.npz"
    elif case == "malformed":
        data = tmp_path / "bad.npz"
        data.write_bytes(b"not a zip file")
    elif case == "bands":
        extra = ["--dct-bands", "9"]
    elif case == "nolabels":
        data = make_npz(tmp_path / "unlabeled.npz", labels=False)
        extra = ["--class-schedules"]
    elif case == "batch":
        extra = ["--grad-accum", "3"]
    elif case == "pca_nolabels":
        data = make_npz(tmp_path / "unlabeled.npz", labels=False)
        extra = ["--basis", "pca", "--pca-rank", "4", "--pca-per", "class"]
    with pytest.raises(ValueError, match=match):
        make_trainer(argv(data, tmp_path / "run", "aniso", 1, *extra))
    assert not (tmp_path / "run").exists()


def test_cli_reports_errors_and_exit_code(tmp_path, capsys):
    assert train.main(argv(tmp_path / "nope.npz", tmp_path / "run")) == 2
    assert "error: --data" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.main(["--stage", "edm", "--data", "x.npz", "--out", str(tmp_path), "--class-schedules"])


@pytest.mark.parametrize("option, value", [
    ("--dropout", "2"),  # issue 10, defect 9: refused only after args.json and the log were written
    ("--dropout", "-0.1"), ("--lr", "nan"), ("--glr", "inf"), ("--kimg", "inf"), ("--num-knots", "1"),
    ("--ema-halflife-kimg", "nan"), ("--decay-start-kimg", "nan"), ("--decay-halflife-kimg", "inf"),
    ("--ema-rampup-ratio", "-1"), ("--seed", "-1"), ("--attn-resolutions", "x"), ("--channel-mult", "0"),
    ("--pca-rank", "0"), ("--plot-every", "-1"), ("--sample-nfe", "1"),
])
def test_every_option_is_checked_before_anything_is_written(tmp_path, npz, capsys, option, value):
    """Issue 10, defect 9: one line `error: --option: ...`, exit 2, nothing in --out; the API raises ValueError."""
    args = argv(npz, tmp_path / "run", "aniso", 2, "--basis", "pca", "--pca-rank", "2", option, value)
    with pytest.raises(SystemExit) as exit_:
        train.main(args)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith(f"error: {option}: ") and err.count("\n") == 1
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match=f"^{option}: "):
        train_config.config_from_argv(args)


def test_good_edge_values_are_accepted(tmp_path, npz):
    args = train_config.config_from_argv(argv(npz, tmp_path / "run", "aniso", 2, "--xflip", "--dropout", "0",
                                       "--decay-start-kimg", "inf", "--num-knots", "2", "--lr", "0"))
    assert args.xflip and args.decay_start_kimg == math.inf and args.steps == 2


@pytest.mark.parametrize("case", ["cuda", "bogus", "out_file", "out_under_file"])
def test_device_and_out_are_checked_before_any_work(tmp_path, npz, capsys, monkeypatch, case):
    """Issue 10, defect 8: these gave tracebacks (from torch.device, torch.cuda and mkdir)."""
    out, extra = tmp_path / "run", []
    if case == "cuda":  # CPU torch: no CUDA device at all; with GPUs, one past the last
        extra = ["--device", "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"]
    elif case == "bogus":
        extra = ["--device", "bogus"]
    else:
        (tmp_path / "file").write_text("keep me")
        out = tmp_path / "file" if case == "out_file" else tmp_path / "file" / "run"
    monkeypatch.setattr(train, "load_dataset", lambda spec: pytest.fail("the data was loaded"))
    with pytest.raises(SystemExit) as exit_:
        train.main(argv(npz, out, "iso", 1, *extra))
    err = capsys.readouterr().err
    option = "--out" if case.startswith("out") else "--device"
    assert exit_.value.code == 2 and err.startswith(f"error: {option}: expected") and err.count("\n") == 1
    assert (tmp_path / "file").read_text() == "keep me" if case.startswith("out") else not out.exists()


def test_labels_out_of_range_are_refused_before_training(tmp_path, capsys):
    """Issue 10, defect 3: one label of 1000000 built a 1,000,001-class network and a 128 MB checkpoint."""
    data = make_npz(tmp_path / "huge.npz", label_values=[0, 1, 2, 1_000_000])
    assert train.main(argv(data, tmp_path / "run", "iso", 1)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --data {data}: ") and "0..K-1" in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


# ---- training ----

def test_aniso_class_schedules_writes_log_samples_plot_checkpoint(tmp_path, npz):
    out = tmp_path / "run"
    trainer = train.run(train_config.parse_args(argv(npz, out, "aniso", 2, "--class-schedules", "--sample-every", "2",
                                              "--sample-n", "3", "--sample-nfe", "3", "--grad-accum", "2")))
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    for key in ("kimg", "loss", "lr", "glr", "grad_norm_net", "grad_norm_schedule", "nonfinite_net",
                "nonfinite_schedule", "sec_per_step", "classes_present"):
        assert key in records[-1]
    assert all(math.isfinite(r["loss"]) for r in records)
    assert records[-1]["kimg"] == pytest.approx(0.008)
    from PIL import Image

    assert Image.open(out / "samples-00000002.png").size == (3 * 8, 8)
    assert (out / "schedule-00000002.png").stat().st_size > 0
    tensors, meta = ckpt.load_checkpoint(out / "checkpoint-00000002.safetensors")
    assert meta["step"] == 2 and meta["schedule_config"]["num_classes"] == 3
    assert torch.equal(tensors["schedule.psi"], trainer.process.psi.detach())


def test_absent_class_keeps_schedule_and_adam_state_bit_identical(tmp_path, npz):
    trainer = make_trainer(argv(npz, tmp_path / "run", "aniso", 2, "--class-schedules"))
    labels = trainer.data.labels
    trainer.train_step(torch.tensor([0, 1, 2, 3]))  # classes 0, 1, 2, 0: every class moves
    state = trainer.opt_process.state[trainer.process.psi]
    psi0 = trainer.process.psi.detach().clone()
    before = {k: v.clone() for k, v in state.items()}
    batch = torch.nonzero(labels != 2).flatten()[:4]
    record = trainer.train_step(batch)  # class 2 absent
    assert record["classes_present"] == 2
    psi1 = trainer.process.psi.detach()
    assert torch.equal(psi1[2], psi0[2])
    assert not torch.equal(psi1[0], psi0[0]) and not torch.equal(psi1[1], psi0[1])
    for key in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(state[key][2], before[key][2]), key
    assert state["step"].tolist() == [2, 2, 1]


def test_nonfinite_gradients_are_sanitised_and_counted(tmp_path, npz, monkeypatch):
    base = STAGE_LOSSES["iso"]
    poison = torch.tensor([float("nan"), float("inf"), -float("inf")])

    def poisoned(model, schedule, x0, labels, **kw):
        loss, stats = base(model, schedule, x0, labels, **kw)
        p = next(model.parameters())
        return loss + (p.flatten()[:3] * poison).sum(), stats

    monkeypatch.setitem(STAGE_LOSSES, "iso", poisoned)
    trainer = make_trainer(argv(npz, tmp_path / "run", "iso", 1))
    record = trainer.train_step()
    assert record["nonfinite_net"] == 3 and record["nonfinite_schedule"] == 0
    assert all(torch.isfinite(p).all() for p in trainer.net.parameters())
    assert math.isfinite(record["grad_norm_net"]) and record["grad_norm_net"] >= 1e5


def test_run_ends_with_a_summary_line(tmp_path, npz, capsys):
    """Issue 10, defect 9: train printed nothing at the end."""
    out = tmp_path / "run"
    train.main(argv(npz, out, "iso", 2))
    loss = json.loads((out / "log.jsonl").read_text().splitlines()[-1])["loss"]
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].startswith(f"done: step 2 of 2, 0.008 kimg, final loss {loss:.4g}, ")
    assert lines[-1].endswith(f" s, last checkpoint {out / 'checkpoint-00000002.safetensors'}")


def test_resume_may_extend_the_run(tmp_path, npz):
    """Issue 10, defect 2: the decay defaults derived from --steps/--kimg made any longer run a config mismatch."""
    out = tmp_path / "run"
    train.run(train_config.parse_args(argv(npz, out, "iso", 6)))
    trainer = train.run(train_config.parse_args(argv(npz, out, "iso", 8, "--resume")))
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert trainer.step == 8 and [r["step"] for r in records] == list(range(1, 9))
    assert ckpt.read_meta(ckpt.latest_checkpoint(out))["step"] == 8
    # the derived defaults follow the new length: decay from 0.016 kimg with a half-life of 0.004 kimg
    assert records[-1]["lr"] == pytest.approx(1e-3 * 0.5 ** ((32 - 16) / 4))
    with pytest.raises(ckpt.CheckpointError, match="decay_start_kimg: checkpoint has None, this run has 1.0"):
        make_trainer(argv(npz, out, "iso", 10, "--resume", "--decay-start-kimg", "1"))
    # a checkpoint written before derived defaults were stored as None holds their values
    path = ckpt.latest_checkpoint(out)
    tensors, meta = ckpt.load_checkpoint(path)
    meta["args"].update(decay_start_kimg=meta["args"]["kimg"] / 2, decay_halflife_kimg=meta["args"]["kimg"] / 8)
    ckpt.save_checkpoint(path, tensors, meta)
    assert make_trainer(argv(npz, out, "iso", 10, "--resume")).step == 8


def test_init_chain_copies_network_ema_and_schedule(tmp_path, npz):
    """METHOD §2.2: edm -> iso (tied) -> aniso per class: a tied schedule to every subspace, global to every class."""
    train.run(train_config.parse_args(argv(npz, tmp_path / "edm", "edm", 1)))
    iso = train.run(train_config.parse_args(argv(npz, tmp_path / "iso", "iso", 2, "--init-from",
                                          tmp_path / "edm" / "checkpoint-00000001.safetensors")))
    iso_ckpt = tmp_path / "iso" / "checkpoint-00000002.safetensors"
    ani = make_trainer(argv(npz, tmp_path / "ani", "aniso", 1, "--class-schedules", "--dct-bands", "2,4",
                            "--init-from", iso_ckpt))
    psi = iso.process.psi.detach()  # [1, 1, 31]
    assert psi.shape == (1, 1, 31) and ani.process.psi.shape == (3, 3, 31)
    assert torch.equal(ani.process.psi.detach(), psi.expand(3, 3, -1))
    # the trained network and its EMA both start from the source's EMA (the paper fine-tunes the published EMA)
    for a, b in zip(ani.net.state_dict().values(), iso.ema.module.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(ani.ema.module.state_dict().values(), iso.ema.module.state_dict().values()):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(iso.net.state_dict().values(),
                                                      iso.ema.module.state_dict().values()))
    raw = make_trainer(argv(npz, tmp_path / "raw", "aniso", 1, "--init-from", iso_ckpt, "--init-weights", "net"))
    for a, b in zip(raw.net.state_dict().values(), iso.net.state_dict().values()):
        assert torch.equal(a, b)
    # a per-class schedule cannot become a global one
    ani_out = tmp_path / "ani2"
    train.run(train_config.parse_args(argv(npz, ani_out, "aniso", 1, "--class-schedules", "--init-from", iso_ckpt)))
    with pytest.raises(ValueError, match="cannot become a global one"):
        make_trainer(argv(npz, tmp_path / "ani3", "aniso", 1, "--init-from",
                          ani_out / "checkpoint-00000001.safetensors"))


def test_init_from_a_shipped_model(tmp_path, npz, monkeypatch):
    """--init-from takes a shipped model (its name or file): network and EMA from its EMA, schedule copied."""
    from aniso_fast import store

    monkeypatch.setenv(store.ASSETS_ENV, str(tmp_path / "assets"))
    iso = train.run(train_config.parse_args(argv(npz, tmp_path / "iso", "iso", 2)))
    path = store.export_model(tmp_path / "iso" / "checkpoint-00000002.safetensors", "tiny-iso", net_dtype="float32")
    for source in ("tiny-iso", str(path)):
        ani = make_trainer(argv(npz, tmp_path / f"ani-{len(source)}", "aniso", 1, "--init-from", source))
        assert torch.equal(ani.process.psi.detach(), iso.process.psi.detach().expand(1, 2, -1))
        for a, b in zip(ani.net.state_dict().values(), iso.ema.module.state_dict().values()):
            assert torch.equal(a, b)
    with pytest.raises(ValueError, match="holds only the EMA network"):
        make_trainer(argv(npz, tmp_path / "ani-raw", "aniso", 1, "--init-from", "tiny-iso", "--init-weights", "net"))
    with pytest.raises(ValueError, match="--init-from no-such-model"):
        make_trainer(argv(npz, tmp_path / "ani-missing", "aniso", 1, "--init-from", "no-such-model"))


def test_edm_stage_keeps_the_karras_schedule_frozen(tmp_path, npz):
    from aniso_fast.geometry.schedules import MatrixSchedule

    trainer = train.run(train_config.parse_args(argv(npz, tmp_path / "edm", "edm", 2)))
    assert trainer.opt_process is None and not trainer.process.psi.requires_grad
    assert torch.equal(trainer.process.psi.detach(), MatrixSchedule(1, tied=True).psi.detach())


@pytest.mark.parametrize("per, groups", [("class", 3), ("cluster", 2)])
def test_pca_basis_per_class_or_cluster(tmp_path, npz, per, groups):
    trainer = train.run(train_config.parse_args(argv(npz, tmp_path / "pca", "aniso", 1, "--basis", "pca",
                                                     "--pca-rank", "3,2", "--pca-per", per, "--pca-clusters", "2")))
    assert trainer.basis.num_groups == groups and trainer.process.num_subspaces == 3
    tensors, meta = ckpt.load_checkpoint(tmp_path / "pca" / "checkpoint-00000001.safetensors")
    assert meta["basis_config"]["type"] == "pca" and tensors["basis.V64"].shape == (groups, 5, 64)
    assert torch.equal(tensors["basis.V64"], trainer.basis.V64)


def test_edm_pickle_starts_network_and_ema(tmp_path, fake_edm):
    write, _ = fake_edm
    pkl = tmp_path / "edm.pkl"
    src = write(pkl)
    rgb = tmp_path / "rgb32.npz"
    rng = np.random.default_rng(0)
    np.savez(rgb, images=rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8), labels=np.arange(20) % 10)
    trainer = make_trainer(argv(rgb, tmp_path / "run", "iso", 1, "--edm-pickle", pkl))
    for k, v in src.state_dict().items():
        assert torch.equal(trainer.net.state_dict()[k], v) and torch.equal(trainer.ema.module.state_dict()[k], v)
    assert trainer.net.training and not trainer.ema.module.training
    trainer.train_step()
    with pytest.raises(ValueError, match=r"the network is for 3x32x32 images, the data is 1x8x8"):
        make_trainer(argv(make_npz(tmp_path / "small.npz", classes=10), tmp_path / "run2", "iso", 1,
                          "--edm-pickle", pkl))


def test_resuming_an_older_checkpoint_starts_a_branch_that_keep_and_latest_follow(tmp_path, npz):
    """Issue 22: after a 6-step run with checkpoints 2, 4, 6, `--steps 3 --snapshot-every 1 --keep 2 --resume
    <out>/checkpoint-00000002` keeps its own step-3 checkpoint (the abandoned branch's 4 and 6 are moved aside), and
    the next plain --resume continues from step 3: the log holds steps 1-6 once each, and the branch ends where an
    uninterrupted run does."""
    out = tmp_path / "run"
    common = ["--decay-start-kimg", "inf"]
    train.run(train_config.parse_args(argv(npz, out, "iso", 6, "--snapshot-every", "2", *common)))
    assert [p.name for p in ckpt.list_checkpoints(out)] == [f"checkpoint-0000000{s}.safetensors" for s in (2, 4, 6)]
    straight = ckpt.load_checkpoint(out / "checkpoint-00000006.safetensors")[0]

    branch = train.run(train_config.parse_args(argv(npz, out, "iso", 3, "--snapshot-every", "1", "--keep", "2", *common,
                                                    "--resume", out / "checkpoint-00000002.safetensors")))
    assert branch.step == 3
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-00000002.safetensors",
                                                            "checkpoint-00000003.safetensors"]
    abandoned = out / "abandoned-00000002"
    assert sorted(p.name for p in abandoned.iterdir()) == ["checkpoint-00000004.safetensors",
                                                           "checkpoint-00000006.safetensors"]

    resumed = train.run(train_config.parse_args(argv(npz, out, "iso", 6, "--snapshot-every", "2", *common,
                                                     "--resume")))
    assert resumed.resume_path == out / "checkpoint-00000003.safetensors" and resumed.step == 6
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    final = ckpt.load_checkpoint(ckpt.latest_checkpoint(out))[0]
    assert final.keys() == straight.keys()
    for key in final:
        if not key.startswith("rng."):
            assert torch.equal(final[key], straight[key]), key


def test_keep_never_deletes_the_checkpoint_just_written(tmp_path, npz):
    """A stale later checkpoint in --out (sorting after this run's) does not make --keep delete this run's own."""
    out = tmp_path / "run"
    train.run(train_config.parse_args(argv(npz, out, "iso", 1, "--snapshot-every", "1")))
    ckpt.save_checkpoint(ckpt.checkpoint_path(out, 9), *ckpt.load_checkpoint(out / "checkpoint-00000001.safetensors"))
    tensors, meta = ckpt.load_checkpoint(out / "checkpoint-00000001.safetensors")
    path = checkpointing.save(out, 2, tensors, meta, keep=1)
    assert path.exists() and (out / "checkpoint-00000009.safetensors").exists()
