"""Triton kernels of the subspace ops (docs/DESIGN.md, "The subspace op contract"); forward only.

Same signatures and semantics as `aniso_fast.reference`; autograd is wired by `aniso_fast.ops`.
Inputs are computed in fp32 (fp64 for fp64 inputs): every load is upcast at once, every store casts back.

- separable (DCT): one program per channel image; the [H, W] tile, padded to powers of two >= 16 (tl.dot's
  minimum), goes through `CH @ X @ CW.T` (truncated [h, w] coefficients), the per-coefficient weights
  `s[b, band] - s[b, K-1]`, and back through `CH.T @ Y @ CW`; the complement's scalar multiplies the image.
  `dot`: one program per sample, channels summed in order. Every tl.dot is IEEE fp32 (no TF32: the reference is
  matched to fp32 rounding) or fp64 for fp64 inputs (fp64 MMA on sm80+, numpy under the interpreter).
- low-rank (PCA): coefficients per (sample, row) tiled over (r, d) with `V[ids[b]]` gathered in-kernel, then a
  synthesis pass tiled over d; `dot` reduces per sample in a fixed order (deterministic, no atomics).

With a CUDA device the launch configs are autotuned; without one (TRITON_INTERPRET=1 on CPU tensors, as in CI)
fixed configs are used, since `triton.autotune` needs a driver.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..ops.reference import compute_dtype

__all__ = ["separable_combine", "separable_dot", "lowrank_combine", "lowrank_dot", "MAX_SEPARABLE_SIDE"]

# The separable kernels hold a whole padded channel image in registers/shared memory.
MAX_SEPARABLE_SIDE = 128

# autotune benchmarks on a device: never under the interpreter, even on a machine that has one
_AUTOTUNE = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
# kernel name -> (jit function, configs, key), whether or not autotune is applied here (tests check the keys)
_TUNING = {}


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(int(n)))


def _tuned(configs, key, registry=_TUNING):
    """`triton.autotune` where a driver exists, otherwise the plain jit function; recorded in `registry`."""
    def wrap(fn):
        registry[fn.__name__] = (fn, configs, key)
        return triton.autotune(configs=configs, key=key)(fn) if _AUTOTUNE else fn
    return wrap


# ---------------------------------------------------------------- separable (DCT) family

@triton.jit
def _separable_coeffs(x, ch, cw):
    """Y = CH @ X @ CW.T for one padded [BH, BW] image tile; CH [Bh, BH], CW [Bw, BW]."""
    t = tl.dot(ch, x, input_precision="ieee")
    return tl.dot(t, tl.trans(cw), input_precision="ieee")


@triton.jit
def _load_basis(ch_ptr, cw_ptr, band_ptr, H, W, h, w, K,
                BH: tl.constexpr, BW: tl.constexpr, Bh: tl.constexpr, Bw: tl.constexpr):
    rH = tl.arange(0, BH)
    rW = tl.arange(0, BW)
    rh = tl.arange(0, Bh)
    rw = tl.arange(0, Bw)
    ch = tl.load(ch_ptr + rh[:, None] * H + rH[None, :], mask=(rh[:, None] < h) & (rH[None, :] < H), other=0.0)
    cw = tl.load(cw_ptr + rw[:, None] * W + rW[None, :], mask=(rw[:, None] < w) & (rW[None, :] < W), other=0.0)
    cmask = (rh[:, None] < h) & (rw[None, :] < w)
    band = tl.load(band_ptr + rh[:, None] * w + rw[None, :], mask=cmask, other=K - 1)
    return ch, cw, band, cmask


@triton.jit
def _relative_weight(s_ptr, b, label, mask, K):
    """s[b, label] - s[b, K-1] (zero for the complement's label and outside the mask)."""
    last = tl.load(s_ptr + b * K + K - 1)
    sel = tl.load(s_ptr + b * K + label, mask=mask, other=0.0)
    return tl.where(mask, sel - last, 0.0), last


@_tuned([triton.Config({}, num_warps=nw) for nw in (2, 4, 8)], key=["H", "W", "h", "w", "HAS_V", "HAS_BASE"])
@triton.jit
def _separable_combine_kernel(u_ptr, v_ptr, base_ptr, out_ptr, a_ptr, c_ptr, ch_ptr, cw_ptr, band_ptr,
                              C, H, W, h, w, K,
                              HAS_V: tl.constexpr, HAS_BASE: tl.constexpr,
                              BH: tl.constexpr, BW: tl.constexpr, Bh: tl.constexpr, Bw: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # one (b, c) channel image
    b = pid // C
    rH = tl.arange(0, BH)
    rW = tl.arange(0, BW)
    offs = pid * H * W + rH[:, None] * W + rW[None, :]
    xmask = (rH[:, None] < H) & (rW[None, :] < W)
    ch, cw, band, cmask = _load_basis(ch_ptr, cw_ptr, band_ptr, H, W, h, w, K, BH, BW, Bh, Bw)
    cdt = ch.dtype

    x = tl.load(u_ptr + offs, mask=xmask, other=0.0).to(cdt)
    wa, a_last = _relative_weight(a_ptr, b, band, cmask, K)
    coeff = wa * _separable_coeffs(x, ch, cw)
    out = a_last * x
    if HAS_V:
        y = tl.load(v_ptr + offs, mask=xmask, other=0.0).to(cdt)
        wc, c_last = _relative_weight(c_ptr, b, band, cmask, K)
        coeff += wc * _separable_coeffs(y, ch, cw)
        out += c_last * y
    # synthesis CH.T @ coeff @ CW
    t = tl.dot(tl.trans(ch), coeff, input_precision="ieee")
    out += tl.dot(t, cw, input_precision="ieee")
    if HAS_BASE:
        out += tl.load(base_ptr + offs, mask=xmask, other=0.0).to(cdt)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=xmask)


@_tuned([triton.Config({}, num_warps=nw) for nw in (2, 4, 8)], key=["C", "H", "W", "h", "w", "K"])
@triton.jit
def _separable_dot_kernel(u_ptr, v_ptr, out_ptr, ch_ptr, cw_ptr, band_ptr,
                          C, H, W, h, w, K,
                          BH: tl.constexpr, BW: tl.constexpr, Bh: tl.constexpr, Bw: tl.constexpr,
                          BK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)  # one sample; channels summed in order (deterministic)
    rH = tl.arange(0, BH)
    rW = tl.arange(0, BW)
    xmask = (rH[:, None] < H) & (rW[None, :] < W)
    ch, cw, band, cmask = _load_basis(ch_ptr, cw_ptr, band_ptr, H, W, h, w, K, BH, BW, Bh, Bw)
    cdt = ch.dtype
    kk = tl.arange(0, BK)
    onehot = tl.reshape(band, (Bh * Bw,))[:, None] == kk[None, :]
    per_band = tl.zeros([BK], dtype=cdt)
    total = tl.zeros([BH, BW], dtype=cdt)
    for c in range(C):
        offs = (b * C + c) * H * W + rH[:, None] * W + rW[None, :]
        x = tl.load(u_ptr + offs, mask=xmask, other=0.0).to(cdt)
        y = tl.load(v_ptr + offs, mask=xmask, other=0.0).to(cdt)
        prod = _separable_coeffs(x, ch, cw) * _separable_coeffs(y, ch, cw)
        per_band += tl.sum(tl.where(onehot, tl.reshape(prod, (Bh * Bw,))[:, None], 0.0), axis=0)
        total += x * y
    inner = tl.where(kk < K - 1, per_band, 0.0)
    last = tl.sum(tl.sum(total, axis=1), axis=0) - tl.sum(inner, axis=0)
    tl.store(out_ptr + b * K + kk, tl.where(kk == K - 1, last, inner), mask=kk < K)


def _separable_setup(u: Tensor, CH: Tensor, CW: Tensor, band: Tensor):
    dt = compute_dtype(u.dtype)
    B, C, H, W = u.shape
    h, w = band.shape
    if max(H, W) > MAX_SEPARABLE_SIDE:
        raise ValueError(f"u: the Triton separable kernels take images up to {MAX_SEPARABLE_SIDE} per side, "
                         f"got {H}x{W}")
    blocks = dict(BH=_pow2(H), BW=_pow2(W), Bh=_pow2(h), Bw=_pow2(w))
    return dt, (B, C, H, W, h, w), CH.to(dt).contiguous(), CW.to(dt).contiguous(), band.contiguous(), blocks


def separable_combine(u: Tensor, a: Tensor, v: Tensor | None = None, c: Tensor | None = None,
                      base: Tensor | None = None, *, CH: Tensor, CW: Tensor, band: Tensor) -> Tensor:
    dt, (B, C, H, W, h, w), CH, CW, band, blocks = _separable_setup(u, CH, CW, band)
    K = a.shape[1]
    u = u.contiguous()
    a = a.to(dt).contiguous()
    has_v, has_base = v is not None, base is not None
    v = v.contiguous() if has_v else u
    c = c.to(dt).contiguous() if has_v else a
    base = base.contiguous() if has_base else u
    out = torch.empty_like(u)
    if B * C == 0:
        return out
    meta = {} if _AUTOTUNE else dict(num_warps=4)
    _separable_combine_kernel[(B * C,)](u, v, base, out, a, c, CH, CW, band, C, H, W, h, w, K,
                                        HAS_V=has_v, HAS_BASE=has_base, **blocks, **meta)
    return out


def separable_dot(u: Tensor, v: Tensor, *, CH: Tensor, CW: Tensor, band: Tensor, K: int) -> Tensor:
    dt, (B, C, H, W, h, w), CH, CW, band, blocks = _separable_setup(u, CH, CW, band)
    out = torch.empty(B, K, dtype=dt, device=u.device)
    if B == 0:
        return out
    meta = {} if _AUTOTUNE else dict(num_warps=4)
    _separable_dot_kernel[(B,)](u.contiguous(), v.contiguous(), out, CH, CW, band, C, H, W, h, w, K,
                                BK=triton.next_power_of_2(K), **blocks, **meta)
    return out


# ---------------------------------------------------------------- low-rank (PCA) family

_ANALYSIS_CONFIGS = [triton.Config({"BR": br, "BD": bd}, num_warps=nw)
                     for br, bd, nw in ((16, 256, 4), (32, 128, 4), (32, 256, 4), (64, 128, 8), (64, 256, 8))]
_SYNTHESIS_CONFIGS = [triton.Config({"BR": br, "BD": bd}, num_warps=nw)
                      for br, bd, nw in ((16, 128, 4), (32, 128, 4), (32, 256, 4), (64, 256, 8), (16, 512, 4))]


@triton.jit
def _lowrank_row(V_ptr, ids_ptr, rows, r, d, HAS_IDS: tl.constexpr):
    """This program's (sample, row): (row, sample b, pointer to the basis V[ids[b]])."""
    row = tl.program_id(0).to(tl.int64)
    b = row // rows
    if HAS_IDS:
        g = tl.load(ids_ptr + b)
    else:
        g = 0
    return row, b, V_ptr + g * r * d


@triton.jit
def _lowrank_project(Vg, u_ptr, v_ptr, row, rr, rmask, d, HAS_V: tl.constexpr, BR: tl.constexpr,
                     BD: tl.constexpr):
    """The r-tile rr of the coefficients V[g] x_u and (HAS_V) V[g] x_v of one row, one pass over V[g]."""
    cdt = Vg.dtype.element_ty
    zu = tl.zeros([BR], dtype=cdt)
    zv = tl.zeros([BR], dtype=cdt)
    for d0 in range(0, d, BD):
        dd = d0 + tl.arange(0, BD)
        dmask = dd < d
        Vt = tl.load(Vg + rr[:, None] * d + dd[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
        x = tl.load(u_ptr + row * d + dd, mask=dmask, other=0.0).to(cdt)
        zu += tl.sum(Vt * x[None, :], axis=1)
        if HAS_V:
            y = tl.load(v_ptr + row * d + dd, mask=dmask, other=0.0).to(cdt)
            zv += tl.sum(Vt * y[None, :], axis=1)
    return zu, zv


@triton.jit
def _lowrank_expand(Vg, z0_ptr, z1_ptr, dd, dmask, r, d, TWO: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr):
    """The d-tile dd of V[g].T z0 and (TWO) V[g].T z1, one pass over V[g]."""
    cdt = Vg.dtype.element_ty
    acc0 = tl.zeros([BD], dtype=cdt)
    acc1 = tl.zeros([BD], dtype=cdt)
    for r0 in range(0, r, BR):
        rr = r0 + tl.arange(0, BR)
        rmask = rr < r
        Vt = tl.load(Vg + rr[:, None] * d + dd[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
        acc0 += tl.sum(Vt * tl.load(z0_ptr + rr, mask=rmask, other=0.0)[:, None], axis=0)
        if TWO:
            acc1 += tl.sum(Vt * tl.load(z1_ptr + rr, mask=rmask, other=0.0)[:, None], axis=0)
    return acc0, acc1


@_tuned(_ANALYSIS_CONFIGS, key=["r", "d", "HAS_V", "DOT"])
@triton.jit
def _lowrank_analysis_kernel(u_ptr, v_ptr, a_ptr, c_ptr, V_ptr, vband_ptr, ids_ptr, z_ptr,
                             rows, r, d, K,
                             HAS_V: tl.constexpr, HAS_IDS: tl.constexpr, DOT: tl.constexpr,
                             BR: tl.constexpr, BD: tl.constexpr):
    """Per (sample, row) and r-tile: z_u = V[g] x_u (and z_v). Stores weighted coefficients for combine
    (w_a z_u + w_c z_v) or the products z_u * z_v for dot."""
    row, b, Vg = _lowrank_row(V_ptr, ids_ptr, rows, r, d, HAS_IDS)
    rr = tl.program_id(1) * BR + tl.arange(0, BR)
    rmask = rr < r
    zu, zv = _lowrank_project(Vg, u_ptr, v_ptr, row, rr, rmask, d, HAS_V, BR, BD)
    if DOT:
        z = zu * zv
    else:
        label = tl.load(vband_ptr + rr, mask=rmask, other=K - 1)
        wa, _ = _relative_weight(a_ptr, b, label, rmask, K)
        z = wa * zu
        if HAS_V:
            wc, _ = _relative_weight(c_ptr, b, label, rmask, K)
            z += wc * zv
    tl.store(z_ptr + row * r + rr, z, mask=rmask)


@_tuned(_SYNTHESIS_CONFIGS, key=["r", "d", "HAS_V", "HAS_BASE"])
@triton.jit
def _lowrank_synthesis_kernel(u_ptr, v_ptr, base_ptr, out_ptr, a_ptr, c_ptr, V_ptr, ids_ptr, z_ptr,
                              rows, r, d, K,
                              HAS_V: tl.constexpr, HAS_BASE: tl.constexpr, HAS_IDS: tl.constexpr,
                              BR: tl.constexpr, BD: tl.constexpr):
    """Per (sample, row) and d-tile: out = a_last u + c_last v + V[g].T z + base."""
    row, b, Vg = _lowrank_row(V_ptr, ids_ptr, rows, r, d, HAS_IDS)
    dd = tl.program_id(1) * BD + tl.arange(0, BD)
    dmask = dd < d
    cdt = V_ptr.dtype.element_ty
    acc, _ = _lowrank_expand(Vg, z_ptr + row * r, z_ptr, dd, dmask, r, d, False, BR, BD)
    x = tl.load(u_ptr + row * d + dd, mask=dmask, other=0.0).to(cdt)
    acc += tl.load(a_ptr + b * K + K - 1) * x
    if HAS_V:
        y = tl.load(v_ptr + row * d + dd, mask=dmask, other=0.0).to(cdt)
        acc += tl.load(c_ptr + b * K + K - 1) * y
    if HAS_BASE:
        acc += tl.load(base_ptr + row * d + dd, mask=dmask, other=0.0).to(cdt)
    tl.store(out_ptr + row * d + dd, acc.to(out_ptr.dtype.element_ty), mask=dmask)


@triton.jit
def _lowrank_dot_reduce_kernel(u_ptr, v_ptr, p_ptr, vband_ptr, out_ptr, rows, r, n, K,
                               BK: tl.constexpr, BLOCK: tl.constexpr):
    """Per sample, in a fixed order: per-band sums of the coefficient products, complement = <u, v> - sum."""
    b = tl.program_id(0).to(tl.int64)
    kk = tl.arange(0, BK)
    cdt = p_ptr.dtype.element_ty
    per_band = tl.zeros([BK], dtype=cdt)
    for i0 in range(0, rows * r, BLOCK):
        ii = i0 + tl.arange(0, BLOCK)
        m = ii < rows * r
        p = tl.load(p_ptr + b * rows * r + ii, mask=m, other=0.0)
        label = tl.load(vband_ptr + ii % r, mask=m, other=K - 1)
        per_band += tl.sum(tl.where(label[:, None] == kk[None, :], p[:, None], 0.0), axis=0)
    total = tl.zeros([BLOCK], dtype=cdt)
    for i0 in range(0, n, BLOCK):
        ii = i0 + tl.arange(0, BLOCK)
        m = ii < n
        x = tl.load(u_ptr + b * n + ii, mask=m, other=0.0).to(cdt)
        y = tl.load(v_ptr + b * n + ii, mask=m, other=0.0).to(cdt)
        total += x * y
    inner = tl.where(kk < K - 1, per_band, 0.0)
    last = tl.sum(total, axis=0) - tl.sum(inner, axis=0)
    tl.store(out_ptr + b * K + kk, tl.where(kk == K - 1, last, inner), mask=kk < K)


def _lowrank_setup(u: Tensor, V: Tensor, vband: Tensor, ids: Tensor | None):
    dt = compute_dtype(u.dtype)
    B, C, H, W = u.shape
    G, r, d = V.shape
    rows = C if d == H * W else 1  # spatial basis: one row per channel; joint: the whole image
    ids_t = ids.contiguous() if ids is not None else vband  # dummy pointer when HAS_IDS is False
    return dt, (B, rows, r, d), V.to(dt).contiguous(), vband.contiguous(), ids_t


def _launch_lowrank(kernel, grid_extent, args, kwargs, fixed):
    """grid = (B*rows, cdiv(extent, block)); fixed block sizes where autotune is unavailable."""
    n_rows, extent, block = grid_extent
    if _AUTOTUNE:
        kernel[lambda meta: (n_rows, triton.cdiv(extent, meta[block]))](*args, **kwargs)
    else:
        kernel[(n_rows, triton.cdiv(extent, fixed[block]))](*args, **kwargs, **fixed)


# Interpreter/fallback configs: few, large programs (the interpreter's cost is per program instance).
_FIXED_ANALYSIS = dict(BR=32, BD=256, num_warps=4)
_FIXED_SYNTHESIS = dict(BR=32, BD=256, num_warps=4)


def lowrank_combine(u: Tensor, a: Tensor, v: Tensor | None = None, c: Tensor | None = None,
                    base: Tensor | None = None, *, V: Tensor, vband: Tensor, ids: Tensor | None = None) -> Tensor:
    dt, (B, rows, r, d), V, vband, ids_t = _lowrank_setup(u, V, vband, ids)
    K = a.shape[1]
    u = u.contiguous()
    a = a.to(dt).contiguous()
    has_v, has_base = v is not None, base is not None
    v = v.contiguous() if has_v else u
    c = c.to(dt).contiguous() if has_v else a
    base = base.contiguous() if has_base else u
    out = torch.empty_like(u)
    if B * rows == 0:
        return out
    z = torch.empty(B * rows, r, dtype=dt, device=u.device)
    flags = dict(HAS_V=has_v, HAS_IDS=ids is not None)
    _launch_lowrank(_lowrank_analysis_kernel, (B * rows, r, "BR"),
                    (u, v, a, c, V, vband, ids_t, z, rows, r, d, K), dict(**flags, DOT=False), _FIXED_ANALYSIS)
    _launch_lowrank(_lowrank_synthesis_kernel, (B * rows, d, "BD"),
                    (u, v, base, out, a, c, V, ids_t, z, rows, r, d, K), dict(**flags, HAS_BASE=has_base),
                    _FIXED_SYNTHESIS)
    return out


def lowrank_dot(u: Tensor, v: Tensor, *, V: Tensor, vband: Tensor, K: int, ids: Tensor | None = None) -> Tensor:
    dt, (B, rows, r, d), V, vband, ids_t = _lowrank_setup(u, V, vband, ids)
    out = torch.empty(B, K, dtype=dt, device=u.device)
    if B == 0:
        return out
    u, v = u.contiguous(), v.contiguous()
    p = torch.empty(B * rows, r, dtype=dt, device=u.device)
    dummy = torch.empty(1, K, dtype=dt, device=u.device)  # a/c are unused by the DOT variant
    _launch_lowrank(_lowrank_analysis_kernel, (B * rows, r, "BR"),
                    (u, v, dummy, dummy, V, vband, ids_t, p, rows, r, d, K),
                    dict(HAS_V=True, HAS_IDS=ids is not None, DOT=True), _FIXED_ANALYSIS)
    _lowrank_dot_reduce_kernel[(B,)](u, v, p, vband, out, rows, r, u[0].numel(), K,
                                     BK=triton.next_power_of_2(K), BLOCK=1024, num_warps=4)
    return out
