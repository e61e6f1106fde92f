"""Triton kernels vs the float64 reference (runs under TRITON_INTERPRET=1 on CPU tensors, set in conftest.py).

Inputs are drawn in the tested dtype and the reference sees exactly those values upcast to float64, so the
only error left is the kernel's arithmetic (fp32 accumulation) and, for fp16/bf16, the rounding of the output.
Tolerances are relative to the output scale: max|ref| for combine, sum|u*v| per sample for dot.
"""
import math

import pytest
import torch

from aniso_fast.ops import reference as ref
from aniso_fast.kernels import subspace_triton as tri

# combine: |err| <= tol * max|ref|; fp16/bf16 outputs are rounded to 11/8 significant bits.
COMBINE_TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
# dot returns fp32 (fp64) and is accumulated in fp32 (fp64) whatever the input dtype.
DOT_TOL = {torch.float64: 1e-13, torch.float32: 2e-6, torch.float16: 2e-6, torch.bfloat16: 2e-6}
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def dct_matrix(n: int) -> torch.Tensor:
    """Orthonormal DCT-II: C[u, x] = alpha_u cos((2x+1) u pi / (2n))."""
    x = torch.arange(n, dtype=torch.float64)
    k = x[:, None]
    C = torch.cos((2 * x[None, :] + 1) * k * math.pi / (2 * n)) * math.sqrt(2.0 / n)
    C[0] /= math.sqrt(2.0)
    return C


def orthonormal_rows(G: int, r: int, d: int, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(G, d, r, dtype=torch.float64, generator=gen))
    return q.transpose(1, 2).contiguous()  # [G, r, d] with orthonormal rows


def rand(shape, dtype, gen):
    return torch.randn(shape, dtype=torch.float64, generator=gen).to(dtype)


def check_combine(out, expected, dtype):
    assert out.dtype == dtype and out.shape == expected.shape
    scale = expected.abs().max().item()
    err = (out.double() - expected).abs().max().item()
    assert err <= COMBINE_TOL[dtype] * scale, f"max err {err:.3e} vs scale {scale:.3e} ({dtype})"


def check_dot(out, expected, u, v, dtype):
    assert out.dtype == ref.compute_dtype(dtype) and out.shape == expected.shape
    scale = (u.double() * v.double()).abs().flatten(1).sum(1, keepdim=True)
    err = (out.double() - expected).abs()
    assert (err <= DOT_TOL[dtype] * scale).all(), f"max rel err {(err / scale).max().item():.3e} ({dtype})"


# ---------------------------------------------------------------- separable (DCT)

# (B, C, H, W, h, w, K): full 28x28 transform; the paper's 16x16 corner of 32x32 (RGB); non-square truncated
SEPARABLE_CASES = [(2, 1, 28, 28, 28, 28, 2), (1, 3, 32, 32, 16, 16, 2), (2, 2, 12, 20, 8, 12, 3)]


def separable_inputs(case, dtype, seed):
    B, C, H, W, h, w, K = case
    gen = torch.Generator().manual_seed(seed)
    cdt = ref.compute_dtype(dtype)
    CH, CW = dct_matrix(H)[:h], dct_matrix(W)[:w]
    band = torch.randint(0, K, (h, w), generator=gen)
    u, v, base = (rand((B, C, H, W), dtype, gen) for _ in range(3))
    a, c = rand((B, K), torch.float64, gen), rand((B, K), torch.float64, gen)
    basis = dict(CH=CH.to(cdt), CW=CW.to(cdt), band=band)
    basis64 = dict(CH=CH, CW=CW, band=band)
    return u, v, base, a, c, basis, basis64, K


VARIANTS = ["u", "u+v", "u+v+base", "u+base"]


def split_variant(variant, v, c, base):
    return (v if "v" in variant else None, c if "v" in variant else None, base if "base" in variant else None)


@pytest.mark.parametrize("dtype,variant", [(torch.float32, var) for var in VARIANTS]
                         + [(dt, "u+v+base") for dt in DTYPES[1:]])
