"""Plain-PyTorch reference of the subspace ops: the yardstick for every fused backend.

The contract (docs/DESIGN.md): a basis is a set of orthonormal coefficient functionals, each labelled with a
subspace id in [0, K); P_k (k < K-1) projects onto the functionals labelled k and the last subspace K-1 is the
orthogonal complement of all of them. Two families:

- separable (DCT): coefficients Y = CH @ X @ CW.T per channel, CH [h, H], CW [w, W], band [h, w];
- low-rank (PCA): coefficients z = V[id] @ x, V [G, r, d] with d = H*W (per channel) or C*H*W, vband [r].

`combine(u, a, v, c, base) = base + sum_k P_k (a_k u + c_k v)`, `dot(u, v)[b, k] = <P_k u, v>` and
`block_combine(x, v, B, base_x, base_v) = (x', v')`, one 2x2 block B[b, k] per sample and subspace acting on (x, v).
Everything here is differentiable by autograd and exact in float64; the fused backends are tested against it.

The module also holds the authors' formulation (einsum onto the k basis images, a Python loop over labels,
METHOD §1.2, §7.4), which is only a benchmark baseline.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "compute_dtype",
    "separable_combine",
    "separable_dot",
    "lowrank_combine",
    "lowrank_dot",
    "separable_block_combine",
    "lowrank_block_combine",
    "authors_scale",
    "authors_scale_labelwise",
]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64; everything else is computed in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _relative_weights(s: Tensor, label: Tensor) -> Tensor:
    """Per-coefficient weight s[b, label] - s[b, K-1]: the complement's scalar is applied to the whole image."""
    rel = s[:, :-1] - s[:, -1:]
    rel = torch.cat([rel, torch.zeros_like(s[:, :1])], dim=1)  # label K-1 -> weight 0
    return rel[:, label]  # [B, *label.shape]


def _bcast(s: Tensor) -> Tensor:
    return s[:, None, None, None]


def _combine(u, a, v, c, base, analysis, synthesis, label):
    dt = compute_dtype(u.dtype)
    a = a.to(dt)
    uc = u.to(dt)
    out = _bcast(a[:, -1]) * uc
    coeff = _relative_weights(a, label).unsqueeze(1) * analysis(uc)
    if v is not None:
        c = c.to(dt)
        vc = v.to(dt)
        out = out + _bcast(c[:, -1]) * vc
        coeff = coeff + _relative_weights(c, label).unsqueeze(1) * analysis(vc)
    out = out + synthesis(coeff)
    if base is not None:
        out = out + base.to(dt)
    return out.to(u.dtype)


def _dot(u, v, K, analysis, label):
    dt = compute_dtype(u.dtype)
    uc, vc = u.to(dt), v.to(dt)
    prod = analysis(uc) * analysis(vc)  # [B, C, ...coefficient dims]
    prod = prod.sum(dim=1).flatten(1)  # [B, n_coeff]
    onehot = torch.nn.functional.one_hot(label.flatten(), K).to(dt)  # [n_coeff, K]
    per_band = prod @ onehot  # [B, K]
    total = (uc * vc).flatten(1).sum(1)
    last = total - per_band[:, :-1].sum(1)
    return torch.cat([per_band[:, :-1], last[:, None]], dim=1)


def _separable_maps(CH: Tensor, CW: Tensor, dt: torch.dtype):
    """(analysis X -> CH X CW^T, synthesis Y -> CH^T Y CW), per channel image, in the compute dtype."""
    CH_, CW_ = CH.to(dt), CW.to(dt)
    return (lambda x: CH_ @ x @ CW_.T), (lambda y: CH_.T @ y @ CW_)


def separable_combine(u: Tensor, a: Tensor, v: Tensor | None = None, c: Tensor | None = None,
                      base: Tensor | None = None, *, CH: Tensor, CW: Tensor, band: Tensor) -> Tensor:
    analysis, synthesis = _separable_maps(CH, CW, compute_dtype(u.dtype))
    return _combine(u, a, v, c, base, analysis, synthesis, band)


def separable_dot(u: Tensor, v: Tensor, *, CH: Tensor, CW: Tensor, band: Tensor, K: int) -> Tensor:
    analysis, _ = _separable_maps(CH, CW, compute_dtype(u.dtype))
    return _dot(u, v, K, analysis, band)


