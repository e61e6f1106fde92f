"""Anisotropic ODE solvers (METHOD §6).

A *grid* is data: the per-subspace variances g along the path, `[G, N+1, K]` (G = 1, or one grid per sample
for class-conditional schedules), descending to the end point, plus optional secondary variances `[G, N, K]`
for the midpoint Heun step. Small named functions build grids; the solvers are loops over them and accept any
`model` with `.basis` and `.flow(x, g, labels)` (an `AnisoPrecond`-wrapped network, or the exact
`GaussianMixture`). The flow ODE run in reverse is `dx = -dS F` with `S = M^{1/2}` (§6.2); `em` integrates the
reverse SDE instead (Euler-Maruyama, docs/SOLVERS.md).
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import multistep
from ..geometry.schedules import MatrixSchedule, karras_sigmas

__all__ = [
    "Grid", "check_grid", "fitted_levels", "uniform_t", "edm_sigma_t", "logsnr_grid", "logsnr_levels", "optimized_t",
    "geometric_sigma_span", "schedule_grid", "karras_grid", "euler", "heun", "em", "seeded_noise", "seeded_labels",
    "check_seeds", "check_labels", "MAX_SEED", "steps_for_nfe", "Sampler", "resolve_sampler", "sample", "SOLVERS",
    "ODE_SOLVERS", "GRIDS", "SAMPLER_NAMES", "SAMPLER_CODES", "SOLVER_LABELS", "GRID_LABELS"
]

EM = "em"  # Euler-Maruyama on the reverse SDE: the one stochastic solver, on any grid (it uses only the variances)
SOLVERS = ("euler", "heun", EM, *multistep.MULTISTEP)
ODE_SOLVERS = tuple(s for s in SOLVERS if s != EM)  # the probability-flow ODE solvers (deterministic)
_ONE_CALL_PER_STEP = ("euler", EM, *multistep.MULTISTEP)  # N steps, N network calls, no secondary point
GRIDS = ("uniform_t", "edm_sigma", "karras", "logsnr", "optimized")
# (solver, grid, secondary) -> the name the docs and tables use, and a one-letter code for compact tables
SAMPLER_NAMES = {("heun", "karras", "end"): "Heun, Karras grid (EDM)",
                 ("heun", "uniform_t", "mid"): "midpoint Heun, uniform t grid (paper)",
                 ("heun", "uniform_t", "end"): "end-point Heun, uniform t grid",
                 ("heun", "edm_sigma", "end"): "end-point Heun, EDM sigma grid on the geometric mean",
                 ("euler", "uniform_t", "end"): "Euler, uniform t grid"}
SAMPLER_CODES = {("heun", "karras", "end"): "K", ("heun", "uniform_t", "mid"): "u", ("heun", "uniform_t", "end"): "ue",
                 ("heun", "edm_sigma", "end"): "e", ("euler", "uniform_t", "end"): "E"}
# names of the other (solver, grid) pairs are composed from these
SOLVER_LABELS = {"euler": "Euler", "heun": "Heun", EM: "Euler-Maruyama", "dpmpp-2m": "DPM-Solver++(2M)",
                 "dpmpp-3m": "DPM-Solver++(3M)", "unipc": "UniPC-bh2", "ipndm": "iPNDM", "deis": "DEIS-tAB"}
GRID_LABELS = {"uniform_t": "uniform t grid", "edm_sigma": "EDM sigma grid on the geometric mean",
               "karras": "Karras grid", "logsnr": "log-SNR grid on the geometric mean",
               "optimized": "fitted grid on the geometric mean"}
# grids placed on the schedule's geometric mean need its inverse (a MatrixSchedule has one)
_NEEDS_INVERSE = ("edm_sigma", "logsnr", "optimized")


def check_grid(grid: str, schedule) -> None:
    """ValueError naming `grid` when the grid does not apply to the schedule: the grids placed on the geometric mean
    need its inverse."""
    if grid in _NEEDS_INVERSE and not hasattr(schedule, "invert_geometric_mean"):
        raise ValueError(f"grid: {grid!r} is placed on the geometric mean of the schedule, and this "
                         f"{type(schedule).__name__} has no inverse of it; use 'uniform_t' or 'karras'")


@dataclass
class Grid:
    g: Tensor  # [G, N+1, K] float64: variances at the grid points, first = start (t = T), last = end
    g_sec: Tensor | None = None  # [G, N, K] secondary variances of the midpoint Heun step (None: end point)
    t: Tensor | None = None  # [G, N+1] the times, for information

    @property
    def num_steps(self) -> int:
        return self.g.shape[1] - 1


# ---- grids ----

def uniform_t(num_steps: int, T: float = 6400.0) -> Tensor:
    """The paper's grid: N+1 times uniform in t from T down to 0 (METHOD §6.4)."""
    return torch.linspace(T, 0.0, num_steps + 1, dtype=torch.float64)


