"""Exponential moving average of network weights with a half-life counted in images (EDM's `training_loop`).

After a step on `batch` images, `beta = 0.5 ** (batch / halflife_nimg)` and `ema <- beta ema + (1 - beta) net`.
With a ramp-up ratio r the half-life is `min(halflife_nimg, r * nimg_seen)` (EDM's `ema_rampup_ratio`), so the
average forgets its initialisation quickly early in training. METHOD §9: the paper's runs use no ramp-up.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["ema_beta", "EMA"]


def ema_beta(batch: int, nimg: int, halflife_kimg: float, rampup_ratio: float | None = None) -> float:
    """Decay for one step of `batch` images when `nimg` images have been seen (this step included)."""
    halflife_nimg = halflife_kimg * 1000.0
    if rampup_ratio is not None:
        halflife_nimg = min(halflife_nimg, nimg * rampup_ratio)
    return 0.5 ** (batch / max(halflife_nimg, 1e-8))


class EMA:
    """Holds `module`, a frozen eval-mode copy of a network, updated in place by `update(net, beta)`."""

    def __init__(self, net: nn.Module, module: nn.Module | None = None):
        self.module = copy.deepcopy(net) if module is None else module
        self.module.eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, net: nn.Module, beta: float) -> None:
        for p_ema, p in zip(self.module.parameters(), net.parameters(), strict=True):
            p_ema.copy_(p.detach().lerp(p_ema, beta))
        for b_ema, b in zip(self.module.buffers(), net.buffers(), strict=True):
            b_ema.copy_(b)
