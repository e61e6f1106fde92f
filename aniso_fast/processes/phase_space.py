"""VSMD's phase space seen through a VE denoiser, and the exponential integrator of its probability-flow ODE.

**The denoiser view.** Per subspace k (one class's c), z_t = (x_t, v_t) given x0 alone, with v0 drawn from its
prior N(0, prior_v), is Gaussian with a mean linear in x0:

    z_t | x0 ~ N(e x0, S),   e = E[:, 0],   S = Sigma(t) + prior_v E[:, 1] E[:, 1]^T          (`given_data`)

(E, Sigma: `VSMDProcess.mean_blocks`, `cov_blocks`). The likelihood of x0 then depends on z only through the scalar
statistic y = e^T S^{-1} z / h, h = e^T S^{-1} e, and y = x0 + N(0, 1/h): a VE noising with the per-subspace
variance g_k = 1/h_k. So E[x0 | z_t] = D(y; g), the engine's anisotropic denoiser (`precond.AnisoPrecond`), and
Tweedie's formula for z gives the velocity score exactly:

    grad_v log p_t(z) = -(S^{-1} z)_v + (S^{-1} e)_v D(y; g).

`VSMDDenoiser` is that model: a C-channel EDM network (`fmnist-edm` unchanged is a working start) inside
`AnisoPrecond`, one `block_combine` for (y, -(S^{-1} z)_v) and one `combine` for the score, the same contract as
`velocity.VSMDPrecond` (so `vsmd.dsm_loss`, the samplers and the c-update take it unchanged). VSMD's own form asks a
2C-channel network for the velocity noise; at a short fine-tune it never learns what this view gets for free.

**The exponential integrator** (`dpmpp_2m_phase_space`, DPM-Solver++(2M) / gDDIM on the phase space). The PF-ODE is
dz/dt = A(t) z + b(t) D, A = F + 1/2 Q S^{-1}, b = -1/2 Q S^{-1} e (F the drift blocks, Q = gamma beta e_v e_v^T).
Its linear part has the transition Phi(t, s) = R(t) R(s)^{-1} for any R with R' = A R; R = L Rot(theta) with
L = chol(S) solves it when theta' = -(beta / 2) L_vv / L_xx (A's upper-right entry is beta/2; S' = F S + S F^T +
Q makes the rest consistent), a scalar integral per subspace done by Gauss-Legendre in log t. Holding D at its
value D_i over a step is exact when the data are a point (z - e x0 then follows the linear part alone):

    z_{i+1} = Phi z_i + (e_{i+1} - Phi e_i) D_i                                    (order 1, DDIM)

and letting D be linear in tau_k = ln g_k between the last two calls adds J1 (D_i - D_{i-1}) with
J1 = int Phi(t_{i+1}, r) b(r) rho(r) dr, rho = (tau(r) - tau_i) / (tau_i - tau_{i-1}), by quadrature (order 2).
The first step and, as DPM-Solver++ does, the last are first order. One network call per step.

Grids: 'uniform_t' (VSMD's), 'logsnr' (the geometric mean of sqrt(g) uniform in its log) and 'edm_sigma' (EDM's rho
grid on it), from T to the end time t0, one grid per sample for per-class c.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..geometry.bases import SubspaceBasis
from ..utils.checks import check_in_range
from ..geometry.schedules import as_time
from ..sampling.grids import step_indices
from ..sampling.multistep import AB_WEIGHTS
from ..sampling.noise import SeedStreams
from ..sampling.spec import EM, Sampler, resolve_sampler
from .process import time_column
from .velocity import VelocityModel
from .vsmd import VSMDProcess, lower_cholesky, prior, sampling_inputs, velocity_score

__all__ = ["DenoiserView", "given_data", "denoiser_view", "VSMDDenoiser", "flow_transition", "sigma_grid",
           "dpmpp_2m_phase_space", "sample_ode", "check_sampler", "PHASE_SPACE_GRIDS", "PHASE_SPACE_SOLVERS"]

_F64 = torch.float64
PHASE_SPACE_GRIDS = ("uniform_t", "logsnr", "edm_sigma")
PHASE_SPACE_SOLVERS = ("heun", "ipndm", "dpmpp-2m")  # the solvers of the phase-space PF-ODE (`sample_ode`)
# Gauss-Legendre nodes and weights on [-1, 1]: 24 for theta over a step, 12 and 8 for the nested quadrature of the
# 2M correction J1 (on fmnist-vsmd's steps it agrees with 24 x 24 nodes to 5e-14 relative)
_GL = {n: [torch.tensor(a, dtype=_F64) for a in np.polynomial.legendre.leggauss(n)] for n in (8, 12, 24)}


class DenoiserView(NamedTuple):
    """Per-sample, per-subspace coefficients at t: `blocks` [B, K, 2, 2] map z to (y, -(S^{-1} z)_v) in one
    `block_combine`; `g` [B, K] the variance of y - x0; `gain` [B, K] (S^{-1} e)_v, D's weight in the score."""
    blocks: Tensor
    g: Tensor
    gain: Tensor


