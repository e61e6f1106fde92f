"""Triton kernels of `block_combine` (docs/DESIGN.md, op 3); forward only, autograd is wired by `aniso_fast.ops`.

`[x'; v'] = base + sum_k P_k (B_k [x; v])` with B [B, K, 2, 2]: the coefficients of x and v are computed once and
mixed by the relative blocks `B_k - B_{K-1}`; the complement's block B_{K-1} multiplies the images themselves.
Same signatures as `aniso_fast.reference`; loads are upcast at once to fp32 (fp64 for fp64 inputs), stores cast
back. The basis helpers, tuning and launch rules are those of `subspace_triton`.

- separable (DCT): one program per channel image (both outputs), as `subspace_triton`'s combine.
- low-rank (PCA): an analysis pass per (sample, row) and r-tile storing both outputs' mixed coefficients
  [B*rows, 2, r], then a synthesis pass per (sample, row) and d-tile that reads each tile of V[ids[b]] once for
  both outputs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .subspace_triton import (_AUTOTUNE, _ANALYSIS_CONFIGS, _FIXED_ANALYSIS, _FIXED_SYNTHESIS, _SYNTHESIS_CONFIGS,
                              _launch_lowrank, _load_basis, _lowrank_expand, _lowrank_project, _lowrank_row,
                              _lowrank_setup, _separable_coeffs, _separable_setup, _tuned)

__all__ = ["separable_block_combine", "lowrank_block_combine"]

# kernel name -> (jit function, configs, key), apart from subspace_triton's (tests check each module's keys)
_TUNING = {}


@triton.jit
def _block_weights(B_ptr, b, label, mask, K, IJ: tl.constexpr):
    """B[b, label, ij] - B[b, K-1, ij] (zero for the complement's label and outside the mask), and B[b, K-1, ij];
    ij = 2 i + j."""
    last = tl.load(B_ptr + (b * K + K - 1) * 4 + IJ)
    sel = tl.load(B_ptr + (b * K + label) * 4 + IJ, mask=mask, other=0.0)
    return tl.where(mask, sel - last, 0.0), last


@_tuned([triton.Config({}, num_warps=nw) for nw in (2, 4, 8)], key=["H", "W", "h", "w", "HAS_BX", "HAS_BV"],
        registry=_TUNING)
@triton.jit
def _separable_block_kernel(x_ptr, v_ptr, bx_ptr, bv_ptr, ox_ptr, ov_ptr, B_ptr, ch_ptr, cw_ptr, band_ptr,
                            C, H, W, h, w, K,
                            HAS_BX: tl.constexpr, HAS_BV: tl.constexpr,
                            BH: tl.constexpr, BW: tl.constexpr, Bh: tl.constexpr, Bw: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # one (b, c) channel image
    b = pid // C
    rH = tl.arange(0, BH)
    rW = tl.arange(0, BW)
    offs = pid * H * W + rH[:, None] * W + rW[None, :]
    xmask = (rH[:, None] < H) & (rW[None, :] < W)
    ch, cw, band, cmask = _load_basis(ch_ptr, cw_ptr, band_ptr, H, W, h, w, K, BH, BW, Bh, Bw)
    cdt = ch.dtype

    x = tl.load(x_ptr + offs, mask=xmask, other=0.0).to(cdt)
    y = tl.load(v_ptr + offs, mask=xmask, other=0.0).to(cdt)
    yx = _separable_coeffs(x, ch, cw)  # each analysis once, shared by both outputs
    yv = _separable_coeffs(y, ch, cw)
    w00, l00 = _block_weights(B_ptr, b, band, cmask, K, 0)
    w01, l01 = _block_weights(B_ptr, b, band, cmask, K, 1)
    w10, l10 = _block_weights(B_ptr, b, band, cmask, K, 2)
    w11, l11 = _block_weights(B_ptr, b, band, cmask, K, 3)

    t = tl.dot(tl.trans(ch), w00 * yx + w01 * yv, input_precision="ieee")
    out = tl.dot(t, cw, input_precision="ieee") + l00 * x + l01 * y
    if HAS_BX:
        out += tl.load(bx_ptr + offs, mask=xmask, other=0.0).to(cdt)
    tl.store(ox_ptr + offs, out.to(ox_ptr.dtype.element_ty), mask=xmask)

    t = tl.dot(tl.trans(ch), w10 * yx + w11 * yv, input_precision="ieee")
    out = tl.dot(t, cw, input_precision="ieee") + l10 * x + l11 * y
    if HAS_BV:
        out += tl.load(bv_ptr + offs, mask=xmask, other=0.0).to(cdt)
    tl.store(ov_ptr + offs, out.to(ov_ptr.dtype.element_ty), mask=xmask)


def _block_operands(x: Tensor, v: Tensor, B: Tensor, base_x: Tensor | None, base_v: Tensor | None, dt):
    """Contiguous inputs, the blocks in the compute dtype, the bases (x as a dummy pointer when absent, with the
    flags saying so) and the two outputs: what both block kernels take."""
    x, v, B = x.contiguous(), v.contiguous(), B.to(dt).contiguous()
    has_bx, has_bv = base_x is not None, base_v is not None
    bx = base_x.contiguous() if has_bx else x
    bv = base_v.contiguous() if has_bv else x
    return x, v, B, bx, bv, has_bx, has_bv, torch.empty_like(x), torch.empty_like(x)


def separable_block_combine(x: Tensor, v: Tensor, B: Tensor, base_x: Tensor | None = None,
                            base_v: Tensor | None = None, *, CH: Tensor, CW: Tensor,
                            band: Tensor) -> tuple[Tensor, Tensor]:
    dt, (n, C, H, W, h, w), CH, CW, band, blocks = _separable_setup(x, CH, CW, band)
    K = B.shape[1]
    x, v, B, bx, bv, has_bx, has_bv, ox, ov = _block_operands(x, v, B, base_x, base_v, dt)
    if n * C == 0:
        return ox, ov
    meta = {} if _AUTOTUNE else dict(num_warps=4)
    _separable_block_kernel[(n * C,)](x, v, bx, bv, ox, ov, B, CH, CW, band, C, H, W, h, w, K,
                                      HAS_BX=has_bx, HAS_BV=has_bv, **blocks, **meta)
    return ox, ov


@_tuned(_ANALYSIS_CONFIGS, key=["r", "d"], registry=_TUNING)
@triton.jit
def _lowrank_block_analysis_kernel(x_ptr, v_ptr, B_ptr, V_ptr, vband_ptr, ids_ptr, z_ptr,
                                   rows, r, d, K,
                                   HAS_IDS: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr):
    """Per (sample, row) and r-tile: z_x = V[g] x, z_v = V[g] v; stores z[row, i] = (B_l - B_last)[i] . (z_x, z_v)."""
    row, b, Vg = _lowrank_row(V_ptr, ids_ptr, rows, r, d, HAS_IDS)
    rr = tl.program_id(1) * BR + tl.arange(0, BR)
    rmask = rr < r
    zx, zv = _lowrank_project(Vg, x_ptr, v_ptr, row, rr, rmask, d, True, BR, BD)
    label = tl.load(vband_ptr + rr, mask=rmask, other=K - 1)
    w00, _ = _block_weights(B_ptr, b, label, rmask, K, 0)
    w01, _ = _block_weights(B_ptr, b, label, rmask, K, 1)
    w10, _ = _block_weights(B_ptr, b, label, rmask, K, 2)
    w11, _ = _block_weights(B_ptr, b, label, rmask, K, 3)
    tl.store(z_ptr + (row * 2) * r + rr, w00 * zx + w01 * zv, mask=rmask)
    tl.store(z_ptr + (row * 2 + 1) * r + rr, w10 * zx + w11 * zv, mask=rmask)


@_tuned(_SYNTHESIS_CONFIGS, key=["r", "d", "HAS_BX", "HAS_BV"], registry=_TUNING)
@triton.jit
def _lowrank_block_synthesis_kernel(x_ptr, v_ptr, bx_ptr, bv_ptr, ox_ptr, ov_ptr, B_ptr, V_ptr, ids_ptr, z_ptr,
                                    rows, r, d, K,
                                    HAS_BX: tl.constexpr, HAS_BV: tl.constexpr, HAS_IDS: tl.constexpr,
                                    BR: tl.constexpr, BD: tl.constexpr):
    """Per (sample, row) and d-tile: both outputs from one pass over V[g]: o_i = V[g].T z_i + B_last[i] . (x, v)."""
    row, b, Vg = _lowrank_row(V_ptr, ids_ptr, rows, r, d, HAS_IDS)
    dd = tl.program_id(1) * BD + tl.arange(0, BD)
    dmask = dd < d
    cdt = V_ptr.dtype.element_ty
    acc_x, acc_v = _lowrank_expand(Vg, z_ptr + (row * 2) * r, z_ptr + (row * 2 + 1) * r, dd, dmask, r, d, True,
                                   BR, BD)
    x = tl.load(x_ptr + row * d + dd, mask=dmask, other=0.0).to(cdt)
    y = tl.load(v_ptr + row * d + dd, mask=dmask, other=0.0).to(cdt)
    last = B_ptr + (b * K + K - 1) * 4
    acc_x += tl.load(last) * x + tl.load(last + 1) * y
    acc_v += tl.load(last + 2) * x + tl.load(last + 3) * y
    if HAS_BX:
        acc_x += tl.load(bx_ptr + row * d + dd, mask=dmask, other=0.0).to(cdt)
    if HAS_BV:
        acc_v += tl.load(bv_ptr + row * d + dd, mask=dmask, other=0.0).to(cdt)
    tl.store(ox_ptr + row * d + dd, acc_x.to(ox_ptr.dtype.element_ty), mask=dmask)
    tl.store(ov_ptr + row * d + dd, acc_v.to(ov_ptr.dtype.element_ty), mask=dmask)


def lowrank_block_combine(x: Tensor, v: Tensor, B: Tensor, base_x: Tensor | None = None,
                          base_v: Tensor | None = None, *, V: Tensor, vband: Tensor,
                          ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
    dt, (n, rows, r, d), V, vband, ids_t = _lowrank_setup(x, V, vband, ids)
    K = B.shape[1]
    x, v, B, bx, bv, has_bx, has_bv, ox, ov = _block_operands(x, v, B, base_x, base_v, dt)
    if n * rows == 0:
        return ox, ov
    z = torch.empty(n * rows, 2, r, dtype=dt, device=x.device)
    has_ids = ids is not None
    _launch_lowrank(_lowrank_block_analysis_kernel, (n * rows, r, "BR"),
                    (x, v, B, V, vband, ids_t, z, rows, r, d, K), dict(HAS_IDS=has_ids), _FIXED_ANALYSIS)
    _launch_lowrank(_lowrank_block_synthesis_kernel, (n * rows, d, "BD"),
                    (x, v, bx, bv, ox, ov, B, V, ids_t, z, rows, r, d, K),
                    dict(HAS_BX=has_bx, HAS_BV=has_bv, HAS_IDS=has_ids), _FIXED_SYNTHESIS)
    return ox, ov
