"""Time grids learned for one solver by matching a teacher (`--grid learned`), in the spirit of LD3 (Tong et al.,
"Learning to Discretize Denoising Diffusion ODEs", ICLR 2025).

Teacher: DPM-Solver++(2M) on a fine log-SNR grid (`teacher_steps` steps) from each seed's start noise; its
endpoints are computed once per run (and kept in a file when a cache path is given). Student: the solver, at one
order and NFE, on a grid whose geometric-mean sigma levels are parameters. Loss: the mean squared difference between
the student's endpoint and the teacher's from the same start noise, backpropagated through the solver (the network,
or the exact mixture, and the subspace ops have autograd; the network's own weights are frozen). Adam over epochs
of the training seeds; the grid with the lowest held-out error (validation seeds disjoint from the training ones)
is kept, the starting grid included, so the result is never worse than its start on the validation seeds. LD3's
relaxed objective (a ball around x_T) is not used. The distance is the pixels' mean square by default; a caller may
pass another one (`distance`: per-sample losses of student and teacher endpoints), e.g. a perceptual one in a
classifier's feature space (`evaluation.features.feature_distance`, `learn-grid --loss classifier`), as LD3 matches
in LPIPS; the held-out seeds then pick the grid by that distance too.

**Parametrisation.** The first level is fixed at the top `hi` of the schedule's geometric-mean sigma span (the start
noise x_T = M(T)^{1/2} z is then the teacher's), the end point sigma = 0 is implied (as for every stored grid), and
the N - 1 interior levels are learned in log sigma: the N - 1 gaps plus a slack down to the floor `lo` of the span
(the schedule's lowest geometric-mean sigma, at most `SIGMA_FLOOR` below) are `(ln hi - ln lo)` times the shares
`MIN_SHARE + (1 - N MIN_SHARE) softmax(theta)`, so the levels are strictly descending inside (lo, hi) for every
theta. A level is placed where the schedule's geometric
mean is sigma^2 (bisection, as `grids.build_grid` places it at sampling time) and g_k there gets its gradient by the
implicit function theorem: d ln g_k / d ln sigma = 2 s_k / mean_j s_j, s_k = d ln g_k / dt (exact for an isotropic
schedule, g = sigma^2). A grid is stored as its N levels, like a fitted one, under the solver's key
(`spec.learned_key`): it belongs to that solver.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .grids import (Grid, check_grid, fitted_levels, geometric_sigma_span, logsnr_levels, offset_grid, per_class_levels,
                    uniform_t)
from .noise import seeded_noise
from .sampler import sample
from .spec import resolve_sampler

__all__ = ["LEARN_SEED", "TEACHER_STEPS", "SIGMA_FLOOR", "BISECTIONS", "STARTS", "Distance", "Teacher",
           "LevelParameters", "level_grid", "teacher", "start_levels", "pixel_mse", "endpoint_error", "learn_levels",
           "learn_grids"]

LEARN_SEED = 10_000_000  # training seeds from here, validation seeds after them: far from the table's 0..N-1
TEACHER_STEPS = 64
SIGMA_FLOOR = 1e-4  # the interior levels may go below the log-SNR grid's 0.002, down to this (or the schedule's end)
MIN_SHARE = 1e-6  # the least share of the log-sigma span a gap gets, whatever the logits (levels stay distinct)
BISECTIONS = 48  # as grids.build_grid places fitted and learned levels at sampling time
STARTS = ("auto", "optimized", "logsnr", "uniform_t")

Distance = Callable[[Tensor, Tensor], Tensor]  # (student endpoints, teacher endpoints) [B, ...] -> losses [B]


def pixel_mse(x: Tensor, x0: Tensor) -> Tensor:
    """The default distance: the mean square over pixels, per sample."""
    return (x - x0).flatten(1).square().mean(1)


@dataclass
class Teacher:
    """Start noise z [B, C, H, W] (unit, per seed), labels [B] or None, and the teacher's endpoints x0."""
    seeds: list[int]
    z: Tensor
    labels: Tensor | None
    x0: Tensor

    def part(self, idx: Tensor | slice) -> "Teacher":
        seeds = [self.seeds[i] for i in range(len(self.seeds))[idx]] if isinstance(idx, slice) else \
            [self.seeds[int(i)] for i in idx]
        return Teacher(seeds, self.z[idx], None if self.labels is None else self.labels[idx], self.x0[idx])