def given_data(process, t: Any, labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(e [B, K, 2], S [B, K, 2, 2]): z_t given x0 alone is N(e x0, S) per subspace (v0 from its prior)."""
    E = process.mean_blocks(t, labels)
    ev = E[..., :, 1:]
    return E[..., :, 0], process.cov_blocks(t, labels) + process.prior_v * (ev @ ev.transpose(-1, -2))


def denoiser_view(process, t: Any, labels: Tensor | None = None) -> DenoiserView:
    """The module docstring's y, g and score weights at t (t > 0: S is singular at t = 0)."""
    return _view(*given_data(process, t, labels))


def _view(e: Tensor, S: Tensor) -> DenoiserView:
    P = torch.linalg.inv(S)
    Pe = (P @ e[..., None])[..., 0]
    h = (e * Pe).sum(-1)
    return DenoiserView(torch.stack([Pe / h[..., None], -P[..., 1, :]], -2), 1 / h, Pe[..., 1])


def _rotation_rate(process, t: Tensor, labels: Tensor | None) -> Tensor:
    """theta'(t) = -(beta / 2) L_vv / L_xx [B, K]."""
    L = lower_cholesky(given_data(process, t, labels)[1])
    return -process.beta / 2 * L[..., 1, 1] / L[..., 0, 0]


def _nodes(a: Tensor, b: Tensor, labels: Tensor | None, count: int = 24) -> tuple[Tensor, Tensor, Tensor | None]:
    """`count` = G Gauss-Legendre nodes in u = ln t between times a and b [n]: (t [G * n] node-major, weights
    times dt/du [G, n], labels repeated to match), so that sum(weights * f(t)) = int_a^b f dt."""
    nodes, weights = (w.to(a.device) for w in _GL[count])
    u_a, u_b = a.log(), b.log()
    half = (u_b - u_a) / 2
    t = ((u_a + u_b) / 2 + half * nodes[:, None]).exp()  # [G, n]
    return t.reshape(-1), weights[:, None] * half * t, None if labels is None else labels.repeat(len(nodes))


def _integrate_rate(process, t_from: Tensor, t_to: Tensor, labels: Tensor | None, count: int = 24) -> Tensor:
    """theta(t_to) - theta(t_from) [n, K] (t_from, t_to [n], both > 0), all `count` nodes in one batched call."""
    t, w, node_labels = _nodes(t_from, t_to, labels, count)
    rate = _rotation_rate(process, t, node_labels).reshape(*w.shape, -1)
    return (w[..., None] * rate).sum(0)


def _rotation(angle: Tensor) -> Tensor:
    c, s = angle.cos(), angle.sin()
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)


def _transition(process, t_to: Tensor, t_from: Tensor, labels: Tensor | None) -> Tensor:
    L_to = lower_cholesky(given_data(process, t_to, labels)[1])
    L_from = lower_cholesky(given_data(process, t_from, labels)[1])
    turn = _rotation(_integrate_rate(process, t_from, t_to, labels))
    return L_to @ turn @ torch.linalg.inv(L_from)


def flow_transition(process, t_to: Any, t_from: Any, labels: Tensor | None = None) -> Tensor:
    """Phi(t_to, t_from) [B, K, 2, 2] of the PF-ODE's linear part dz/dt = (F + 1/2 Q S^{-1}) z, for times in
    (0, T] ([B] or scalars)."""
    t_to, t_from = (as_time(t, process.log_damping.device) for t in (t_to, t_from))
    for name, t in (("t_to", t_to), ("t_from", t_from)):
        check_in_range(name, t, torch.finfo(_F64).tiny, process.T, f"finite times in (0, T={process.T:g}]")
    t_to, t_from = torch.broadcast_tensors(t_to.reshape(-1), t_from.reshape(-1))
    return _transition(process, t_to, t_from, labels)


