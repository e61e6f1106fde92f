"""`block_combine` (docs/DESIGN.md, op 3; issue 13 item 2) in every available backend against the float64 reference.

`[x'; v'] = base + sum_k P_k (B_k [x; v])`, B [B, K, 2, 2]. Same method and tolerances as tests/test_ops.py: inputs
drawn in the tested dtype, the reference sees those values upcast to float64. Triton runs interpreted on small
cases; gradcheck / gradgradcheck in float64 on small sizes.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from aniso_fast import ops
from aniso_fast.ops import reference as ref
from aniso_fast.geometry.bases import DCTBasis, IsotropicBasis, PCABasis
from test_ops import (CPU_BACKENDS, CPU_ISAS, DTYPES, SETTINGS, SIZES, TRITON_SKIP, assert_combine_close, cap_isa,
                      dct_matrix, f64, needs_cpp, needs_triton, on, orthonormal_rows, rand)

ALL_BACKENDS = CPU_BACKENDS + ([] if TRITON_SKIP else ["triton"])
EXAMPLES = {"reference": 8, "cpp": 30, "cuda": 30, "triton": 30}


def blocks(n, K, dtype, gen, layout="contiguous"):
    """[n, K, 2, 2] blocks; 'permuted' gives a non-contiguous view."""
    if layout == "contiguous":
        return torch.randn(n, K, 2, 2, dtype=dtype, generator=gen)
    return torch.randn(n, 2, 2, K, dtype=dtype, generator=gen).permute(0, 3, 1, 2)


@st.composite
def block_cases(draw, small=False):
    H, W = draw(st.sampled_from(SIZES[3:] if small else SIZES))
    return dict(
        B=draw(st.integers(1, 2 if small else 4)), C=draw(st.integers(1, 3)), H=H, W=W, K=draw(st.integers(1, 4)),
        dtype=draw(st.sampled_from(DTYPES)), block_dtype=draw(st.sampled_from([torch.float32, torch.float64])),
        with_bx=draw(st.booleans()), with_bv=draw(st.booleans()),
        layout=draw(st.sampled_from(["contiguous", "contiguous", "permuted", "sliced"])),
        hfrac=draw(st.sampled_from([1, 2, 4])), wfrac=draw(st.sampled_from([1, 2, 4])),
        joint=draw(st.booleans()), G=draw(st.integers(1, 3)), r=draw(st.integers(1, 6 if small else 24)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def images(case, gen):
    shape = (case["B"], case["C"], case["H"], case["W"])
    dtype, layout = case["dtype"], case["layout"]
    return dict(x=rand(shape, dtype, gen, layout), v=rand(shape, dtype, gen, layout),
                B=blocks(case["B"], case["K"], case["block_dtype"], gen, "permuted" if layout != "contiguous" else
                         "contiguous"),
                base_x=rand(shape, dtype, gen, layout) if case["with_bx"] else None,
                base_v=rand(shape, dtype, gen) if case["with_bv"] else None)


def basis_dtype(case):
    return torch.float64 if case["dtype"] == torch.float64 else torch.float32


def separable_basis(case, gen):
    H, W, K = case["H"], case["W"], case["K"]
    h, w = max(1, H // case["hfrac"]), max(1, W // case["wfrac"])
    band = torch.randint(0, K, (h, w), generator=gen)
    return dict(CH=dct_matrix(H)[:h].to(basis_dtype(case)), CW=dct_matrix(W)[:w].to(basis_dtype(case)), band=band)


def lowrank_basis(case, gen):
    C, H, W, K, G = case["C"], case["H"], case["W"], case["K"], case["G"]
    d = C * H * W if case["joint"] else H * W
    r = min(case["r"], d)
    ids = torch.randint(0, G, (case["B"],), generator=gen) if G > 1 else None
    return dict(V=orthonormal_rows(G, r, d, gen).to(basis_dtype(case)), vband=torch.randint(0, K, (r,), generator=gen),
                ids=ids)


def check(case, family, backend, device="cpu"):
    """The op on `device` against the float64 reference computed on the CPU."""
    gen = torch.Generator().manual_seed(case["seed"])
    args = images(case, gen)
    basis = separable_basis(case, gen) if family == "separable" else lowrank_basis(case, gen)
    op, ref_op = {"separable": (ops.separable_block_combine, ref.separable_block_combine),
                  "lowrank": (ops.lowrank_block_combine, ref.lowrank_block_combine)}[family]
    basis64 = {k: f64(t) if t is not None and t.is_floating_point() else t for k, t in basis.items()}
    expected = ref_op(*(f64(args[k]) for k in ("x", "v", "B", "base_x", "base_v")), **basis64)
    out = op(**on(device, args), **on(device, basis), backend=backend)
    assert isinstance(out, tuple) and len(out) == 2
    assert out[0].data_ptr() != out[1].data_ptr()
    for o, e in zip(out, expected):
        assert_combine_close(o.cpu(), e, case["dtype"], *(args.values() if device == "cpu" else ()))


@needs_cpp
@pytest.mark.parametrize("isa", CPU_ISAS)
def test_block_combine_every_isa(isa, monkeypatch):
    """Each instruction-set variant of the cpp kernels this CPU has (tests/test_ops.py, cap_isa): separable block
    loops on the benchmark sizes and an odd one; low-rank with one big basis (shared tiles) and per class."""
    cap_isa(monkeypatch, isa)
    for H, W in ((28, 28), (32, 32), (64, 64), (12, 20)):
        for i, dtype in enumerate(DTYPES):
            case = dict(B=2, C=3, H=H, W=W, K=3, dtype=dtype, block_dtype=torch.float64, with_bx=True, with_bv=True,
                        layout="contiguous", hfrac=2, wfrac=2, joint=False, G=1, r=min(H * W // 4, 260),
                        seed=H * W + i)
            check(case, "separable", "cpp")
            check({**case, "r": 24}, "lowrank", "cpp")
            check({**case, "G": 3, "r": 24}, "lowrank", "cpp")


# `device_backend` (tests/conftest.py): (device, backend) per backend of the --device
@pytest.mark.parametrize("family", ["separable", "lowrank"])
def test_block_combine_matches_reference(family, device_backend):
    device, backend = device_backend
    settings(SETTINGS, max_examples=EXAMPLES[backend])(given(case=block_cases())(
        lambda case: check(case, family, backend, device)))()


@needs_triton
@pytest.mark.parametrize("family", ["separable", "lowrank"])
def test_block_combine_triton_matches_reference(family):
    settings(SETTINGS, max_examples=6)(given(case=block_cases(small=True))(
        lambda case: check(case, family, "triton")))()


def _small_bases(gen, K=3, shape=(3, 2, 12, 20)):
    _, C, H, W = shape
    sep = dict(CH=dct_matrix(H)[:6], CW=dct_matrix(W)[:9], band=torch.randint(0, K, (6, 9), generator=gen))
    low = {joint: dict(V=orthonormal_rows(3, 7, (C if joint else 1) * H * W, gen),
                       vband=torch.tensor([0, 1, 2, 0, 1, 0, 2]) % K, ids=torch.tensor([2, 0, 2]))
           for joint in (False, True)}
    return [(ops.separable_block_combine, ops.separable_combine, sep),
            (ops.lowrank_block_combine, ops.lowrank_combine, low[False]),
            (ops.lowrank_block_combine, ops.lowrank_combine, low[True])]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_block_combine_equals_two_combines(backend):
    """The contract: block_combine is two combine calls sharing (u=x, v=v), row i of B as (a, c)."""
    gen = torch.Generator().manual_seed(5)
    x, v, bx, bv = (rand((3, 2, 12, 20), torch.float64, gen) for _ in range(4))
    B = torch.randn(3, 3, 2, 2, dtype=torch.float64, generator=gen)
    for block, combine, basis in _small_bases(gen):
        ox, ov = block(x, v, B, bx, bv, **basis, backend=backend)
        ex = combine(x, B[:, :, 0, 0], v, B[:, :, 0, 1], bx, **basis, backend=backend)
        ev = combine(x, B[:, :, 1, 0], v, B[:, :, 1, 1], bv, **basis, backend=backend)
        torch.testing.assert_close(ox, ex, rtol=0, atol=1e-12)
        torch.testing.assert_close(ov, ev, rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_edge_cases(backend):
    """K = 1 (one block for the whole image), every label in the complement, an empty batch."""
    gen = torch.Generator().manual_seed(6)
    x, v = rand((2, 1, 8, 8), torch.float64, gen), rand((2, 1, 8, 8), torch.float64, gen)
    CH = dct_matrix(8)[:4]
    B1 = torch.randn(2, 1, 2, 2, dtype=torch.float64, generator=gen)
    want = ops.isotropic_block_combine(x, v, B1)
    got = ops.separable_block_combine(x, v, B1, CH=CH, CW=CH, band=torch.zeros(4, 4, dtype=torch.int64),
                                      backend=backend)
    for g, w, i in zip(got, want, (0, 1)):
        torch.testing.assert_close(g, w)
        torch.testing.assert_close(w, B1[:, 0, i, 0, None, None, None] * x + B1[:, 0, i, 1, None, None, None] * v)
    B3 = torch.randn(2, 3, 2, 2, dtype=torch.float64, generator=gen)
    got = ops.separable_block_combine(x, v, B3, CH=CH, CW=CH, band=torch.full((4, 4), 2), backend=backend)
    torch.testing.assert_close(got[1], B3[:, 2, 1, 0, None, None, None] * x + B3[:, 2, 1, 1, None, None, None] * v)
    empty = torch.empty(0, 1, 8, 8, dtype=torch.float64)
    V = orthonormal_rows(1, 3, 64, gen)
    out = ops.lowrank_block_combine(empty, empty, torch.empty(0, 2, 2, 2, dtype=torch.float64), V=V,
                                    vband=torch.tensor([0, 1, 0]), backend=backend)
    assert [o.shape for o in out] == [empty.shape, empty.shape]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("ids_kind", ["interleaved", "one_group", "none"])
def test_lowrank_batches_spanning_many_tiles(backend, dtype, ids_kind):
    """More than one tile per group (the cpp kernel cuts id-sorted samples into tiles of <= 64 rows): gathered tiles,
    tiles read and written in place, no ids; spatial and joint bases."""
    gen = torch.Generator().manual_seed(10)
    n, C, H, W, K, G = 70, 3, 8, 8, 3, 4
    x, v, bx, bv = (rand((n, C, H, W), dtype, gen) for _ in range(4))
    B = torch.randn(n, K, 2, 2, generator=gen)
    ids = {"interleaved": torch.arange(n) % G, "one_group": torch.full((n,), 2), "none": None}[ids_kind]
    for d in (H * W, C * H * W):
        V = orthonormal_rows(G if ids is not None else 1, 24, d, gen).to(ref.compute_dtype(dtype))
        basis = dict(V=V, vband=torch.randint(0, K, (24,), generator=gen), ids=ids)
        expected = ref.lowrank_block_combine(f64(x), f64(v), f64(B), f64(bx), f64(bv), **dict(basis, V=f64(V)))
        out = ops.lowrank_block_combine(x, v, B, bx, bv, **basis, backend=backend)
        for o, e in zip(out, expected):
            assert_combine_close(o, e, dtype, x, v, bx, bv)


@needs_triton
def test_triton_autotune_specs_are_valid():
    """The autotune configs of the block kernels (applied only where a CUDA driver exists) name real arguments."""
    import triton

    from aniso_fast.kernels import block_triton

    assert len(block_triton._TUNING) == 3
    for name, (fn, configs, key) in block_triton._TUNING.items():
        triton.autotune(configs=configs, key=key)(fn)  # raises on a key that is not an argument
        for cfg in configs:
            assert set(cfg.kwargs) <= set(fn.arg_names), name


# ---------------------------------------------------------------- autograd

def _grad_inputs(shape=(2, 2, 4, 3), K=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x, v, bx, bv = (torch.randn(shape, dtype=torch.float64, generator=gen).requires_grad_() for _ in range(4))
    return x, v, torch.randn(shape[0], K, 2, 2, dtype=torch.float64, generator=gen).requires_grad_(), bx, bv


def _grad_families():
    gen = torch.Generator().manual_seed(1)
    sep = dict(CH=dct_matrix(4)[:3], CW=dct_matrix(3)[:2], band=torch.randint(0, 3, (3, 2), generator=gen))
    spatial = dict(V=orthonormal_rows(3, 5, 12, gen), vband=torch.tensor([0, 1, 2, 0, 1]), ids=torch.tensor([2, 0]))
    joint = dict(V=orthonormal_rows(3, 5, 24, gen), vband=torch.tensor([0, 1, 2, 0, 1]), ids=torch.tensor([2, 0]))
    return {"separable": (ops.separable_block_combine, ref.separable_block_combine, sep),
            "lowrank-spatial": (ops.lowrank_block_combine, ref.lowrank_block_combine, spatial),
            "lowrank-joint": (ops.lowrank_block_combine, ref.lowrank_block_combine, joint)}


GRAD_FAMILIES = _grad_families()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("family", list(GRAD_FAMILIES))
def test_gradcheck_and_gradgradcheck(family, backend):
    op, _, basis = GRAD_FAMILIES[family]
    f = lambda *a: op(*a, **basis, backend=backend)  # noqa: E731
    inputs = _grad_inputs()
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs, fast_mode=True)


def _double_backward(op, basis, inputs, **kw):
    """A loss of both outputs; gradients of a gradient (create_graph=True), as the estimator (§5) needs."""
    x, v, B, bx, bv = inputs
    ox, ov = op(x, v, B, bx, bv, **basis, **kw)
    loss = (ox * x).sum() + ov.pow(2).sum() + (ox * ov).sum()
    gx, gB = torch.autograd.grad(loss, (x, B), create_graph=True)
    return (loss, gx, gB) + torch.autograd.grad(gx.pow(2).sum() + gB.pow(3).sum(), inputs)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("family", list(GRAD_FAMILIES))
def test_double_backward_matches_reference_autograd(family, backend):
    op, ref_op, basis = GRAD_FAMILIES[family]
    inputs = _grad_inputs(seed=3)
    got = _double_backward(op, basis, inputs, backend=backend)
    want = _double_backward(ref_op, basis, inputs)  # plain PyTorch autograd, no custom op
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_one_output_used_and_fp32_with_fp64_blocks(backend):
    """Only v' in the loss (x's upstream gradient is None); fp32 images with fp64 B keep each input's dtype."""
    op, ref_op, basis = GRAD_FAMILIES["lowrank-spatial"]
    x, v, B, _, _ = _grad_inputs(seed=4)
    x32, v32 = x.detach().float().requires_grad_(), v.detach().float().requires_grad_()
    basis32 = dict(basis, V=basis["V"].float())
    _, ov = op(x32, v32, B, **basis32, backend=backend)
    gx, gv, gB = torch.autograd.grad(ov.pow(2).sum(), (x32, v32, B))
    assert gx.dtype == torch.float32 and gB.dtype == torch.float64
    want = torch.autograd.grad(ref_op(x, v, B, **basis)[1].pow(2).sum(), (x, v, B))
    for g, w in zip((gx, gv, gB), want):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", CPU_BACKENDS[-1:])  # cpp when built
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    op, _, basis = GRAD_FAMILIES["separable"]
    x, v, B, bx, _ = _grad_inputs(seed=7)

    def f(x, v, B):
        ox, ov = op(x, v, B, bx, None, **basis, backend=backend)
        return (ox * ov).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, v, B), f(x, v, B))
    got = torch.autograd.grad(compiled(x, v, B), (x, v, B))
    want = torch.autograd.grad(f(x, v, B), (x, v, B))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


