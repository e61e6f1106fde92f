"""Schedule-gradient estimator (METHOD §5): the derivative of the ideal flow with respect to the schedule.

For the per-sample loss gradient delta = dl/dF (held fixed) and phi(x) = <delta, F(x)>, the heat equation gives,
at fixed x and for every subspace k (Cor. 4.2, §5.3),

    d<delta, F*(x; g)>/dg_k = 1/2 tr(P_k grad^2 phi) + <P_k J_F^T delta, F>/sqrt(g_k) + 1/2 <P_k delta, F>/g_k,

written with x-derivatives of F only, so a network whose conditioning is detached can stand in for F*.
The trace is estimated with one unit direction e per sample: n <grad^2 phi e, P_k e> (E[e e^T] = I/n).
The surrogate A = sum_{b,k} g_k(t_b) * coeff[b, k] (coefficients detached) carries exactly this gradient to g,
and the loss adds A - A.detach(): value 0, no gradient to the network.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["flow_schedule_derivative", "schedule_gradient_surrogate", "unit_directions"]

_TRACES = ("hutchinson", "exact")


def unit_directions(like: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One direction per sample, uniform on the unit sphere of R^{C*H*W} (§5.1)."""
    xi = torch.randn(like.shape, generator=generator, dtype=like.dtype, device=like.device)
    return xi / xi.flatten(1).norm(dim=1)[:, None, None, None]


def flow_schedule_derivative(model, x: Tensor, F: Tensor, delta: Tensor, g: Tensor, labels: Tensor | None = None,
                             *, generator: torch.Generator | None = None, trace: str = "hutchinson",
                             directions: Tensor | None = None) -> dict[str, Tensor]:
    """Estimate d<delta_b, F*(x_b; g_b)>/dg_bk at fixed x, as three detached [B, K] terms (§5.3).

    `F = model.flow(x, g.detach(), labels)` must still be attached to `x`; `delta` is detached. Returns
    {"trace", "jacobian", "scale", "total"}. `trace="exact"` sums over all n coordinate directions instead of
    one random direction (n backward passes: tests and small images only). `directions` overrides the random
    unit directions (shape of x).
    """
    if trace not in _TRACES:
        raise ValueError(f"trace: expected one of {_TRACES}, got {trace!r}")
    if not x.requires_grad or not F.requires_grad:
        raise ValueError("x, F: F must be computed from x with autograd recording (x.requires_grad)")
    if delta.shape != x.shape or F.shape != x.shape:
        raise ValueError(f"delta, F: expected the shape of x {tuple(x.shape)}, got {tuple(delta.shape)} and "
                         f"{tuple(F.shape)}")
    basis = model.basis
    ids = basis.group_ids(labels)
    gd = g.detach()
    delta = delta.detach()
    # pass 1: u = J_F^T delta, kept differentiable in x for the Hessian-vector products
    (u,) = torch.autograd.grad((delta * F).sum(), x, create_graph=True)
    if trace == "hutchinson":
        e = unit_directions(x, generator) if directions is None else directions.to(x.dtype)
        # pass 2: He = grad^2 phi e; retain the graph: the loss still back-propagates through F
        (He,) = torch.autograd.grad((u * e).sum(), x, retain_graph=True)
        n = x[0].numel()
        tr = 0.5 * n * basis.dot(He, e, ids=ids)
    else:
        flat = x.flatten(1)
        tr = torch.zeros_like(gd)
        for i in range(flat.shape[1]):
            e = torch.zeros_like(flat)
            e[:, i] = 1
            e = e.view_as(x)
            (He,) = torch.autograd.grad((u * e).sum(), x, retain_graph=True)
            tr = tr + 0.5 * basis.dot(He, e, ids=ids).to(gd.dtype)
    u, F = u.detach(), F.detach()
    terms = {
        "trace": tr.to(gd.dtype),
        "jacobian": basis.dot(u, F, ids=ids).to(gd.dtype) * gd.rsqrt(),
        "scale": 0.5 * basis.dot(delta, F, ids=ids).to(gd.dtype) / gd,
    }
    terms["total"] = terms["trace"] + terms["jacobian"] + terms["scale"]
    return terms


def schedule_gradient_surrogate(model, x: Tensor, F: Tensor, delta: Tensor, g: Tensor,
                                labels: Tensor | None = None, *, generator: torch.Generator | None = None,
                                trace: str = "hutchinson", return_terms: bool = False):
    """A - A.detach() with A = 1/2 n <He, M e> + <u, M_rel^{1/2} F> + 1/2 <delta, M_rel F> (§5.3, §5.5).

    M = sum_k g_k P_k, M_rel^{1/2} = sum_k g_k/sqrt(gd_k) P_k, M_rel = sum_k g_k/gd_k P_k, gd = g.detach();
    He, u, F and delta are detached, so the value is exactly 0 and only g (hence the schedule) gets gradient.
    """
    terms = flow_schedule_derivative(model, x, F, delta, g, labels, generator=generator, trace=trace)
    A = (g * terms["total"]).sum()
    out = A - A.detach()
    return (out, terms) if return_terms else out
