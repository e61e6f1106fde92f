"""Where the time of the default sample job and of the default recipe's training step goes, per run (precision and
memory format): `python bench/profile_network.py` -> bench/results/<device>-profile.json, which
`python bench/report.py --e2e` turns into the "Where the time goes" part of bench/RESULTS.md.

Each workload runs once to warm up, then once under torch.profiler (CPU). Self CPU time of every op is summed into
the kinds below (the first pattern that matches an op's name wins), per image; the share is of the profiled total.
It bounds what a faster kernel of one kind can do end to end (Amdahl), and it shows what bf16 speeds up (the
convolutions' arithmetic) and what it cannot (the rest).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parent.parent
KINDS = (  # (kind, substrings of op names), first match wins
    ("convolution", ("convolution",)),
    ("GroupNorm (+ SiLU)", ("group_norm",)),
    ("matmul (attention, linear)", ("addmm", "bmm", "aten::mm", "aten::matmul", "linear")),
    ("subspace ops", ("aniso_fast::",)),
    ("copies and casts", ("copy_", "_to_copy", "contiguous", "clone", "aten::cat")),
    ("elementwise and the rest", ("",)),
)
SAMPLE = {"nfe": 9, "batch": 64}  # the default job (`python -m aniso_fast.sample`)
SAMPLE_RUNS = (("fp32", "contiguous"), ("bf16", "channels_last"))
TRAIN_RUNS = ("fp32", "bf16")


def kind_of(name: str) -> str:
    return next(kind for kind, pats in KINDS if any(p in name for p in pats))


def _profile(fn) -> tuple[float, dict]:
    fn()  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        fn()
        seconds = time.perf_counter() - start
    by_kind = dict.fromkeys((k for k, _ in KINDS), 0.0)
    for event in prof.key_averages():
        by_kind[kind_of(event.key)] += event.self_cpu_time_total / 1e6
    return seconds, by_kind


def _sample_workload(precision: str, memory_format: str):
    import aniso_fast

    pipe = aniso_fast.load(device="cpu", precision=precision, memory_format=memory_format)
    return lambda: pipe.sample(SAMPLE["batch"], nfe=SAMPLE["nfe"], batch=SAMPLE["batch"], output="uint8")


def _train_workload(precision: str):
    from bench import common
    from bench.test_bench_e2e import TRAIN_BATCH, _train_setup

    _, _, model, process, loss_fn, x0, labels = _train_setup("cpu")
    common.execute(model, common.Run(precision), "cpu")

    def step():
        model.zero_grad(set_to_none=True)
        process.zero_grad(set_to_none=True)
        loss, _ = loss_fn(x0, labels, torch.Generator().manual_seed(0))
        loss.backward()
    return step, TRAIN_BATCH


def main(argv: list[str] | None = None) -> int:
    from aniso_fast.utils.atomic import atomic_write_text
    import json

    from aniso_fast.utils.machine import cpu_flags, machine_description

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "cpu-profile.json")
    p.add_argument("--no-train", action="store_true", help="profile the sample job only")
    args = p.parse_args(argv)
    rows = []
    for precision, memory_format in SAMPLE_RUNS:
        seconds, by_kind = _profile(_sample_workload(precision, memory_format))
        rows.append({"workload": f"sample, NFE {SAMPLE['nfe']}, B {SAMPLE['batch']}", "precision": precision,
                     "memory_format": memory_format, "images": SAMPLE["batch"], "seconds": seconds,
                     "self_cpu_s": by_kind})
        print(rows[-1], flush=True)
    if not args.no_train:
        for precision in TRAIN_RUNS:
            step, batch = _train_workload(precision)
            seconds, by_kind = _profile(step)
            rows.append({"workload": f"training step, B {batch}", "precision": precision,
                         "memory_format": "contiguous", "images": batch, "seconds": seconds, "self_cpu_s": by_kind})
            print(rows[-1], flush=True)
    flags = cpu_flags()
    doc = {"machine": machine_description(), "threads": torch.get_num_threads(), "kinds": [k for k, _ in KINDS],
           "bf16_isa": "amx" if "amx_bf16" in flags else ("avx512_bf16" if "avx512_bf16" in flags else None),
           "command": "python bench/profile_network.py", "rows": rows}
    atomic_write_text(args.out, json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
