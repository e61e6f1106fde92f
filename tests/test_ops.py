"""The dispatch layer (aniso_fast.ops) and every available backend against the float64 reference.

Inputs are drawn in the tested dtype and the reference sees exactly those values upcast to float64 (basis tensors
too, before the backend casts them to its compute dtype), so what is left is the backend's arithmetic and the
output rounding. Tolerances, relative to the output's scale:
- combine: |out - ref| <= COMBINE_TOL[dtype] * (1 + max|ref|); fp16/bf16 outputs keep 11/8 significant bits
  (half an ulp is 4.9e-4 / 3.9e-3 relative), computed in fp32.
- dot (returned in fp32, fp64 for fp64 inputs, accumulated in that precision whatever the input dtype):
  |out - ref| <= DOT_TOL[dtype] * (1 + sum_chw |u v|) per sample.
Triton runs under TRITON_INTERPRET=1 on CPU tensors (tests/conftest.py), on small cases only (the interpreter
costs ~0.5 ms per program instance).
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aniso_fast import ops
from aniso_fast.ops import dispatch
from aniso_fast.ops import reference as ref

COMBINE_TOL = {torch.float64: 1e-11, torch.float32: 5e-6, torch.float16: 1.5e-3, torch.bfloat16: 1e-2}
DOT_TOL = {torch.float64: 1e-12, torch.float32: 5e-6, torch.float16: 5e-6, torch.bfloat16: 5e-6}
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SIZES = [(28, 28), (32, 32), (64, 64), (12, 20), (8, 8)]

_AVAILABLE_CPU = ops.backends()["available"]
CPU_BACKENDS = [b for b in ("reference", "cpp") if dispatch._unavailable(b, "cpu") is None]
TRITON_SKIP = dispatch._unavailable("triton", "cpu")  # None when aniso_fast.kernels.subspace_triton runs here
needs_triton = pytest.mark.skipif(TRITON_SKIP is not None, reason=f"triton backend unavailable: {TRITON_SKIP}")
needs_cpp = pytest.mark.skipif("cpp" not in CPU_BACKENDS, reason=f"cpp backend unavailable: {dispatch._C_ERROR}")
SETTINGS = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---------------------------------------------------------------- bases built here (independent of bases.py)

def dct_matrix(n: int) -> torch.Tensor:
    """Orthonormal DCT-II, C[u, x] = alpha_u cos((2x+1) u pi / (2n)), float64."""
    x = torch.arange(n, dtype=torch.float64)
    C = torch.cos((2 * x[None, :] + 1) * x[:, None] * math.pi / (2 * n)) * math.sqrt(2.0 / n)
    C[0] /= math.sqrt(2.0)
    return C


def orthonormal_rows(G: int, r: int, d: int, gen: torch.Generator) -> torch.Tensor:
    """[G, r, d] with orthonormal rows per group (QR of a Gaussian matrix), float64."""
    q, _ = torch.linalg.qr(torch.randn(G, d, r, dtype=torch.float64, generator=gen))
    return q.transpose(1, 2).contiguous()


def rand(shape, dtype, gen, layout="contiguous"):
    """Gaussian tensor in `dtype`; layout 'permuted' / 'sliced' returns a non-contiguous view of the same shape."""
    B, C, H, W = shape
    if layout == "permuted":
        return torch.randn(B, H, W, C, dtype=torch.float64, generator=gen).to(dtype).permute(0, 3, 1, 2)
    if layout == "sliced":
        return torch.randn(B, C, H, 2 * W, dtype=torch.float64, generator=gen).to(dtype)[..., ::2]
    return torch.randn(shape, dtype=torch.float64, generator=gen).to(dtype)


def scalars(B, K, dtype, gen, transposed=False):
    s = torch.randn(K, B, dtype=dtype, generator=gen)
    return s.t() if transposed else s.t().contiguous()


def f64(t):
    return None if t is None else t.detach().to(torch.float64)


def assert_combine_close(out, expected, dtype, *inputs):
    assert out.dtype == dtype and out.shape == expected.shape and out.is_contiguous()
    for t in inputs:
        if t is not None:
            assert out.data_ptr() != t.data_ptr(), "output aliases an input"
    err = (out.double() - expected).abs().max().item() if out.numel() else 0.0
    scale = 1 + (expected.abs().max().item() if out.numel() else 0.0)
    assert err <= COMBINE_TOL[dtype] * scale, f"max error {err:.3g} > {COMBINE_TOL[dtype]} * {scale:.3g}"


def assert_dot_close(out, expected, u, v):
    dtype = u.dtype
    assert out.dtype == ref.compute_dtype(dtype) and out.shape == expected.shape
    scale = 1 + (f64(u) * f64(v)).abs().flatten(1).sum(1, keepdim=True)
    err = (out.double() - expected).abs()
    assert bool((err <= DOT_TOL[dtype] * scale).all()), f"max relative error {(err / scale).max().item():.3g}"


# ---------------------------------------------------------------- random cases

@st.composite
def separable_cases(draw, small=False):
    H, W = draw(st.sampled_from(SIZES[3:] if small else SIZES))
    case = dict(
        B=draw(st.integers(1, 2 if small else 5)), C=draw(st.integers(1, 3)), H=H, W=W,
        K=draw(st.integers(2, 4)),
        h=draw(st.sampled_from(sorted({H, max(1, H // 2), max(1, H // 4), 1}))),
        w=draw(st.sampled_from(sorted({W, max(1, W // 2), max(1, W // 4), 1}))),
        dtype=draw(st.sampled_from(DTYPES)), scalar_dtype=draw(st.sampled_from([torch.float32, torch.float64])),
        with_v=draw(st.booleans()), with_base=draw(st.booleans()),
        layout=draw(st.sampled_from(["contiguous", "contiguous", "permuted", "sliced"])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )
    case["two_band"] = draw(st.booleans())  # the paper's layout: a low-frequency corner in band 0, rest complement
    return case


@st.composite
def lowrank_cases(draw, small=False):
    H, W = draw(st.sampled_from(SIZES[3:] if small else SIZES))
    C = draw(st.integers(1, 3))
    case = dict(
        B=draw(st.integers(1, 2 if small else 5)), C=C, H=H, W=W, K=draw(st.integers(2, 4)),
        joint=draw(st.booleans()), G=draw(st.integers(1, 3)), r=draw(st.integers(1, 6 if small else 24)),
        dtype=draw(st.sampled_from(DTYPES)), scalar_dtype=draw(st.sampled_from([torch.float32, torch.float64])),
        with_v=draw(st.booleans()), with_base=draw(st.booleans()),
        layout=draw(st.sampled_from(["contiguous", "contiguous", "permuted", "sliced"])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )
    case["with_ids"] = case["G"] > 1 or draw(st.booleans())
    return case


def build_separable(case):
    gen = torch.Generator().manual_seed(case["seed"])
    B, C, H, W, K, h, w, dtype = (case[k] for k in ("B", "C", "H", "W", "K", "h", "w", "dtype"))
    basis_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    CH, CW = dct_matrix(H)[:h].to(basis_dtype), dct_matrix(W)[:w].to(basis_dtype)
    if case["two_band"]:
        band = torch.full((h, w), K - 1, dtype=torch.int64)
        band[: max(1, h // 2), : max(1, w // 2)] = 0
    else:
        band = torch.randint(0, K, (h, w), generator=gen)
    shape = (B, C, H, W)
    args = dict(
        u=rand(shape, dtype, gen, case["layout"]),
        a=scalars(B, K, case["scalar_dtype"], gen, transposed=case["layout"] != "contiguous"),
        v=rand(shape, dtype, gen, case["layout"]) if case["with_v"] else None,
        c=scalars(B, K, case["scalar_dtype"], gen) if case["with_v"] else None,
        base=rand(shape, dtype, gen) if case["with_base"] else None,
    )
    return args, dict(CH=CH, CW=CW, band=band), K


def build_lowrank(case):
    gen = torch.Generator().manual_seed(case["seed"])
    B, C, H, W, K, G, dtype = (case[k] for k in ("B", "C", "H", "W", "K", "G", "dtype"))
    d = C * H * W if case["joint"] else H * W
    r = min(case["r"], d)
    basis_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    V = orthonormal_rows(G, r, d, gen).to(basis_dtype)
    vband = torch.randint(0, K, (r,), generator=gen)
    ids = torch.randint(0, G, (B,), generator=gen) if case["with_ids"] else None
    shape = (B, C, H, W)
    args = dict(
        u=rand(shape, dtype, gen, case["layout"]),
        a=scalars(B, K, case["scalar_dtype"], gen, transposed=case["layout"] != "contiguous"),
        v=rand(shape, dtype, gen, case["layout"]) if case["with_v"] else None,
        c=scalars(B, K, case["scalar_dtype"], gen) if case["with_v"] else None,
        base=rand(shape, dtype, gen) if case["with_base"] else None,
    )
    return args, dict(V=V, vband=vband, ids=ids), K


def on(device, tensors: dict) -> dict:
    """The tensors of a dict on `device` (None kept)."""
    return {k: None if t is None else t.to(device) for k, t in tensors.items()}


def check_separable(case, backend, device="cpu"):
    """The op on `device` against the float64 reference computed on the CPU."""
    args, basis, K = build_separable(case)
    basis64 = dict(CH=f64(basis["CH"]), CW=f64(basis["CW"]), band=basis["band"])
    expected = ref.separable_combine(*(f64(args[k]) for k in ("u", "a", "v", "c", "base")), **basis64)
    args_d, basis_d = on(device, args), on(device, basis)
    out = ops.separable_combine(**args_d, **basis_d, backend=backend)
    assert_combine_close(out.cpu(), expected, case["dtype"], *(args.values() if device == "cpu" else ()))
    v = args["v"] if args["v"] is not None else args["u"]
    expected = ref.separable_dot(f64(args["u"]), f64(v), K=K, **basis64)
    out = ops.separable_dot(args_d["u"], v.to(device), K=K, **basis_d, backend=backend)
    assert_dot_close(out.cpu(), expected, args["u"], v)


def check_lowrank(case, backend, device="cpu"):
    """The op on `device` against the float64 reference computed on the CPU."""
    args, basis, K = build_lowrank(case)
    basis64 = dict(V=f64(basis["V"]), vband=basis["vband"], ids=basis["ids"])
    expected = ref.lowrank_combine(*(f64(args[k]) for k in ("u", "a", "v", "c", "base")), **basis64)
    args_d, basis_d = on(device, args), on(device, basis)
    out = ops.lowrank_combine(**args_d, **basis_d, backend=backend)
    assert_combine_close(out.cpu(), expected, case["dtype"], *(args.values() if device == "cpu" else ()))
    v = args["v"] if args["v"] is not None else args["u"]
    expected = ref.lowrank_dot(f64(args["u"]), f64(v), K=K, **basis64)
    out = ops.lowrank_dot(args_d["u"], v.to(device), K=K, **basis_d, backend=backend)
    assert_dot_close(out.cpu(), expected, args["u"], v)


# ---------------------------------------------------------------- backends vs the reference

# The reference backend through the dispatch only checks the plumbing (preparation, custom op): fewer examples.
EXAMPLES = {"reference": 12, "cpp": 40, "cuda": 40, "triton": 40}


# `device_backend` (tests/conftest.py): (device, backend) per backend of the --device (cpu: reference, cpp; cuda:
# reference, cuda, triton compiled)
def test_separable_matches_reference(device_backend):
    device, backend = device_backend
    settings(SETTINGS, max_examples=EXAMPLES[backend])(given(case=separable_cases())(
        lambda case: check_separable(case, backend, device)))()


def test_lowrank_matches_reference(device_backend):
    device, backend = device_backend
    settings(SETTINGS, max_examples=EXAMPLES[backend])(given(case=lowrank_cases())(
        lambda case: check_lowrank(case, backend, device)))()


@needs_triton
@settings(SETTINGS, max_examples=8)
@given(case=separable_cases(small=True))
def test_separable_triton_matches_reference(case):
    check_separable(case, "triton")


@needs_triton
@settings(SETTINGS, max_examples=8)
@given(case=lowrank_cases(small=True))
def test_lowrank_triton_matches_reference(case):
    check_lowrank(case, "triton")


def test_paper_shapes(device_backend):
    """The paper's cases: 32x32x3 with a 16x16 DCT corner (K=2), and per-class spatial PCA with one call."""
    device, backend = device_backend
    gen = torch.Generator().manual_seed(0)
    CH = dct_matrix(32)[:16]
    band = torch.zeros(16, 16, dtype=torch.int64)
    u, v = rand((16, 3, 32, 32), torch.float64, gen), rand((16, 3, 32, 32), torch.float64, gen)
    a, c = scalars(16, 2, torch.float64, gen), scalars(16, 2, torch.float64, gen)
    d = on(device, dict(u=u, a=a, v=v, c=c, CH=CH, band=band))
    out = ops.separable_combine(d["u"], d["a"], d["v"], d["c"], CH=d["CH"], CW=d["CH"], band=d["band"],
                                backend=backend)
    assert_combine_close(out.cpu(), ref.separable_combine(u, a, v, c, CH=CH, CW=CH, band=band), torch.float64)
    V = orthonormal_rows(10, 20, 28 * 28, gen)
    ids = torch.randint(0, 10, (16,), generator=gen)
    x = rand((16, 1, 28, 28), torch.float64, gen)
    vband = torch.tensor([0] * 8 + [1] * 8 + [2] * 4)
    a = scalars(16, 3, torch.float64, gen)
    d = on(device, dict(x=x, a=a, V=V, vband=vband, ids=ids))
    out = ops.lowrank_combine(d["x"], d["a"], V=d["V"], vband=d["vband"], ids=d["ids"], backend=backend)
    assert_combine_close(out.cpu(), ref.lowrank_combine(x, a, V=V, vband=vband, ids=ids), torch.float64)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ids_kind", ["interleaved", "one_group", "none"])
