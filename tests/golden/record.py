"""Record (or check) the images every shipped model gives with every sampler it takes, through the `sample` CLI.

    python tests/golden/record.py            # rewrite tests/golden/images.npz + cases.json from the current code

The cases are the CLI's own argument lists, so the record survives any refactor below the CLI: the golden test
(tests/test_golden_images.py) replays each case and compares the uint8 images with the record.
"""
from __future__ import annotations

import contextlib
import io
import itertools
import json
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SOLVERS = ("euler", "heun", "em", "dpmpp-2m", "dpmpp-3m", "unipc", "ipndm", "deis")
GRIDS = ("uniform_t", "edm_sigma", "karras", "logsnr", "optimized")
SEEDS = "0-1"
THREADS = 2  # the record's intra-op threads: oneDNN's reductions (and so the last bit) depend on the count


def machine() -> dict:
    """What decides whether float results can be byte-identical: torch's version and the CPU's vector ISA."""
    import torch

    flags = ""
    with contextlib.suppress(OSError):
        flags = Path("/proc/cpuinfo").read_text()
    isa = sorted({f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in flags})
    vendor = "AMD" if "AuthenticAMD" in flags else "Intel" if "GenuineIntel" in flags else platform.machine()
    return {"torch": torch.__version__, "vendor": vendor, "isa": isa}


def run_case(argv: list[str]) -> np.ndarray | None:
    """The case's uint8 images, or None where the CLI refuses it (exit 2)."""
    import torch

    from aniso_fast import sample

    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    with tempfile.TemporaryDirectory() as tmp:
        err = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            try:
                # the record is of the plain fp32 network (contiguous), whatever the sample CLI's defaults
                code = sample.main([*argv, "--outdir", tmp, "--format", "npz", "--no-progress", "--precision", "fp32",
                                    "--memory-format", "contiguous"])
            finally:
                torch.set_num_threads(threads)
        if code != 0:
            return None
        (path,) = Path(tmp).glob("*.npz")
        with np.load(path) as f:
            return f["images"].copy()


def candidate_cases(models: list[str]) -> list[list[str]]:
    """Per model: every solver at NFE 5, 6 or 7 (the first it can spend), every grid, both Heun points, and every
    multistep order; the CLI decides which the model takes."""
    cases = []
    for model in models:
        base = ["--model", model, "--seeds", SEEDS]
        for solver, grid in itertools.product(SOLVERS, GRIDS):
            variants = [[]]
            if solver == "heun":
                variants = [["--secondary", "end"], ["--secondary", "mid"]]
            if solver in ("ipndm", "deis"):
                variants = [["--order", str(o)] for o in (1, 2, 3, 4)]
            if solver == "unipc":
                variants = [["--order", "2"], ["--order", "3"]]
            for extra in variants:
                cases.append([*base, "--solver", solver, "--grid", grid, *extra])
        cases.append([*base, "--schedule", "edm"])
    return cases


def main() -> int:
    from aniso_fast import store as models

    names = [*models.MODELS]
    kept, images = [], {}
    for argv in candidate_cases(names):
        for nfe in ("5", "6", "7"):
            out = run_case([*argv, "--nfe", nfe])
            if out is not None:
                key = f"case{len(kept):04d}"
                kept.append({"key": key, "argv": [*argv, "--nfe", nfe]})
                images[key] = out
                break
    np.savez_compressed(HERE / "images.npz", **images)
    (HERE / "cases.json").write_text(json.dumps({"machine": machine(), "cases": kept}, indent=1) + "\n")
    print(f"{len(kept)} cases over {len(names)} models -> {HERE}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
