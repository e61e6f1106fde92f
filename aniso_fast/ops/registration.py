"""The `torch.library` custom ops (namespace `aniso_fast`) behind the public ops: one per (op, basis family), with a
fake implementation so that `torch.compile(fullgraph=True)` traces through them, and autograd formulas written with
the same custom ops, so double backward works (DESIGN.md, "The subspace op contract")."""
from __future__ import annotations

import torch

from . import reference
from .dispatch import OP_ARGS, run as run_kernel

__all__ = ["separable_combine_op", "separable_dot_op", "lowrank_combine_op", "lowrank_dot_op",
           "separable_block_op", "lowrank_block_op", "is_plain_eager", "EAGER"]

_COMBINE_ARGS = "Tensor u, Tensor a, Tensor? v, Tensor? c, Tensor? base"
_BLOCK_ARGS = "Tensor x, Tensor v, Tensor B, Tensor? base_x, Tensor? base_v"
_SCHEMAS = {
    "separable_combine": f"({_COMBINE_ARGS}, Tensor CH, Tensor CW, Tensor band, str backend) -> Tensor",
    "separable_dot": "(Tensor u, Tensor v, Tensor CH, Tensor CW, Tensor band, int K, str backend) -> Tensor",
    "lowrank_combine": f"({_COMBINE_ARGS}, Tensor V, Tensor vband, Tensor? ids, str backend) -> Tensor",
    "lowrank_dot": "(Tensor u, Tensor v, Tensor V, Tensor vband, Tensor? ids, int K, str backend) -> Tensor",
    "separable_block_combine": f"({_BLOCK_ARGS}, Tensor CH, Tensor CW, Tensor band, str backend) -> (Tensor, Tensor)",
    "lowrank_block_combine": f"({_BLOCK_ARGS}, Tensor V, Tensor vband, Tensor? ids, str backend) -> (Tensor, Tensor)",
}


def _custom_op(op: str):
    """`torch.library` op `aniso_fast::<op>`: the arguments of `OP_ARGS[op]`, then the backend's name."""
    def run(*args):
        return run_kernel(op, args[-1], *args[:-1])

    return torch.library.custom_op(f"aniso_fast::{op}", run, mutates_args=(), schema=_SCHEMAS[op])


(separable_combine_op, separable_dot_op, lowrank_combine_op, lowrank_dot_op, separable_block_op,
 lowrank_block_op) = map(_custom_op, OP_ARGS)


# Fake (meta) implementations: output shapes and dtypes only, for torch.compile / FakeTensor tracing.
def _combine_fake(u, a, v, c, base, basis0, basis1, basis2, backend):
    return torch.empty_like(u, memory_format=torch.contiguous_format)


def _dot_fake(u, v, basis0, basis1, basis2, K, backend):
    return u.new_empty((u.shape[0], K), dtype=reference.compute_dtype(u.dtype))


for _op in (separable_combine_op, lowrank_combine_op):
    _op.register_fake(_combine_fake)
for _op in (separable_dot_op, lowrank_dot_op):
    _op.register_fake(_dot_fake)


def _block_fake(x, v, B, base_x, base_v, basis0, basis1, basis2, backend):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(x, memory_format=torch.contiguous_format))


for _op in (separable_block_op, lowrank_block_op):
    _op.register_fake(_block_fake)


class _Family:
    """The two custom ops of one basis family with its three basis tensors bound ((CH, CW, band) or
    (V, vband, ids), the same position in both schemas): the autograd formulas are written with it."""

    def __init__(self, combine_op, dot_op, basis, backend):
        self.combine_op, self.dot_op, self.basis, self.backend = combine_op, dot_op, basis, backend

    def combine(self, u, a):
        return self.combine_op(u.contiguous(), a.contiguous(), None, None, None, *self.basis, self.backend)

    def dot(self, u, v, K):
        return self.dot_op(u.contiguous(), v.contiguous(), *self.basis, K, self.backend)