# ---------------------------------------------------------------- bases

@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_basis_block_combine(backend):
    gen = torch.Generator().manual_seed(8)
    x, v, bx = (rand((4, 1, 8, 8), torch.float64, gen) for _ in range(3))
    labels = torch.tensor([0, 1, 2, 1])
    pca = PCABasis(orthonormal_rows(3, 6, 64, gen), (1, 8, 8), band_sizes=[2, 4],
                   class_to_group=torch.arange(3))
    for basis, ids in ((DCTBasis(8, 8, bands=(2, 4)), None), (pca, pca.group_ids(labels)), (IsotropicBasis(), None)):
        K = basis.num_subspaces
        B = torch.randn(4, K, 2, 2, dtype=torch.float64, generator=gen)
        ox, ov = basis.block_combine(x, v, B, bx, ids=ids, backend=backend)
        torch.testing.assert_close(ox, basis.combine(x, B[:, :, 0, 0], v, B[:, :, 0, 1], bx, ids=ids, backend=backend))
        torch.testing.assert_close(ov, basis.combine(x, B[:, :, 1, 0], v, B[:, :, 1, 1], ids=ids, backend=backend))
        with pytest.raises(ValueError, match=r"^B: expected one 2x2 block per subspace"):
            basis.block_combine(x, v, torch.zeros(4, K + 1, 2, 2), ids=ids, backend=backend)
    with pytest.raises(ValueError, match=r"^x: image size"):
        DCTBasis(8, 8, bands=(2, 4)).block_combine(x[..., :6], v[..., :6], torch.zeros(4, 3, 2, 2))
    with pytest.raises(ValueError, match=r"^ids"):
        pca.block_combine(x, v, torch.zeros(4, 3, 2, 2))