def _step_coefficients(process, t_i: Tensor, t_next: Tensor, tau_prev: Tensor | None,
                       labels: Tensor | None) -> tuple[Tensor, ...]:
    """(Phi [n, K, 2, 2], J0 [n, K, 2], J1 [n, K, 2], tau_i = ln g(t_i) [n, K]) of the step t_i -> t_next (J1 zero
    without tau_prev). Both ends in one `given_data` call."""
    n = t_i.shape[0]
    e, S = given_data(process, torch.cat([t_next, t_i]), None if labels is None else labels.repeat(2))
    L = lower_cholesky(S)
    Phi = L[:n] @ _rotation(_integrate_rate(process, t_i, t_next, labels)) @ torch.linalg.inv(L[n:])
    e_next, e_i = e[:n], e[n:]
    J0 = e_next - (Phi @ e_i[..., None])[..., 0]
    tau_i = -(e_i * torch.linalg.solve(S[n:], e_i[..., None])[..., 0]).sum(-1).log()  # g = 1 / (e^T S^-1 e)
    if tau_prev is None:
        return Phi, J0, torch.zeros_like(J0), tau_i
    r, w, node_labels = _nodes(t_i, t_next, labels, 12)
    G = w.shape[0]
    e_r, S_r = given_data(process, r, node_labels)
    view = _view(e_r, S_r)
    rho = (view.g.log().reshape(G, *tau_i.shape) - tau_i) / (tau_i - tau_prev)
    # Phi(t_next, r) b(r) = -(gamma beta / 2) gain(r) Phi(t_next, r)[:, 1]
    turn = _rotation(_integrate_rate(process, r, t_next.repeat(G), node_labels, 8))
    column = (L[:n].repeat(G, 1, 1, 1) @ turn @ torch.linalg.inv(lower_cholesky(S_r)))[..., :, 1]
    column = column.reshape(G, *J0.shape)
    gain = view.gain.reshape(G, *tau_i.shape)
    J1 = (-process.gamma * process.beta / 2) * ((w[..., None] * gain * rho)[..., None] * column).sum(0)
    return Phi, J0, J1, tau_i


def _mean_log_sigma(process, t: Tensor, labels: Tensor | None) -> Tensor:
    return denoiser_view(process, t, labels).g.log().mean(-1) / 2


def _classes(process, labels: Tensor | None, B: int) -> tuple[Tensor | None, Tensor]:
    """(the distinct classes, or None for a process without classes; each sample's row among them [B]): the
    grids and step coefficients depend on a sample only through its class, so they are computed once per class."""
    if process.num_classes is None:
        return None, torch.zeros(B, dtype=torch.long, device=process.log_damping.device)
    return labels.unique(return_inverse=True)


def _class_rows(per_sample: Tensor, pick: Tensor, count: int) -> Tensor:
    """[count, ...]: the row of `per_sample` [B, ...] of one sample of each class (`_classes`'s `pick`), for values
    that depend on a sample only through its class."""
    first = torch.full((count,), len(pick), dtype=torch.long, device=pick.device)
    return per_sample[first.scatter_reduce_(0, pick, torch.arange(len(pick), device=pick.device), "amin")]


def sigma_grid(process, grid: str, steps: int, B: int, labels: Tensor | None, *, sigma_min: float = 0.002,
               rho: float = 7.0, points: int = 1025) -> Tensor:
    """Times [B, steps + 1] from T down to t0: uniform in t, or at the geometric-mean sqrt(g) of EDM's rho grid or
    uniform in its log ('logsnr'), from its value at T down to max(its value at t0, sigma_min), then t0. The mean
    log sigma is tabulated at `points` times uniform in ln t and inverted by linear interpolation (one call)."""
    if grid not in PHASE_SPACE_GRIDS:
        raise ValueError(f"grid: expected one of {', '.join(PHASE_SPACE_GRIDS)} for the phase space, got {grid!r}")
    device = process.log_damping.device
    if grid == "uniform_t":
        return torch.linspace(process.T, process.t0, steps + 1, dtype=_F64, device=device).expand(B, -1)
    classes, pick = _classes(process, labels, B)
    return _sigma_grid(process, grid, steps, 1 if classes is None else len(classes), classes, sigma_min, rho,
                       points)[pick]