def test_lowrank_batches_spanning_many_tiles(backend, dtype, ids_kind):
    """Batches larger than one tile per group (the cpp kernel cuts id-sorted samples into tiles of <= 64 rows):
    interleaved ids (gathered tiles), one id for all (tiles read and written in place), no ids; spatial and joint."""
    gen = torch.Generator().manual_seed(DTYPES.index(dtype))
    B, C, H, W, K, G = 70, 3, 8, 8, 3, 4
    for joint in (False, True):
        d = C * H * W if joint else H * W
        basis_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        V = orthonormal_rows(G, 24, d, gen).to(basis_dtype)
        vband = torch.randint(0, K, (24,), generator=gen)
        ids = {"interleaved": torch.arange(B) % G, "one_group": torch.full((B,), 2), "none": None}[ids_kind]
        Vx = V[:1] if ids is None else V
        u, v, base = (rand((B, C, H, W), dtype, gen) for _ in range(3))
        a, c = scalars(B, K, torch.float32, gen), scalars(B, K, torch.float32, gen)
        basis64 = dict(V=f64(Vx), vband=vband, ids=ids)
        out = ops.lowrank_combine(u, a, v, c, base, V=Vx, vband=vband, ids=ids, backend=backend)
        expected = ref.lowrank_combine(f64(u), f64(a), f64(v), f64(c), f64(base), **basis64)
        assert_combine_close(out, expected, dtype, u, v, base)
        out = ops.lowrank_combine(u, a, V=Vx, vband=vband, ids=ids, backend=backend)
        assert_combine_close(out, ref.lowrank_combine(f64(u), f64(a), **basis64), dtype, u)
        for w in (v, u):
            expected = ref.lowrank_dot(f64(u), f64(w), K=K, **basis64)
            assert_dot_close(ops.lowrank_dot(u, w, V=Vx, vband=vband, K=K, ids=ids, backend=backend), expected, u, w)


