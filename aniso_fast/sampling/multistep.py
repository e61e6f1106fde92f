"""Multistep solvers for matrix-valued schedules: DPM-Solver++(2M/3M), UniPC (bh2), iPNDM, DEIS (docs/SOLVERS.md).

Every subspace k runs the scalar method on its own clock, sigma_k = sqrt(g_k) and lambda_k = -log sigma_k on the
shared grid: step sizes h_k and ratios r_k are [B, K] tensors, and each update is a linear combination of a few
images with per-subspace weights, applied with `basis.combine` (two images per call). With K = 1, or all g_k
equal, each solver is the published scalar method. Same signature as `ode.euler/heun`; one network call per
step and none at the end point, so N steps cost N calls. Their names, orders and NFE rules: `spec.SOLVERS`.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from .grids import Grid, step_indices

__all__ = ["AB_WEIGHTS", "deis", "dpmpp_2m", "dpmpp_3m", "ipndm", "unipc"]

_F64 = torch.float64
# Adams-Bashforth weights on F at the current point and the previous ones (iPNDM, uniform steps)
AB_WEIGHTS = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


# ---- shared pieces ----

def _check(x: Tensor, grid: Grid, order: int, orders: tuple[int, ...]) -> None:
    if not isinstance(getattr(grid, "g", None), Tensor) or not hasattr(grid, "g_sec"):
        raise TypeError(f"grid: expected a grids.Grid, got {type(grid).__name__}")
    if grid.g_sec is not None:
        raise ValueError("grid: multistep solvers use no secondary points; build the grid with secondary='end'")
    if grid.g.dim() != 3 or grid.g.shape[0] not in (1, x.shape[0]) or grid.num_steps < 1:
        raise ValueError(f"grid: expected variances [1 or {x.shape[0]}, N+1 >= 2, K], got {tuple(grid.g.shape)}")
    if not bool((grid.g[:, :-1] > 0).all()) or not bool((grid.g[:, -1] >= 0).all()):
        raise ValueError("grid: expected positive variances (zero allowed at the end point only)")
    if isinstance(order, bool) or not isinstance(order, int) or order not in orders:
        raise ValueError(f"order: expected one of {', '.join(map(str, orders))}, got {order!r}")


def _clock(grid: Grid, B: int) -> tuple[Tensor, Tensor]:
    """sigma_k and lambda_k = -log sigma_k along the grid, [B, N+1, K] (lambda = inf at sigma = 0)."""
    sigma = grid.g.sqrt().expand(B, -1, -1)
    return sigma, -sigma.log()


def _step_order(i: int, num_steps: int, order: int, lower_order_final: bool) -> int:
    """Warm-up from first order at the start; with lower_order_final also back down over the last steps."""
    return min(order, i + 1, num_steps - i if lower_order_final else order)


def _units(n: int, like: Tensor) -> tuple[Tensor, ...]:
    """Unit weight vectors e_0..e_{n-1} ([n, 1, 1]): a formula written on them yields each image's [B, K] weight."""
    return torch.eye(n, dtype=_F64, device=like.device)[:, :, None, None].unbind(0)


def _lincomb(basis, ids, terms: list[tuple[Tensor, Tensor]], base: Tensor | None = None) -> Tensor:
    """base + sum_j sum_k w_j[:, k] P_k v_j for terms [(v_j, w_j [B, K])]: one combine per pair of images."""
    out = base
    for j in range(0, len(terms), 2):
        (u, a), (v, c) = terms[j], terms[j + 1] if j + 1 < len(terms) else (None, None)
        out = basis.combine(u, a, v, c, base=out, ids=ids)
    return out


def _denoise(model, x: Tensor, g: Tensor, labels: Tensor | None, ids: Tensor | None) -> tuple[Tensor, Tensor]:
    """One network call: the flow F and the data prediction D = x + M^{1/2} F (METHOD §3.3)."""
    F = model.flow(x, g, labels)
    return F, model.basis.combine(F, g.sqrt(), base=x, ids=ids)


# ---- DPM-Solver++ (data prediction, exponential integrator in lambda_k) ----

