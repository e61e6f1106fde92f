"""Checkpoints: format round trip, corrupt files, crashes during writes, bit-identical resume after SIGKILL."""
from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from aniso_fast.store import checkpoint as ckpt
from aniso_fast.training import config as train_config
from aniso_fast.training import trainer as train

from test_train import argv, make_npz, make_trainer

torch.set_num_threads(1)
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def _tensors(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    return {"net.w": torch.randn(3, 4, generator=g), "optim.net.state.0.step": torch.tensor(float(step)),
            "basis.empty": torch.zeros(0, dtype=torch.long), "rng.0.torch": torch.arange(256, dtype=torch.uint8),
            "half": torch.randn(5, generator=g).to(torch.bfloat16)}


def test_round_trip_and_listing(tmp_path):
    for step in (3, 12, 7):
        ckpt.save_checkpoint(ckpt.checkpoint_path(tmp_path, step), _tensors(step), {"step": step, "x": [1, 2]})
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == [
        "checkpoint-00000003.safetensors", "checkpoint-00000007.safetensors", "checkpoint-00000012.safetensors"]
    tensors, meta = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path))
    assert meta["step"] == 12 and meta["x"] == [1, 2]
    for k, v in _tensors(12).items():
        assert torch.equal(tensors[k], v) and tensors[k].dtype == v.dtype


def test_optimizer_state_flattens_and_restores_exactly():
    p = torch.nn.Parameter(torch.randn(4))
    opt = torch.optim.Adam([p], lr=0.1)
    p.grad = torch.randn(4)
    opt.step()
    t, info = ckpt.flatten_optimizer_state("optim.net", opt.state_dict())
    info = json.loads(json.dumps(info))
    opt2 = torch.optim.Adam([torch.nn.Parameter(p.detach().clone())], lr=0.5)
    opt2.load_state_dict(ckpt.unflatten_optimizer_state("optim.net", t, info))
    a, b = opt.state_dict(), opt2.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for key in ("step", "exp_avg", "exp_avg_sq"):
        assert torch.equal(a["state"][0][key], b["state"][0][key])


@pytest.mark.parametrize("damage", ["truncate_tail", "truncate_header", "flip_byte", "empty", "garbage"])
def test_damaged_file_gives_a_clear_error_and_is_left_alone(tmp_path, damage):
    path = ckpt.save_checkpoint(ckpt.checkpoint_path(tmp_path, 1), _tensors(1), {"step": 1})
    data = bytearray(path.read_bytes())
    if damage == "truncate_tail":
        data = data[:-7]
    elif damage == "truncate_header":
        data = data[:40]
    elif damage == "flip_byte":
        data[-3] ^= 0xFF
    elif damage == "empty":
        data = bytearray()
    else:
        data = bytearray(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    path.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="checkpoint-00000001.safetensors: (truncated|corrupt)"):
        ckpt.load_checkpoint(path)
    assert path.read_bytes() == bytes(data)


@pytest.mark.parametrize("fail_at", ["write", "fsync", "replace"])
def test_crash_inside_the_writer_keeps_the_previous_checkpoint(tmp_path, monkeypatch, fail_at):
    ckpt.save_checkpoint(ckpt.checkpoint_path(tmp_path, 1), _tensors(1), {"step": 1})
    target = ckpt.checkpoint_path(tmp_path, 2)
    ckpt.save_checkpoint(target, _tensors(99), {"step": 99})  # an older file under the same name

    class Crash(Exception):
        pass

    def boom(*a, **k):
        raise Crash(fail_at)

    if fail_at == "write":
        real_fdopen = os.fdopen

        class HalfWriter:  # writes half of the bytes, then crashes
            def __init__(self, f):
                self.f = f

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()

            def write(self, b):
                self.f.write(b[: len(b) // 2])
                self.f.flush()
                boom()

        def fdopen(fd, mode="r", *a, **k):
            return HalfWriter(real_fdopen(fd, mode, *a, **k))

        monkeypatch.setattr(ckpt.os, "fdopen", fdopen)
    else:
        monkeypatch.setattr(ckpt.os, fail_at, boom)
    with pytest.raises(Crash):
        ckpt.save_checkpoint(target, _tensors(2), {"step": 2})
    monkeypatch.undo()
    assert ckpt.load_checkpoint(ckpt.checkpoint_path(tmp_path, 1))[1]["step"] == 1
    assert ckpt.load_checkpoint(target)[1]["step"] == 99  # the old complete file, not half of the new one
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint-00000001.safetensors", "checkpoint-00000002.safetensors"]  # no temporary left behind


def _write_forever(out: str, start: int) -> None:
    for step in range(start, start + 10 ** 6):
        t = {"a": torch.full((1_000_000,), float(step)), "b": torch.arange(step % 7 + 1)}
        ckpt.save_checkpoint(ckpt.checkpoint_path(out, step), t, {"step": step})
        for old in ckpt.list_checkpoints(out)[:-2]:
            old.unlink()


def test_sigkill_at_random_moments_during_writes_leaves_a_loadable_checkpoint(tmp_path):
    """A forked writer (4 MB checkpoints, fsync, rotation) is SIGKILLed at random moments, five times."""
    rng = random.Random(0)
    out = tmp_path / "ckpts"
    out.mkdir()
    fork = multiprocessing.get_context("fork")
    for round_ in range(5):
        before = len(ckpt.list_checkpoints(out))
        proc = fork.Process(target=_write_forever, args=(str(out), 1000 * round_))
        proc.start()
        deadline = time.time() + 60
        while len(list(out.iterdir())) <= before and time.time() < deadline:  # writing has started
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.3))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        found = ckpt.list_checkpoints(out)
        assert found, "no checkpoint survived"
        for path in found:  # every committed checkpoint is complete
            tensors, meta = ckpt.load_checkpoint(path)
            assert torch.equal(tensors["a"], torch.full((1_000_000,), float(meta["step"])))
        for tmp in out.glob(".*.tmp"):  # an interrupted write leaves only a hidden temporary, never a checkpoint
            tmp.unlink()