@pytest.mark.parametrize("case", SEPARABLE_CASES, ids=str)
def test_separable_combine(case, dtype, variant):
    u, v, base, a, c, basis, basis64, _ = separable_inputs(case, dtype, seed=1)
    v_, c_, base_ = split_variant(variant, v, c, base)
    cdt = ref.compute_dtype(dtype)
    out = tri.separable_combine(u, a.to(cdt), v_, None if c_ is None else c_.to(cdt), base_, **basis)
    expected = ref.separable_combine(u.double(), a, None if v_ is None else v_.double(), c_,
                                     None if base_ is None else base_.double(), **basis64)
    check_combine(out, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", SEPARABLE_CASES, ids=str)
def test_separable_dot(case, dtype):
    u, v, _, _, _, basis, basis64, K = separable_inputs(case, dtype, seed=2)
    out = tri.separable_dot(u, v, K=K, **basis)
    expected = ref.separable_dot(u.double(), v.double(), K=K, **basis64)
    check_dot(out, expected, u, v, dtype)


def test_separable_projectors_partition_identity():
    """sum_k P_k u = u and the per-band squared norms sum to |u|^2, with labels K-1 inside the box."""
    u, _, _, _, _, basis, _, K = separable_inputs((2, 2, 12, 20, 8, 12, 3), torch.float32, seed=3)
    parts = [tri.separable_combine(u, torch.eye(K)[k].expand(u.shape[0], K).contiguous(), **basis)
             for k in range(K)]
    assert all((p - u).abs().max() > 1e-2 for p in parts)  # each P_k is a proper projector here
    torch.testing.assert_close(sum(parts), u, atol=1e-5, rtol=0)
    norms = tri.separable_dot(u, u, K=K, **basis)
    assert (norms > 0).all()
    torch.testing.assert_close(norms.sum(1), u.double().pow(2).flatten(1).sum(1).float(), atol=1e-3, rtol=1e-5)


def test_separable_rejects_oversized_images():
    u = torch.zeros(1, 1, tri.MAX_SEPARABLE_SIDE + 1, 4)
    with pytest.raises(ValueError, match="u:"):
        tri.separable_dot(u, u, CH=torch.zeros(1, u.shape[2]), CW=torch.zeros(1, 4),
                          band=torch.zeros(1, 1, dtype=torch.int64), K=2)


# ---------------------------------------------------------------- low-rank (PCA)

# (B, C, H, W, r, G, joint, with_ids, K): r not a multiple of the r-tile, d not a multiple of the d-tile
LOWRANK_CASES = [(2, 3, 12, 20, 40, 1, False, False, 2),   # spatial, one group, no ids
                 (3, 1, 28, 28, 24, 3, False, True, 3),    # spatial, per-sample ids over 3 groups
                 (2, 3, 32, 32, 50, 2, True, True, 3)]     # joint (d = C*H*W), mixed-group batch


def lowrank_inputs(case, dtype, seed):
    B, C, H, W, r, G, joint, with_ids, K = case
    gen = torch.Generator().manual_seed(seed)
    cdt = ref.compute_dtype(dtype)
    d = C * H * W if joint else H * W
    V = orthonormal_rows(G, r, d, gen)
    vband = torch.randint(0, K, (r,), generator=gen)
    ids = torch.randint(0, G, (B,), generator=gen) if with_ids else None
    if ids is not None:
        ids[:G] = torch.arange(min(G, B))  # every group present in the batch
    u, v, base = (rand((B, C, H, W), dtype, gen) for _ in range(3))
    a, c = rand((B, K), torch.float64, gen), rand((B, K), torch.float64, gen)
    return u, v, base, a, c, dict(V=V.to(cdt), vband=vband, ids=ids), dict(V=V, vband=vband, ids=ids), K


@pytest.mark.parametrize("dtype,variant", [(torch.float32, var) for var in VARIANTS]
                         + [(dt, "u+v+base") for dt in DTYPES[1:]])
@pytest.mark.parametrize("case", LOWRANK_CASES, ids=str)
def test_lowrank_combine(case, dtype, variant):
    u, v, base, a, c, basis, basis64, _ = lowrank_inputs(case, dtype, seed=4)
    v_, c_, base_ = split_variant(variant, v, c, base)
    cdt = ref.compute_dtype(dtype)
    out = tri.lowrank_combine(u, a.to(cdt), v_, None if c_ is None else c_.to(cdt), base_, **basis)
    expected = ref.lowrank_combine(u.double(), a, None if v_ is None else v_.double(), c_,
                                   None if base_ is None else base_.double(), **basis64)
    check_combine(out, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", LOWRANK_CASES, ids=str)
def test_lowrank_dot(case, dtype):
    u, v, _, _, _, basis, basis64, K = lowrank_inputs(case, dtype, seed=5)
    out = tri.lowrank_dot(u, v, K=K, **basis)
    expected = ref.lowrank_dot(u.double(), v.double(), K=K, **basis64)
    check_dot(out, expected, u, v, dtype)


def test_lowrank_ids_select_each_samples_group():
    """A mixed batch in one launch equals each sample run alone with its own group as the only basis."""
    u, _, _, a, _, basis, _, _ = lowrank_inputs((4, 3, 8, 12, 50, 2, True, True, 3), torch.float32, seed=6)
    a = a.float()
    out = tri.lowrank_combine(u, a, **basis)
    for b in range(u.shape[0]):
        g = int(basis["ids"][b])
        alone = tri.lowrank_combine(u[b:b + 1], a[b:b + 1], V=basis["V"][g:g + 1], vband=basis["vband"])
        torch.testing.assert_close(out[b:b + 1], alone, atol=1e-6, rtol=0)
    swapped = tri.lowrank_combine(u, a, V=basis["V"], vband=basis["vband"], ids=basis["ids"].flip(0))
    assert (swapped - out).abs().max() > 1e-2  # the group really is taken from ids


def test_dot_is_deterministic():
    u, v, _, _, _, basis, _, K = lowrank_inputs(LOWRANK_CASES[1], torch.float32, seed=7)
    assert torch.equal(tri.lowrank_dot(u, v, K=K, **basis), tri.lowrank_dot(u, v, K=K, **basis))
    u, v, _, _, _, basis, _, K = separable_inputs(SEPARABLE_CASES[2], torch.float32, seed=7)
    assert torch.equal(tri.separable_dot(u, v, K=K, **basis), tri.separable_dot(u, v, K=K, **basis))


def test_autotune_specs_are_valid():
    """The autotune configs (applied only where a CUDA driver exists) name real kernel arguments."""
    import triton

    assert len(tri._TUNING) == 4
    for name, (fn, configs, key) in tri._TUNING.items():
        triton.autotune(configs=configs, key=key)(fn)  # raises on a key that is not an argument
        for cfg in configs:
            assert set(cfg.kwargs) <= set(fn.arg_names), name
