"""The sampling entry: build the grid, draw x_T = M(T)^{1/2} z from each seed's stream, run the solver."""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor

from ..geometry.schedules import MatrixSchedule
from .grids import GRIDS, Grid, build_grid, check_grid
from .noise import SeedStreams, check_labels, check_seeds
from .spec import learned_key, resolve_sampler

__all__ = ["sample"]


def sample(model, schedule: MatrixSchedule | None = None, *, nfe: int = 9, solver: str = "heun",
           grid: str = "uniform_t", secondary: str | None = None, order: int | None = None,
           seeds: Sequence[int] = (0,), labels: Tensor | None = None, image_shape: Sequence[int] | None = None,
           fitted: Mapping[int, Sequence[float]] | None = None, dtype=torch.float32,
           device: torch.device | str = "cpu", progress: bool = False,
           callback: Callable[[dict], None] | None = None) -> tuple[Tensor, Tensor | None, dict]:
    """Generate one sample per seed with any solver of `spec.SOLVERS` on any grid of `grids.GRIDS`.

    solver: 'euler', 'heun' (matrix Heun, METHOD §6), 'em' (Euler-Maruyama on the reverse SDE, per-seed step
    noises) or a multistep solver (with its `order`). grid: 'uniform_t' (the paper's, midpoint Heun by default),
    'edm_sigma' (EDM's sigma grid on the geometric mean, end-point Heun), 'logsnr' (the geometric-mean sigma
    uniform in log sigma), 'karras' (the isotropic EDM baseline; the schedule is not used), 'optimized' (the
    model's grid fitted for the step count, from `fitted`: steps -> geometric-mean sigma levels), 'learned' (the
    grid learned for this solver and order, from `fitted.learned`: a `grids.FittedGrids`).
    `callback` is called after every solver step with {i, x, g, flow, ...}.
    Returns (x [B, C, H, W], labels, info with the NFE actually spent).
    """
    plan = resolve_sampler(solver, grid, secondary, nfe, order)
    if GRIDS[grid].uses_schedule and schedule is None:
        raise ValueError(f"schedule: grid {grid!r} needs a schedule")
    check_grid(grid, schedule)
    seeds = check_seeds(seeds)
    labels = check_labels(labels, seeds, getattr(model, "num_classes", None), device)
    g = build_grid(grid, schedule, plan.steps, labels, secondary=plan.secondary or "end", fitted=fitted,
                   num_subspaces=model.basis.num_subspaces,
                   learned_key=learned_key(solver, plan.order, plan.secondary) if grid == "learned" else None)
    g = Grid(g.g.to(device), None if g.g_sec is None else g.g_sec.to(device), g.t)
    shape = tuple(image_shape) if image_shape is not None else tuple(model.image_shape)
    streams = SeedStreams(seeds)
    z = streams.draw(shape, dtype, device)
    x = model.basis.scale(z, g.g[:, 0].expand(len(seeds), -1).sqrt(), ids=model.basis.group_ids(labels))
    spec = plan.spec
    kwargs = {}
    if spec.orders:
        kwargs["order"] = plan.order
    if spec.secondaries:
        kwargs["final_euler"] = plan.final_euler
    if spec.stochastic:  # the step noises continue each seed's stream after its start noise
        kwargs["noise"] = lambda: streams.draw(shape, dtype, device)
    with torch.no_grad():
        x = spec.run(model, x, g, labels, progress=progress, callback=callback, **kwargs)
    return x, labels, {"nfe": plan.nfe, "steps": plan.steps, "solver": solver, "grid": grid,
                       "secondary": plan.secondary, "order": plan.order}
