"""Time grids fitted to a model's own trajectories (`--grid optimized`), in the spirit of GITS (Chen et al., 2024).

A teacher run of DPM-Solver++(2M) on a fine log-SNR grid (`teacher_steps` steps, geometric-mean sigma uniform in
log sigma, then sigma = 0) records the states x_i and data predictions D_i of a batch of the model's own samples.
The cost of a coarse step from fine point i to fine point j is the error of the first-order (DDIM-type) step taken
from the teacher's state, per subspace k

    x_j ~ (sigma_jk / sigma_ik) x_i + (1 - sigma_jk / sigma_ik) D_i,

as the RMS over pixels, averaged over the batch. It needs no network call beyond the teacher's: D_i is the
teacher's own. Dynamic programming then picks, for each step count N, the N steps from the first fine point to the
last whose summed cost is least. A grid is stored as its N geometric-mean sigma levels (the end point sigma = 0
is implied), so a class-conditional schedule places it per class like the log-SNR grid. One grid per step count
serves every solver that takes one network call per step (N = NFE); Heun uses the N-step grid for its N steps.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import multistep
from .grids import check_grid, logsnr_grid, logsnr_levels, schedule_grid
from .noise import seeded_noise
from .sampler import sample

__all__ = ["TEACHER_STEPS", "FIT_SEED", "teacher_trajectory", "step_costs", "best_steps", "fit_levels",
           "endpoint_errors"]

TEACHER_STEPS = 128  # fine grid: log sigma steps of ln(80 / 0.002) / 127 = 0.083
FIT_SEED = 2 ** 31  # the teacher's seeds start here, far from the seeds the table and the CLI use


def teacher_trajectory(model, schedule, seeds: Sequence[int], labels: Tensor | None, steps: int = TEACHER_STEPS,
                       progress: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(fine geometric-mean sigma levels [steps + 1] ending at 0, variances g [G, steps + 1, K], states x
    [steps + 1, B, C, H, W], data predictions D [steps, B, C, H, W]) of DPM-Solver++(2M) from seeded noise."""
    check_grid("logsnr", schedule)
    t = logsnr_grid(schedule, steps, labels)
    grid = schedule_grid(schedule, t, labels)
    levels = torch.cat([logsnr_levels(schedule, steps, labels), torch.zeros(1, dtype=torch.float64)])
    basis, B = model.basis, len(seeds)
    x = basis.scale(seeded_noise(seeds, model.image_shape), grid.g[:, 0].expand(B, -1).sqrt(),
                    ids=basis.group_ids(labels))
    xs, Ds = [x], []

    def record(step: dict) -> None:
        xs.append(step["x"])
        Ds.append(step["denoised"])

    with torch.no_grad():
        multistep.dpmpp_2m(model, x, grid, labels, progress=progress, callback=record)
    return levels, grid.g, torch.stack(xs), torch.stack(Ds)


def step_costs(basis, g: Tensor, xs: Tensor, Ds: Tensor, labels: Tensor | None = None,
               progress: bool = False) -> np.ndarray:
    """[M + 1, M + 1] cost of a first-order step from fine point i to j > i (inf where j <= i): the RMS over
    pixels of its error against the teacher's x_j, averaged over the batch."""
    M, B = Ds.shape[0], xs.shape[1]
    ids = basis.group_ids(labels)
    sigma = g.sqrt().expand(B, -1, -1)  # [B, M + 1, K]
    cost = np.full((M + 1, M + 1), np.inf)
    scale = math.sqrt(xs[0, 0].numel())
    for i in tqdm(range(M), disable=not progress, desc="step costs", leave=False):
        for j in range(i + 1, M + 1):
            ratio = (sigma[:, j] / sigma[:, i]).to(torch.float32)
            err = basis.combine(xs[i], ratio, Ds[i], 1 - ratio, base=-xs[j], ids=ids)
            cost[i, j] = float(err.flatten(1).norm(dim=1).mean()) / scale
    return cost


def best_steps(cost: np.ndarray, steps: int) -> list[int]:
    """The fine points 0 = i_0 < ... < i_steps = M of least summed cost (dynamic programming)."""
    M = cost.shape[0] - 1
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= M:
        raise ValueError(f"steps: expected an int in [1, {M}] (the teacher's fine steps), got {steps!r}")
    best = np.full((steps + 1, M + 1), np.inf)
    came = np.zeros((steps + 1, M + 1), dtype=np.int64)
    best[0, 0] = 0.0
    for n in range(1, steps + 1):
        total = best[n - 1][:, None] + cost  # [from i, to j]
        came[n] = total.argmin(0)
        best[n] = total.min(0)
    path = [M]
    for n in range(steps, 0, -1):
        path.append(int(came[n, path[-1]]))
    return path[::-1]


def fit_levels(model, schedule, step_counts: Sequence[int], *, samples: int = 256,
               teacher_steps: int = TEACHER_STEPS, progress: bool = False) -> dict[int, list[float]]:
    """{N: the N geometric-mean sigma levels of the fitted N-step grid, descending} for each N in `step_counts`,
    from one teacher run of `samples` class-balanced samples."""
    seeds = list(range(FIT_SEED, FIT_SEED + samples))
    labels = None if not model.num_classes else torch.arange(samples) % model.num_classes
    levels, g, xs, Ds = teacher_trajectory(model, schedule, seeds, labels, teacher_steps, progress)
    cost = step_costs(model.basis, g, xs, Ds, labels, progress)
    return {n: [float(levels[i]) for i in best_steps(cost, n)[:-1]] for n in step_counts}


def endpoint_errors(model, schedule, fitted: dict[int, list[float]], step_counts: Sequence[int], *,
                    samples: int = 64, teacher_steps: int = TEACHER_STEPS, first_seed: int = FIT_SEED + 10 ** 6,
                    progress: bool = False) -> dict[int, dict[str, float]]:
    """{N: {grid: RMS endpoint error}}: DPM-Solver++(2M) with N steps on the log-SNR grid and on the fitted one,
    against the teacher's endpoint from the same noise, on `samples` held-out seeds (disjoint from the fit's)."""
    seeds = list(range(first_seed, first_seed + samples))
    labels = None if not model.num_classes else torch.arange(samples) % model.num_classes
    reference = teacher_trajectory(model, schedule, seeds, labels, teacher_steps, progress)[2][-1]
    scale = math.sqrt(reference[0].numel())
    out = {}
    for n in step_counts:
        out[n] = {}
        for grid in ("logsnr", "optimized"):
            x = sample(model, schedule, nfe=n, solver="dpmpp-2m", grid=grid, seeds=seeds, labels=labels,
                       fitted=fitted)[0]
            out[n][grid] = float((x - reference).flatten(1).norm(dim=1).mean()) / scale
    return out