def geometric_sigma_span(schedule, labels: Tensor | None = None, sigma_min: float = 0.002,
                         sigma_max: float = 80.0) -> tuple[float, float]:
    """[sigma_min, sigma_max] clipped to the geometric-mean sigma the schedule spans on [0, T] (for every class in
    `labels`): a grid placed on the geometric mean must stay inside it, or its end points would repeat."""
    if not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in (sigma_min, sigma_max)) \
            or not 0 < sigma_min < sigma_max < math.inf:
        raise ValueError(f"sigma_min, sigma_max: expected 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    if schedule.num_classes is None:
        labels = None  # a global schedule: one span
    n = 1 if labels is None else labels.shape[0]
    with torch.no_grad():
        lo = schedule.geometric_mean(torch.zeros(n, dtype=torch.float64), labels).sqrt().max()
        hi = schedule.geometric_mean(torch.full((n,), float(schedule.T), dtype=torch.float64), labels).sqrt().min()
    tol = 1e-9  # exp(mean log g) rounds: a schedule that reaches sigma_max leaves it exact
    lo = sigma_min if float(lo) <= sigma_min * (1 + tol) else float(lo)
    hi = sigma_max if float(hi) >= sigma_max * (1 - tol) else float(hi)
    if not lo < hi:
        raise ValueError(f"grid: the schedule's geometric-mean sigma lies outside [{sigma_min:g}, {sigma_max:g}]")
    return lo, hi


def _on_geometric_mean(schedule, sig: Tensor, labels: Tensor | None, iterations: int) -> Tensor:
    t = schedule.invert_geometric_mean(sig ** 2, labels, iterations=iterations)
    return torch.cat([t, torch.zeros(*t.shape[:-1], 1, dtype=t.dtype)], dim=-1)


def edm_sigma_t(schedule: MatrixSchedule, num_steps: int, labels: Tensor | None = None, *,
                sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                iterations: int = 48) -> Tensor:
    """Times at which the geometric-mean noise level follows EDM's sigma grid, then t = 0 (METHOD §6.3).

    One grid per sample ([B, N+1]) for class-conditional schedules (the reference used class 0's, §10.7). The
    sigma range is clipped to the schedule's (`geometric_sigma_span`).
    """
    lo, hi = geometric_sigma_span(schedule, labels, sigma_min, sigma_max)
    return _on_geometric_mean(schedule, karras_sigmas(num_steps, lo, hi, rho), labels, iterations)


def logsnr_grid(schedule: MatrixSchedule, num_steps: int, labels: Tensor | None = None, *,
                sigma_min: float = 0.002, sigma_max: float = 80.0, iterations: int = 48) -> Tensor:
    """Times at which the geometric-mean sigma is uniform in log sigma (DPM-Solver's 'logSNR' grid), then t = 0;
    returned like `edm_sigma_t`."""
    return _on_geometric_mean(schedule, logsnr_levels(schedule, num_steps, labels, sigma_min=sigma_min,
                                                      sigma_max=sigma_max), labels, iterations)


def logsnr_levels(schedule: MatrixSchedule, num_steps: int, labels: Tensor | None = None, *,
                  sigma_min: float = 0.002, sigma_max: float = 80.0) -> Tensor:
    """The log-SNR grid's geometric-mean sigma levels [num_steps], uniform in log sigma over the schedule's span."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps: expected an int >= 1, got {num_steps!r}")
    lo, hi = geometric_sigma_span(schedule, labels, sigma_min, sigma_max)
    return torch.linspace(math.log(hi), math.log(lo), num_steps, dtype=torch.float64).exp()


def fitted_levels(fitted: Mapping[int, Sequence[float]] | None, num_steps: int) -> Tensor:
    """The geometric-mean sigma levels [num_steps] of a model's fitted `num_steps`-step grid (`grid_fit`, stored
    with a shipped model: `models.fitted_grids`); ValueError naming `grid` when there is none or it is malformed."""
    if not fitted:
        raise ValueError("grid: 'optimized' needs a grid fitted to the model (python -m aniso_fast.evaluate "
                         "fit-grid --model NAME, for a shipped model); this model has none")
    if num_steps not in fitted:
        raise ValueError(f"grid: no optimized grid fitted for {num_steps} steps; this model has grids for "
                         f"{', '.join(map(str, sorted(fitted)))} steps")
    levels = torch.as_tensor(fitted[num_steps], dtype=torch.float64)
    if levels.shape != (num_steps,) or not bool(torch.isfinite(levels).all()) or not bool((levels > 0).all()) \
            or not bool((levels[1:] < levels[:-1]).all()):
        raise ValueError(f"grid: the fitted {num_steps}-step grid is not {num_steps} positive, descending levels")
    return levels


def optimized_t(schedule: MatrixSchedule, fitted: Mapping[int, Sequence[float]] | None, num_steps: int,
                labels: Tensor | None = None, *, iterations: int = 48) -> Tensor:
    """Times at which the geometric-mean sigma takes the fitted levels, then t = 0; returned like `edm_sigma_t`."""
    return _on_geometric_mean(schedule, fitted_levels(fitted, num_steps), labels, iterations)


def schedule_grid(schedule: MatrixSchedule, t: Tensor, labels: Tensor | None = None,
                  secondary: str = "end") -> Grid:
    """Evaluate a matrix schedule on times t ([N+1] or [B, N+1]); secondary 'mid' adds g at (t_a + t_b)/2.

    Grids are data: the values are detached from the schedule's parameters.
    """
    if secondary not in ("end", "mid"):
        raise ValueError(f"secondary: expected 'end' or 'mid', got {secondary!r}")
    t = t.to(torch.float64)
    tt = t if t.dim() == 2 else t[None]

    per_class = schedule.num_classes is not None
    if per_class:
        if labels is None:
            raise ValueError("labels: the schedule is class-conditional; pass labels")
        tt = tt.expand(labels.shape[0], -1)  # one grid per sample, with its own class's schedule

    @torch.no_grad()
    def at(times: Tensor) -> Tensor:  # [G, n] -> [G, n, K]
        G, n = times.shape
        g, _ = schedule(times.reshape(-1), labels.repeat_interleave(n) if per_class else None)
        return g.reshape(G, n, -1)

    g = at(tt)
    g_sec = at((tt[:, :-1] + tt[:, 1:]) / 2) if secondary == "mid" else None
    return Grid(g=g, g_sec=g_sec, t=tt)


def karras_grid(num_steps: int, num_subspaces: int = 1, *, sigma_min: float = 0.002, sigma_max: float = 80.0,
                rho: float = 7.0) -> Grid:
    """The isotropic EDM baseline: g = sigma^2 in every subspace on EDM's rho grid, then sigma = 0 (§6.1)."""
    sig = torch.cat([karras_sigmas(num_steps, sigma_min, sigma_max, rho), torch.zeros(1, dtype=torch.float64)])
    return Grid(g=(sig ** 2)[None, :, None].expand(1, -1, num_subspaces).contiguous())


