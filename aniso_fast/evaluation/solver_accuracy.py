"""Solver accuracy on an exact Gaussian mixture (`python -m aniso_fast.evaluate solvers`).

Every solver/grid/NFE is measured by (1) the endpoint error against a high-NFE solution from the same initial
noise (per-sample RMS over pixels, in [-1, 1] units: mean and max) and (2) the sliced Wasserstein distance (POT)
between its samples and exact samples of the mixture, next to the two-sample floor (two independent exact sets
of the same size). The configurations on the 'optimized' grid use grids fitted to the mixture itself
(`grid_fit.fit_levels`: its own DPM-Solver++(2M) teacher, seeds apart from the measured ones). Results go to a
JSON file and a Markdown table; nothing is typed by hand.
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

from ..utils.atomic import atomic_write_text
from .metrics import endpoint_error, sliced_wasserstein
from ..sampling.grids import fitted_levels
from ..sampling.sampler import sample
from ..sampling.spec import resolve_sampler

__all__ = ["SOLVER_CONFIGS", "solver_accuracy", "to_markdown", "write_report"]

# (name, solver, grid, secondary): the paper's sampler, its end-point variant, the EDM-v2 grid, EDM itself, and
# the multistep solvers (default orders) on the grids they are usually run on
SOLVER_CONFIGS = [
    ("EDM Heun, Karras grid", "heun", "karras", "end"),
    ("Heun midpoint, uniform t", "heun", "uniform_t", "mid"),
    ("Heun end point, uniform t", "heun", "uniform_t", "end"),
    ("Heun end point, EDM sigma on geometric mean", "heun", "edm_sigma", "end"),
    ("Euler, uniform t", "euler", "uniform_t", "end"),
    ("DPM-Solver++(2M), Karras grid", "dpmpp-2m", "karras", None),
    ("DPM-Solver++(2M), log-SNR grid", "dpmpp-2m", "logsnr", None),
    ("DPM-Solver++(2M), uniform t", "dpmpp-2m", "uniform_t", None),
    ("DPM-Solver++(3M), log-SNR grid", "dpmpp-3m", "logsnr", None),
    ("UniPC-bh2 order 3, log-SNR grid", "unipc", "logsnr", None),
    ("iPNDM order 4, log-SNR grid", "ipndm", "logsnr", None),
    ("iPNDM order 4, uniform t", "ipndm", "uniform_t", None),
    ("DPM-Solver++(2M), grid fitted to the mixture", "dpmpp-2m", "optimized", None),
    ("iPNDM order 4, grid fitted to the mixture", "ipndm", "optimized", None),
]


def solver_accuracy(model, schedule, nfes, *, n: int = 1000, seed: int = 0, reference_nfe: int = 255,
                    configs=SOLVER_CONFIGS, progress: bool = True) -> dict:
    """Each configuration at each NFE it can spend exactly (others are skipped, e.g. an even NFE for
    end-point Heun), against the midpoint-Heun reference at `reference_nfe` and exact mixture samples."""
    seeds = list(range(seed, seed + n))
    labels = None
    if model.num_classes:
        labels = torch.arange(n) % model.num_classes
    ref, _, _ = sample(model, schedule, nfe=reference_nfe, solver="heun", grid="uniform_t", secondary="mid",
                       seeds=seeds, labels=labels, dtype=torch.float64)
    gen_a, gen_b = torch.Generator().manual_seed(10_000 + seed), torch.Generator().manual_seed(20_000 + seed)
    exact_a = model.sample(labels=labels, n=n, generator=gen_a)[0]
    exact_b = model.sample(labels=labels, n=n, generator=gen_b)[0]
    floor = sliced_wasserstein(exact_a.flatten(1), exact_b.flatten(1))
    fitted = {}
    if any(grid == "optimized" for _, _, grid, _ in configs):
        from ..sampling.grid_fit import fit_levels

        fitted = fit_levels(model, schedule, [n for n in nfes if n <= 128], progress=progress)
    rows = []
    for name, solver, grid, secondary in configs:
        for nfe in nfes:
            try:
                plan = resolve_sampler(solver, grid, secondary, nfe)
                if grid == "optimized":
                    fitted_levels(fitted, plan.steps)  # none fitted beyond the teacher's steps
            except ValueError:
                continue
            t0 = time.perf_counter()
            x, _, info = sample(model, schedule, nfe=nfe, solver=solver, grid=grid, secondary=secondary,
                                seeds=seeds, labels=labels, fitted=fitted, dtype=torch.float64)
            err = endpoint_error(x, ref)
            rows.append({"config": name, "solver": solver, "grid": grid, "secondary": info["secondary"],
                         "nfe": info["nfe"], "endpoint_rmse_mean": float(err.mean), "endpoint_rmse_max": float(err.max),
                         "sliced_wasserstein": sliced_wasserstein(x.flatten(1), exact_a.flatten(1)),
                         "seconds": time.perf_counter() - t0})
            if progress:
                print(f"{name:45s} NFE {nfe:3d}  endpoint {rows[-1]['endpoint_rmse_mean']:.4f}  "
                      f"SW {rows[-1]['sliced_wasserstein']:.4f}", flush=True)
    return {"n": n, "seed": seed, "reference_nfe": reference_nfe, "sliced_wasserstein_floor": floor,
            "fitted_grids": {str(k): v for k, v in fitted.items()}, "rows": rows}


def to_markdown(result: dict, title: str, command: str) -> str:
    nfes = sorted({r["nfe"] for r in result["rows"]})
    lines = [f"# {title}", "", f"Regenerate: `{command}`", "",
             f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}. "
             f"{result['n']} samples (seeds {result['seed']}..{result['seed'] + result['n'] - 1}, classes cycled), "
             f"reference: midpoint Heun on the uniform t grid at NFE {result['reference_nfe']} from the same noise.",
             "", f"Sliced Wasserstein two-sample floor (two independent exact sample sets): "
                 f"{result['sliced_wasserstein_floor']:.4f}", ""]
    for metric, label in [("endpoint_rmse_mean", "Endpoint error (per-sample RMS in [-1, 1] units, mean)"),
                          ("sliced_wasserstein", "Sliced Wasserstein distance to exact samples")]:
        lines += [f"## {label}", "", "| solver / grid | " + " | ".join(f"NFE {k}" for k in nfes) + " |",
                  "|---|" + "---|" * len(nfes)]
        for name, *_ in SOLVER_CONFIGS:
            cells = {r["nfe"]: r[metric] for r in result["rows"] if r["config"] == name}
            if cells:
                lines.append(f"| {name} | " + " | ".join(f"{cells[k]:.4f}" if k in cells else "—" for k in nfes) + " |")
        lines.append("")
    return "\n".join(lines)


def write_report(result: dict, out: str | os.PathLike, title: str, command: str) -> Path:
    """`out`.json (the result) and `out`.md (its tables), each written atomically; returns the .md path."""
    out = Path(out)
    atomic_write_text(out.with_suffix(".json"), json.dumps(result, indent=1))
    return atomic_write_text(out.with_suffix(".md"), to_markdown(result, title, command))
