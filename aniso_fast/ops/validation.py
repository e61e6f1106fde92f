"""Argument checks and preparation of the subspace ops: each public op validates its arguments once (ValueError or
TypeError naming the argument) and prepares them for the backends (preconditions in csrc/subspace.h): u, v, base
made contiguous (a copy for non-contiguous views), scalars and basis tensors cast to the compute dtype (fp32, fp64
for fp64 inputs), labels and ids to int64."""
from __future__ import annotations

import weakref

import torch
from torch import Tensor

from . import reference
from ..utils.checks import check_index

__all__ = ["NAMES", "prepare_block", "prepare_combine", "prepare_dot", "prepare_lowrank", "prepare_separable"]

def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _check_tensor(name: str, t, expected: str):
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected {expected}, got {type(t).__name__}")


def _check_image(u, name: str = "u") -> None:
    _check_tensor(name, u, "a [B, C, H, W] floating tensor")
    if u.dim() != 4:
        raise ValueError(f"{name}: expected a 4-D [B, C, H, W] tensor, got shape {tuple(u.shape)}")
    if not u.is_floating_point():
        raise TypeError(f"{name}: expected a floating dtype (fp16, bf16, fp32, fp64), got {u.dtype}")


def _check_like(name: str, t, u: Tensor, u_name: str = "u") -> Tensor:
    """v / base: u's shape, dtype and device; made contiguous (a copy for a non-contiguous view)."""
    _check_tensor(name, t, f"a tensor like {u_name}")
    if t.shape != u.shape:
        raise ValueError(f"{name}: expected {u_name}'s shape {tuple(u.shape)}, got {tuple(t.shape)}")
    if t.dtype != u.dtype:
        raise TypeError(f"{name}: expected {u_name}'s dtype {u.dtype}, got {t.dtype}")
    if t.device != u.device:
        raise ValueError(f"{name}: expected {u_name}'s device {u.device}, got {t.device}")
    return t.contiguous()


def _check_floats(name: str, t, u: Tensor, dt: torch.dtype, expected: str, shape_ok, u_name: str = "u") -> Tensor:
    """A floating tensor on u's device whose shape passes `shape_ok`, cast to the compute dtype."""
    _check_tensor(name, t, expected)
    if not shape_ok(t.shape):
        raise ValueError(f"{name}: expected {expected}, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating dtype, got {t.dtype}")
    if t.device != u.device:
        raise ValueError(f"{name}: expected {u_name}'s device {u.device}, got {t.device}")
    return t.to(dt).contiguous()


def _check_scalars(name: str, s, u: Tensor, dt: torch.dtype, u_name: str = "u") -> Tensor:
    B = u.shape[0]
    return _check_floats(name, s, u, dt, f"a [B={B}, K>=1] floating tensor",
                         lambda shape: len(shape) == 2 and shape[0] == B and shape[1] >= 1, u_name)


def _check_basis(name: str, t, u: Tensor, dt: torch.dtype, dims: int, expected: str) -> Tensor:
    return _check_floats(name, t, u, dt, expected, lambda shape: len(shape) == dims)


_label_ranges: dict[int, tuple] = {}  # id(tensor) -> (weakref, version, min, max): labels are checked once


def _label_range(t: Tensor) -> tuple[int, int]:
    hit = _label_ranges.get(id(t))
    if hit is not None and hit[0]() is t and hit[1] == t._version:
        return hit[2], hit[3]
    flat = t.detach().reshape(-1).cpu()  # tiny (one label per coefficient functional)
    lo, hi = int(flat.min()), int(flat.max())
    if len(_label_ranges) > 256:
        _label_ranges.clear()
    _label_ranges[id(t)] = (weakref.ref(t), t._version, lo, hi)
    return lo, hi


def _check_labels(name: str, t, shape: tuple, K: int, u: Tensor) -> Tensor:
    _check_tensor(name, t, f"an integer tensor of shape {list(shape)}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {list(shape)}, got {tuple(t.shape)}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name}: expected an integer dtype, got {t.dtype}")
    if t.device != u.device:
        raise ValueError(f"{name}: expected u's device {u.device}, got {t.device}")
    if t.numel() > 0:
        if _compiling():
            torch._assert_async(((t >= 0) & (t < K)).all(), f"{name}: labels must lie in [0, K={K})")
        else:
            lo, hi = _label_range(t)
            if lo < 0 or hi >= K:
                raise ValueError(f"{name}: expected labels in [0, K={K}), got values in [{lo}, {hi}]")
    return t.to(torch.int64).contiguous()


