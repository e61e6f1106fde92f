"""Time grids (METHOD §6.3-6.4): small named functions that build them, and the table of grids a sampler can name.

A *grid* is data: the per-subspace variances g along the path, `[G, N+1, K]` (G = 1, or one grid per sample
for class-conditional schedules), descending to the end point, plus optional secondary variances `[G, N, K]`
for the midpoint Heun step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..geometry.schedules import MatrixSchedule, karras_sigmas

__all__ = ["GridSpec", "GRIDS", "SECONDARIES", "Grid", "FittedGrids", "check_grid", "uniform_t",
           "geometric_sigma_span", "edm_sigma_t", "logsnr_grid", "logsnr_levels", "fitted_levels", "learned_levels",
           "per_class_levels", "learned_offsets", "offset_grid",
           "optimized_t", "schedule_grid", "karras_grid", "build_grid", "step_indices"]

SECONDARIES = ("end", "mid")  # Heun's secondary point: the step's end point, or the midpoint in t


@dataclass(frozen=True)
class GridSpec:
    """What a sampler needs to know about a grid."""
    name: str
    label: str  # as the docs and tables name it
    code: str  # one character for compact tables
    on_geometric_mean: bool = False  # placed on the schedule's geometric mean: needs its inverse
    secondaries: tuple[str, ...] = SECONDARIES  # Heun's secondary points defined on it
    default_secondary: str = "end"
    uses_schedule: bool = True  # False: the isotropic Karras grid, the same whatever the schedule


GRIDS: dict[str, GridSpec] = {g.name: g for g in (
    GridSpec("uniform_t", "uniform t grid", "u", default_secondary="mid"),
    GridSpec("edm_sigma", "EDM sigma grid on the geometric mean", "e", on_geometric_mean=True),
    GridSpec("karras", "Karras grid", "K", secondaries=("end",), uses_schedule=False),
    GridSpec("logsnr", "log-SNR grid on the geometric mean", "λ", on_geometric_mean=True),
    GridSpec("optimized", "fitted grid on the geometric mean", "o", on_geometric_mean=True),
    GridSpec("learned", "learned grid (LD3) on the geometric mean", "L", on_geometric_mean=True),
)}


class FittedGrids(dict):
    """A model's grids fitted to it: steps -> geometric-mean sigma levels of its 'optimized' grids (the dict itself),
    and `learned`: solver key (`spec.learned_key`, e.g. 'ipndm-4') -> {steps: levels} of the grids learned for that
    solver (`grid_learn`, grid 'learned'). A plain {steps: levels} mapping still serves where only 'optimized' is
    used."""

    def __init__(self, optimized: Mapping[int, Sequence[float]] | None = None,
                 learned: Mapping[str, Mapping[int, Sequence[float]]] | None = None):
        super().__init__(optimized or {})
        self.learned = {key: dict(levels) for key, levels in (learned or {}).items()}


@dataclass
class Grid:
    g: Tensor  # [G, N+1, K] float64: variances at the grid points, first = start (t = T), last = end
    g_sec: Tensor | None = None  # [G, N, K] secondary variances of the midpoint Heun step (None: end point)
    t: Tensor | None = None  # [G, N+1] the times, for information

    @property
    def num_steps(self) -> int:
        return self.g.shape[1] - 1


def check_grid(grid: str, schedule) -> None:
    """ValueError naming `grid` when the grid does not apply to the schedule: the grids placed on the geometric mean
    need its inverse."""
    if grid not in GRIDS:
        raise ValueError(f"grid: expected one of {', '.join(GRIDS)}, got {grid!r}")
    if GRIDS[grid].on_geometric_mean and not hasattr(schedule, "invert_geometric_mean"):
        raise ValueError(f"grid: {grid!r} is placed on the geometric mean of the schedule, and this "
                         f"{type(schedule).__name__} has no inverse of it; use 'uniform_t' or 'karras'")


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
    """Times [N+1] (or [B, N+1]) at the geometric-mean sigma levels `sig` [N], then t = 0; `sig` [C, N] holds one
    grid per class of a class-conditional schedule (a per-class learned grid), each sample taking its class's."""
    if sig.dim() == 2:
        sig = per_class_levels(schedule, sig, labels)
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