def _reference_by_chunks(u, a, v, c, base, *, V, vband, ids, K, chunk=8):
    """The float64 reference of lowrank combine and dot, a few samples at a time (samples are independent; the
    reference copies V[ids] per sample, which for a large basis and batch would take gigabytes)."""
    outs, dots = [], []
    for i in range(0, u.shape[0], chunk):
        part = lambda t: None if t is None else f64(t[i:i + chunk])  # noqa: E731
        basis64 = dict(V=f64(V), vband=vband, ids=None if ids is None else ids[i:i + chunk])
        outs.append(ref.lowrank_combine(part(u), part(a), part(v), part(c), part(base), **basis64))
        if v is not None:
            dots.append(ref.lowrank_dot(part(u), part(v), K=K, **basis64))
    return torch.cat(outs), (torch.cat(dots) if dots else None)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("side", ["per_thread", "shared"])
@pytest.mark.parametrize("ids_kind", ["none", "one_group"])
def test_lowrank_one_basis_tiles(dtype, side, ids_kind):
    """One basis for the whole batch, images in place: the cpp kernel cuts the fewest tiles of <= 1024 units and
    shares each among the threads when V[id] is over 4 MiB, else runs them per thread (csrc/cpu/lowrank.cpp,
    LowrankPlan). Both sides of that switch: a 64x64 spatial basis of 4 MiB is r = 256 in fp32 (128 in fp64),
    one more direction is over. 3 samples of 3 channels: one tile shared, or two per-thread tiles on 2 threads."""
    gen = torch.Generator().manual_seed(7)
    B, C, H, W, K = 3, 3, 64, 64, 3
    r = (256 if dtype == torch.float32 else 128) + (1 if side == "shared" else 0)
    G = 1 if ids_kind == "none" else 2
    V = orthonormal_rows(G, r, H * W, gen).to(dtype)
    assert (r * H * W * V.element_size() > 4 << 20) == (side == "shared")
    vband = torch.randint(0, K, (r,), generator=gen)
    ids = None if ids_kind == "none" else torch.full((B,), 1)
    u, v, base = (rand((B, C, H, W), dtype, gen) for _ in range(3))
    a, c = scalars(B, K, torch.float64, gen), scalars(B, K, torch.float64, gen)
    expected, expected_dot = _reference_by_chunks(u, a, v, c, base, V=V, vband=vband, ids=ids, K=K)
    out = ops.lowrank_combine(u, a, v, c, base, V=V, vband=vband, ids=ids, backend="cpp")
    assert_combine_close(out, expected, dtype, u, v, base)
    assert_dot_close(ops.lowrank_dot(u, v, V=V, vband=vband, K=K, ids=ids, backend="cpp"), expected_dot, u, v)
    scale_only, _ = _reference_by_chunks(u, a, None, None, None, V=V, vband=vband, ids=ids, K=K)
    assert_combine_close(ops.lowrank_combine(u, a, V=V, vband=vband, ids=ids, backend="cpp"), scale_only, dtype, u)