def _sigma_grid(process, grid: str, steps: int, B: int, labels: Tensor | None, sigma_min: float, rho: float,
                points: int) -> Tensor:
    device = process.log_damping.device
    T, t0 = process.T, process.t0
    with torch.no_grad():
        log_t = torch.linspace(math.log(t0), math.log(T), points, dtype=_F64, device=device)
        table = _mean_log_sigma(process, log_t.exp().repeat(B),
                                None if labels is None else labels.repeat_interleave(points)).reshape(B, points)
        table = table.cummax(1).values  # increasing in t (it is; cummax only guards searchsorted against ties)
        hi, lo = table[:, -1], table[:, 0].clamp_min(math.log(sigma_min))
        if grid == "logsnr":
            ramp = torch.linspace(0, 1, steps, dtype=_F64, device=device)
            target = hi[:, None] + ramp * (lo - hi)[:, None]
        else:  # EDM's rho ramp between the two end sigmas (schedules.karras_sigmas, per sample)
            ramp = torch.arange(steps, dtype=_F64, device=device) / max(steps - 1, 1)
            top, bottom = (hi / rho).exp()[:, None], (lo / rho).exp()[:, None]
            target = rho * (top + ramp * (bottom - top)).log()
        right = torch.searchsorted(table, target.contiguous()).clamp(1, points - 1)
        y0, y1 = table.gather(1, right - 1), table.gather(1, right)
        frac = ((target - y0) / (y1 - y0).clamp_min(1e-300)).clamp(0, 1)
        t = (log_t[right - 1] + frac * (log_t[right] - log_t[right - 1])).exp()
        t[:, 0] = T
        return torch.cat([t, torch.full((B, 1), t0, dtype=_F64, device=device)], 1)


class VSMDDenoiser(VelocityModel):
    """VSMD's velocity score from a VE denoiser (the module docstring): `denoiser` is an `AnisoPrecond` on the
    process's basis (a C-channel network); `forward(z, t, labels)` returns grad_v log p_t(z) [B, C, H, W] like
    `velocity.VSMDPrecond`, `denoise(z, t, labels)` the data prediction E[x0 | z_t]."""

    def __init__(self, denoiser: nn.Module, process):
        super().__init__()
        from ..networks.precond import AnisoPrecond

        if not isinstance(denoiser, AnisoPrecond):
            raise ValueError(f"denoiser: expected a precond.AnisoPrecond, got {type(denoiser).__name__}")
        if not isinstance(process, VSMDProcess):
            raise ValueError(f"process: expected a VSMDProcess, got {type(process).__name__}")
        if denoiser.basis.num_subspaces != process.num_subspaces:
            raise ValueError(f"denoiser: expected a basis with the process's {process.num_subspaces} subspaces, "
                             f"got {denoiser.basis.num_subspaces}")
        self.denoiser, self.process = denoiser, process
        self.label_dim = denoiser.label_dim
        self._image_shape = denoiser.image_shape

    @property
    def net(self) -> nn.Module:
        return self.denoiser.net

    def set_network(self, net: nn.Module) -> None:
        self.denoiser.set_network(net)

    @property
    def basis(self) -> SubspaceBasis:
        return self.denoiser.basis

    def _parts(self, z: Tensor, t: Any, labels: Tensor | None) -> tuple[Tensor, Tensor, DenoiserView, Tensor]:
        tt = self._inputs(z, t)
        C, B = self._image_shape[0], z.shape[0]
        with torch.no_grad():
            view = denoiser_view(self.process, tt, labels)
        if view.g.shape[0] not in (1, B):
            raise ValueError(f"t: batch size {view.g.shape[0]} does not match z's {B}")
        view = DenoiserView(*(v.expand(B, *v.shape[1:]) for v in view))
        ids = self.basis.group_ids(labels)
        y, minus_pz = self.basis.block_combine(z[:, :C], z[:, C:], view.blocks, ids=ids)
        return self.denoiser.denoise(y, view.g, labels), minus_pz, view, ids

    def denoise(self, z: Tensor, t: Any, labels: Tensor | None = None) -> Tensor:
        return self._parts(z, t, labels)[0]

    def forward(self, z: Tensor, t: Any, labels: Tensor | None = None) -> Tensor:
        D, minus_pz, view, ids = self._parts(z, t, labels)
        return self.basis.combine(D, view.gain, base=minus_pz, ids=ids, names={"u": "D", "base": "score"})