def _span(schedule, num_classes: int | None) -> tuple[float, float]:
    labels = None if not num_classes else torch.arange(num_classes)
    return geometric_sigma_span(schedule, labels, SIGMA_FLOOR)


class LevelParameters(torch.nn.Module):
    """N descending geometric-mean sigma levels: hi fixed, then N - 1 learned inside (lo, hi) (module docstring);
    a start [C, N] learns one such grid per class."""

    def __init__(self, start: Tensor, lo: float, hi: float, subspaces: int | None = None):
        super().__init__()
        start = torch.as_tensor(start, dtype=torch.float64)
        if start.dim() not in (1, 2) or start.shape[-1] < 2 or 0 in start.shape:
            raise ValueError(f"start: expected at least 2 levels (1 step has nothing to learn), or [classes, levels], "
                             f"got {tuple(start.shape)}")
        if not 0 < lo < hi:
            raise ValueError(f"lo, hi: expected 0 < lo < hi, got {lo}, {hi}")
        self.lo, self.hi = float(lo), float(hi)
        log = start.log().clamp(math.log(lo), math.log(hi))
        log[..., 0] = math.log(hi)
        gaps = torch.cat([log[..., :-1] - log[..., 1:], (log[..., -1:] - math.log(lo))], -1)
        total = math.log(hi) - math.log(lo)
        gaps = gaps.clamp_min(1e-4 * total)  # a start level on the floor, or repeated, gets a small gap
        n = gaps.shape[-1]
        share = (gaps / gaps.sum(-1, keepdim=True) - MIN_SHARE) / (1 - n * MIN_SHARE)
        self.theta = torch.nn.Parameter(share.clamp_min(1e-12).log())
        # per-subspace offsets of the interior levels' log-variances (`subspaces`: K), zero-mean over the subspaces
        self.shift = None if not subspaces else torch.nn.Parameter(
            torch.zeros(start.shape[-1] - 1, int(subspaces), dtype=torch.float64))

    def offsets(self) -> Tensor | None:
        """[N, K] per-subspace log-variance offsets of the N levels (the first, the start noise's, 0; each row of
        mean 0 over the subspaces, so a level's geometric mean stays), or None without `subspaces`."""
        if self.shift is None:
            return None
        moved = self.shift - self.shift.mean(-1, keepdim=True)
        return torch.cat([moved.new_zeros(1, moved.shape[1]), moved])

    def forward(self) -> Tensor:
        total = math.log(self.hi) - math.log(self.lo)
        n = self.theta.shape[-1]
        share = MIN_SHARE + (1 - n * MIN_SHARE) * torch.softmax(self.theta, -1)  # no gap underflows to 0
        drops = torch.cumsum(share[..., :-1], -1) * total
        top = self.theta.new_full((*self.theta.shape[:-1], 1), math.log(self.hi))
        return torch.cat([top, math.log(self.hi) - drops], -1).exp()


