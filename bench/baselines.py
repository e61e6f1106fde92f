"""Benchmark baselines, composed only from `aniso_fast.ops.reference` (the one place the formulations live).

(a) The authors' formulation: `reference.authors_scale` / `authors_scale_labelwise` (an einsum onto the k
    spatial basis images per channel; a Python loop over the labels present for class-conditional bases). The
    authors' code has one projector and its complement (K = 2) and builds every other subspace op from that
    scale, so the Heun update and the per-subspace dot below are written the way their code writes them.
(b) Plain-PyTorch compositions: the `reference` backend itself, and `grouped_lowrank_*`, the reference applied
    per group of a class-conditional basis. The reference gathers V[ids] into a [B, r, d] tensor (a full copy of
    the basis per sample); grouping the batch by id avoids that copy, which makes it the faster plain-PyTorch
    composition for class-conditional PCA at the larger sizes.
"""
from __future__ import annotations

import torch
from torch import Tensor

from aniso_fast.ops import reference
from aniso_fast.geometry.bases import DCTBasis, PCABasis, SubspaceBasis

__all__ = ["authors_basis_images", "authors_combine", "authors_dot", "authors_heun_step",
           "grouped_lowrank_combine", "grouped_lowrank_dot"]


def authors_basis_images(basis: SubspaceBasis) -> Tensor | None:
    """The spatial basis images the authors' formulation projects onto: [k, H, W], or [G, k, H, W] per group.

    None when the authors' formulation does not cover the basis (K != 2, or a joint PCA basis over channels).
    """
    if basis.num_subspaces != 2:
        return None
    if isinstance(basis, DCTBasis):
        images = torch.einsum("ih,jw->ijhw", basis.CH32, basis.CW32)  # outer products of DCT rows
        return images[basis.band == 0].contiguous()
    if isinstance(basis, PCABasis) and not basis.joint:
        G, r, _ = basis.V32.shape
        V = basis.V32.reshape(G, r, *basis.image_size)
        return V[0] if G == 1 else V
    return None


def _authors_scale(x: Tensor, a: Tensor, b: Tensor, V: Tensor, ids: Tensor | None) -> Tensor:
    if ids is None:
        return reference.authors_scale(x, a, b, V)
    return reference.authors_scale_labelwise(x, a, b, V, ids)


def authors_combine(u: Tensor, a: Tensor, v: Tensor | None = None, c: Tensor | None = None,
                    base: Tensor | None = None, *, V: Tensor, ids: Tensor | None = None) -> Tensor:
    """`base + P(a_0 u + c_0 v) + P_perp(a_1 u + c_1 v)` as the authors write it: one scale per input, then adds.

    a, c: [B, 2] in u's dtype (cast once, outside the timed region, as the authors' code holds them).
    """
    out = _authors_scale(u, a[:, 0], a[:, 1], V, ids)
    if v is not None:
        out = out + _authors_scale(v, c[:, 0], c[:, 1], V, ids)
    if base is not None:
        out = out + base
    return out


def authors_dot(u: Tensor, v: Tensor, *, V: Tensor, ids: Tensor | None = None) -> Tensor:
    """[B, 2]: `<P u, v>` from the projection `P u` (a scale with (1, 0)), and the complement as the rest."""
    B = u.shape[0]
    one, zero = u.new_ones(B), u.new_zeros(B)
    pu = _authors_scale(u, one, zero, V, ids)
    first = (pu * v).flatten(1).sum(1)
    total = (u * v).flatten(1).sum(1)
    return torch.stack([first, total - first], dim=1)


def authors_heun_step(x: Tensor, F_a: Tensor, F_s: Tensor, g_a: Tensor, g_s: Tensor, g_b: Tensor, *, V: Tensor,
                      ids: Tensor | None = None) -> Tensor:
    """One matrix Heun step (METHOD §6.2) with the authors' scale; the flows are given (no network).

    g_*: [B, 2] float64 variances; the same algebra as `aniso_fast.sampling.ode.heun`, scalars cast to x.dtype.
    """
    S_a, S_s, S_b = g_a.sqrt(), g_s.sqrt(), g_b.sqrt()
    dS, R = S_b - S_a, (S_b - S_a) / (S_s - S_a)
    x_s = authors_combine(F_a, (-(S_s - S_a)).to(x.dtype), base=x, V=V, ids=ids)  # Euler predictor to s
    # x_s would feed the network here; the stand-in flow returns F_s whatever its input
    del x_s
    return authors_combine(F_a, (-dS * (1 - R / 2)).to(x.dtype), F_s, (-dS * R / 2).to(x.dtype), base=x, V=V,
                           ids=ids)


def _groups(ids: Tensor) -> list[tuple[int, Tensor]]:
    return [(int(g), (ids == g).nonzero().squeeze(1)) for g in torch.unique(ids).tolist()]


def grouped_lowrank_combine(u: Tensor, a: Tensor, v: Tensor | None = None, c: Tensor | None = None,
                            base: Tensor | None = None, *, V: Tensor, vband: Tensor, ids: Tensor) -> Tensor:
    """`reference.lowrank_combine` per group of samples sharing a basis (no [B, r, d] gather of V[ids])."""
    out = torch.empty_like(u)
    for g, idx in _groups(ids):
        def sel(t, idx=idx):
            return None if t is None else t.index_select(0, idx)
        out.index_copy_(0, idx, reference.lowrank_combine(sel(u), sel(a), sel(v), sel(c), sel(base),
                                                          V=V[g:g + 1], vband=vband))
    return out


def grouped_lowrank_dot(u: Tensor, v: Tensor, *, V: Tensor, vband: Tensor, K: int, ids: Tensor) -> Tensor:
    """`reference.lowrank_dot` per group of samples sharing a basis."""
    out = u.new_empty((u.shape[0], K), dtype=reference.compute_dtype(u.dtype))
    for g, idx in _groups(ids):
        out.index_copy_(0, idx, reference.lowrank_dot(u.index_select(0, idx), v.index_select(0, idx),
                                                      V=V[g:g + 1], vband=vband, K=K))
    return out