def _register_autograd(combine_op, dot_op, n_basis):
    """DESIGN.md: d/du = combine(g, a), d/dv = combine(g, c), d/da = dot(g, u), d/dc = dot(g, v), d/dbase = g;
    for dot: d/du = combine(v, G), d/dv = combine(u, G).

    `register_autograd` is enough for double backward here (torch 2.13): the backward only calls these custom ops,
    which are differentiable themselves, so create_graph=True records them; tests/test_ops_autograd.py checks it
    with gradgradcheck and against plain autograd of the reference. Basis tensors get no gradient."""

    def combine_setup(ctx, inputs, output):
        u, a, v, c, base = inputs[:5]
        ctx.basis, ctx.backend = inputs[5:5 + n_basis], inputs[-1]
        ctx.save_for_backward(u, a, v, c)

    def combine_backward(ctx, g):
        u, a, v, c = ctx.saved_tensors
        fam = _Family(combine_op, dot_op, ctx.basis, ctx.backend)
        need = ctx.needs_input_grad
        K = a.shape[1]
        gu = fam.combine(g, a) if need[0] else None
        ga = fam.dot(g, u, K) if need[1] else None
        gv = fam.combine(g, c) if v is not None and need[2] else None
        gc = fam.dot(g, v, K) if v is not None and need[3] else None
        gbase = g if need[4] else None
        return (gu, ga, gv, gc, gbase) + (None,) * (n_basis + 1)

    def dot_setup(ctx, inputs, output):
        u, v = inputs[:2]
        ctx.basis, ctx.backend = inputs[2:2 + n_basis], inputs[-1]
        ctx.save_for_backward(u, v)

    def dot_backward(ctx, G):
        u, v = ctx.saved_tensors
        fam = _Family(combine_op, dot_op, ctx.basis, ctx.backend)
        need = ctx.needs_input_grad
        gu = fam.combine(v, G) if need[0] else None
        gv = fam.combine(u, G) if need[1] else None
        return (gu, gv) + (None,) * (n_basis + 2)

    combine_op.register_autograd(combine_backward, setup_context=combine_setup)
    dot_op.register_autograd(dot_backward, setup_context=dot_setup)


_register_autograd(separable_combine_op, separable_dot_op, 3)
_register_autograd(lowrank_combine_op, lowrank_dot_op, 3)


def _register_block_autograd(block_op, dot_op, n_basis):
    """DESIGN.md op 3: (d/dx, d/dv) = block_combine(gx, gv, B^T), d/dB[:, k, i, j] = dot(in_j, g_i)[:, k]
    (in = (x, v), g = (gx, gv)), d/dbase_x = gx, d/dbase_v = gv; written with the custom ops (double backward)."""

    def setup(ctx, inputs, output):
        x, v, B = inputs[:3]
        ctx.basis, ctx.backend = inputs[5:5 + n_basis], inputs[-1]
        ctx.save_for_backward(x, v, B)

    def backward(ctx, gx, gv):
        x, v, B = ctx.saved_tensors
        need = ctx.needs_input_grad
        g = [t.contiguous() if t is not None else torch.zeros_like(x) for t in (gx, gv)]
        gin = [None, None]
        if need[0] or need[1]:
            gin = block_op(g[0], g[1], B.transpose(2, 3).contiguous(), None, None, *ctx.basis, ctx.backend)
        gB = None
        if need[2]:
            K, inputs = B.shape[1], (x, v)
            gB = torch.stack([torch.stack([dot_op(inputs[j], g[i], *ctx.basis, K, ctx.backend) for j in (0, 1)], -1)
                              for i in (0, 1)], -2)
        return (gin[0] if need[0] else None, gin[1] if need[1] else None, gB,
                g[0] if need[3] else None, g[1] if need[4] else None) + (None,) * (n_basis + 1)

    block_op.register_autograd(backward, setup_context=setup)


_register_block_autograd(separable_block_op, separable_dot_op, 3)
_register_block_autograd(lowrank_block_op, lowrank_dot_op, 3)


def is_plain_eager(*args) -> bool:
    """Whether a call with these arguments is plain eager work that nothing records or transforms: not traced
    (torch.compile, torch.jit.trace, a dispatch mode such as make_fx's), no torch.func transform or forward-mode AD
    level active, no tensor subclass (FakeTensor, Parameter), and no input that requires grad while grad mode is
    on. Anything else goes through the custom op, which handles it or refuses it."""
    if (torch.compiler.is_compiling() or torch.jit.is_tracing() or torch._C._are_functorch_transforms_active()
            or torch._C._len_torch_dispatch_stack() > 0 or torch.autograd.forward_ad._current_level >= 0):
        return False
    tensors = [t for t in args if isinstance(t, torch.Tensor)]
    if any(type(t) is not torch.Tensor for t in tensors):
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def _eager(op: str, op_def):
    """The op as the public functions call it: the backend's kernel itself for a plain eager call
    (`is_plain_eager`), the custom op otherwise. The same kernel runs either way; the direct call spares the custom
    op's dispatch, whose first call in a process imports torch._dynamo (about 1.5 s on a 2-core CPU: most of the
    warm-up of a 64-image sample job before this rule)."""
    def call(*args):
        if not is_plain_eager(*args):
            return op_def(*args)
        if torch.autograd.profiler._is_profiler_enabled:  # the profiler sees the op under its custom op's name
            with torch.profiler.record_function(f"aniso_fast::{op}"):
                return run_kernel(op, args[-1], *args[:-1])
        return run_kernel(op, args[-1], *args[:-1])

    call.__name__ = call.__qualname__ = op
    return call


# op name -> what the public functions call (ops/__init__.py)
EAGER = {op: _eager(op, op_def) for op, op_def in zip(OP_ARGS, (
    separable_combine_op, separable_dot_op, lowrank_combine_op, lowrank_dot_op, separable_block_op,
    lowrank_block_op))}