# ---- solvers ----

def _at(g: Tensor, i: int, B: int) -> Tensor:
    return g[:, i].expand(B, -1)


def _progress(n: int, disable: bool):
    return tqdm(range(n), disable=disable, desc="sampling", leave=False)


def euler(model, x: Tensor, grid: Grid, labels: Tensor | None = None, *, progress: bool = False,
          callback: Callable[[dict], None] | None = None) -> Tensor:
    """Euler: x_b = x_a - (S_b - S_a) F(x_a). One network call per step."""
    basis, ids, B = model.basis, model.basis.group_ids(labels), x.shape[0]
    for i in _progress(grid.num_steps, not progress):
        g_a, g_b = _at(grid.g, i, B), _at(grid.g, i + 1, B)
        F_a = model.flow(x, g_a, labels)
        x = basis.combine(F_a, -(g_b.sqrt() - g_a.sqrt()), base=x, ids=ids)
        if callback is not None:
            callback({"i": i, "x": x, "g": g_b, "flow": F_a})
    return x


def heun(model, x: Tensor, grid: Grid, labels: Tensor | None = None, *, final_euler: bool = True,
         progress: bool = False, callback: Callable[[dict], None] | None = None) -> Tensor:
    """Matrix Heun (METHOD §6.2): secondary point s = the end point, or the midpoint when grid.g_sec is set.

    With `final_euler` the last step is Euler (EDM's convention: 2N-1 network calls for N steps, and no call
    at the end point, where sigma may be 0).
    """
    basis, ids, B = model.basis, model.basis.group_ids(labels), x.shape[0]
    N = grid.num_steps
    for i in _progress(N, not progress):
        g_a, g_b = _at(grid.g, i, B), _at(grid.g, i + 1, B)
        g_s = g_b if grid.g_sec is None else _at(grid.g_sec, i, B)
        S_a, S_b, S_s = g_a.sqrt(), g_b.sqrt(), g_s.sqrt()
        F_a = model.flow(x, g_a, labels)
        if final_euler and i == N - 1:
            x = basis.combine(F_a, -(S_b - S_a), base=x, ids=ids)  # Euler step
        else:
            x_s = basis.combine(F_a, -(S_s - S_a), base=x, ids=ids)  # Euler predictor to s
            F_s = model.flow(x_s, g_s, labels)
            dS, R = S_b - S_a, (S_b - S_a) / (S_s - S_a)  # R = 1 at the end point
            x = basis.combine(F_a, -dS * (1 - R / 2), F_s, -dS * R / 2, base=x, ids=ids)  # x_a - dS[F_a + R/2 (F_s - F_a)]
        if callback is not None:
            callback({"i": i, "x": x, "g": g_b, "flow": F_a})
    return x


