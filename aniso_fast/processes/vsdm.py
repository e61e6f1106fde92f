"""The VSDM process family (Variational Schrödinger Diffusion, docs/METHOD.md §11) on an engine basis.

Forward SDE, with A = sum_k lambda_k P_k diagonal in a basis (identity: one rate per pixel, as VSDM's image code;
DCT bands; PCA) and VSDM's power schedule beta(t) = b_min + (t/T)^{b_r} (b_max - b_min):

    dx = -1/2 beta(t) (I - 2A) x dt + sqrt(beta(t)) dW,     B(t) = int_0^t beta,   r_k = 1 - 2 lambda_k > 0.

Per subspace the transition is closed-form, x_t = alpha_k x0 + sigma_k eps, with

    alpha_k = exp(-r_k B / 2),  sigma_k^2 = (1 - alpha_k^2) / r_k,  g_k = sigma_k^2 / alpha_k^2 = (e^{r_k B} - 1) / r_k

and VSDM's adaptive prior is N(0, sum_k sigma_k(T)^2 P_k). In y = x / alpha (per subspace) the process is the
engine's matrix VE process M = sum_k g_k P_k (METHOD.md §1.2): `ve_schedule()` exposes it to the solvers.

Learning the rates, two ways (docs/METHOD.md §11.4): VSDM's alternating rule, `dsm_loss` for the network with the rates
frozen, then `forward_sb_loss` for the rates on paths that `simulate_backward` draws from the current model; or
the engine's `losses.trajectory_loss` (with its schedule-gradient estimator) on `ve_schedule()`. Sampling:
`sample_em` (the reverse SDE, VSDM's sampler) or any engine solver on `ve_schedule()` (the probability flow).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from ..geometry.bases import SubspaceBasis
from ..utils.checks import (
    check_in_range,
    check_int,
    check_number,
    check_subspace_values,
)
from .losses import forward_process
from .process import ContractingProcess, Trajectories, check_steps, path_integral, time_column
from ..geometry.schedules import as_time
from ..sampling.grids import step_indices
from ..sampling.noise import SeedStreams, check_seeds, seeded_labels
from ..sampling.sampler import sample
from ..sampling.spec import EM, Sampler, resolve_sampler

__all__ = ["PowerBeta", "VSDMProcess", "VESchedule", "Trajectories", "score", "forward_score",
           "forward_score_divergence", "dsm_loss", "forward_sb_loss", "simulate_backward", "sample_em", "sample_ode",
           "check_sampler"]

_F64 = torch.float64


@dataclass(frozen=True)
class PowerBeta:
    """VSDM's power schedule beta(t) = b_min + (t/T)^{b_r} (b_max - b_min) and its integral B(t), closed form."""

    beta_min: float = 0.1
    beta_max: float = 20.0
    beta_r: float = 1.7
    T: float = 1.0

    def __post_init__(self):
        # beta(t) lies between beta_min and beta_max, so both positive <=> beta > 0 on [0, T]
        for name in ("beta_min", "beta_max"):
            check_number(name, getattr(self, name), "a finite number > 0 (beta must stay positive)", lambda v: v > 0)
        check_number("beta_r", self.beta_r, "a finite number >= 0", lambda v: v >= 0)
        check_number("T", self.T, "a finite number > 0", lambda v: v > 0)

    def beta(self, t: Tensor) -> Tensor:
        return self.beta_min + (t / self.T) ** self.beta_r * (self.beta_max - self.beta_min)

    def integral(self, t: Tensor) -> Tensor:
        """B(t) = b_min t + (b_max - b_min) T (t/T)^{b_r + 1} / (b_r + 1)."""
        p = self.beta_r + 1
        return self.beta_min * t + (self.beta_max - self.beta_min) * self.T * (t / self.T) ** p / p


def _one_minus_exp_ratio(z: Tensor) -> Tensor:
    """(1 - e^{-z}) / z, = 1 at z = 0 (the series below 1e-6: no 0/0 in the value or its gradient)."""
    small = z.abs() < 1e-6
    safe = torch.where(small, torch.ones_like(z), z)
    return torch.where(small, 1 - z / 2 + z * z / 6, -torch.expm1(-safe) / safe)


