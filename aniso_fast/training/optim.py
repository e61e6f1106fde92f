"""Optimisation rules of a training run: run length, learning-rate schedule, per-class Adam, gradient hygiene.

`Trainer` (train.py) runs the loop; everything here is a plain function or optimiser it calls (METHOD §4.4, §8,
§9).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["train_length", "lr_decay", "lr_factor", "ClassMaskedAdam", "sanitize_grads_", "grad_norm"]


def train_length(kimg: float, steps: int | None, batch: int) -> tuple[int, float]:
    """(steps, kimg) of a run: `steps` when given, else enough steps of `batch` images to cover `kimg`; the
    returned kimg is what those steps actually see."""
    steps = steps or max(1, math.ceil(kimg * 1000 / batch))
    return steps, steps * batch / 1000


def lr_decay(kimg: float, decay_start_kimg: float | None, decay_halflife_kimg: float | None
             ) -> tuple[float, float]:
    """(decay start, half-life) in kimg; None stands for the default derived from the run length `kimg`: the
    decay starts at half the run with a half-life of an eighth of it (METHOD §9's shape)."""
    start = kimg / 2 if decay_start_kimg is None else decay_start_kimg
    halflife = kimg / 8 if decay_halflife_kimg is None else decay_halflife_kimg
    return start, halflife


def lr_factor(nimg: int, rampup_kimg: float, decay_start_kimg: float, decay_halflife_kimg: float) -> float:
    """Learning-rate factor after `nimg` images (this step's batch included): linear warm-up over
    `rampup_kimg` to 1, held, then halved every `decay_halflife_kimg` after `decay_start_kimg` (METHOD §9, with
    a warm-up that completes, unlike the reference's §10.3)."""
    f = min(nimg / (rampup_kimg * 1000.0), 1.0) if rampup_kimg > 0 else 1.0
    over = nimg - decay_start_kimg * 1000.0
    if over > 0:
        f *= 0.5 ** (over / (decay_halflife_kimg * 1000.0))
    return f


class ClassMaskedAdam(torch.optim.Optimizer):
    """Adam on schedule parameters `psi [S, ...]` run as S independent Adams, one per class row (METHOD §8).

    `step(present)` updates only rows s with `present[s]`: an absent class keeps its parameters, both moments and
    its own step count bit for bit (the reference keeps one optimiser per class and steps those in the batch).
    With every row present this is `torch.optim.Adam` (per-row step counts are then all equal).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps))

    @torch.no_grad()
    def step(self, present: Tensor | None = None) -> None:
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                S = p.shape[0]
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros(S, dtype=torch.float64, device=p.device)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                mask = (torch.ones(S, dtype=torch.bool, device=p.device) if present is None
                        else present.to(device=p.device, dtype=torch.bool))
                if mask.shape != (S,):
                    raise ValueError(f"present: expected a bool mask of shape [{S}], got {tuple(mask.shape)}")
                rows = mask.view(S, *([1] * (p.dim() - 1)))
                grad = p.grad
                # Optimizer.load_state_dict leaves "step" on the CPU (torch's convention for Adam's step)
                state["step"] = state["step"].to(p.device)
                step = torch.where(mask, state["step"] + 1, state["step"])
                exp_avg = state["exp_avg"].lerp(grad, 1 - beta1)
                exp_avg_sq = state["exp_avg_sq"].mul(beta2).addcmul_(grad, grad, value=1 - beta2)
                n = step.clamp_min(1).view(rows.shape)
                step_size = group["lr"] / (1 - beta1 ** n)
                denom = (exp_avg_sq.sqrt() / (1 - beta2 ** n).sqrt()).add_(group["eps"])
                new_p = p - (step_size * (exp_avg / denom)).to(p.dtype)
                p.copy_(torch.where(rows, new_p, p))
                state["exp_avg"] = torch.where(rows, exp_avg, state["exp_avg"])
                state["exp_avg_sq"] = torch.where(rows, exp_avg_sq, state["exp_avg_sq"])
                state["step"] = step


def sanitize_grads_(tensors: Sequence[Tensor]) -> Tensor:
    """NaN -> 0, +-inf -> +-1e5 in place (METHOD §4.4); returns the number of non-finite entries (a tensor)."""
    bad = torch.zeros((), dtype=torch.int64, device=tensors[0].device if tensors else "cpu")
    for t in tensors:
        bad = bad + (~torch.isfinite(t)).sum()
        torch.nan_to_num_(t, nan=0.0, posinf=1e5, neginf=-1e5)
    return bad


def grad_norm(tensors: Sequence[Tensor]) -> Tensor:
    """The global L2 norm of a list of gradients, in float64 (0 for an empty list)."""
    if not tensors:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.double()) for t in tensors]))
