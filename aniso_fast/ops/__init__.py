"""The subspace ops (docs/DESIGN.md, "The subspace op contract"): `combine`, `dot` and `block_combine` for the
separable (DCT), low-rank (PCA) and isotropic bases. Every other module calls these plain functions; `dispatch`
(which backend runs where) is the only module that touches compiled code, `registration` holds the custom ops and
their autograd, `validation` the argument checks, `reference` the float64 plain-PyTorch yardstick.
"""
from __future__ import annotations

from torch import Tensor

from .dispatch import BACKENDS, ENV_VAR, backends, resolve
from .registration import EAGER
from .validation import NAMES, prepare_block, prepare_combine, prepare_dot, prepare_lowrank, prepare_separable

__all__ = ["BACKENDS", "ENV_VAR", "backends", "separable_combine", "separable_dot", "lowrank_combine", "lowrank_dot",
           "isotropic_combine", "isotropic_dot", "separable_block_combine", "lowrank_block_combine",
           "isotropic_block_combine"]

def separable_combine(u: Tensor, a: Tensor, v: Tensor | None = None, c: Tensor | None = None,
                      base: Tensor | None = None, *, CH: Tensor, CW: Tensor, band: Tensor,
                      backend: str | None = None, names: dict[str, str] | None = None) -> Tensor:
    """`base + sum_k P_k (a[:, k] u + c[:, k] v)` for the separable basis (CH, CW, band); returns u.dtype."""
    u, a, v, c, base, dt = prepare_combine(u, a, v, c, base, names)
    CH, CW, band = prepare_separable(u, CH, CW, band, a.shape[1], dt)
    return EAGER["separable_combine"](u, a, v, c, base, CH, CW, band, resolve(backend, u.device))


def separable_dot(u: Tensor, v: Tensor, *, CH: Tensor, CW: Tensor, band: Tensor, K: int,
                  backend: str | None = None, names: dict[str, str] | None = None) -> Tensor:
    """`[B, K]`: `<P_k u_b, v_b>` for the separable basis; fp32 (fp64 for fp64 inputs)."""
    u, v, K, dt = prepare_dot(u, v, K, names)
    CH, CW, band = prepare_separable(u, CH, CW, band, K, dt)
    return EAGER["separable_dot"](u, v, CH, CW, band, K, resolve(backend, u.device))


def lowrank_combine(u: Tensor, a: Tensor, v: Tensor | None = None, c: Tensor | None = None,
                    base: Tensor | None = None, *, V: Tensor, vband: Tensor, ids: Tensor | None = None,
                    backend: str | None = None, names: dict[str, str] | None = None) -> Tensor:
    """`base + sum_k P_k (a[:, k] u + c[:, k] v)` for the low-rank basis V[ids] (one call for all groups)."""
    u, a, v, c, base, dt = prepare_combine(u, a, v, c, base, names)
    V, vband, ids = prepare_lowrank(u, V, vband, ids, a.shape[1], dt)
    return EAGER["lowrank_combine"](u, a, v, c, base, V, vband, ids, resolve(backend, u.device))


def lowrank_dot(u: Tensor, v: Tensor, *, V: Tensor, vband: Tensor, K: int, ids: Tensor | None = None,
                backend: str | None = None, names: dict[str, str] | None = None) -> Tensor:
    """`[B, K]`: `<P_k u_b, v_b>` for the low-rank basis V[ids]; fp32 (fp64 for fp64 inputs)."""
    u, v, K, dt = prepare_dot(u, v, K, names)
    V, vband, ids = prepare_lowrank(u, V, vband, ids, K, dt)
    return EAGER["lowrank_dot"](u, v, V, vband, ids, K, resolve(backend, u.device))


def isotropic_combine(u: Tensor, a: Tensor, v: Tensor | None = None, c: Tensor | None = None,
                      base: Tensor | None = None, *, names: dict[str, str] | None = None) -> Tensor:
    """K = 1 (P_0 = I): `base + a u + c v`, elementwise in the compute dtype (no kernel needed); returns u.dtype."""
    u, a, v, c, base, dt = prepare_combine(u, a, v, c, base, names)
    if a.shape[1] != 1:
        raise ValueError(f"{(names or NAMES).get('a', 'a')}: expected one subspace ([B, 1]), got {tuple(a.shape)}")
    out = a[:, :, None, None] * u.to(dt)
    if v is not None:
        out = out + c[:, :, None, None] * v.to(dt)
    if base is not None:
        out = out + base.to(dt)
    return out.to(u.dtype)


def isotropic_dot(u: Tensor, v: Tensor, *, names: dict[str, str] | None = None) -> Tensor:
    """`[B, 1]`: `<u_b, v_b>` in the compute dtype."""
    u, v, _, dt = prepare_dot(u, v, 1, names)
    return (u.to(dt) * v.to(dt)).flatten(1).sum(1, keepdim=True)


def separable_block_combine(x: Tensor, v: Tensor, B: Tensor, base_x: Tensor | None = None,
                            base_v: Tensor | None = None, *, CH: Tensor, CW: Tensor, band: Tensor,
                            backend: str | None = None) -> tuple[Tensor, Tensor]:
    """`(x', v')`: `x' = base_x + sum_k P_k (B[:, k, 0, 0] x + B[:, k, 0, 1] v)`, `v'` likewise with row 1 of B
    [B, K, 2, 2], for the separable basis (CH, CW, band); both in x.dtype."""
    x, v, B, base_x, base_v, dt = prepare_block(x, v, B, base_x, base_v)
    CH, CW, band = prepare_separable(x, CH, CW, band, B.shape[1], dt)
    return EAGER["separable_block_combine"](x, v, B, base_x, base_v, CH, CW, band, resolve(backend, x.device))


def lowrank_block_combine(x: Tensor, v: Tensor, B: Tensor, base_x: Tensor | None = None,
                          base_v: Tensor | None = None, *, V: Tensor, vband: Tensor, ids: Tensor | None = None,
                          backend: str | None = None) -> tuple[Tensor, Tensor]:
    """`(x', v')` of `separable_block_combine` for the low-rank basis V[ids] (one call for all groups)."""
    x, v, B, base_x, base_v, dt = prepare_block(x, v, B, base_x, base_v)
    V, vband, ids = prepare_lowrank(x, V, vband, ids, B.shape[1], dt)
    return EAGER["lowrank_block_combine"](x, v, B, base_x, base_v, V, vband, ids, resolve(backend, x.device))


def isotropic_block_combine(x: Tensor, v: Tensor, B: Tensor, base_x: Tensor | None = None,
                            base_v: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """K = 1 (P_0 = I): `x' = base_x + B00 x + B01 v`, `v' = base_v + B10 x + B11 v`, elementwise in the compute
    dtype; both in x.dtype."""
    x, v, B, base_x, base_v, dt = prepare_block(x, v, B, base_x, base_v)
    if B.shape[1] != 1:
        raise ValueError(f"B: expected one subspace ([B, 1, 2, 2]), got {tuple(B.shape)}")
    xc, vc, m = x.to(dt), v.to(dt), B[:, 0, :, :, None, None, None]
    outs = []
    for i, base in enumerate((base_x, base_v)):
        out = m[:, i, 0] * xc + m[:, i, 1] * vc
        outs.append((out if base is None else out + base.to(dt)).to(x.dtype))
    return tuple(outs)