def _checked_levels(values: Sequence[float], num_steps: int, what: str) -> Tensor:
    """[num_steps] positive descending levels, or [C, num_steps] of them (one grid per class), as float64."""
    levels = torch.as_tensor(values, dtype=torch.float64)
    if levels.dim() not in (1, 2) or levels.shape[-1] != num_steps or 0 in levels.shape \
            or not bool(torch.isfinite(levels).all()) or not bool((levels > 0).all()) \
            or not bool((levels[..., 1:] < levels[..., :-1]).all()):
        raise ValueError(f"grid: the {what} {num_steps}-step grid is not {num_steps} positive, descending levels "
                         f"(or one such grid per class)")
    return levels


def per_class_levels(schedule, levels: Tensor, labels: Tensor | None) -> Tensor:
    """Each sample's row [B, N] of per-class levels [C, N] (one grid per class of a class-conditional schedule);
    ValueError naming `grid` when the schedule is global or the classes do not match."""
    if schedule.num_classes is None:
        raise ValueError("grid: a grid learned per class needs a class-conditional schedule; this one is global")
    if levels.shape[0] != schedule.num_classes:
        raise ValueError(f"grid: the per-class grid has {levels.shape[0]} classes, the schedule "
                         f"{schedule.num_classes}")
    labels = schedule.check_labels(labels)
    if labels is None:
        raise ValueError("labels: the schedule is class-conditional; pass labels")
    return levels[labels]


def fitted_levels(fitted: Mapping[int, Sequence[float]] | None, num_steps: int) -> Tensor:
    """The geometric-mean sigma levels [num_steps] of a model's fitted `num_steps`-step grid (`grid_fit`, stored
    with a shipped model: `models.fitted_grids`); ValueError naming `grid` when there is none or it is malformed."""
    if not fitted:
        raise ValueError("grid: 'optimized' needs a grid fitted to the model (python -m aniso_fast.evaluate "
                         "fit-grid --model NAME, for a shipped model); this model has none")
    if num_steps not in fitted:
        raise ValueError(f"grid: no optimized grid fitted for {num_steps} steps; this model has grids for "
                         f"{', '.join(map(str, sorted(fitted)))} steps")
    return _checked_levels(fitted[num_steps], num_steps, "fitted")


def _learned_entry(fitted, key: str | None, num_steps: int):
    learned = getattr(fitted, "learned", None) or {}
    if key not in learned or not learned[key]:
        have = f"it has learned grids for {', '.join(sorted(learned))}" if learned else "it has none"
        raise ValueError(f"grid: 'learned' needs a grid learned for {key} on the model (python -m "
                         f"aniso_fast.evaluate learn-grid --model NAME --solver ...); {have}")
    if num_steps not in learned[key]:
        raise ValueError(f"grid: no grid learned for {key} at {num_steps} steps; the model has {key} grids for "
                         f"{', '.join(map(str, sorted(learned[key])))} steps")
    return learned[key][num_steps]


def learned_levels(fitted: Mapping[int, Sequence[float]] | None, key: str | None, num_steps: int) -> Tensor:
    """The geometric-mean sigma levels [num_steps] (or [C, num_steps], one grid per class: `learn-grid --per-class`)
    of the `num_steps`-step grid learned for the solver `key` (`spec.learned_key`; `grid_learn`, stored with a
    shipped model in `FittedGrids.learned`); ValueError naming `grid` when the model has none for that solver and
    step count."""
    entry = _learned_entry(fitted, key, num_steps)
    return _checked_levels(entry["levels"] if isinstance(entry, dict) else entry, num_steps, f"learned {key}")