def level_grid(schedule, levels: Tensor, labels: Tensor | None = None, secondary: str = "end") -> Grid:
    """The grid [G, N+1, K] at geometric-mean sigma `levels` [N] (or [C, N], one grid per class: each sample takes
    its class's) then t = 0, differentiable in the levels (the implicit function theorem; the values are those
    `grids.build_grid` gives for the same levels). `secondary` 'mid' adds g at the midpoints in t (midpoint Heun),
    differentiable too: a level's time moves by dt_i = 2 d ln sigma_i / mean_j s_j(t_i), the midpoint by half of it."""
    check_grid("learned", schedule)
    if levels.dim() == 2:
        levels = per_class_levels(schedule, levels, labels)
    fixed = levels.detach().to(torch.float64)
    t = schedule.invert_geometric_mean(fixed ** 2, labels, iterations=BISECTIONS)
    tt = t if t.dim() == 2 else t[None]
    G, n = tt.shape
    per_class = schedule.num_classes is not None

    def at(times: Tensor) -> tuple[Tensor, Tensor]:  # [G, m] -> (g, s = d ln g / dt) [G, m, K]
        m = times.shape[1]
        g, gdot = schedule(times.reshape(-1), labels.repeat_interleave(m) if per_class else None)
        return g.reshape(G, m, -1), (gdot / g).reshape(G, m, -1)

    with torch.no_grad():
        g, slope = at(tt)
        mean = slope.mean(-1, keepdim=True)
        ok = mean.abs() > 0
        dt = torch.where(ok, 2 / mean.where(ok, torch.ones_like(mean)), 0.0)  # d t_i / d ln sigma_i [G, N, 1]
        g_end = schedule(torch.zeros(G, dtype=torch.float64), labels if per_class else None)[0][:, None]
        if secondary == "mid":
            ends = torch.cat([tt, torch.zeros(G, 1, dtype=tt.dtype)], 1)
            g_mid, slope_mid = at((ends[:, :-1] + ends[:, 1:]) / 2)
    moved = (levels.to(torch.float64).log() - fixed.log())  # zero, carrying the gradient
    moved = (moved if moved.dim() == 2 else moved[None])[:, :, None]
    shift = dt * moved  # each level's time moved [G, N, 1]
    g = g * torch.exp(slope * shift)  # = exp(2 s_k / mean_j s_j d ln sigma): d ln g_k / d ln sigma
    g_sec = None
    if secondary == "mid":
        half = (shift + torch.cat([shift[:, 1:], torch.zeros_like(shift[:, :1])], 1)) / 2  # t = 0 stays
        g_sec = g_mid * torch.exp(slope_mid * half)
    elif secondary != "end":
        raise ValueError(f"secondary: expected 'end' or 'mid', got {secondary!r}")
    return Grid(g=torch.cat([g, g_end], 1), g_sec=g_sec, t=torch.cat([tt, torch.zeros(G, 1, dtype=tt.dtype)], 1))


def teacher(model, schedule, seeds: Sequence[int], *, steps: int = TEACHER_STEPS, batch: int = 64,
            cache: str | Path | None = None, progress: bool = False) -> Teacher:
    """The teacher's endpoints (DPM-Solver++(2M), `steps` steps on the log-SNR grid) from each seed's noise; labels
    seed mod num_classes (class-balanced). With `cache`, read from that file when it holds these seeds and steps,
    else computed and written there."""
    seeds = list(seeds)
    num_classes = getattr(model, "num_classes", None)
    labels = None if not num_classes else torch.tensor([s % num_classes for s in seeds])
    z = seeded_noise(seeds, model.image_shape)
    if cache is not None and Path(cache).is_file():
        saved = torch.load(cache, weights_only=True)
        if saved.get("seeds") == seeds and saved.get("steps") == steps:
            return Teacher(seeds, z, labels, saved["x0"])
    out = []
    for i in tqdm(range(0, len(seeds), batch), disable=not progress, desc=f"teacher ({steps} steps)", leave=False):
        chunk = seeds[i:i + batch]
        out.append(sample(model, schedule, nfe=steps, solver="dpmpp-2m", grid="logsnr", seeds=chunk,
                          labels=None if labels is None else labels[i:i + batch])[0])
    x0 = torch.cat(out)
    if cache is not None:
        from ..utils.atomic import atomic_write  # utils is below sampling

        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(cache, lambda tmp: torch.save({"seeds": seeds, "steps": steps, "x0": x0}, tmp))
    return Teacher(seeds, z, labels, x0)


def start_levels(schedule, steps: int, start: str, num_classes: int | None,
                 fitted: dict | None = None) -> tuple[str, Tensor]:
    """(the name of the starting grid, its levels [steps]): 'optimized' (the model's fitted grid), 'logsnr',
    'uniform_t' (the geometric-mean sigma at the paper's uniform times; for class-conditional schedules the geometric
    mean over the classes, clipped into the span), or 'auto' (the fitted grid where the model has one for `steps`,
    else the log-SNR grid)."""
    if start not in STARTS:
        raise ValueError(f"start: expected one of {', '.join(map(repr, STARTS))}, got {start!r}")
    if start == "optimized" or (start == "auto" and fitted and steps in fitted):
        return "optimized", fitted_levels(fitted, steps)
    labels = None if not num_classes else torch.arange(num_classes)
    if start == "uniform_t":
        lo, hi = _span(schedule, num_classes)
        t = uniform_t(steps, schedule.T)[:-1]
        with torch.no_grad():
            if schedule.num_classes is None:
                gm = schedule.geometric_mean(t, None)
            else:
                n = labels.shape[0]
                gm = schedule.geometric_mean(t.repeat(n), labels.repeat_interleave(steps)).reshape(n, steps)
                gm = gm.log().mean(0).exp()
        levels = gm.sqrt().clamp(lo, hi)
        levels[0] = hi
        return "uniform_t", levels
    return "logsnr", logsnr_levels(schedule, steps, labels)