def dpmpp_2m_phase_space(process, model: VSMDDenoiser, x: Tensor, v: Tensor, ts: Tensor, labels: Tensor | None, *,
             order: int = 2, progress: bool = False) -> tuple[Tensor, Tensor]:
    """The module docstring's integrator on the grid ts [B, N + 1] from (x, v) at ts[:, 0]: N network calls,
    order 1 on the first and last steps (DPM-Solver++'s lower-order final step)."""
    basis, N = model.basis, ts.shape[1] - 1
    ids = basis.group_ids(labels)
    classes, pick = _classes(process, labels, x.shape[0])  # ts must depend on a sample only through its class
    rows = _class_rows(ts, pick, 1 if classes is None else len(classes))
    D_prev = tau_prev = None
    for i in step_indices(N, progress):
        D = model.denoise(torch.cat([x, v], 1), ts[:, i], labels)
        second = order == 2 and D_prev is not None and i < N - 1
        with torch.no_grad():
            Phi, J0, J1, tau_prev = _step_coefficients(process, rows[:, i], rows[:, i + 1],
                                                       tau_prev if second else None, classes)
            Phi, J0, J1 = Phi[pick], J0[pick], J1[pick]
        x, v = basis.block_combine(x, v, Phi.to(_F64), ids=ids)
        data = torch.stack([torch.stack([J0[..., 0] + J1[..., 0], -J1[..., 0]], -1),
                            torch.stack([J0[..., 1] + J1[..., 1], -J1[..., 1]], -1)], -2)
        x, v = basis.block_combine(D, D if D_prev is None else D_prev, data, x, v, ids=ids)
        D_prev = D
    return x, v


def _heun(flow, x: Tensor, v: Tensor, ts: Tensor, progress: bool) -> tuple[Tensor, Tensor]:
    """Heun on the grid ts, the last step Euler (VSMD's sampler; EDM's convention): 2N - 1 calls for N steps."""
    N = len(ts) - 1
    for i in step_indices(N, progress, calls_per_step=2, last_step_calls=1):
        h = float(ts[i + 1] - ts[i])
        dx, dv = flow(x, v, ts[i])
        x_e, v_e = x + h * dx, v + h * dv  # Euler step
        if i == N - 1:
            x, v = x_e, v_e
        else:
            dx_e, dv_e = flow(x_e, v_e, ts[i + 1])
            x, v = x + h / 2 * (dx + dx_e), v + h / 2 * (dv + dv_e)  # trapezoidal correction
    return x, v


def _ipndm(flow, x: Tensor, v: Tensor, ts: Tensor, order: int, progress: bool) -> tuple[Tensor, Tensor]:
    """Adams-Bashforth on the uniform grid ts, orders warming up 1, 2, .. `order` (iPNDM): one call per step."""
    hist: list[tuple[Tensor, Tensor]] = []
    for i in step_indices(len(ts) - 1, progress):
        h = float(ts[i + 1] - ts[i])
        hist = [flow(x, v, ts[i])] + hist[:order - 1]
        weights = AB_WEIGHTS[len(hist)]
        x = x + h * sum(w * d[0] for w, d in zip(weights, hist))
        v = v + h * sum(w * d[1] for w, d in zip(weights, hist))
    return x, v