def learned_offsets(fitted, key: str | None, num_steps: int) -> Tensor | None:
    """The per-subspace log-variance offsets [num_steps, K] of a learned grid (`learn-grid --per-subspace`), or
    None for a grid without them."""
    entry = _learned_entry(fitted, key, num_steps)
    if not isinstance(entry, dict):
        return None
    offsets = torch.as_tensor(entry["offsets"], dtype=torch.float64)
    if offsets.dim() != 2 or offsets.shape[0] != num_steps or not bool(torch.isfinite(offsets).all()):
        raise ValueError(f"grid: the learned {key} {num_steps}-step grid's offsets are not {num_steps} rows of "
                         f"finite per-subspace values")
    return offsets


def offset_grid(grid: "Grid", offsets: Tensor | None) -> "Grid":
    """A grid with each subspace's log-variance moved by `offsets` [N, K] at the N levels (its own clock; the end
    point stays), the midpoints by the mean of their ends' offsets; `grid` itself for None."""
    if offsets is None:
        return grid
    K = grid.g.shape[-1]
    if offsets.shape != (grid.num_steps, K):
        raise ValueError(f"grid: the learned grid's offsets are {tuple(offsets.shape)}, expected "
                         f"({grid.num_steps}, {K}) for this model's {K} subspaces")
    ends = torch.cat([offsets, torch.zeros_like(offsets[:1])])  # t = 0 stays
    g = grid.g * ends.exp()
    g_sec = None if grid.g_sec is None else grid.g_sec * ((ends[:-1] + ends[1:]) / 2).exp()
    return Grid(g=g, g_sec=g_sec, t=grid.t)


def optimized_t(schedule: MatrixSchedule, fitted: Mapping[int, Sequence[float]] | None, num_steps: int,
                labels: Tensor | None = None, *, iterations: int = 48) -> Tensor:
    """Times at which the geometric-mean sigma takes the fitted levels, then t = 0; returned like `edm_sigma_t`."""
    return _on_geometric_mean(schedule, fitted_levels(fitted, num_steps), labels, iterations)


def schedule_grid(schedule: MatrixSchedule, t: Tensor, labels: Tensor | None = None,
                  secondary: str = "end") -> Grid:
    """Evaluate a matrix schedule on times t ([N+1] or [B, N+1]); secondary 'mid' adds g at (t_a + t_b)/2.

    Grids are data: the values are detached from the schedule's parameters.
    """
    if secondary not in SECONDARIES:
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


def build_grid(grid: str, schedule: MatrixSchedule | None, num_steps: int, labels: Tensor | None = None, *,
               secondary: str = "end", fitted: Mapping[int, Sequence[float]] | None = None,
               num_subspaces: int = 1, learned_key: str | None = None) -> Grid:
    """The named grid of `num_steps` steps on the schedule (the Karras grid ignores it: `num_subspaces` copies);
    'learned' takes the grid learned for the solver `learned_key` (`spec.learned_key`) from `fitted.learned`."""
    if grid == "karras":
        return karras_grid(num_steps, num_subspaces)
    times = {"uniform_t": lambda: uniform_t(num_steps, schedule.T),
             "edm_sigma": lambda: edm_sigma_t(schedule, num_steps, labels),
             "logsnr": lambda: logsnr_grid(schedule, num_steps, labels),
             "optimized": lambda: optimized_t(schedule, fitted, num_steps, labels),
             "learned": lambda: _on_geometric_mean(schedule, learned_levels(fitted, learned_key, num_steps), labels,
                                                   48)}
    built = schedule_grid(schedule, times[grid](), labels, secondary)
    return offset_grid(built, learned_offsets(fitted, learned_key, num_steps)) if grid == "learned" else built


def step_indices(num_steps: int, progress: bool = False, calls_per_step: int = 1, last_step_calls: int | None = None):
    """The step indices 0..num_steps-1 of a solver's loop over a grid, with a progress bar in network calls (the
    NFE: `calls_per_step` per step, `last_step_calls` on the last one) that stays on screen, when `progress`."""
    last = calls_per_step if last_step_calls is None else last_step_calls
    with tqdm(total=calls_per_step * (num_steps - 1) + last if num_steps else 0, disable=not progress,
              desc="sampling", unit="call", leave=True) as bar:
        for i in range(num_steps):
            yield i
            bar.update(last if i == num_steps - 1 else calls_per_step)