def em(model, x: Tensor, grid: Grid, labels: Tensor | None = None, *, noise: Callable[[], Tensor] | None = None,
       progress: bool = False, callback: Callable[[dict], None] | None = None) -> Tensor:
    """Euler-Maruyama on the reverse SDE of the matrix VE process, dx = -gdot score ds + sqrt(gdot) dW with
    score = M^{-1/2} F per subspace, each step's gdot ds taken as the grid's g_a - g_b:
    x_b = x_a + (g_a - g_b) g_a^{-1/2} F(x_a) + (g_a - g_b)^{1/2} xi. One network call per step, on any grid.

    `noise()` draws each step's standard normal xi like x (default `torch.randn_like`; `sample` passes per-seed
    generators, so a sample does not depend on the rest of the batch).
    """
    if grid.g_sec is not None:
        raise ValueError("grid: Euler-Maruyama uses no secondary points; build the grid with secondary='end'")
    basis, ids, B = model.basis, model.basis.group_ids(labels), x.shape[0]
    draw = noise if noise is not None else lambda: torch.randn_like(x)
    for i in _progress(grid.num_steps, not progress):
        g_a, g_b = _at(grid.g, i, B), _at(grid.g, i + 1, B)
        F_a = model.flow(x, g_a, labels)
        dg = g_a - g_b
        x = basis.combine(F_a, dg * g_a.rsqrt(), draw(), dg.sqrt(), base=x, ids=ids)
        if callback is not None:
            callback({"i": i, "x": x, "g": g_b, "flow": F_a})
    return x