@needs_cpp
@pytest.mark.parametrize("side", ["per_thread", "shared"])
def test_lowrank_one_basis_several_big_tiles(side):
    """More units than one big tile (1024): per-thread tiles (8x8 basis, 1100 samples) and shared tiles (64x64
    basis over 4 MiB, 342 samples of 3 channels = 1026 units), fp32 in place, against the float64 reference."""
    gen = torch.Generator().manual_seed(8)
    (B, C, H, W), r, K = ((1100, 1, 8, 8), 24, 3) if side == "per_thread" else ((342, 3, 64, 64), 257, 2)
    V = orthonormal_rows(1, r, H * W, gen).float()
    vband = torch.randint(0, K, (r,), generator=gen)
    u, v, base = (rand((B, C, H, W), torch.float32, gen) for _ in range(3))
    a, c = scalars(B, K, torch.float32, gen), scalars(B, K, torch.float32, gen)
    expected, expected_dot = _reference_by_chunks(u, a, v, c, base, V=V, vband=vband, ids=None, K=K, chunk=64)
    out = ops.lowrank_combine(u, a, v, c, base, V=V, vband=vband, backend="cpp")
    assert_combine_close(out, expected, torch.float32, u, v, base)
    assert_dot_close(ops.lowrank_dot(u, v, V=V, vband=vband, K=K, backend="cpp"), expected_dot, u, v)


