"""Many processes, one result (issue 24): `sample` and `evaluate table` under torchrun shard whole batches of the
single-process run over the ranks (gloo on the CPU here) and rank 0 alone writes, byte-identical to one process
with the same batch and thread count.

The batch size alone changes the U-Net's last bits on the CPU (oneDNN: seeds 0-9 at NFE 5 sampled in batches of
10 and of 5 differ by up to 3.8e-6, measured when this was written), so the ranks run the very batches one process
would; the odd counts and short last batches below give the ranks unequal shares.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from aniso_fast import evaluate
from aniso_fast.evaluation import table
from aniso_fast.sample import main as sample_main
from aniso_fast.training import distributed
from aniso_fast.training.distributed import Dist

from test_evaluate import gmm_recipe  # noqa: F401 (a fixture)

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**env, "PYTHONPATH": f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1", **extra}


@pytest.mark.parametrize("n,batch,world", [(10, 3, 2), (11, 3, 2), (7, 10, 3), (12, 4, 3), (1, 1, 4), (9, 2, 4)])
def test_the_ranks_take_the_single_process_batches_whole(n, batch, world):
    single = Dist().batch_slices(n, batch)
    assert single == [slice(i, min(i + batch, n)) for i in range(0, n, batch)]
    shares = [Dist(rank=r, world_size=world).batch_slices(n, batch) for r in range(world)]
    assert sorted(shares_all := [s for share in shares for s in share], key=lambda s: s.start) == single
    assert len(shares_all) == len(single)
    for r, share in enumerate(shares):  # batch i on rank i mod world
        assert share == single[r::world]


def test_torchrun_sample_npz_is_byte_identical_to_one_process(tmp_path):
    """Two torchrun ranks, 11 seeds in batches of 3 (rank 0: batches 0 and 2, 6 seeds; rank 1: batches 1 and 3,
    5 seeds); one file, written by rank 0, equal byte for byte to the single-process file."""
    common = ["--count", "11", "--batch", "3", "--nfe", "3", "--format", "npz", "--no-progress"]
    multi, single = tmp_path / "multi" / "s.npz", tmp_path / "single" / "s.npz"
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                          "127.0.0.1", "--master_port", str(_free_port()), "-m", "aniso_fast.sample", *common,
                          "--out", str(multi)], capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"{multi}\n"  # rank 1 prints nothing
    assert out.stderr.count("11 samples") == 1, out.stderr
    assert sorted(p.name for p in multi.parent.iterdir()) == ["s.npz"]  # no second file, no temporary left

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as torchrun's OMP_NUM_THREADS=1: the thread count changes the last bits too
    try:
        assert sample_main([*common, "--out", str(single)]) == 0
    finally:
        torch.set_num_threads(threads)
    a, b = np.load(multi), np.load(single)
    assert sorted(a.files) == sorted(b.files) and a["seeds"].tolist() == list(range(11))
    for key in a.files:
        assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), key
    assert multi.read_bytes() == single.read_bytes()


def test_bad_option_on_every_rank_exits_2_with_one_line(tmp_path):
    """Both ranks (torchrun's environment) check the options before any work and exit 2; rank 0 alone says why."""
    env = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2")
    procs = [subprocess.Popen([sys.executable, "-m", "aniso_fast.sample", "--count", "0", "--format", "npz",
                               "--outdir", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_env(**env, RANK=str(r), LOCAL_RANK=str(r)), cwd=tmp_path) for r in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [2, 2]
    assert [o for o, _ in outs] == ["", ""]
    (_, err0), (_, err1) = outs
    assert err0.startswith("error: --count") and err0.count("\n") == 1 and "Traceback" not in err0, err0
    assert err1 == ""
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("rank", [0, 1])
def test_evaluate_errors_once_and_runs_only_table_under_torchrun(rank, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", str(rank))
    assert evaluate.main(["solvers", "--n", "4"]) == 2
    err = capsys.readouterr().err
    assert err == ("error: solvers: runs in one process; under torchrun (WORLD_SIZE=2) only `table` shares out its "
                   "work\n" if rank == 0 else "")
    assert evaluate.main(["table", "--n", "1"]) == 2
    err = capsys.readouterr().err
    assert (err.startswith("error: --n") and err.count("\n") == 1) if rank == 0 else err == ""


def _table_rank(rank: int, world: int, port: int, recipe: dict, scorer, kw: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist = distributed.init("cpu")
    try:
        if dist.is_main:
            result, extras = table.results_table(recipe, scorer, dist=dist, **kw)
            torch.save({"rows": result["rows"], "floor": result["floor"],
                        "shown": {name: e[2] for name, e in extras.items()}}, out)
        else:
            def forbidden(*args, **kwargs):
                raise AssertionError(f"rank {rank} wrote a file")

            table.atomic_write = forbidden  # this forked process only: the cache is rank 0's alone
            sampled, run_sampler = [], table.registry.run_sampler
            table.registry.run_sampler = lambda m, p, plan, seeds, *a, **k: sampled.append(list(seeds)) or \
                run_sampler(m, p, plan, seeds, *a, **k)
            table.serve_samples(recipe, "auto", dist)
            torch.save(sampled, f"{out}.rank{rank}")
    finally:
        distributed.shutdown()


def _without_seconds(rows: list) -> list:
    return [{**row, "cells": [{k: v for k, v in c.items() if k != "seconds"} for c in row["cells"]]} for row in rows]


def test_table_under_two_ranks_equals_one_process(gmm_recipe, tmp_path, one_thread):  # noqa: F811
    """The results table on the exact mixture: rank 0 runs it, rank 1 samples its batches of every cell (11
    samples per set in batches of 4: 8 and 3 seeds), the same scores, figure samples and cache files as one
    process."""
    recipe, scorer, images = gmm_recipe
    kw = dict(n=11, seeds=2, nfes=[3, 5], batch=4, per_class=1, progress=False, bootstrap=5,
              floor_images=images, floor_labels=torch.arange(64) % 4)
    mp.start_processes(_table_rank, args=(2, _free_port(), recipe, scorer, {**kw, "cache": tmp_path / "multi"},
                                          str(tmp_path / "multi.pt")), nprocs=2, start_method="fork")
    multi = torch.load(tmp_path / "multi.pt", weights_only=False)
    # rank 1 sampled batch 1 of every set (seeds 0-10 and 11-21 in batches of 4) and of the figure's (seeds 0-9)
    sampled = torch.load(tmp_path / "multi.pt.rank1")
    assert {tuple(s) for s in sampled} == {(4, 5, 6, 7), (15, 16, 17, 18)}
    result, extras = table.results_table(recipe, scorer, cache=tmp_path / "single", **kw)
    assert _without_seconds(multi["rows"]) == _without_seconds(result["rows"])
    assert multi["floor"] == result["floor"]
    assert any("fd" in c for row in result["rows"] for c in row["cells"])
    for name, (_, _, shown, _) in extras.items():
        assert torch.equal(multi["shown"][name], shown), name
    files = sorted(p.name for p in (tmp_path / "single").iterdir())
    assert files and sorted(p.name for p in (tmp_path / "multi").iterdir()) == files
    for name in files:
        with np.load(tmp_path / "multi" / name) as m, np.load(tmp_path / "single" / name) as s:
            assert sorted(m.files) == sorted(s.files)
            for key in m.files:
                assert np.array_equal(m[key], s[key]), (name, key)