# ---- per-seed randomness (the same seed gives the same sample whatever else is in the batch) ----

MAX_SEED = 2 ** 32 - 1  # torch's CPU generator keeps only a seed's low 32 bits: 2**32 would repeat seed 0


def check_seeds(seeds: Sequence[int]) -> list[int]:
    """The seeds as a list of ints in [0, MAX_SEED], at least one; ValueError naming `seeds` otherwise."""
    try:
        out = [operator.index(s) for s in seeds]
    except TypeError:
        raise ValueError(f"seeds: expected integers, got {seeds!r}") from None
    if not out:
        raise ValueError("seeds: expected at least one seed")
    bad = [s for s in out if not 0 <= s <= MAX_SEED]
    if bad:
        raise ValueError(f"seeds: expected integers in [0, {MAX_SEED}] (32-bit generator seeds), got {bad[0]}")
    return out


def _generators(seeds: Sequence[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in check_seeds(seeds)]


def _draw(gens: Sequence[torch.Generator], shape: Sequence[int], dtype, device) -> Tensor:
    """The next standard normal image of each seed's stream (drawn in float64 on the CPU, so any device and dtype
    sees the same numbers)."""
    return torch.stack([torch.randn(tuple(shape), generator=g, dtype=torch.float64) for g in gens]).to(
        device=device, dtype=dtype)


def seeded_noise(seeds: Sequence[int], shape: Sequence[int], *, dtype=torch.float32,
                 device: torch.device | str = "cpu") -> Tensor:
    """The first draw of each seed's stream: the start noise of every sampler."""
    return _draw(_generators(seeds), shape, dtype, device)


def seeded_labels(seeds: Sequence[int], num_classes: int, device: torch.device | str = "cpu") -> Tensor:
    """A class per seed from numpy's generator on (seed, 1): a stream apart from the seed's torch noise stream
    (an offset seed on torch's generator is not: it keeps only the low 32 bits)."""
    out = [int(np.random.default_rng([s, 1]).integers(num_classes)) for s in check_seeds(seeds)]
    return torch.tensor(out, dtype=torch.long, device=device)


def check_labels(labels, seeds: Sequence[int], num_classes: int | None,
                 device: torch.device | str = "cpu") -> Tensor | None:
    """One class label per seed (drawn by `seeded_labels` when None) for a model with `num_classes`, else None;
    ValueError naming `labels` otherwise."""
    if not num_classes:
        if labels is not None:
            raise ValueError("labels: this model is unconditional")
        return None
    if labels is None:
        return seeded_labels(seeds, num_classes, device)
    labels = torch.as_tensor(labels, dtype=torch.long, device=device)
    if labels.shape != (len(seeds),):
        raise ValueError(f"labels: expected one label per seed ({len(seeds)}), got shape {tuple(labels.shape)}")
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(f"labels: expected classes in [0, {num_classes}), got {labels.tolist()}")
    return labels


def steps_for_nfe(nfe: int, solver: str, secondary: str = "end") -> tuple[int, bool]:
    """(number of steps, final_euler) that spend exactly `nfe` network calls (no wasted call, METHOD §10.6)."""
    if solver not in SOLVERS:
        raise ValueError(f"solver: expected one of {SOLVERS}, got {solver!r}")
    if not isinstance(nfe, int) or isinstance(nfe, bool):
        raise ValueError(f"nfe: expected an int, got {nfe!r}")
    if solver in _ONE_CALL_PER_STEP:  # the order of a multistep solver is checked by resolve_sampler
        if nfe < 1:
            raise ValueError(f"nfe: {SOLVER_LABELS[solver]} needs at least 1 network call, got {nfe}")
        return nfe, False
    if secondary == "end":
        if nfe < 3 or nfe % 2 == 0:
            raise ValueError(f"nfe: end-point Heun uses 2N-1 calls (N steps, the last one Euler): expected an odd "
                             f"number >= 3, got {nfe}")
        return (nfe + 1) // 2, True
    if nfe < 2:
        raise ValueError(f"nfe: midpoint Heun needs at least 2 network calls, got {nfe}")
    return (nfe + 1) // 2, nfe % 2 == 1


MAX_NFE = 10_000  # far beyond any useful sampler; keeps a typo from allocating a grid of 10^11 steps


@dataclass(frozen=True)
class Sampler:
    """A fully resolved sampler: the one place where solver, grid, secondary point and NFE are reconciled."""
    solver: str
    grid: str
    secondary: str | None  # Heun's secondary point ('mid' or 'end'); None for Euler
    nfe: int  # network calls per sample, exactly
    steps: int
    final_euler: bool
    order: int | None = None  # multistep solvers only

    @property
    def key(self) -> tuple[str, str, str]:
        """(solver, grid, secondary) as the sampler-name tables key it (Euler: secondary 'end')."""
        return (self.solver, self.grid, self.secondary or "end")

    @property
    def name(self) -> str:
        order = f" order {self.order}" if self.order is not None and self.solver in ("unipc", "ipndm", "deis") else ""
        return SAMPLER_NAMES.get(self.key, f"{SOLVER_LABELS[self.solver]}{order}, {GRID_LABELS[self.grid]}")


def resolve_sampler(solver: str = "heun", grid: str = "uniform_t", secondary: str | None = None,
                    nfe: int = 9, order: int | None = None) -> Sampler:
    """Check a (solver, grid, secondary, nfe) choice and work out its steps; ValueError naming the argument.

    Defaults: Heun's secondary point is the midpoint on the uniform t grid and the end point elsewhere; on the
    Karras grid (EDM's) Heun takes the end point only. Euler, Euler-Maruyama ('em') and the multistep solvers
    spend one call per step, take no secondary point and run on every grid. Which samplers a process family
    accepts: `families.check_sampler`.
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver: expected one of {', '.join(SOLVERS)}, got {solver!r}")
    if grid not in GRIDS:
        raise ValueError(f"grid: expected one of {', '.join(GRIDS)}, got {grid!r}")
    if secondary is not None and secondary not in ("end", "mid"):
        raise ValueError(f"secondary: expected 'end' or 'mid', got {secondary!r}")
    multi = solver in multistep.MULTISTEP
    if order is not None and not multi:
        raise ValueError(f"order: only the multistep solvers ({', '.join(multistep.MULTISTEP)}) take an order")
    if solver in _ONE_CALL_PER_STEP and secondary == "mid":
        raise ValueError(f"secondary: {solver} uses no secondary point")
    if solver in _ONE_CALL_PER_STEP:
        secondary = None
    elif secondary is None:
        secondary = "mid" if grid == "uniform_t" else "end"
    if grid == "karras" and secondary == "mid":
        raise ValueError("secondary: the Karras grid is defined for end-point Heun only")
    if not isinstance(nfe, int) or isinstance(nfe, bool):
        raise ValueError(f"nfe: expected an int, got {nfe!r}")
    if nfe > MAX_NFE:
        raise ValueError(f"nfe: expected at most {MAX_NFE} network calls, got {nfe}")
    steps, final_euler = steps_for_nfe(nfe, solver, secondary or "end")
    if multi:
        order = multistep.DEFAULT_ORDER[solver] if order is None else order
        need = multistep.min_nfe(solver, order)  # ValueError naming order if the solver has no such order
        if nfe < need:
            raise ValueError(f"nfe: {solver} of order {order} needs at least {need} network calls, got {nfe}")
    return Sampler(solver, grid, secondary, nfe, steps, final_euler, order)


def sample(model, schedule: MatrixSchedule | None = None, *, nfe: int = 9, solver: str = "heun",
           grid: str = "uniform_t", secondary: str | None = None, order: int | None = None,
           seeds: Sequence[int] = (0,), labels: Tensor | None = None, image_shape: Sequence[int] | None = None,
           fitted: Mapping[int, Sequence[float]] | None = None, dtype=torch.float32,
           device: torch.device | str = "cpu", progress: bool = False) -> tuple[Tensor, Tensor | None, dict]:
    """Generate one sample per seed: build the grid, draw x_T = M(T)^{1/2} z, run the solver.

    solver: 'euler', 'heun' (matrix Heun, METHOD §6), 'em' (Euler-Maruyama on the reverse SDE, per-seed step
    noises) or a multistep solver of `multistep.MULTISTEP` (with its `order`). grid: 'uniform_t' (the paper's, midpoint Heun by default), 'edm_sigma' (EDM's sigma grid on the
    geometric mean, end-point Heun), 'logsnr' (the geometric-mean sigma uniform in log sigma), 'karras' (the
    isotropic EDM baseline; the schedule is not used), 'optimized' (the model's grid fitted for the step count,
    from `fitted`: steps -> geometric-mean sigma levels, `models.fitted_grids`).
    Returns (x [B, C, H, W], labels, info with the NFE actually spent).
    """
    plan = resolve_sampler(solver, grid, secondary, nfe, order)
    if grid != "karras" and schedule is None:
        raise ValueError(f"schedule: grid {grid!r} needs a schedule")
    check_grid(grid, schedule)
    seeds = check_seeds(seeds)
    labels = check_labels(labels, seeds, getattr(model, "num_classes", None), device)
    if grid == "karras":
        g = karras_grid(plan.steps, model.basis.num_subspaces)
    else:
        times = {"uniform_t": lambda: uniform_t(plan.steps, schedule.T),
                 "edm_sigma": lambda: edm_sigma_t(schedule, plan.steps, labels),
                 "logsnr": lambda: logsnr_grid(schedule, plan.steps, labels),
                 "optimized": lambda: optimized_t(schedule, fitted, plan.steps, labels)}
        t = times[grid]()
        g = schedule_grid(schedule, t, labels, plan.secondary or "end")
    g = Grid(g.g.to(device), None if g.g_sec is None else g.g_sec.to(device), g.t)
    shape = tuple(image_shape) if image_shape is not None else tuple(model.image_shape)
    gens = _generators(seeds)
    z = _draw(gens, shape, dtype, device)
    ids = model.basis.group_ids(labels)
    x = model.basis.scale(z, _at(g.g, 0, len(seeds)).sqrt(), ids=ids)
    with torch.no_grad():
        if solver in multistep.MULTISTEP:
            x = multistep.MULTISTEP[solver](model, x, g, labels, order=plan.order, progress=progress)
        elif solver == "euler":
            x = euler(model, x, g, labels, progress=progress)
        elif solver == EM:  # the step noises continue each seed's stream after its start noise
            x = em(model, x, g, labels, noise=lambda: _draw(gens, shape, dtype, device), progress=progress)
        else:
            x = heun(model, x, g, labels, final_euler=plan.final_euler, progress=progress)
    return x, labels, {"nfe": plan.nfe, "steps": plan.steps, "solver": solver, "grid": grid,
                       "secondary": plan.secondary, "order": plan.order}
