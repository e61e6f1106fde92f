"""Anisotropic EDM preconditioning (METHOD §3.2-3.3).

    D(x; g, y) = C_skip x + C_out F_net(C_in x, c_noise, y),     F(x; g, y) = M^{-1/2} (D - x)

with the per-subspace matrix functions of M = sum_k g_k P_k (sigma_d = 0.5)

    C_in = (M + sd^2)^{-1/2},  C_out = sd M^{1/2} (M + sd^2)^{-1/2},  C_skip = sd^2 (M + sd^2)^{-1},
    c_noise = mean_k(ln g_k) / 8  (= (ln g + ln h)/16 for K = 2: a quarter of ln of the geometric-mean sigma).

With g = h = sigma^2 this is EDM's EDMPrecond exactly. Each matrix function is one fused `combine`.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..geometry.bases import SubspaceBasis

__all__ = ["AnisoPrecond", "preconditioning"]


def preconditioning(g: Tensor, sigma_data: float = 0.5) -> dict[str, Tensor]:
    """Per-subspace coefficients [B, K] (float64 in, float64 out) and c_noise [B]."""
    sd2 = sigma_data ** 2
    return {
        "c_in": (g + sd2).rsqrt(),
        "c_skip": sd2 / (g + sd2),
        "c_out": sigma_data * g.sqrt() * (g + sd2).rsqrt(),
        "c_noise": g.log().mean(1) / 8,
    }


class AnisoPrecond(nn.Module):
    """Wraps a network with EDM's `(x, c_noise, class_labels)` signature into the denoiser D and the flow F.

    `g` is the per-sample, per-subspace variance `[B, K]` (float64); `labels` are int class labels `[B]`
    (one-hot encoded for the network when it is class-conditional; also select per-class bases).
    """

    def __init__(self, net: nn.Module, basis: SubspaceBasis, sigma_data: float = 0.5):
        super().__init__()
        self.net = net
        self.basis = basis
        self.sigma_data = float(sigma_data)
        self.label_dim = int(getattr(net, "label_dim", 0) or 0)

    def set_network(self, net: nn.Module) -> None:
        """Call `net` in place of the network (the trainer's DistributedDataParallel wrapper of the same one)."""
        self.net = net

    @property
    def num_classes(self) -> int | None:
        return self.label_dim or None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        cfg = self.net.config() if hasattr(self.net, "config") else {}
        if "in_channels" not in cfg or "img_resolution" not in cfg:
            raise AttributeError("image_shape: the network does not report in_channels/img_resolution; "
                                 "pass image_shape to the sampler")
        return (cfg["in_channels"], cfg["img_resolution"], cfg["img_resolution"])

    def _check(self, x: Tensor, g: Tensor, labels: Tensor | None) -> None:
        if g.dim() != 2 or g.shape != (x.shape[0], self.basis.num_subspaces):
            raise ValueError(f"g: expected per-subspace variances [{x.shape[0]}, {self.basis.num_subspaces}], "
                             f"got {tuple(g.shape)}")
        if self.label_dim and labels is None:
            raise ValueError(f"labels: the network is class-conditional ({self.label_dim} classes); pass labels")
        if labels is not None and labels.shape != (x.shape[0],):
            raise ValueError(f"labels: expected int class labels of shape [{x.shape[0]}], got {tuple(labels.shape)}")

    def _network(self, x: Tensor, g: Tensor, labels: Tensor | None, ids: Tensor | None, coef: dict) -> Tensor:
        x_in = self.basis.scale(x, coef["c_in"], ids=ids)
        onehot = None
        if self.label_dim:
            onehot = nn.functional.one_hot(labels, self.label_dim).to(torch.float32)
        out = self.net(x_in.to(torch.float32), coef["c_noise"].to(torch.float32), onehot)
        return out.to(x.dtype)

    def denoise(self, x: Tensor, g: Tensor, labels: Tensor | None = None) -> Tensor:
        self._check(x, g, labels)
        coef = preconditioning(g, self.sigma_data)
        ids = self.basis.group_ids(labels)
        F_net = self._network(x, g, labels, ids, coef)
        return self.basis.combine(x, coef["c_skip"], F_net, coef["c_out"], ids=ids)

    def flow(self, x: Tensor, g: Tensor, labels: Tensor | None = None) -> Tensor:
        """F = M^{-1/2}(D - x) in one combine: (C_skip - 1) M^{-1/2} x + C_out M^{-1/2} F_net."""
        self._check(x, g, labels)
        coef = preconditioning(g, self.sigma_data)
        ids = self.basis.group_ids(labels)
        F_net = self._network(x, g, labels, ids, coef)
        sd2 = self.sigma_data ** 2
        inv = (g + sd2).rsqrt()
        return self.basis.combine(x, -g.sqrt() * inv * inv, F_net, self.sigma_data * inv, ids=ids)

    forward = denoise
