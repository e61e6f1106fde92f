"""DDP: two gloo ranks stay identical and match one process on the same global batch.

The 2-rank run uses --grad-accum 2 and the 1-process run --grad-accum 4: both cut every global batch of 4 images
into the same 4 chunks of 1 image with the same per-chunk noise (seeded from seed, step, chunk), so they compute
the same gradients up to floating-point summation order. The aniso stage with the estimator exercises DDP under
the estimator's double-backward passes (the network is called through DDP's forward, METHOD §10.11); per-class
schedules exercise the all_gather of the classes present (chunks of one image: most steps have a class on one
rank only).
"""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from aniso_fast.training import config as train_config
from aniso_fast.training import trainer as train
from aniso_fast.utils.data import InfiniteBatchSampler, load_npz
from aniso_fast.geometry.schedules import MatrixSchedule

from test_train import argv, make_npz

torch.set_num_threads(1)
STEPS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _state(trainer: train.Trainer) -> dict:
    out = {f"net.{k}": v.detach().clone() for k, v in trainer.net.state_dict().items()}
    out.update({f"ema.{k}": v.detach().clone() for k, v in trainer.ema.module.state_dict().items()})
    out["psi"] = trainer.process.psi.detach().clone()
    for key, value in trainer.opt_process.state[trainer.process.psi].items():
        out[f"opt_sched.{key}"] = value.clone()
    for i, p in enumerate(trainer.net.parameters()):
        out[f"opt_net.{i}.exp_avg_sq"] = trainer.opt_net.state[p]["exp_avg_sq"].clone()
    return out


def _rank(rank: int, world: int, port: int, args: list, result: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    trainer = train.run(train_config.parse_args(args))
    torch.save(_state(trainer), f"{result}.rank{rank}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    npz = make_npz(tmp / "tiny.npz")
    common = ("aniso", STEPS, "--class-schedules", "--dct-bands", "3", "--cond", "--device", "cpu")
    mp.start_processes(_rank, args=(2, _free_port(), argv(npz, tmp / "ddp", *common, "--grad-accum", "2"),
                                    str(tmp / "ddp")), nprocs=2, start_method="fork")
    ranks = [torch.load(tmp / f"ddp.rank{r}.pt") for r in range(2)]
    single = _state(train.run(train_config.parse_args(argv(npz, tmp / "single", *common, "--grad-accum", "4"))))
    return ranks, single, tmp


def test_both_ranks_end_with_identical_parameters_and_optimizer_states(runs):
    (r0, r1), _, _ = runs
    assert sorted(r0) == sorted(r1)
    for name in r0:
        assert torch.equal(r0[name], r1[name]), name


def test_two_ranks_match_one_process_on_the_same_global_batch(runs):
    (r0, _), single, _ = runs
    for name, value in single.items():
        # only the summation order differs (DDP's all-reduce vs local accumulation): measured max |diff| ~1e-10
        tol = dict(rtol=1e-6, atol=1e-8) if value.is_floating_point() else dict(rtol=0, atol=0)
        torch.testing.assert_close(r0[name], value, **tol, msg=name)
    assert not torch.equal(r0["psi"], MatrixSchedule(3, 3).psi.detach()), "the schedules did not move"


def test_some_class_was_present_on_one_rank_only(runs):
    """So the identical per-class schedules above depend on gathering the classes present across ranks."""
    _, _, tmp = runs
    _, labels = load_npz(tmp / "tiny.npz")
    sampler = InfiniteBatchSampler(len(labels), 4, seed=0)
    one_sided = 0
    for _ in range(STEPS):
        chunks = next(sampler).reshape(2, 2, -1)  # [accum, rank, chunk]
        seen = [set(labels[chunks[:, r].flatten()].tolist()) for r in range(2)]
        one_sided += len(seen[0] ^ seen[1])
    assert one_sided > 0