CPU_ISAS = ("base", "avx", "avx512")  # narrowest first, as ANISO_FAST_CPU_ISA names them


def cap_isa(monkeypatch, isa):
    """Cap the cpp kernels' instruction set at `isa` (ANISO_FAST_CPU_ISA, read per call); skip if the CPU lacks it."""
    monkeypatch.setenv("ANISO_FAST_CPU_ISA", isa)
    used = dispatch._C.cpu_isa()
    if used != isa:
        pytest.skip(f"this CPU has no {isa} (the kernels run {used})")


@needs_cpp
@pytest.mark.parametrize("isa", CPU_ISAS)
def test_separable_every_isa(isa, monkeypatch):
    """The separable tile loops are compiled for AVX-512, AVX+FMA and the baseline ISA and picked at run time: each
    variant this CPU has, on the benchmark sizes (whole vectors), an odd one (scalar tails) and every dtype."""
    cap_isa(monkeypatch, isa)
    for H, W in ((28, 28), (32, 32), (64, 64), (12, 20)):
        for i, dtype in enumerate(DTYPES):
            for two_band in (True, False):
                check_separable(dict(B=2, C=3, H=H, W=W, K=3, h=H // 2, w=W // 2, dtype=dtype,
                                     scalar_dtype=torch.float64, with_v=True, with_base=True, layout="contiguous",
                                     seed=H * W + i, two_band=two_band), "cpp")


