"""Training losses (METHOD §4): the isotropic warm-up loss and the anisotropic trajectory loss.

Per sample: t ~ U(tmin, T), (g, gdot) = schedule(t, label) [B, K], eps ~ N(0, I), x = x0 + M^{1/2} eps.

    iso_loss:        l = sum_k gdot_k^2 / (g_k^2 (g_k + c)) ||P_k (D(x; g) - x0)||^2     nothing detached (§4.1)
    trajectory_loss: l = sum_k gdot_k^2 / (g_k (g_k + c))   ||P_k (F(x; gd) - F_tgt)||^2  F_tgt = M^{-1/2}(x0 - x)

In the trajectory loss the network's conditioning is detached (gd = g.detach()) and the estimator's surrogate
(§5, `estimator.py`) supplies the derivative of the ideal flow with respect to the schedule instead.
Random draws, in order, from `generator`: t [B], eps [B, C, H, W], then the estimator's directions.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .estimator import schedule_gradient_surrogate

__all__ = ["iso_loss", "trajectory_loss", "forward_process", "target_flow"]

_REDUCTIONS = ("mean", "sum")


def forward_process(basis, x0: Tensor, noise: Tensor, g: Tensor, ids: Tensor | None = None) -> Tensor:
    """x = x0 + M^{1/2} eps (§1.4)."""
    return basis.combine(noise, g.sqrt(), base=x0, ids=ids)


def target_flow(basis, x0: Tensor, x: Tensor, g: Tensor, ids: Tensor | None = None) -> Tensor:
    """F_tgt = M^{-1/2}(x0 - x), computed in the graph (= -eps, with zero schedule derivative)."""
    return basis.combine(x0 - x, g.rsqrt(), ids=ids)


def _labels_needed(model, schedule, basis) -> str | None:
    if getattr(schedule, "num_classes", None) is not None:
        return f"the schedule is class-conditional ({schedule.num_classes} classes)"
    if basis.num_groups > 1:
        return f"the basis has one group per class or cluster ({basis.num_groups} groups)"
    if getattr(model, "num_classes", None) is not None:
        return f"the model is class-conditional ({model.num_classes} classes)"
    return None


def _check_inputs(model, schedule, x0, labels, c, reduction, tmin, t, noise) -> None:
    basis = getattr(model, "basis", None)
    if basis is None or not hasattr(model, "flow") or not hasattr(model, "denoise"):
        raise TypeError(f"model: expected an object with .basis, .denoise and .flow (AnisoPrecond, "
                        f"GaussianMixture), got {type(model).__name__}")
    if not isinstance(x0, Tensor) or x0.dim() != 4 or x0.dtype not in (torch.float32, torch.float64):
        got = f"{x0.dtype} {tuple(x0.shape)}" if isinstance(x0, Tensor) else type(x0).__name__
        raise ValueError(f"x0: expected a float32/float64 tensor [B, C, H, W], got {got}")
    if x0.shape[0] < 1:
        raise ValueError("x0: expected a non-empty batch")
    if basis.image_size is not None and tuple(x0.shape[-2:]) != tuple(basis.image_size):
        raise ValueError(f"x0: image size {tuple(x0.shape[-2:])} does not match the basis {tuple(basis.image_size)}")
    shape = getattr(model, "image_shape", None)  # None also when the wrapped network does not report it
    if shape is not None and tuple(x0.shape[1:]) != tuple(shape):
        raise ValueError(f"x0: expected images of shape {tuple(shape)} for this model, got {tuple(x0.shape[1:])}")
    K = basis.num_subspaces
    if getattr(schedule, "num_subspaces", None) != K:
        raise ValueError(f"schedule: expected a MatrixSchedule with {K} subspaces (the basis), got "
                         f"{getattr(schedule, 'num_subspaces', type(schedule).__name__)}")
    B = x0.shape[0]
    why = _labels_needed(model, schedule, basis)
    if labels is None:
        if why is not None:
            raise ValueError(f"labels: required because {why}; pass int class labels [{B}]")
    elif not isinstance(labels, Tensor) or labels.dtype != torch.int64 or labels.shape != (B,):
        got = f"{labels.dtype} {tuple(labels.shape)}" if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"labels: expected an int64 tensor [{B}], got {got}")
    if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c) or c <= 0:
        raise ValueError(f"c: expected a finite number > 0, got {c!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction: expected one of {_REDUCTIONS}, got {reduction!r}")
    if isinstance(tmin, bool) or not isinstance(tmin, (int, float)) or not 0 <= tmin < schedule.T:
        raise ValueError(f"tmin: expected a number in [0, T={schedule.T}), got {tmin!r}")
    if t is not None and (not isinstance(t, Tensor) or not t.is_floating_point() or t.shape != (B,)):
        raise ValueError(f"t: expected a floating tensor [{B}] of times, got "
                         f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    if noise is not None and (not isinstance(noise, Tensor) or noise.shape != x0.shape):
        raise ValueError(f"noise: expected a tensor of the shape of x0 {tuple(x0.shape)}, got "
                         f"{tuple(noise.shape) if isinstance(noise, Tensor) else type(noise).__name__}")


def _draw(schedule, x0: Tensor, labels, generator, tmin: float, t, noise):
    """t ~ U(tmin, T) [B] (float64), (g, gdot) = schedule(t, labels), eps ~ N(0, I) like x0."""
    B = x0.shape[0]
    if t is None:
        t = tmin + (schedule.T - tmin) * torch.rand(B, generator=generator, dtype=torch.float64, device=x0.device)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
    g, gdot = schedule(t.to(torch.float64), labels)
    return t, noise.to(x0.dtype), g, gdot


def _reduce(per_sample: Tensor, reduction: str) -> Tensor:
    return per_sample.mean() if reduction == "mean" else per_sample.sum()


def edm_loss(model, schedule, x0: Tensor, labels: Tensor | None = None, *, reduction: str = "mean",
             generator: torch.Generator | None = None, P_mean: float = -1.2, P_std: float = 1.2,
             sigma_data: float = 0.5) -> tuple[Tensor, dict[str, Tensor]]:
    """EDM's training loss (Karras et al. 2022, their `EDMLoss`), for training the network from scratch.

    ln sigma ~ N(P_mean, P_std^2), x = x0 + sigma eps (g = sigma^2 in every subspace), weight
    (sigma^2 + sd^2)/(sigma sd)^2 on ||D - x0||^2 summed over pixels. The schedule is not used (same signature
    as the other losses). The iso/trajectory losses weight low noise levels very little in terms of the
    network output, which suits fine-tuning (the paper's workflow) but not training from scratch.
    """
    _check_inputs(model, schedule, x0, labels, 1.0, reduction, 1e-9, None, None)
    B, K = x0.shape[0], model.basis.num_subspaces
    ln_sigma = P_mean + P_std * torch.randn(B, generator=generator, dtype=torch.float64, device=x0.device)
    sigma = ln_sigma.exp()
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
    x = x0 + sigma.to(x0.dtype)[:, None, None, None] * noise
    D = model.denoise(x, (sigma ** 2)[:, None].expand(B, K), labels)
    weight = (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2
    per = weight * (D - x0).to(torch.float64).square().flatten(1).sum(1)
    return _reduce(per, reduction), {"loss_mean": per.detach().mean(), "log_sigma_mean": ln_sigma.mean()}


def iso_loss(model, schedule, x0: Tensor, labels: Tensor | None = None, *, c: float = 1.0,
             reduction: str = "mean", generator: torch.Generator | None = None, tmin: float = 1e-9,
             t: Tensor | None = None, noise: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Isotropic warm-up loss (§4.1, `ANILoss_gh_energy`): denoiser error weighted by gdot^2/(g^2 (g + c)).

    Nothing is detached: the schedule gradient flows through the weights, through x and through the network's
    conditioning. `t` and `noise` override the random draws. Returns (loss, stats) with detached stats.
    """
    _check_inputs(model, schedule, x0, labels, c, reduction, tmin, t, noise)
    basis = model.basis
    ids = basis.group_ids(labels)
    t, noise, g, gdot = _draw(schedule, x0, labels, generator, tmin, t, noise)
    x = forward_process(basis, x0, noise, g, ids)
    D = model.denoise(x, g, labels)
    err = basis.sqnorms(D - x0, ids=ids).to(torch.float64)  # [B, K]
    w = gdot.square() / (g.square() * (g + c))
    per = w * err
    loss = _reduce(per.sum(1), reduction)
    stats = {"t": t.detach(), "loss_per_subspace": per.detach().mean(0), "weight_mean": w.detach().mean(0),
             "error_sqnorm": err.detach().mean(0)}
    return loss, stats


def trajectory_loss(model, schedule, x0: Tensor, labels: Tensor | None = None, *, c: float = 0.5,
                    reduction: str = "sum", estimator: bool = True, trace: str = "hutchinson",
                    generator: torch.Generator | None = None, tmin: float = 1e-9, t: Tensor | None = None,
                    noise: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Anisotropic trajectory loss (§4.2, `flow_matching_energy_debug`) with the schedule-gradient estimator (§5).

    l_b = sum_k gdot_k^2/(g_k (g_k + c)) ||P_k (F - F_tgt)||^2, summed (default) or averaged over the batch.
    estimator=True: F = model.flow(x, g.detach()) and the surrogate of §5.3 (value 0) is added, so the schedule
    gradient is weight term + pathwise term + estimated d<delta, F*>/dg. estimator=False: plain back-propagation
    through the network's conditioning (g not detached). `trace="exact"` uses the exact trace in the estimator
    (n extra backward passes; small images only). `t` and `noise` override the random draws.
    """
    _check_inputs(model, schedule, x0, labels, c, reduction, tmin, t, noise)
    if trace not in ("hutchinson", "exact"):
        raise ValueError(f"trace: expected 'hutchinson' or 'exact', got {trace!r}")
    basis = model.basis
    ids = basis.group_ids(labels)
    t, noise, g, gdot = _draw(schedule, x0, labels, generator, tmin, t, noise)
    x = forward_process(basis, x0, noise, g, ids)
    F = model.flow(x, g.detach() if estimator else g, labels)
    r = F - target_flow(basis, x0, x, g, ids)
    w2 = gdot.square() / (g * (g + c))  # W^2 = Mdot^2 M^{-1} (M + c)^{-1} per subspace
    sq = basis.sqnorms(r, ids=ids).to(torch.float64)  # [B, K]
    per = w2 * sq
    loss = _reduce(per.sum(1), reduction)
    stats = {"t": t.detach(), "loss_per_subspace": per.detach().mean(0), "weight_mean": w2.detach().mean(0),
             "residual_sqnorm": sq.detach().mean(0)}
    if estimator and g.requires_grad:
        scale = 2.0 / x0.shape[0] if reduction == "mean" else 2.0
        delta = basis.combine(r.detach(), scale * w2.detach(), ids=ids)  # dloss/dF, held fixed
        surrogate, terms = schedule_gradient_surrogate(model, x, F, delta, g, labels, generator=generator,
                                                       trace=trace, return_terms=True)
        loss = loss + surrogate
        stats["dA_dg"] = terms["total"]
    return loss, stats
