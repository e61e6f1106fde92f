"""Autograd through the `aniso_fast` custom ops: gradcheck / gradgradcheck in float64 (small sizes), double backward
against plain-PyTorch autograd of the reference, no gradient for basis tensors, and torch.compile(fullgraph=True).

The backward formulas (docs/DESIGN.md) are registered with `torch.library.register_autograd` and written with the
same custom ops, so double backward goes through them again; gradgradcheck below is what verifies it.
"""
from __future__ import annotations

import pytest
import torch

from aniso_fast import ops
from aniso_fast.ops import reference as ref
from test_ops import CPU_BACKENDS, TRITON_SKIP, dct_matrix, orthonormal_rows

F64 = dict(dtype=torch.float64, requires_grad=True)


def _separable(K=3):
    gen = torch.Generator().manual_seed(0)
    basis = dict(CH=dct_matrix(4)[:3], CW=dct_matrix(3)[:2], band=torch.randint(0, K, (3, 2), generator=gen))
    return basis, (2, 2, 4, 3)


def _lowrank(joint, K=3):
    d = 2 * 4 * 3 if joint else 4 * 3
    gen = torch.Generator().manual_seed(1)
    basis = dict(V=orthonormal_rows(3, 5, d, gen), vband=torch.tensor([0, 1, 2, 0, 1]), ids=torch.tensor([2, 0]))
    return basis, (2, 2, 4, 3)


FAMILIES = {
    "separable": (_separable, ops.separable_combine, ops.separable_dot, ref.separable_combine, ref.separable_dot),
    "lowrank-spatial": (lambda: _lowrank(False), ops.lowrank_combine, ops.lowrank_dot, ref.lowrank_combine,
                        ref.lowrank_dot),
    "lowrank-joint": (lambda: _lowrank(True), ops.lowrank_combine, ops.lowrank_dot, ref.lowrank_combine,
                      ref.lowrank_dot),
}


def _inputs(shape, K=3, seed=0):
    torch.manual_seed(seed)
    B = shape[0]
    return (torch.randn(shape, **F64), torch.randn(B, K, **F64), torch.randn(shape, **F64),
            torch.randn(B, K, **F64), torch.randn(shape, **F64))


def _on(device, basis: dict, inputs: tuple) -> tuple[dict, tuple]:
    """The basis and the float64 leaf inputs on `device` (leaves again there)."""
    basis = {k: t.to(device) for k, t in basis.items()}
    return basis, tuple(t.detach().to(device).requires_grad_() for t in inputs)