def test_cpu_isa_cap(monkeypatch):
    """backends()["cpu_isa"] follows ANISO_FAST_CPU_ISA down to `base`, and an unknown value caps nothing."""
    if "cpp" not in CPU_BACKENDS:
        assert ops.backends()["cpu_isa"] is None
        return
    monkeypatch.delenv("ANISO_FAST_CPU_ISA", raising=False)
    widest = ops.backends()["cpu_isa"]
    assert widest in CPU_ISAS
    monkeypatch.setenv("ANISO_FAST_CPU_ISA", "base")
    assert ops.backends()["cpu_isa"] == "base"
    monkeypatch.setenv("ANISO_FAST_CPU_ISA", "bogus")
    assert ops.backends()["cpu_isa"] == widest


# ---------------------------------------------------------------- projector identities through the ops

def _projector_checks(combine, dot, x, K):
    onehot = torch.eye(K, dtype=torch.float64)
    B = x.shape[0]
    parts = []
    for k in range(K):
        ek = onehot[k].expand(B, K)
        p = combine(x, ek)
        torch.testing.assert_close(combine(p, ek), p, rtol=0, atol=1e-10)  # P_k^2 = P_k
        parts.append(p)
    torch.testing.assert_close(sum(parts), x, rtol=0, atol=1e-10)  # sum_k P_k = I
    for j in range(K):
        for k in range(j + 1, K):  # P_j P_k = 0
            torch.testing.assert_close(combine(parts[j], onehot[k].expand(B, K)), torch.zeros_like(x),
                                       rtol=0, atol=1e-10)
    norms = dot(x, x, K)
    torch.testing.assert_close(norms.sum(1), x.flatten(1).pow(2).sum(1), rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(norms, torch.stack([p.flatten(1).pow(2).sum(1) for p in parts], 1),
                               rtol=1e-10, atol=1e-10)
    assert bool((norms >= -1e-10).all())


@pytest.mark.parametrize("backend", CPU_BACKENDS + ([] if TRITON_SKIP else ["triton"]))
def test_projector_identities(backend):
    gen = torch.Generator().manual_seed(1)
    K = 3
    x = rand((2, 3, 12, 20), torch.float64, gen)
    CH, CW = dct_matrix(12)[:6], dct_matrix(20)[:9]
    band = torch.randint(0, K, (6, 9), generator=gen)
    _projector_checks(lambda u, a: ops.separable_combine(u, a, CH=CH, CW=CW, band=band, backend=backend),
                      lambda u, v, K: ops.separable_dot(u, v, CH=CH, CW=CW, band=band, K=K, backend=backend), x, K)
    for d in (12 * 20, 3 * 12 * 20):
        V = orthonormal_rows(3, 7, d, gen)
        vband = torch.tensor([0, 1, 2, 0, 1, 0, 1])
        ids = torch.tensor([2, 0])
        _projector_checks(
            lambda u, a: ops.lowrank_combine(u, a, V=V, vband=vband, ids=ids, backend=backend),
            lambda u, v, K: ops.lowrank_dot(u, v, V=V, vband=vband, K=K, ids=ids, backend=backend), x, K)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_edge_cases(backend):
    """K=1 (isotropic: plain scaling), every label in the complement, and an empty batch."""
    gen = torch.Generator().manual_seed(2)
    x = rand((2, 1, 8, 8), torch.float64, gen)
    CH = dct_matrix(8)[:4]
    s = torch.tensor([[2.0], [-1.0]], dtype=torch.float64)
    out = ops.separable_combine(x, s, CH=CH, CW=CH, band=torch.zeros(4, 4, dtype=torch.int64), backend=backend)
    torch.testing.assert_close(out, x * s[:, :, None, None])
    assert out.data_ptr() != x.data_ptr()
    a = scalars(2, 3, torch.float64, gen)
    out = ops.separable_combine(x, a, CH=CH, CW=CH, band=torch.full((4, 4), 2), backend=backend)
    torch.testing.assert_close(out, x * a[:, 2, None, None, None])
    V = orthonormal_rows(1, 3, 64, gen)
    empty = torch.empty(0, 1, 8, 8, dtype=torch.float64)
    assert ops.lowrank_combine(empty, torch.empty(0, 2, dtype=torch.float64), V=V, vband=torch.tensor([0, 1, 0]),
                               backend=backend).shape == empty.shape
    assert ops.lowrank_dot(empty, empty, V=V, vband=torch.tensor([0, 1, 0]), K=2, backend=backend).shape == (0, 2)


# ---------------------------------------------------------------- dispatch

def test_backends_report():
    info = ops.backends()
    assert "reference" in info["available"]
    assert info["cpu"] == ("cpp" if "cpp" in CPU_BACKENDS else "reference")
    assert info["cuda"] in ("triton", "cuda", "reference")
    for name, reasons in info["unavailable"].items():
        assert name in ops.BACKENDS and all(isinstance(r, str) and r for r in reasons.values())


def _spy(monkeypatch, name):
    calls = []
    original = getattr(ref, name)
    monkeypatch.setattr(ref, name, lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


def test_backend_choice(monkeypatch):
    x = torch.randn(2, 1, 8, 8)
    a = torch.rand(2, 2)
    basis = dict(CH=dct_matrix(8)[:4], CW=dct_matrix(8)[:4], band=torch.zeros(4, 4, dtype=torch.int64))
    calls = _spy(monkeypatch, "separable_combine")
    monkeypatch.delenv(ops.ENV_VAR, raising=False)
    ops.separable_combine(x, a, **basis)
    assert len(calls) == (0 if "cpp" in CPU_BACKENDS else 1)  # default for CPU: cpp when built
    ops.separable_combine(x, a, **basis, backend="reference")
    assert len(calls) == (1 if "cpp" in CPU_BACKENDS else 2)
    monkeypatch.setenv(ops.ENV_VAR, "reference")
    calls.clear()
    ops.separable_combine(x, a, **basis)
    assert len(calls) == 1 and ops.backends()["cpu"] == "reference"
    if "cpp" in CPU_BACKENDS:  # the argument wins over the environment
        ops.separable_combine(x, a, **basis, backend="cpp")
        assert len(calls) == 1


def test_unknown_or_unavailable_backend(monkeypatch):
    x = torch.randn(1, 1, 8, 8)
    basis = dict(CH=dct_matrix(8)[:4], CW=dct_matrix(8)[:4], band=torch.zeros(4, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"'fast'.*available for cpu tensors: \[.*'reference'"):
        ops.separable_combine(x, torch.rand(1, 2), **basis, backend="fast")
    with pytest.raises(ValueError, match=r"backend 'cuda' is not available.*available: \["):
        ops.separable_combine(x, torch.rand(1, 2), **basis, backend="cuda")
    monkeypatch.setenv(ops.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match=r"ANISO_FAST_BACKEND.*'bogus'"):
        ops.separable_dot(x, x, **basis, K=2)
    assert ops.backends()["cpu"] is None


# ---------------------------------------------------------------- bad inputs: never a native call

def _sep_inputs():
    u = torch.randn(2, 3, 8, 12)
    basis = dict(CH=dct_matrix(8)[:4].float(), CW=dct_matrix(12)[:5].float(), band=torch.arange(20).reshape(4, 5) % 2)
    return u, torch.rand(2, 2), basis


def _lr_inputs():
    u = torch.randn(2, 3, 8, 12)
    V = orthonormal_rows(3, 4, 96, torch.Generator().manual_seed(0)).float()
    return u, torch.rand(2, 2), dict(V=V, vband=torch.tensor([0, 1, 0, 1]), ids=torch.tensor([0, 2]))


def _bad_cases():
    u, a, sb = _sep_inputs()
    _, _, lb = _lr_inputs()
    sep = lambda **kw: lambda: ops.separable_combine(**{"u": u, "a": a, **sb, **kw})  # noqa: E731
    sdot = lambda **kw: lambda: ops.separable_dot(**{"u": u, "v": u, "K": 2, **sb, **kw})  # noqa: E731
    low = lambda **kw: lambda: ops.lowrank_combine(**{"u": u, "a": a, **lb, **kw})  # noqa: E731
    ldot = lambda **kw: lambda: ops.lowrank_dot(**{"u": u, "v": u, "K": 2, **lb, **kw})  # noqa: E731
    meta = torch.empty(u.shape, device="meta")
    return {
        "u not a tensor": (sep(u=u.numpy()), TypeError, "u"),
        "u 3-D": (sep(u=u[0]), ValueError, "u"),
        "u integer": (sep(u=u.long()), TypeError, "u"),
        "v shape": (sep(v=u[:, :2], c=a), ValueError, "v"),
        "v dtype": (sep(v=u.double(), c=a), TypeError, "v"),
        "v device": (sep(v=meta, c=a), ValueError, "v"),
        "base shape": (sep(base=u[:1]), ValueError, "base"),
        "base dtype": (sep(base=u.half()), TypeError, "base"),
        "v without c": (sep(v=u), ValueError, "v, c"),
        "c without v": (sep(c=a), ValueError, "v, c"),
        "a shape": (sep(a=torch.rand(3, 2)), ValueError, "a"),
        "a 1-D": (sep(a=torch.rand(2)), ValueError, "a"),
        "a K=0": (sep(a=torch.rand(2, 0)), ValueError, "a"),
        "a integer": (sep(a=torch.ones(2, 2, dtype=torch.int64)), TypeError, "a"),
        "a not a tensor": (sep(a=[[1.0, 2.0], [3.0, 4.0]]), TypeError, "a"),
        "c shape": (sep(v=u, c=torch.rand(2, 3)), ValueError, "c"),
        "CH width": (sep(CH=dct_matrix(9)[:4]), ValueError, "CH"),
        "CH 3-D": (sep(CH=sb["CH"][None]), ValueError, "CH"),
        "CH integer": (sep(CH=sb["CH"].long()), TypeError, "CH"),
        "CH too tall": (sep(CH=torch.rand(9, 8)), ValueError, "CH"),
        "CW width": (sep(CW=dct_matrix(8)[:5]), ValueError, "CW"),
        "CW device": (sep(CW=sb["CW"].to("meta")), ValueError, "CW"),
        "band shape": (sep(band=torch.zeros(4, 4, dtype=torch.int64)), ValueError, "band"),
        "band float": (sep(band=sb["band"].float()), TypeError, "band"),
        "band >= K": (sep(band=torch.full((4, 5), 2)), ValueError, "band"),
        "band < 0": (sep(band=torch.full((4, 5), -1)), ValueError, "band"),
        "dot band >= K": (sdot(K=1), ValueError, "band"),
        "dot K=0": (sdot(K=0), ValueError, "K"),
        "dot K float": (sdot(K=2.0), TypeError, "K"),
        "dot v shape": (sdot(v=u[:1]), ValueError, "v"),
        "V d": (low(V=lb["V"][:, :, :95]), ValueError, "V"),
        "V 2-D": (low(V=lb["V"][0]), ValueError, "V"),
        "V integer": (low(V=lb["V"].long()), TypeError, "V"),
        "vband length": (low(vband=torch.tensor([0, 1, 0])), ValueError, "vband"),
        "vband >= K": (low(vband=torch.tensor([0, 1, 2, 0])), ValueError, "vband"),
        "vband float": (low(vband=torch.tensor([0.0, 1, 0, 1])), TypeError, "vband"),
        "ids >= G": (low(ids=torch.tensor([0, 3])), ValueError, "ids"),
        "ids < 0": (low(ids=torch.tensor([-1, 0])), ValueError, "ids"),
        "ids shape": (low(ids=torch.tensor([0, 1, 2])), ValueError, "ids"),
        "ids float": (low(ids=torch.tensor([0.0, 1.0])), TypeError, "ids"),
        "ids missing with G>1": (low(ids=None), ValueError, "ids"),
        "ids device": (low(ids=lb["ids"].to("meta")), ValueError, "ids"),
        "dot ids >= G": (ldot(ids=torch.tensor([5, 0])), ValueError, "ids"),
        "dot vband >= K": (ldot(K=1), ValueError, "vband"),
    }


BAD = _bad_cases()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", list(BAD))
def test_bad_input(name, backend, monkeypatch):
    call, error, argument = BAD[name]
    monkeypatch.setenv(ops.ENV_VAR, backend)
    with pytest.raises(error, match=f"^{argument}"):
        call()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_label_check_sees_in_place_changes(backend):
    u, a, basis = _sep_inputs()
    ops.separable_combine(u, a, **basis, backend=backend)  # caches the label range of this band tensor
    basis["band"][0, 0] = 7
    with pytest.raises(ValueError, match="^band"):
        ops.separable_combine(u, a, **basis, backend=backend)