# ---- resume ----

RUN = ("aniso", 6, "--class-schedules", "--grad-accum", "2", "--snapshot-every", "1", "--keep", "2")


def _final(out: Path):
    return ckpt.load_checkpoint(ckpt.latest_checkpoint(out))


def test_resume_after_sigkill_is_bit_identical(tmp_path):
    npz = make_npz(tmp_path / "tiny.npz")
    straight = tmp_path / "straight"
    train.run(train_config.parse_args(argv(npz, straight, *RUN)))

    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "aniso_fast.train", *argv(npz, killed, *RUN)]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        latest = ckpt.latest_checkpoint(killed)
        if latest is not None and int(latest.stem.split("-")[1]) >= 3:
            break
        time.sleep(0.01)
    time.sleep(random.Random(1).uniform(0, 0.1))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed_from = ckpt.load_checkpoint(ckpt.latest_checkpoint(killed))[1]["step"]
    assert 3 <= resumed_from < 6, f"the child was killed at step {resumed_from}"

    train.run(train_config.parse_args(argv(npz, killed, *RUN, "--resume")))
    (ta, ma), (tb, mb) = _final(straight), _final(killed)
    assert ma["step"] == mb["step"] == 6 and ma["sampler"] == mb["sampler"]
    assert sorted(ta) == sorted(tb)
    for name in ta:  # network, EMA, schedule, both optimizers' states, RNG states
        assert torch.equal(ta[name], tb[name]), name
    steps = [json.loads(line)["step"] for line in (killed / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_resume_checks_the_configuration(tmp_path):
    npz = make_npz(tmp_path / "tiny.npz")
    out = tmp_path / "run"
    fixed = ["--decay-start-kimg", "1", "--decay-halflife-kimg", "1"]  # the defaults scale with the run length
    train.run(train_config.parse_args(argv(npz, out, "iso", 1, *fixed)))
    with pytest.raises(ValueError, match="already holds checkpoints"):
        make_trainer(argv(npz, out, "iso", 2, *fixed))
    with pytest.raises(ckpt.CheckpointError, match="lr: checkpoint has 0.001, this run has 0.002"):
        make_trainer(argv(npz, out, "iso", 2, *fixed, "--resume", "--lr", "2e-3"))
    with pytest.raises(ckpt.CheckpointError, match="stage: checkpoint has 'iso', this run has 'aniso'"):
        make_trainer(argv(npz, out, "aniso", 2, *fixed, "--resume"))
    other = make_npz(tmp_path / "other.npz", n=30)
    with pytest.raises(ckpt.CheckpointError, match="data"):
        make_trainer(argv(other, out, "iso", 2, *fixed, "--resume"))
    with pytest.raises(ValueError, match="no checkpoint"):
        make_trainer(argv(npz, tmp_path / "empty", "iso", 2, "--resume"))
    trainer = make_trainer(argv(npz, out, "iso", 2, *fixed, "--resume"))  # a longer run may resume
    assert trainer.step == 1