# `device_backend` (tests/conftest.py): (device, backend) per backend of the --device
@pytest.mark.parametrize("family", list(FAMILIES))
def test_gradcheck_and_gradgradcheck(family, device_backend):
    """Full Jacobians for first order; gradgradcheck in fast mode (random projections) to stay quick."""
    device, backend = device_backend
    make, combine, dot, _, _ = FAMILIES[family]
    basis, shape = make()
    basis, (u, a, v, c, base) = _on(device, basis, _inputs(shape))
    f = lambda u, a, v, c, base: combine(u, a, v, c, base, **basis, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(f, (u, a, v, c, base))
    assert torch.autograd.gradgradcheck(f, (u, a, v, c, base), fast_mode=True)
    g = lambda u, v: dot(u, v, **basis, K=3, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(g, (u, v))
    assert torch.autograd.gradgradcheck(g, (u, v), fast_mode=True)


def _double_backward(combine, dot, basis, inputs, **kw):
    """A loss shaped like the schedule-gradient estimator (§5): gradients of a gradient, create_graph=True."""
    u, a, v, c, base = inputs
    y = combine(u, a, v, c, base, **basis, **kw)
    n = dot(y, y, **basis, K=a.shape[1], **kw)
    loss = (n * torch.linspace(0.5, 1.5, a.shape[1], dtype=n.dtype, device=n.device)).sum() + (y * u).sum()
    gu, ga = torch.autograd.grad(loss, (u, a), create_graph=True)
    second = torch.autograd.grad((gu.pow(2).sum() + ga.pow(3).sum()), inputs)
    return (loss, gu, ga) + second


def _check_double_backward(family, backend, device="cpu"):
    make, combine, dot, ref_combine, ref_dot = FAMILIES[family]
    basis, shape = make()
    inputs = _inputs(shape, seed=3)
    got = _double_backward(combine, dot, *_on(device, basis, inputs), backend=backend)
    want = _double_backward(ref_combine, ref_dot, basis, inputs)  # plain PyTorch autograd on the CPU, no custom op
    for g, w in zip(got, want):
        torch.testing.assert_close(g.cpu(), w, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_double_backward_matches_reference_autograd(family, device_backend):
    _check_double_backward(family, device_backend[1], device_backend[0])


@pytest.mark.skipif(TRITON_SKIP is not None, reason=f"triton backend unavailable: {TRITON_SKIP}")
@pytest.mark.parametrize("family", list(FAMILIES))
def test_double_backward_triton_interpreted(family):
    """Triton under TRITON_INTERPRET=1 on CPU tensors (tests/conftest.py)."""
    _check_double_backward(family, "triton")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_mixed_dtypes_and_basis_without_grad(backend):
    """fp32 images with fp64 scalars: gradients come back in each input's dtype; basis tensors get none."""
    basis, shape = _separable()
    basis = dict(basis, CH=basis["CH"].float().requires_grad_(), CW=basis["CW"].float())
    u = torch.randn(shape, requires_grad=True)
    a = torch.randn(shape[0], 3, dtype=torch.float64, requires_grad=True)
    y = ops.separable_combine(u, a, **basis, backend=backend)
    (y.pow(2).sum() + ops.separable_dot(y, u, **basis, K=3, backend=backend).sum()).backward()
    assert u.grad.dtype == torch.float32 and a.grad.dtype == torch.float64
    assert basis["CH"].grad is None
    uu = u.detach().double().requires_grad_()
    aa = a.detach().requires_grad_()
    basis64 = dict(basis, CH=basis["CH"].detach().double(), CW=basis["CW"].double())
    yy = ref.separable_combine(uu, aa, **basis64)
    (yy.pow(2).sum() + ref.separable_dot(yy, uu, **basis64, K=3).sum()).backward()
    torch.testing.assert_close(u.grad.double(), uu.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a.grad, aa.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_noncontiguous_grad_output(backend):
    """Upstream gradients may be expanded or permuted views; the backward makes them contiguous."""
    basis, shape = _lowrank(False)
    u, a = torch.randn(shape, **F64), torch.randn(shape[0], 3, **F64)
    y = ops.lowrank_combine(u, a, **basis, backend=backend)
    g = torch.randn(shape[0], shape[2], shape[3], shape[1], dtype=torch.float64).permute(0, 3, 1, 2)
    gu, ga = torch.autograd.grad(y, (u, a), g)
    yr = ref.lowrank_combine(u, a, **basis)
    wu, wa = torch.autograd.grad(yr, (u, a), g)
    torch.testing.assert_close(gu, wu)
    torch.testing.assert_close(ga, wa)


@pytest.mark.parametrize("backend", CPU_BACKENDS[-1:])  # cpp when built
def test_torch_compile_fullgraph(backend):
    """The custom ops trace without graph breaks (fake impls), forward and backward. aot_eager keeps it quick:
    it runs dynamo + AOTAutograd with the fake implementations but skips Inductor's C++ codegen."""
    torch._dynamo.reset()
    sep, shape = _separable(K=2)
    low, _ = _lowrank(True, K=2)
    low = dict(low, vband=torch.tensor([0, 1, 0, 0, 1]))

    def f(x, a):
        y = ops.separable_combine(x, a, x, a, CH=sep["CH"], CW=sep["CW"], band=sep["band"], backend=backend)
        z = ops.lowrank_combine(y, a, base=x, **low, backend=backend)
        return ops.separable_dot(z, x, **sep, K=2, backend=backend) + ops.lowrank_dot(z, z, **low, K=2,
                                                                                          backend=backend)

    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    a = torch.rand(shape[0], 2, dtype=torch.float64, requires_grad=True)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(x, a)
    torch.testing.assert_close(out, f(x, a))
    gx, ga = torch.autograd.grad(out.sum(), (x, a))
    wx, wa = torch.autograd.grad(f(x, a).sum(), (x, a))
    torch.testing.assert_close(gx, wx)
    torch.testing.assert_close(ga, wa)