def dpmpp_2m(model, x: Tensor, grid: Grid, labels: Tensor | None = None, *, order: int = 2,
             lower_order_final: bool = True, progress: bool = False,
             callback: Callable[[dict], None] | None = None) -> Tensor:
    """DPM-Solver++(2M) per subspace: x_b = (sigma_b/sigma_a) x + (1 - e^{-h}) [(1 + 1/2r) D_0 - 1/2r D_1].

    First step first order; a step to sigma = 0 gives x = D; `lower_order_final`: the last step is first order.
    `order` is 2 (taken for a signature shared by all multistep solvers).
    """
    _check(x, grid, order, (2,))
    basis, ids, B, N = model.basis, model.basis.group_ids(labels), x.shape[0], grid.num_steps
    sigma, lam = _clock(grid, B)
    D_prev = None
    for i in step_indices(N, progress):
        g_a, s_a, s_b = grid.g[:, i].expand(B, -1), sigma[:, i], sigma[:, i + 1]
        F, D = _denoise(model, x, g_a, labels, ids)
        h = lam[:, i + 1] - lam[:, i]
        phi_1 = -torch.expm1(-h)
        if _step_order(i, N, 2, lower_order_final) == 1:
            x = _lincomb(basis, ids, [(x, s_b / s_a), (D, phi_1)])
        else:
            c = torch.where(s_b > 0, h / (2 * (lam[:, i] - lam[:, i - 1])), 0.0)  # 1/(2r), r = h_last/h
            x = _lincomb(basis, ids, [(x, s_b / s_a), (D, phi_1 * (1 + c)), (D_prev, -phi_1 * c)])
        D_prev = D
        if callback is not None:
            callback({"i": i, "x": x, "g": grid.g[:, i + 1].expand(B, -1), "flow": F, "denoised": D})
    return x


def dpmpp_3m(model, x: Tensor, grid: Grid, labels: Tensor | None = None, *, order: int = 3,
             variant: str = "published", lower_order_final: bool = True, progress: bool = False,
             callback: Callable[[dict], None] | None = None) -> Tensor:
    """DPM-Solver++(3M) per subspace, with the 2nd-order (Taylor) update on the second step.

    variant 'published': DPM-Solver's / k-diffusion's update, `- phi_3 d2` (measured order 2: the quadratic term
    is half the exact integral of the interpolant); 'exact': `- 2 phi_3 d2`, third order (docs/SOLVERS.md).
    A step to sigma = 0 gives x = D; `lower_order_final`: orders 2 and 1 on the last two steps. `order` is 3.
    """
    if variant not in ("published", "exact"):
        raise ValueError(f"variant: expected 'published' or 'exact', got {variant!r}")
    _check(x, grid, order, (3,))
    kappa = 1.0 if variant == "published" else 2.0
    basis, ids, B, N = model.basis, model.basis.group_ids(labels), x.shape[0], grid.num_steps
    sigma, lam = _clock(grid, B)
    hist: list[Tensor] = []  # data predictions, newest first
    for i in step_indices(N, progress):
        g_a, s_a, s_b = grid.g[:, i].expand(B, -1), sigma[:, i], sigma[:, i + 1]
        F, D = _denoise(model, x, g_a, labels, ids)
        hist = [D] + hist[:2]
        p = _step_order(i, N, 3, lower_order_final)
        h = lam[:, i + 1] - lam[:, i]
        phi_1 = -torch.expm1(-h)
        phi_2 = 1 - phi_1 / h
        phi_3 = phi_2 / h - 0.5
        m0, m1, m2 = _units(3, x)
        w = phi_1 * m0
        if p == 2:
            r = (lam[:, i] - lam[:, i - 1]) / h
            w = w + phi_2 * (m0 - m1) / r
        elif p == 3:
            r0, r1 = (lam[:, i] - lam[:, i - 1]) / h, (lam[:, i - 1] - lam[:, i - 2]) / h
            d1_0, d1_1 = (m0 - m1) / r0, (m1 - m2) / r1
            d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            w = w + phi_2 * d1 - kappa * phi_3 * d2
        w = torch.where(s_b > 0, w, m0)  # step to sigma = 0: x = D
        x = _lincomb(basis, ids, [(x, s_b / s_a)] + [(hist[j], w[j]) for j in range(p)])
        if callback is not None:
            callback({"i": i, "x": x, "g": grid.g[:, i + 1].expand(B, -1), "flow": F, "denoised": D})
    return x


# ---- UniPC (B(h) = e^h - 1, data prediction) ----