def _lowrank_maps(shape, V: Tensor, ids: Tensor | None, dt: torch.dtype):
    B, C, H, W = shape
    d = V.shape[-1]
    rows = C if d == H * W else 1  # spatial basis: one row per channel; joint basis: the whole image
    Vb = (V[ids] if ids is not None else V[:1].expand(B, -1, -1)).to(dt)  # [B, r, d]

    def analysis(x):
        return torch.einsum("bcd,brd->bcr", x.reshape(B, rows, d), Vb)

    def synthesis(z):
        return torch.einsum("bcr,brd->bcd", z, Vb).reshape(shape)

    return analysis, synthesis


def lowrank_combine(u: Tensor, a: Tensor, v: Tensor | None = None, c: Tensor | None = None,
                    base: Tensor | None = None, *, V: Tensor, vband: Tensor, ids: Tensor | None = None) -> Tensor:
    analysis, synthesis = _lowrank_maps(u.shape, V, ids, compute_dtype(u.dtype))
    return _combine(u, a, v, c, base, analysis, synthesis, vband)


def lowrank_dot(u: Tensor, v: Tensor, *, V: Tensor, vband: Tensor, K: int, ids: Tensor | None = None) -> Tensor:
    analysis, _ = _lowrank_maps(u.shape, V, ids, compute_dtype(u.dtype))
    return _dot(u, v, K, analysis, vband)


def _block_combine(x, v, B, base_x, base_v, analysis, synthesis, label):
    """Output i of `[x'; v'] = base + sum_k P_k (B_k [x; v])`, both from one analysis of x and of v."""
    dt = compute_dtype(x.dtype)
    B = B.to(dt)
    xc, vc = x.to(dt), v.to(dt)
    yx, yv = analysis(xc), analysis(vc)
    outs = []
    for i, base in enumerate((base_x, base_v)):
        out = _bcast(B[:, -1, i, 0]) * xc + _bcast(B[:, -1, i, 1]) * vc
        coeff = (_relative_weights(B[:, :, i, 0], label).unsqueeze(1) * yx
                 + _relative_weights(B[:, :, i, 1], label).unsqueeze(1) * yv)
        out = out + synthesis(coeff)
        if base is not None:
            out = out + base.to(dt)
        outs.append(out.to(x.dtype))
    return tuple(outs)


def separable_block_combine(x: Tensor, v: Tensor, B: Tensor, base_x: Tensor | None = None,
                            base_v: Tensor | None = None, *, CH: Tensor, CW: Tensor,
                            band: Tensor) -> tuple[Tensor, Tensor]:
    analysis, synthesis = _separable_maps(CH, CW, compute_dtype(x.dtype))
    return _block_combine(x, v, B, base_x, base_v, analysis, synthesis, band)


def lowrank_block_combine(x: Tensor, v: Tensor, B: Tensor, base_x: Tensor | None = None,
                          base_v: Tensor | None = None, *, V: Tensor, vband: Tensor,
                          ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
    analysis, synthesis = _lowrank_maps(x.shape, V, ids, compute_dtype(x.dtype))
    return _block_combine(x, v, B, base_x, base_v, analysis, synthesis, vband)


# ---- the authors' formulation (benchmark baseline only; METHOD §1.2 mat_mul, §7.4 mat_mul_labelwise) ----

def authors_scale(x: Tensor, a: Tensor, b: Tensor, V: Tensor) -> Tensor:
    """`a P x + b (x - P x)` with P the per-channel projector onto the spatial basis images V [k, H, W]."""
    coeff = torch.einsum("bchw,khw->bck", x, V)
    px = torch.einsum("bck,khw->bchw", coeff, V)
    return _bcast(a) * px + _bcast(b) * (x - px)


def authors_scale_labelwise(x: Tensor, a: Tensor, b: Tensor, V_by_id: Tensor, ids: Tensor) -> Tensor:
    """The same with a basis per sample id: group the batch by id and loop over the ids present."""
    out = torch.empty_like(x)
    for i in torch.unique(ids).tolist():
        m = ids == i
        out[m] = authors_scale(x[m], a[m], b[m], V_by_id[i])
    return out