# ---------------------------------------------------------------- bad input: errors name the argument

def _bad_cases():
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(2, 3, 8, 12)
    B = torch.randn(2, 2, 2, 2)
    sb = dict(CH=dct_matrix(8)[:4].float(), CW=dct_matrix(12)[:5].float(), band=torch.arange(20).reshape(4, 5) % 2)
    lb = dict(V=orthonormal_rows(3, 4, 96, gen).float(), vband=torch.tensor([0, 1, 0, 1]), ids=torch.tensor([0, 2]))
    sep = lambda **kw: lambda: ops.separable_block_combine(**{"x": x, "v": x, "B": B, **sb, **kw})  # noqa: E731
    low = lambda **kw: lambda: ops.lowrank_block_combine(**{"x": x, "v": x, "B": B, **lb, **kw})  # noqa: E731
    iso = lambda **kw: lambda: ops.isotropic_block_combine(**{"x": x, "v": x, "B": B[:, :1], **kw})  # noqa: E731
    return {
        "x not a tensor": (sep(x=x.numpy()), TypeError, "x"),
        "x 3-D": (sep(x=x[0]), ValueError, "x"),
        "x integer": (sep(x=x.long()), TypeError, "x"),
        "v missing": (sep(v=None), TypeError, "v"),
        "v shape": (sep(v=x[:, :2]), ValueError, "v"),
        "v dtype": (sep(v=x.double()), TypeError, "v"),
        "v device": (sep(v=torch.empty(x.shape, device="meta")), ValueError, "v"),
        "B not a tensor": (sep(B=B.tolist()), TypeError, "B"),
        "B [B, K]": (sep(B=B[:, :, 0, 0]), ValueError, "B"),
        "B 3x2 blocks": (sep(B=torch.randn(2, 2, 3, 2)), ValueError, "B"),
        "B batch": (sep(B=B[:1]), ValueError, "B"),
        "B K=0": (sep(B=B[:, :0]), ValueError, "B"),
        "B integer": (sep(B=B.long()), TypeError, "B"),
        "B device": (sep(B=B.to("meta")), ValueError, "B"),
        "base_x shape": (sep(base_x=x[:1]), ValueError, "base_x"),
        "base_v dtype": (sep(base_v=x.half()), TypeError, "base_v"),
        "band >= K": (sep(B=B[:, :1]), ValueError, "band"),
        "CH width": (sep(CH=dct_matrix(9)[:4]), ValueError, "CH"),
        "vband >= K": (low(B=B[:, :1]), ValueError, "vband"),
        "ids >= G": (low(ids=torch.tensor([0, 3])), ValueError, "ids"),
        "ids missing": (low(ids=None), ValueError, "ids"),
        "V d": (low(V=lb["V"][:, :, :95]), ValueError, "V"),
        "isotropic K=2": (iso(B=B), ValueError, "B"),
        "isotropic base_v": (iso(base_v=x[0]), ValueError, "base_v"),
    }


BAD = _bad_cases()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", list(BAD))
def test_bad_input(name, backend, monkeypatch):
    call, error, argument = BAD[name]
    monkeypatch.setenv(ops.ENV_VAR, backend)
    with pytest.raises(error, match=f"^{argument}"):
        call()