def _unipc_weights(p: int, h: Tensor, h_prev: list[Tensor],
                   corrector: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """UniP (and UniC) weights of D_0..D_{p-1} ([p, B, K] each) and the corrector's weight of the new D.

    The per-subspace Vandermonde systems R rho = b of UniPC's `multistep_uni_pc_bh_update` are solved batched.
    """
    hh = -h
    B_h = torch.expm1(hh)  # bh2
    # r_j = (lambda_{-j} - lambda_0) / h for the previous points, then 1 for the new one
    rks = [-sum(h_prev[:j]) / h for j in range(1, p)] + [torch.ones_like(h)]
    R = torch.stack([torch.stack([rk ** n for rk in rks], -1) for n in range(p)], -2)  # [B, K, p, p]
    b, h_phi_k, fact = [], torch.expm1(hh) / hh - 1, 1
    for n in range(1, p + 1):
        b.append(h_phi_k * fact / B_h)
        fact *= n + 1
        h_phi_k = h_phi_k / hh - 1 / fact
    b = torch.stack(b, -1)  # [B, K, p]
    m = _units(p, h)
    D1s = [(m[j] - m[0]) / rks[j - 1] for j in range(1, p)]
    base = -torch.expm1(hh) * m[0]  # the first-order (DDIM) part: (1 - e^{-h}) D_0
    if p == 1:
        w_pred = base
    else:
        rho_p = [torch.full_like(h, 0.5)] if p == 2 else \
            torch.linalg.solve(R[..., :-1, :-1], b[..., :-1]).unbind(-1)
        w_pred = base - B_h * sum(r * d for r, d in zip(rho_p, D1s))
    if not corrector:
        return w_pred, None, None
    rho_c = [torch.full_like(h, 0.5)] if p == 1 else torch.linalg.solve(R, b).unbind(-1)
    # corrector: base - B_h (sum_j rho_c[j] D1s_j + rho_c[-1] (D_new - D_0))
    w_corr = base - B_h * (sum(r * d for r, d in zip(rho_c[:-1], D1s)) - rho_c[-1] * m[0])
    return w_pred, w_corr, -B_h * rho_c[-1]


def unipc(model, x: Tensor, grid: Grid, labels: Tensor | None = None, *, order: int = 3,
          lower_order_final: bool = True, progress: bool = False,
          callback: Callable[[dict], None] | None = None) -> Tensor:
    """UniPC-bh2 per subspace: predictor UniP-p, then the corrector UniC with the next step's model value.

    The model value at the predicted point corrects that point and enters the history (no extra call); the
    last step has no corrector. A step to sigma = 0 gives x = D. `callback` sees the predicted x.
    """
    _check(x, grid, order, (2, 3))
    basis, ids, B, N = model.basis, model.basis.group_ids(labels), x.shape[0], grid.num_steps
    sigma, lam = _clock(grid, B)
    hist: list[Tensor] = []
    pending = None  # the last step's corrector, short of its new-model-value term, and that term's weight
    for i in step_indices(N, progress):
        g_a, s_a, s_b = grid.g[:, i].expand(B, -1), sigma[:, i], sigma[:, i + 1]
        F, D = _denoise(model, x, g_a, labels, ids)
        if pending is not None:
            x = basis.combine(D, pending[1], base=pending[0], ids=ids)  # UniC
        hist = [D] + hist[:order - 1]
        p = _step_order(i, N, order, lower_order_final)
        live = s_b > 0
        h = torch.where(live, lam[:, i + 1] - lam[:, i], 1.0)  # a finite stand-in at sigma = 0 (masked below)
        h_prev = [lam[:, i - j] - lam[:, i - j - 1] for j in range(p - 1)]
        w_pred, w_corr, w_new = _unipc_weights(p, h, h_prev, corrector=i < N - 1)
        m0 = _units(p, x)[0]
        ratio = s_b / s_a
        terms = [(hist[j], torch.where(live, w_pred[j], m0[j])) for j in range(p)]
        pending = None if w_corr is None else \
            (_lincomb(basis, ids, [(x, ratio)] + [(hist[j], w_corr[j]) for j in range(p)]), w_new)
        x = _lincomb(basis, ids, [(x, ratio)] + terms)  # UniP
        if callback is not None:
            callback({"i": i, "x": x, "g": grid.g[:, i + 1].expand(B, -1), "flow": F, "denoised": D})
    return x


# ---- iPNDM (Adams-Bashforth on dx = -dS F) ----

def ipndm(model, x: Tensor, grid: Grid, labels: Tensor | None = None, *, order: int = 4, progress: bool = False,
          callback: Callable[[dict], None] | None = None) -> Tensor:
    """iPNDM per subspace: x_b = x_a - (S_b - S_a) * sum_j c_j F_{i-j}, fixed Adams-Bashforth weights c.

    Orders warm up 1, 2, .. `order` over the first steps (as diff-sampler's `ipndm_sampler` on the EDM ODE);
    the network is never called at the end point.
    """
    _check(x, grid, order, tuple(AB_WEIGHTS))
    basis, ids, B, N = model.basis, model.basis.group_ids(labels), x.shape[0], grid.num_steps
    sigma, _ = _clock(grid, B)
    hist: list[Tensor] = []
    for i in step_indices(N, progress):
        F = model.flow(x, grid.g[:, i].expand(B, -1), labels)
        hist = [F] + hist[:order - 1]
        F_ab = sum(c * F_j for c, F_j in zip(AB_WEIGHTS[min(order, i + 1)], hist))
        x = basis.combine(F_ab, -(sigma[:, i + 1] - sigma[:, i]), base=x, ids=ids)
        if callback is not None:
            callback({"i": i, "x": x, "g": grid.g[:, i + 1].expand(B, -1), "flow": F})
    return x


# ---- DEIS tAB (Adams-Bashforth in DEIS's VP time, integrated exactly against dS) ----

def _vp_time(sigma: Tensor, sigma_min: float = 0.002, sigma_max: float = 80.0, eps_s: float = 1e-3) -> Tensor:
    """DEIS's VP time of an EDM sigma (diff-sampler's `edm2t`: beta fitted to (eps_s, sigma_min), (1, sigma_max))."""
    beta_d = 2 * (math.log(sigma_min ** 2 + 1) / eps_s - math.log(sigma_max ** 2 + 1)) / (eps_s - 1)
    beta_min = math.log(sigma_max ** 2 + 1) - 0.5 * beta_d
    return ((beta_min ** 2 + 2 * beta_d * torch.log1p(sigma ** 2)).sqrt() - beta_min) / beta_d


_GAUSS = [torch.tensor(a, dtype=_F64) for a in np.polynomial.legendre.leggauss(8)]  # nodes, weights on [-1, 1]


def _deis_weights(s_a: Tensor, s_b: Tensor, nodes: list[Tensor]) -> list[Tensor]:
    """integral_{S_a}^{S_b} l_j(tau(S)) dS for the Lagrange basis l_j on the VP times `nodes` ([B, K] each).

    Integrated in S, where tau(S) is smooth down to S = 0 (in tau, dS/dtau is singular at 0): 8-point Gauss."""
    node, weight = (a.to(s_a.device) for a in _GAUSS)
    tau = _vp_time((s_a + s_b)[..., None] / 2 + (s_b - s_a)[..., None] / 2 * node)  # [B, K, 8]
    out = []
    for j, tj in enumerate(nodes):
        lj = torch.ones_like(tau)
        for m, tm in enumerate(nodes):
            if m != j:
                lj = lj * (tau - tm[..., None]) / (tj - tm)[..., None]
        out.append((s_b - s_a) / 2 * (lj * weight).sum(-1))
    return out


def deis(model, x: Tensor, grid: Grid, labels: Tensor | None = None, *, order: int = 3, progress: bool = False,
         callback: Callable[[dict], None] | None = None) -> Tensor:
    """DEIS tAB per subspace: F_k as a polynomial in the VP time tau_k through the last `order` points,
    integrated along dS_k: x_b = x_a - sum_j (integral l_j(tau) dS) F_{i-j}.

    Orders warm up 1, 2, .. (as diff-sampler's `deis_sampler`); no network call at the end point.
    """
    _check(x, grid, order, (1, 2, 3, 4))
    basis, ids, B, N = model.basis, model.basis.group_ids(labels), x.shape[0], grid.num_steps
    sigma, _ = _clock(grid, B)
    tau = _vp_time(sigma)
    hist: list[Tensor] = []
    for i in step_indices(N, progress):
        F = model.flow(x, grid.g[:, i].expand(B, -1), labels)
        hist = [F] + hist[:order - 1]
        p = min(order, i + 1)
        w = _deis_weights(sigma[:, i], sigma[:, i + 1], [tau[:, i - j] for j in range(p)])
        x = _lincomb(basis, ids, [(hist[j], -w[j]) for j in range(p)], base=x)
        if callback is not None:
            callback({"i": i, "x": x, "g": grid.g[:, i + 1].expand(B, -1), "flow": F})
    return x