def _check_rates(rates: Any, shape: tuple[int, int]) -> Tensor:
    return check_subspace_values("rates", rates, shape, "lambda values",
                                 "finite lambda_k with 1 - 2 lambda_k > 0 (at 1/2 the drift vanishes, above it the "
                                 "process explodes)", lambda v: 1 - 2 * v > 0)


class VSDMProcess(ContractingProcess):
    """VSDM's forward process with learnable rates lambda [S, K] (S = num_classes, 1 if None) in a K-subspace basis.

    Parameterisation: `log_decay = ln(1 - 2 lambda)`, unconstrained, so lambda = (1 - e^{log_decay}) / 2 < 1/2
    (a contracting process) whatever the optimiser does. `alpha`, `sigma` and `g` take t [B] or a scalar in
    [0, T] and labels [B] (or None) and return (value, d/dt value), each [B, K] float64 ([1, K] for a scalar t
    without labels). The basis is passed to the methods that touch images; its K must match the rates.
    """

    def __init__(self, num_subspaces: int, num_classes: int | None = None, rates: Any = 0.0, *,
                 beta_min: float = 0.1, beta_max: float = 20.0, beta_r: float = 1.7, T: float = 1.0,
                 t0: float = 1e-2):
        super().__init__()
        check_int("num_subspaces", num_subspaces)
        check_int("num_classes", num_classes, optional=True)
        self.beta = PowerBeta(beta_min, beta_max, beta_r, T)
        self.T = self.beta.T
        self.t0 = check_number("t0", t0, f"a finite number in (0, T={self.T:g})", lambda v: 0 < v < self.T)
        self.num_subspaces, self.num_classes = num_subspaces, num_classes
        values = _check_rates(rates, (num_classes or 1, num_subspaces))
        self._rates_init = float(rates) if isinstance(rates, (int, float)) else torch.as_tensor(rates).tolist()
        self.log_decay = self.contracting_parameter(values)

    def config(self) -> dict:
        """JSON-able constructor arguments; the trained rates live in `state_dict()`."""
        b = self.beta
        return {"num_subspaces": self.num_subspaces, "num_classes": self.num_classes, "rates": self._rates_init,
                "beta_min": b.beta_min, "beta_max": b.beta_max, "beta_r": b.beta_r, "T": b.T, "t0": self.t0}

    @property
    def rates(self) -> Tensor:
        """lambda [S, K]."""
        return self.contracting_values(self.log_decay)

    def _batch(self, t: Any, labels: Tensor | None) -> tuple[Tensor, Tensor]:
        """t [B] float64 in [0, T] and the decay rates r = 1 - 2 lambda [B, K] (or [1, K])."""
        return self.per_sample(self.log_decay.exp(), t, labels, "rates")

    def _parts(self, t: Any, labels: Tensor | None):
        t, r = self._batch(t, labels)
        B, beta = self.beta.integral(t)[:, None], self.beta.beta(t)[:, None]
        return r, B, beta, r * B

    def alpha(self, t: Any, labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(alpha_k(t), d alpha_k / dt) [B, K]: the mean scale exp(-r B / 2)."""
        r, _, beta, z = self._parts(t, labels)
        alpha = torch.exp(-z / 2)
        return alpha, -0.5 * r * beta * alpha

    def sigma(self, t: Any, labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(sigma_k(t), d sigma_k / dt) [B, K], sigma^2 = (1 - alpha^2) / r; the derivative is +inf at t = 0."""
        r, B, beta, z = self._parts(t, labels)
        sigma = (B * _one_minus_exp_ratio(z)).sqrt()
        return sigma, beta * torch.exp(-z) / (2 * sigma)  # d sigma^2/dt = beta alpha^2

    def g(self, t: Any, labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(g_k, d g_k / dt) [B, K] with g = sigma^2 / alpha^2 = (e^{r B} - 1) / r: `MatrixSchedule.forward`'s
        contract, in the process time t (g(0) = 0; `ve_schedule()` is the view the solvers take)."""
        _, B, beta, z = self._parts(t, labels)
        growth = torch.exp(z)
        return B * _one_minus_exp_ratio(z) * growth, beta * growth

    def prior_std(self, labels: Tensor | None = None) -> Tensor:
        """sigma_k(T) [B, K] ([1, K] without labels): VSDM's adaptive prior N(0, sum_k sigma_k(T)^2 P_k)."""
        return self.sigma(self.T, labels)[0]

    def _coefficients(self, basis: SubspaceBasis, x: Tensor, t: Any, labels: Tensor | None, *fns) -> list[Tensor]:
        """The values of `fns` (alpha, sigma) at t for images x, [B, K] each, after checking the basis's K."""
        if not isinstance(basis, SubspaceBasis):
            raise ValueError(f"basis: expected a SubspaceBasis, got {type(basis).__name__}")
        if basis.num_subspaces != self.num_subspaces:
            raise ValueError(f"basis: expected {self.num_subspaces} subspaces (one rate each), got a basis with "
                             f"{basis.num_subspaces}")
        if not isinstance(x, Tensor) or x.dim() != 4:
            raise ValueError(f"x: expected images [B, C, H, W], got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        values = [fn(t, labels)[0] for fn in fns]
        if values[0].shape[0] not in (1, x.shape[0]):
            raise ValueError(f"t: batch size {values[0].shape[0]} does not match the images' {x.shape[0]}")
        return [v.expand(x.shape[0], -1) for v in values]

    def perturb(self, basis: SubspaceBasis, x0: Tensor, eps: Tensor, t: Any,
                labels: Tensor | None = None) -> Tensor:
        """x_t = sum_k P_k (alpha_k(t) x0 + sigma_k(t) eps): one combine."""
        a, s = self._coefficients(basis, x0, t, labels, self.alpha, self.sigma)
        return basis.combine(x0, a, eps, s, ids=basis.group_ids(labels), names={"u": "x0", "v": "eps"})

    def prior_sample(self, basis: SubspaceBasis, z: Tensor, labels: Tensor | None = None) -> Tensor:
        """x_T = sum_k sigma_k(T) P_k z for z ~ N(0, I): a draw from the adaptive prior."""
        s, = self._coefficients(basis, z, self.T, labels, self.sigma)
        return basis.combine(z, s, ids=basis.group_ids(labels), names={"u": "z"})

    def to_ve(self, basis: SubspaceBasis, x: Tensor, t: Any, labels: Tensor | None = None) -> Tensor:
        """y = sum_k P_k x / alpha_k(t): the state of the VE process `ve_schedule()` at process time t."""
        a, = self._coefficients(basis, x, t, labels, self.alpha)
        return basis.combine(x, 1 / a, ids=basis.group_ids(labels), names={"u": "x"})

    def from_ve(self, basis: SubspaceBasis, y: Tensor, t: Any, labels: Tensor | None = None) -> Tensor:
        """x = sum_k alpha_k(t) P_k y: back to VSDM's variable (after sampling, t = t0)."""
        a, = self._coefficients(basis, y, t, labels, self.alpha)
        return basis.combine(y, a, ids=basis.group_ids(labels), names={"u": "y"})

    def ve_schedule(self) -> "VESchedule":
        return VESchedule(self)

    def extra_repr(self) -> str:
        b = self.beta
        return (f"num_subspaces={self.num_subspaces}, num_classes={self.num_classes}, beta_min={b.beta_min}, "
                f"beta_max={b.beta_max}, beta_r={b.beta_r}, T={b.T}, t0={self.t0}")


class VESchedule(nn.Module):
    """The process seen by the engine: the matrix VE process of y = x / alpha, g_k = sigma_k^2 / alpha_k^2.

    Its time s in [0, T] maps onto VSDM's [t0, T] by t = t0 + s (T - t0) / T, so that g(0) = g(t0) > 0 plays
    the role of MatrixSchedule's g0 (the solvers' grids end at s = 0). `forward(s, labels) -> (g, dg/ds)` as
    MatrixSchedule's; `sampling.schedule_grid` and `sampling.sample(grid="uniform_t")` take it unchanged. The
    parameters are the process's own (gradients reach its rates).
    """

    def __init__(self, process: VSDMProcess):
        super().__init__()
        self.process = process
        self.T, self.num_classes, self.num_subspaces = process.T, process.num_classes, process.num_subspaces

    def process_time(self, s: Any) -> Tensor:
        s = as_time(s, self.process.log_decay.device)
        check_in_range("s", s, 0.0, self.T, f"finite times in [0, T={self.T:g}]")
        return self.process.t0 + s * ((self.T - self.process.t0) / self.T)

    def forward(self, s: Any, labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        g, gdot = self.process.g(self.process_time(s), labels)
        return g, gdot * ((self.T - self.process.t0) / self.T)

    def geometric_mean(self, s: Any, labels: Tensor | None = None) -> Tensor:
        """exp(mean_k ln g_k(s)) [B]: what the grids on the geometric mean (EDM's sigma grid, logSNR) step in."""
        return self(s, labels)[0].log().mean(-1).exp()

    def invert_geometric_mean(self, y: Tensor, labels: Tensor | None = None, iterations: int = 48) -> Tensor:
        """s with geometric_mean(s) = y by bisection on [0, T] (every g_k grows with s), detached, as
        `MatrixSchedule.invert_geometric_mean`: [N], or [B, N] (one grid per sample) with per-class rates.
        Targets outside [geometric_mean(0), geometric_mean(T)] land on the nearer end."""
        check_int("iterations", iterations)
        if not isinstance(y, Tensor) or not y.is_floating_point() or y.dim() != 1:
            raise ValueError(f"y: expected a floating tensor [N] of variances, got "
                             f"{tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__}")
        target = y.to(_F64).to(self.process.log_decay.device)
        if self.num_classes is None:
            labels = None
        else:
            if not isinstance(labels, Tensor) or labels.dim() != 1:
                raise ValueError(f"labels: required as an integer tensor [B], the rates are per class "
                                 f"({self.num_classes} classes)")
            target = target.expand(labels.shape[0], -1)
            labels = labels[:, None].expand_as(target).reshape(-1)
        with torch.no_grad():
            lo, hi = torch.zeros_like(target), torch.full_like(target, self.T)
            for _ in range(iterations):
                mid = (lo + hi) / 2
                below = self.geometric_mean(mid.reshape(-1), labels).reshape(mid.shape) < target
                lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
            return (lo + hi) / 2


def _per_sample(values: Tensor, B: int) -> Tensor:
    return values.expand(B, -1)


def score(process: VSDMProcess, model, x: Tensor, t: Any, labels: Tensor | None = None) -> Tensor:
    """grad_x log p_t(x) from an engine model trained on the VE view: sum_k P_k F(x / alpha; g) / sigma_k.

    (y = x / alpha has the score M^{-1}(D - y) = M^{-1/2} F, and d/dx = 1/alpha d/dy per subspace.)
    """
    basis = model.basis
    ids = basis.group_ids(labels)
    a, s = process._coefficients(basis, x, t, labels, process.alpha, process.sigma)
    a, s = a.detach(), s.detach()
    y = basis.combine(x, 1 / a, ids=ids, names={"u": "x"})
    F = model.flow(y, (s / a).square(), labels)
    return basis.scale(F, 1 / s, ids=ids)


def forward_score(process: VSDMProcess, basis: SubspaceBasis, x: Tensor, t: Any,
                  labels: Tensor | None = None) -> Tensor:
    """VSDM's linear variational score z_f = sqrt(beta(t)) A x, A = sum_k lambda_k P_k (gradients reach the rates)."""
    process._coefficients(basis, x, t, labels, process.alpha)  # the basis, images and batch-size checks
    tt, decay = process._batch(t, labels)
    lam, B = (1 - decay) / 2, x.shape[0]
    return basis.scale(x, _per_sample(process.beta.beta(tt).sqrt()[:, None] * lam, B), ids=basis.group_ids(labels))


def forward_score_divergence(process: VSDMProcess, basis: SubspaceBasis, channels: int, t: Any,
                             labels: Tensor | None = None) -> Tensor:
    """div_x (g z_f) = beta(t) tr A = beta(t) sum_k n_k lambda_k [B], exact: A is linear and fixed in the basis,
    so VSDM's Hutchinson probe is not needed (docs/METHOD.md §11.4, §12.4)."""
    tt, decay = process._batch(t, labels)
    dims = torch.tensor(basis.subspace_dims(channels), dtype=_F64, device=decay.device)
    return process.beta.beta(tt) * ((1 - decay) / 2 * dims).sum(1)


def dsm_loss(process: VSDMProcess, model, x0: Tensor, labels: Tensor | None = None,
             generator: torch.Generator | None = None, *, t: Tensor | None = None,
             noise: Tensor | None = None) -> Tensor:
    """Denoising score matching with VSDM's closed-form labels, rates frozen (docs/METHOD.md §11.4 step 1).

    t ~ U(t0, T), x_t = alpha x0 + sigma eps. VSDM's |z_b - label|^2 with z = sqrt(beta)(score - A x) is
    beta |s_theta - s*|^2, s* = -eps / sigma; in the VE view y = x_t / alpha = x0 + g^{1/2} eps it is the engine's
    flow error, beta / sigma_k^2 |P_k (F(y; g) - F_tgt)|^2 with F_tgt = -eps. Mean over the batch.
    Random draws, in order, from `generator`: t [B], eps like x0 (`t`, `noise` override them).
    """
    if not isinstance(x0, Tensor) or x0.dim() != 4:
        raise ValueError(f"x0: expected images [B, C, H, W], got "
                         f"{tuple(x0.shape) if isinstance(x0, Tensor) else type(x0).__name__}")
    B = x0.shape[0]
    if t is None:
        t = process.t0 + (process.T - process.t0) * torch.rand(B, generator=generator, dtype=_F64,
                                                               device=x0.device)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
    basis = model.basis
    ids = basis.group_ids(labels)
    with torch.no_grad():
        a, s = process._coefficients(basis, x0, t, labels, process.alpha, process.sigma)
        g, weight = (s / a).square(), process.beta.beta(as_time(t, x0.device)).reshape(-1, 1) / s.square()
    y = forward_process(basis, x0, noise, g, ids)
    F = model.flow(y, g, labels)
    return (weight * basis.sqnorms(F + noise, ids=ids).to(_F64)).sum(1).mean()


def simulate_backward(process: VSDMProcess, model, seeds: Sequence[int], steps: int = 100,
                      labels: Tensor | None = None, image_shape: Sequence[int] | None = None,
                      dtype=torch.float32, record: bool = True, progress: bool = False) -> Trajectories:
    """The reverse SDE dx = [-1/2 beta (I - 2A) x - beta score] dt + sqrt(beta) dW, Euler-Maruyama on `steps`
    uniform steps from T to t0, one path per seed, from the adaptive prior.

    Per seed one generator: x_T = prior(z) with z = `sampling.seeded_noise`'s draw for that seed (so the PF-ODE
    solvers start from the same point), then the step noises from the same stream: a path depends on its seed
    only, never on the rest of the batch. Each step: x <- x + h beta (r/2 x + score) + sqrt(h beta) xi.
    """
    
    steps = check_steps(steps)
    seeds = check_seeds(seeds)
    num_classes = getattr(model, "num_classes", None)
    if num_classes and labels is None:
        labels = seeded_labels(seeds, num_classes)
    shape = tuple(image_shape) if image_shape is not None else tuple(model.image_shape)
    basis = model.basis
    ids = basis.group_ids(labels)
    device = process.log_decay.device
    streams = SeedStreams(seeds)
    B = len(seeds)
    ts = torch.linspace(process.T, process.t0, steps + 1, dtype=_F64)
    xs, zs = [], []
    with torch.no_grad():
        x = process.prior_sample(basis, streams.draw(shape, dtype, device), labels)
        r = _per_sample(process._batch(process.T, labels)[1], B)  # 1 - 2 lambda per sample
        for i in step_indices(steps, progress):
            t_a, h = float(ts[i]), float(ts[i] - ts[i + 1])
            beta = float(process.beta.beta(ts[i]))
            s = score(process, model, x, time_column(t_a, B, device), labels)
            if record:
                xs.append(x)
                zs.append(basis.combine(s, torch.full_like(r, math.sqrt(beta)), x, -math.sqrt(beta) * (1 - r) / 2,
                                        ids=ids))
            x = basis.combine(x, 1 + h * beta * r / 2, s, torch.full_like(r, h * beta),
                              base=math.sqrt(h * beta) * streams.draw(shape, dtype, device), ids=ids)
    empty = x.new_zeros((0, *x.shape))
    return Trajectories(t=ts[:-1], dt=-ts.diff(), x=torch.stack(xs) if record else empty,
                        z_b=torch.stack(zs) if record else empty, final=x, labels=labels)


def sample_em(process: VSDMProcess, model, seeds: Sequence[int], steps: int = 100, labels: Tensor | None = None,
              image_shape: Sequence[int] | None = None, dtype=torch.float32,
              progress: bool = False) -> tuple[Tensor, Tensor | None, dict]:
    """VSDM's sampler: the reverse SDE by Euler-Maruyama (`simulate_backward` without recording), per-seed
    deterministic. Returns (x at t0 in VSDM's variable [B, C, H, W], labels, info) like `sampling.sample`."""
    paths = simulate_backward(process, model, seeds, steps, labels, image_shape, dtype, record=False,
                              progress=progress)
    return paths.final, paths.labels, {"nfe": steps, "steps": steps, "solver": "euler_maruyama"}


def sample_ode(process: VSDMProcess, model, seeds: Sequence[int], nfe: int = 9, *, solver: str = "heun",
               grid: str = "uniform_t", secondary: str | None = None, order: int | None = None,
               labels: Tensor | None = None, image_shape: Sequence[int] | None = None, dtype=torch.float32,
               device: torch.device | str = "cpu", progress: bool = False) -> tuple[Tensor, Tensor | None, dict]:
    """The probability-flow ODE through any engine solver: `sampling.sample` on `process.ve_schedule()` (the VE
    view starts at y_T = x_T / alpha(T) ~ N(0, M(T)), the adaptive prior's image), then x = alpha(t0) y.
    Same seeds, labels and NFE accounting as `sampling.sample`; returns (x in VSDM's variable, labels, info)."""
    check_sampler(resolve_sampler(solver, grid, secondary, nfe, order))
    y, labels, info = sample(model, process.ve_schedule(), nfe=nfe, solver=solver, grid=grid, secondary=secondary,
                             order=order, seeds=seeds, labels=labels, image_shape=image_shape, dtype=dtype,
                             device=device, progress=progress)
    with torch.no_grad():
        return process.from_ve(model.basis, y, process.t0, labels), labels, info


def forward_sb_loss(process: VSDMProcess, basis: SubspaceBasis, paths: Trajectories, zeta: float = 0.75) -> Tensor:
    """VSDM's forward (variational-score) update, the SB-FBSDE implicit loss on backward paths (§1.4 step 3):

        L = sum_i dt_i mean_b [ z_f . (1/2 z_f + z_b) + zeta div(g z_f) ],  z_f = sqrt(beta) A x,  g = sqrt(beta)

    with the divergence exact (`forward_score_divergence`). Only the rates get gradient (z_b, x are data).
    zeta is VSDM's `interact_coef` (0.75 by default there).
    """
    zeta = check_number("zeta", zeta, "a finite number", lambda v: True)
    if not isinstance(paths, Trajectories) or paths.x.shape[0] == 0 or paths.v is not None:
        raise ValueError("paths: expected Trajectories recorded by simulate_backward(record=True)")
    N, B = paths.x.shape[:2]
    t = paths.t.to(process.log_decay.device).repeat_interleave(B)
    labels = None if paths.labels is None else paths.labels.repeat(N)
    x = paths.x.flatten(0, 1)
    z_f = forward_score(process, basis, x, t, labels)
    return path_integral(paths, z_f, forward_score_divergence(process, basis, x.shape[1], t, labels), zeta)


def check_sampler(plan: Sampler) -> None:
    """ValueError naming `grid` when a VSDM model does not take the resolved sampler: Euler-Maruyama on the uniform
    t grid (its own sampler in x space), or the PF-ODE through any engine solver on the VE view, on every grid but
    the Karras grid (which ignores the process) and the fitted grids (fitted for core models)."""
    if plan.grid in ("optimized", "learned"):
        raise ValueError(f"grid: {plan.grid!r} grids are fitted for core models (grid_fit, grid_learn); a vsdm model "
                         f"takes its family's grids")
    if plan.solver == EM and plan.grid != "uniform_t":
        raise ValueError(f"grid: a vsdm model's Euler-Maruyama runs on the uniform t grid ('uniform_t'), "
                         f"got {plan.grid!r}")
    if plan.grid == "karras":
        raise ValueError("grid: 'karras' ignores the process (EDM's isotropic grid); a vsdm model takes "
                         "'uniform_t', 'edm_sigma' or 'logsnr'")