def _run(model, schedule, plan, levels: Tensor, part: Teacher, offsets: Tensor | None = None) -> Tensor:
    grid = offset_grid(level_grid(schedule, levels, part.labels, plan.secondary or "end"), offsets)
    B = part.z.shape[0]
    x = model.basis.scale(part.z, grid.g[:, 0].expand(B, -1).sqrt(), ids=model.basis.group_ids(part.labels))
    kwargs = {}
    if plan.spec.orders:
        kwargs["order"] = plan.order
    if plan.spec.secondaries:
        kwargs["final_euler"] = plan.final_euler
    return plan.spec.run(model, x, grid, part.labels, **kwargs)


def endpoint_error(model, schedule, plan, levels: Tensor, part: Teacher, batch: int = 64,
                   distance: Distance | None = None, offsets: Tensor | None = None) -> float:
    """Mean over samples of the RMS over pixels of (student endpoint - teacher endpoint), as `grid_fit` reports;
    with `distance`, the mean of that distance instead. `offsets`: per-subspace offsets of the levels."""
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(part.seeds), batch):
            chunk = part.part(slice(i, i + batch))
            x = _run(model, schedule, plan, levels.detach(), chunk, None if offsets is None else offsets.detach())
            per = pixel_mse(x, chunk.x0).sqrt() if distance is None else distance(x, chunk.x0)
            total += float(per.sum())
    return total / len(part.seeds)


def learn_levels(model, schedule, solver: str, nfe: int, train: Teacher, val: Teacher, start: Tensor, *,
                 order: int | None = None, epochs: int = 10, batch: int = 16, lr: float = 0.05, seed: int = 0,
                 distance: Distance | None = None, per_class: bool = False, secondary: str | None = None,
                 per_subspace: bool = False, progress: bool = False) -> dict:
    """Learn the grid of `solver` (at `order`) for `nfe` network calls: returns {levels (list, descending), start,
    start_val, best_val, best_epoch, history: [{epoch, train_loss, val}], start_rms, best_rms}. `val` (the mean
    `distance` on the held-out seeds; without one, the pixel RMS) picks the kept grid; `*_rms` are the pixel RMS of
    the start and of the kept grid on them. `per_class`: one grid per class of a class-conditional schedule (each
    starting from `start`; a class's levels learn from its own seeds only), returned as a list per class.
    `per_subspace`: also each subspace's log-variance offset at every interior level (`LevelParameters.offsets`),
    returned as `offsets` [N][K]."""
    loss_of = pixel_mse if distance is None else distance
    plan = resolve_sampler(solver, "learned", secondary, nfe, order)
    if plan.spec.stochastic:
        raise ValueError(f"solver: {solver} is stochastic; a grid is learned for a deterministic solver")
    if start.shape != (plan.steps,):
        raise ValueError(f"start: expected {plan.steps} levels for {plan.steps} steps, got {tuple(start.shape)}")
    lo, hi = _span(schedule, getattr(model, "num_classes", None))
    if per_class:
        if schedule.num_classes is None:
            raise ValueError("per_class: the model's schedule is global; a grid per class needs class-conditional "
                             "schedules")
    params = LevelParameters(start.expand(schedule.num_classes, -1) if per_class else start, lo, hi,
                             subspaces=model.basis.num_subspaces if per_subspace else None)
    optimiser = torch.optim.Adam(params.parameters(), lr=lr)
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)

    def current() -> tuple[Tensor, Tensor | None]:
        with torch.no_grad():
            offsets = params.offsets()
            return params().detach().clone(), None if offsets is None else offsets.detach().clone()

    def held_out(grid: tuple[Tensor, Tensor | None], by: Distance | None = distance) -> float:
        return endpoint_error(model, schedule, plan, grid[0], val, distance=by, offsets=grid[1])

    try:
        begin = current()
        best_val = start_val = held_out(begin)
        best, best_epoch, history = begin, 0, [{"epoch": 0, "val": start_val}]
        per_epoch = math.ceil(len(train.seeds) / batch)
        with tqdm(total=epochs * per_epoch, disable=not progress, desc=f"learn {solver} NFE {nfe}",
                  leave=True) as bar:
            for epoch in range(1, epochs + 1):
                order_ = torch.randperm(len(train.seeds), generator=gen)
                losses = []
                for i in range(0, len(order_), batch):
                    part = train.part(order_[i:i + batch])
                    loss = loss_of(_run(model, schedule, plan, params(), part, params.offsets()), part.x0).mean()
                    optimiser.zero_grad()
                    loss.backward()
                    optimiser.step()
                    losses.append(float(loss.detach()))
                    bar.update(1)
                grid = current()
                err = held_out(grid)
                history.append({"epoch": epoch, "train_loss": sum(losses) / len(losses), "val": err})
                if err < best_val:
                    best, best_val, best_epoch = grid, err, epoch
                bar.set_postfix(val=f"{err:.4f}", best=f"{best_val:.4f}", start=f"{start_val:.4f}")
        rms = {"start_rms": start_val, "best_rms": best_val} if distance is None else {
            "start_rms": held_out(begin, None), "best_rms": held_out(best, None)}
    finally:
        for p in frozen:
            p.requires_grad_(True)
    offsets = {} if best[1] is None else {"offsets": best[1].tolist()}
    return {"levels": best[0].tolist(), **offsets, "start": start.tolist(), "start_val": start_val,
            "best_val": best_val, "best_epoch": best_epoch, "history": history, **rms}