def sample_ode(process: VSMDProcess, precond, seeds: Sequence[int], nfe: int = 9, *, solver: str = "heun",
               grid: str = "uniform_t", order: int | None = None, labels: Tensor | None = None,
               image_shape: Sequence[int] | None = None, dtype=torch.float32, device: torch.device | str | None = None,
               progress: bool = False) -> tuple[Tensor, Tensor | None, dict]:
    """VSMD's sampler: the probability-flow ODE dz = [F z - 1/2 G G^T grad log p] dt (G nonzero on v only, so
    dv gets -1/2 gamma beta score_v) on a uniform t grid from T to t0, from VSMD's prior; the sample is x.

    solver 'heun' (VSMD's `sample(prob_flow=True)`: Heun, last step Euler, nfe = 2 steps - 1), 'ipndm'
    (Adams-Bashforth of `order` <= 4 on the same grid, nfe = steps), both on the uniform t grid, or 'dpmpp-2m',
    the phase-space exponential integrator (`dpmpp_2m_phase_space`, nfe = steps) on `grid` (uniform_t, logsnr or
    edm_sigma), for a model with a `denoise` (the denoiser head, `VSMDDenoiser`). The engine's other
    multistep solvers (UniPC, DEIS) are exponential integrators of the VE form and do not apply here. The NFE
    rule is `sampling.resolve_sampler`'s. Seeds as `vsmd.simulate_backward` (the same start point). Returns (x at t0
    [B, C, H, W], labels, info with the NFE spent) like `sampling.sample`.
    """
    if solver not in PHASE_SPACE_SOLVERS:
        raise ValueError(f"solver: expected one of {', '.join(PHASE_SPACE_SOLVERS)} (the phase-space ODE solvers), "
                         f"got {solver!r}")
    plan = resolve_sampler(solver, grid, "end" if solver == "heun" else None, nfe, order)
    check_sampler(plan)
    if solver == "dpmpp-2m" and not callable(getattr(precond, "denoise", None)):
        raise ValueError(f"solver: dpmpp-2m needs the denoiser head (phase_space.VSMDDenoiser, a data prediction), "
                         f"got {type(precond).__name__}")
    device = process.log_damping.device if device is None else torch.device(device)
    seeds, labels, shape = sampling_inputs(process, precond, seeds, labels, image_shape, device)
    basis, B = precond.basis, len(seeds)
    ids = basis.group_ids(labels)
    streams = SeedStreams(seeds)
    with torch.no_grad():
        x, v = prior(process, basis, streams, shape, labels, device, dtype)
        if solver == "dpmpp-2m":
            grid_t = sigma_grid(process, grid, plan.steps, B, labels)
            x, v = dpmpp_2m_phase_space(process, precond, x, v, grid_t, labels, order=plan.order, progress=progress)
        else:
            F, half_g2 = process.drift_blocks(labels).expand(B, -1, -1, -1), process.gamma * process.beta / 2

            def flow(x: Tensor, v: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
                s = velocity_score(precond, x, v, time_column(t, B, device), labels)
                return basis.block_combine(x, v, F, base_v=-half_g2 * s, ids=ids)

            ts = torch.linspace(process.T, process.t0, plan.steps + 1, dtype=_F64)
            if solver == "heun":
                x, v = _heun(flow, x, v, ts, progress)
            else:
                x, v = _ipndm(flow, x, v, ts, plan.order, progress)
    return x, labels, {"nfe": plan.nfe, "steps": plan.steps, "solver": solver, "order": plan.order, "grid": grid}


def check_sampler(plan: Sampler) -> None:
    """ValueError naming `solver`, `grid` or `secondary` when a VSMD model does not take the resolved sampler:
    Euler-Maruyama, Heun (end point, last step Euler) or iPNDM on the uniform t grid, and the phase-space
    DPM-Solver++(2M) on `PHASE_SPACE_GRIDS` (the engine's other solvers integrate the VE form)."""
    if plan.grid in ("optimized", "learned"):
        raise ValueError(f"grid: {plan.grid!r} grids are fitted for core models (grid_fit, grid_learn); a vsmd model "
                         f"takes its family's grids")
    if plan.solver not in (EM, *PHASE_SPACE_SOLVERS):
        raise ValueError(f"solver: a vsmd model samples with {EM}, {', '.join(PHASE_SPACE_SOLVERS)} (the other "
                         f"solvers integrate the VE form, not the phase space), got {plan.solver!r}")
    if plan.solver == "dpmpp-2m":
        if plan.grid not in PHASE_SPACE_GRIDS:
            raise ValueError(f"grid: a vsmd model's dpmpp-2m runs on {', '.join(PHASE_SPACE_GRIDS)}, "
                             f"got {plan.grid!r}")
    elif plan.grid != "uniform_t":
        what = "Euler-Maruyama" if plan.solver == EM else f"{plan.solver} on the phase space"
        raise ValueError(f"grid: a vsmd model's {what} runs on the uniform t grid ('uniform_t'), got {plan.grid!r}")
    if plan.secondary == "mid":
        raise ValueError("secondary: a vsmd model's Heun steps to the end point (VSMD's sampler), got 'mid'")
