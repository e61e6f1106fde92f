"""Exact Gaussian-mixture model: ground truth for solvers and the estimator, and a default "network".

    p(x0 | y) = sum_{m in class y} pi_m N(mu_m, Sigma_m),     Sigma_m = sum_j lam[m, j] Q_j,

where Q_0..Q_{J-1} are the subspaces of a *fine* basis that refines the diffusion basis (each fine subspace j
lies inside diffusion subspace parent[j]). Under the forward process x = x0 + M^{1/2} eps with
M = sum_k g_k P_k, each component stays Gaussian with covariance sum_j (lam[m, j] + g_parent(j)) Q_j, so the
posterior mean (the exact denoiser) and the exact flow F* = M^{-1/2}(D* - x) are closed-form, computed with
the same subspace ops as everything else, in float64, and differentiable in x and g.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from ..geometry.bases import DCTBasis, PCABasis, SubspaceBasis

__all__ = ["GaussianMixture"]


class GaussianMixture(nn.Module):
    def __init__(self, fine_basis: SubspaceBasis, parent: Sequence[int], means: Tensor, variances: Tensor,
                 weights: Tensor | None = None, classes: Tensor | None = None):
        super().__init__()
        M = means.shape[0]
        J = fine_basis.num_subspaces
        if means.dim() != 4:
            raise ValueError(f"means: expected [M, C, H, W], got {tuple(means.shape)}")
        if variances.shape != (M, J):
            raise ValueError(f"variances: expected [{M}, {J}] (components x fine subspaces), got {tuple(variances.shape)}")
        if not bool((variances > 0).all()) or not bool(torch.isfinite(variances).all()):
            raise ValueError("variances: must be positive and finite")
        if not bool(torch.isfinite(means).all()):
            raise ValueError("means: contains NaN or infinite values")
        weights = torch.full((M,), 1.0 / M, dtype=torch.float64) if weights is None else weights.to(torch.float64)
        if weights.shape != (M,) or not bool((weights > 0).all()):
            raise ValueError(f"weights: expected {M} positive mixture weights")
        self.fine = fine_basis
        self.basis = fine_basis.regroup(parent)
        self.channels = means.shape[1]
        self.register_buffer("parent", torch.as_tensor(list(parent), dtype=torch.long))
        self.register_buffer("means", means.to(torch.float64))
        self.register_buffer("variances", variances.to(torch.float64))
        self.register_buffer("dims", torch.tensor(fine_basis.subspace_dims(self.channels), dtype=torch.float64))
        if classes is None:
            self.num_classes = None
            comp = torch.arange(M)[None]
            logw = weights.log()[None]
        else:
            classes = torch.as_tensor(classes, dtype=torch.long)
            self.num_classes = int(classes.max()) + 1
            counts = torch.bincount(classes, minlength=self.num_classes)
            if classes.shape != (M,) or int(counts.min()) != int(counts.max()):
                raise ValueError("classes: expected every class to have the same number of components")
            comp = torch.argsort(classes, stable=True).reshape(self.num_classes, -1)
            w = weights[comp]
            logw = (w / w.sum(1, keepdim=True)).log()
        self.register_buffer("comp", comp)  # [num_classes or 1, m] component indices per class
        self.register_buffer("log_weights", logw)  # [num_classes or 1, m] within-class log weights

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.means.shape[1:])

    # ---- helpers ----
    def _candidates(self, labels: Tensor | None, B: int) -> tuple[Tensor, Tensor]:
        if self.num_classes is None:
            return self.comp.expand(B, -1), self.log_weights.expand(B, -1)
        if labels is None:
            raise ValueError(f"labels: this mixture is class-conditional ({self.num_classes} classes); pass labels")
        return self.comp[labels], self.log_weights[labels]

    def _posterior(self, x: Tensor, g: Tensor, labels: Tensor | None):
        if g.shape != (x.shape[0], self.basis.num_subspaces):
            raise ValueError(f"g: expected [{x.shape[0]}, {self.basis.num_subspaces}], got {tuple(g.shape)}")
        B = x.shape[0]
        comp, logw = self._candidates(labels, B)  # [B, m]
        m = comp.shape[1]
        x64 = x.to(torch.float64)
        mu = self.means[comp]  # [B, m, C, H, W]
        lam = self.variances[comp]  # [B, m, J]
        tot = lam + g.to(torch.float64)[:, None, self.parent]  # [B, m, J]
        r = (x64[:, None] - mu).flatten(0, 1)
        ids = self.fine.group_ids(labels.repeat_interleave(m)) if labels is not None else None
        q = self.fine.sqnorms(r, ids=ids).reshape(B, m, -1)
        logp = logw - 0.5 * (q / tot).sum(-1) - 0.5 * (self.dims * tot.log()).sum(-1)
        return comp, mu, lam, tot, r, ids, logp

    # ---- the model interface shared with AnisoPrecond ----
    def denoise(self, x: Tensor, g: Tensor, labels: Tensor | None = None) -> Tensor:
        """Exact posterior mean E[x0 | x_t = x] under per-sample variances g [B, K]."""
        comp, mu, lam, tot, r, ids, logp = self._posterior(x, g, labels)
        B, m = comp.shape
        post = self.fine.combine(r, (lam / tot).flatten(0, 1), base=mu.flatten(0, 1), ids=ids)
        w = torch.softmax(logp, dim=1)
        D = (w[:, :, None, None, None] * post.reshape(B, m, *x.shape[1:])).sum(1)
        return D.to(x.dtype)

    def flow(self, x: Tensor, g: Tensor, labels: Tensor | None = None) -> Tensor:
        """Exact flow F* = M^{-1/2}(D* - x) = M^{1/2} grad log p_M(x) (METHOD §3.3)."""
        D = self.denoise(x.to(torch.float64), g, labels)
        ids = self.basis.group_ids(labels)
        F = self.basis.scale(D - x.to(torch.float64), g.to(torch.float64).rsqrt(), ids=ids)
        return F.to(x.dtype)

    def log_prob(self, x: Tensor, g: Tensor, labels: Tensor | None = None) -> Tensor:
        """log p_M(x | label) of the noised distribution, [B]."""
        *_, logp = self._posterior(x, g, labels)
        n = float(self.dims.sum())
        return torch.logsumexp(logp, dim=1) - 0.5 * n * math.log(2 * math.pi)

    # ---- exact samples ----
    def sample(self, n: int | None = None, labels: Tensor | None = None,
               generator: torch.Generator | None = None) -> tuple[Tensor, Tensor | None]:
        """Exact samples x0 [n, C, H, W] (float64) and their labels (drawn uniformly when not given)."""
        if labels is None:
            if n is None:
                raise ValueError("n: pass the number of samples or labels")
            if self.num_classes is not None:
                labels = torch.randint(0, self.num_classes, (n,), generator=generator)
        elif self.num_classes is None:
            raise ValueError("labels: this mixture is unconditional")
        B = labels.shape[0] if labels is not None else n
        comp, logw = self._candidates(labels, B)
        pick = torch.multinomial(logw.exp(), 1, generator=generator)[:, 0]
        m = comp[torch.arange(B), pick]
        eps = torch.randn((B, *self.means.shape[1:]), generator=generator, dtype=torch.float64)
        ids = self.fine.group_ids(labels) if labels is not None else None
        x0 = self.fine.combine(eps, self.variances[m].sqrt(), base=self.means[m], ids=ids)
        return x0, labels

    # ---- constructors ----
    @classmethod
    def toy(cls, channels: int = 1, height: int = 8, width: int = 8, bands: Sequence[int] = (3,),
            num_components: int = 3, num_classes: int | None = None, seed: int = 0) -> "GaussianMixture":
        """A small random mixture in a DCT basis: fine subspaces are the DCT "L-shells" max(u, v) = s, the
        diffusion subspaces are the bands `bands`. Variances fall with frequency, like images."""
        gen = torch.Generator().manual_seed(seed)
        size = max(height, width)
        fine = DCTBasis(height, width, bands=list(range(1, size)))
        edges = torch.tensor(list(bands))
        parent = torch.bucketize(torch.arange(size), edges, right=True).tolist()
        M = num_components * (num_classes or 1)
        shells = torch.arange(size, dtype=torch.float64)
        base_var = 0.3 * (1 + shells) ** -1.5
        variances = base_var * torch.exp(0.5 * torch.randn(M, size, generator=gen, dtype=torch.float64))
        means = 0.5 * torch.randn(M, channels, height, width, generator=gen, dtype=torch.float64)
        means = fine.scale(means, (1 + shells).pow(-1.0).expand(M, -1).contiguous())  # smooth means
        classes = None if num_classes is None else torch.arange(M) // num_components
        weights = torch.rand(M, generator=gen, dtype=torch.float64) + 0.5
        return cls(fine, parent, means, variances, weights / weights.sum(), classes)

    @classmethod
    def fit_pca(cls, images: Tensor, labels: Tensor | None, *, rank: int, split: int,
                per_class: bool = True, floor: float = 1e-4) -> "GaussianMixture":
        """One Gaussian per class (or one overall) with a PCA covariance, fitted to images [N, 1, H, W].

        The fine basis has one subspace per principal direction (plus the complement, whose variance is the
        mean residual variance); the diffusion basis is the top-`split` directions and their complement.
        """
        N, C, H, W = images.shape
        if C != 1:
            raise ValueError(f"images: fit_pca supports single-channel images, got {C} channels")
        if not 1 <= split < rank:
            raise ValueError(f"split: expected 1 <= split < rank = {rank}, got {split}")
        x = images.to(torch.float64)
        if images.dtype == torch.uint8:
            x = x / 127.5 - 1
        X = x.reshape(N, H * W)
        groups = [torch.arange(N)] if not per_class else [torch.nonzero(labels == y)[:, 0]
                                                           for y in range(int(labels.max()) + 1)]
        Vs, means, variances = [], [], []
        for idx in groups:
            Xi = X[idx]
            mu = Xi.mean(0)
            _, S, Vh = torch.linalg.svd(Xi - mu, full_matrices=False)
            var = S ** 2 / (len(idx) - 1)
            resid = (var[rank:].sum() / (H * W - rank)).clamp_min(floor)
            Vs.append(Vh[:rank])
            means.append(mu.reshape(1, H, W))
            variances.append(torch.cat([var[:rank].clamp_min(floor), resid[None]]))
        G = len(groups)
        fine = PCABasis(torch.stack(Vs), (1, H, W), [1] * rank, torch.arange(G) if per_class else None)
        parent = [0] * split + [1] * (rank - split + 1)
        return cls(fine, parent, torch.stack(means), torch.stack(variances),
                   classes=torch.arange(G) if per_class else None)