def _check_ids(ids, u: Tensor, G: int) -> Tensor | None:
    if ids is None:
        if G != 1:
            raise ValueError(f"ids: required when V holds G={G} groups (got None)")
        return None
    _check_tensor("ids", ids, f"an integer tensor of shape [B={u.shape[0]}]")
    if ids.dim() != 1 or ids.shape[0] != u.shape[0]:
        raise ValueError(f"ids: expected shape [B={u.shape[0]}], got {tuple(ids.shape)}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"ids: expected an integer dtype, got {ids.dtype}")
    if ids.device != u.device:
        raise ValueError(f"ids: expected u's device {u.device}, got {ids.device}")
    return check_index("ids", ids, G, "group ids").contiguous()


def _check_K(K) -> int:
    if isinstance(K, bool) or not isinstance(K, int):
        raise TypeError(f"K: expected an int, got {type(K).__name__}")
    if K < 1:
        raise ValueError(f"K: expected K >= 1, got {K}")
    return K


NAMES = {"u": "u", "a": "a", "v": "v", "c": "c", "base": "base"}


def prepare_combine(u, a, v, c, base, names=None):
    """Checks and prepares combine's arguments; `names` maps u/a/v/c/base to the caller's own argument names
    (a basis's `scale(x, s)` reports `x` and `s`), so that errors name what the user passed."""
    n = {**NAMES, **(names or {})}
    _check_image(u, n["u"])
    if (v is None) != (c is None):
        raise ValueError(f"{n['v']}, {n['c']}: {n['v']} and {n['c']} come together (both or neither), got {n['v']}="
                         f"{'None' if v is None else 'a tensor'} and {n['c']}={'None' if c is None else 'a tensor'}")
    dt = reference.compute_dtype(u.dtype)
    a = _check_scalars(n["a"], a, u, dt, n["u"])
    if v is not None:
        v = _check_like(n["v"], v, u, n["u"])
        c = _check_scalars(n["c"], c, u, dt, n["u"])
        if c.shape != a.shape:
            raise ValueError(f"{n['c']}: expected {n['a']}'s shape {tuple(a.shape)}, got {tuple(c.shape)}")
    if base is not None:
        base = _check_like(n["base"], base, u, n["u"])
    return u.contiguous(), a, v, c, base, dt


def prepare_separable(u, CH, CW, band, K, dt):
    H, W = u.shape[2], u.shape[3]
    CH = _check_basis("CH", CH, u, dt, 2, f"a [h<={H}, H={H}] tensor")
    CW = _check_basis("CW", CW, u, dt, 2, f"a [w<={W}, W={W}] tensor")
    if CH.shape[1] != H or not 1 <= CH.shape[0] <= H:
        raise ValueError(f"CH: expected shape [h<={H}, H={H}], got {tuple(CH.shape)}")
    if CW.shape[1] != W or not 1 <= CW.shape[0] <= W:
        raise ValueError(f"CW: expected shape [w<={W}, W={W}], got {tuple(CW.shape)}")
    band = _check_labels("band", band, (CH.shape[0], CW.shape[0]), K, u)
    return CH, CW, band


def prepare_lowrank(u, V, vband, ids, K, dt):
    C, H, W = u.shape[1:]
    V = _check_basis("V", V, u, dt, 3, f"a [G, r, d] tensor with d = H*W = {H * W} or C*H*W = {C * H * W}")
    if V.shape[2] not in (H * W, C * H * W) or V.shape[0] < 1 or V.shape[1] < 1:
        raise ValueError(f"V: expected shape [G>=1, r>=1, d] with d = H*W = {H * W} or C*H*W = {C * H * W}, "
                         f"got {tuple(V.shape)}")
    vband = _check_labels("vband", vband, (V.shape[1],), K, u)
    ids = _check_ids(ids, u, V.shape[0])
    return V, vband, ids


def prepare_block(x, v, B, base_x, base_v):
    """Checks and prepares block_combine's arguments: v, base_x, base_v like x; B [B, K>=1, 2, 2] in the compute
    dtype."""
    _check_image(x, "x")
    v = _check_like("v", v, x, "x")
    dt = reference.compute_dtype(x.dtype)
    n = x.shape[0]
    B = _check_floats("B", B, x, dt, f"a [B={n}, K>=1, 2, 2] floating tensor",
                      lambda shape: len(shape) == 4 and shape[0] == n and shape[1] >= 1 and tuple(shape[2:]) == (2, 2),
                      "x")
    base_x = None if base_x is None else _check_like("base_x", base_x, x, "x")
    base_v = None if base_v is None else _check_like("base_v", base_v, x, "x")
    return x.contiguous(), v, B, base_x, base_v, dt


def prepare_dot(u, v, K, names=None):
    n = {**NAMES, **(names or {})}
    _check_image(u, n["u"])
    v = _check_like(n["v"], v, u, n["u"])
    return u.contiguous(), v, _check_K(K), reference.compute_dtype(u.dtype)