def learn_grids(model, schedule, solver: str, nfes: Sequence[int], *, order: int | None = None, samples: int = 128,
                val: int = 32, teacher_steps: int = TEACHER_STEPS, epochs: int = 10, batch: int = 16,
                lr: float = 0.05, start: str = "auto", fitted: dict | None = None, cache: str | Path | None = None,
                distance: Distance | None = None, loss: str = "MSE to the teacher's endpoint",
                per_class: bool = False, secondary: str | None = None, per_subspace: bool = False,
                progress: bool = False) -> tuple[dict[int, list | dict], dict[int, dict]]:
    """({steps: learned levels, or {levels, offsets} with `per_subspace`}, {steps: how: start grid, errors,
    history}) for each NFE in `nfes`, from one teacher run on `samples` training and `val` validation seeds (from
    `LEARN_SEED`); `loss` names `distance` in the record."""
    seeds = range(LEARN_SEED, LEARN_SEED + samples + val)
    ref = teacher(model, schedule, seeds, steps=teacher_steps, cache=cache, progress=progress)
    train, held = ref.part(slice(0, samples)), ref.part(slice(samples, samples + val))
    levels, how = {}, {}
    for nfe in nfes:
        plan = resolve_sampler(solver, "learned", secondary, nfe, order)
        name, begin = start_levels(schedule, plan.steps, start, getattr(model, "num_classes", None), fitted)
        out = learn_levels(model, schedule, solver, nfe, train, held, begin, order=plan.order, epochs=epochs,
                           batch=batch, lr=lr, distance=distance, per_class=per_class, secondary=plan.secondary,
                           per_subspace=per_subspace, progress=progress)
        levels[plan.steps] = out.pop("levels") if not per_subspace else {"levels": out.pop("levels"),
                                                                          "offsets": out.pop("offsets")}
        how[plan.steps] = {"nfe": nfe, "start_grid": name, "teacher": "dpmpp-2m", "teacher_grid": "logsnr",
                           "teacher_steps": teacher_steps, "samples": samples, "val": val, "first_seed": LEARN_SEED,
                           "epochs": epochs, "batch": batch, "lr": lr, "loss": loss, "per_class": per_class,
                           "per_subspace": per_subspace, "secondary": plan.secondary,
                           **out}
    return levels, how
