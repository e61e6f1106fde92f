"""Dispatch layer for the subspace ops (docs/DESIGN.md, "The subspace op contract").

Every other module calls the public functions below; this is the only module that touches compiled code.

Backends: `reference` (plain PyTorch, always), `cpp` (C++ CPU extension `aniso_fast._C`), `cuda` (CUDA kernels of
the same extension, when it was built with them), `triton` (`aniso_fast.kernels.subspace_triton`: CUDA tensors
when triton and a GPU exist, or any tensors under TRITON_INTERPRET=1, as in CI). Default: CPU tensors -> `cpp`
if built else `reference`; CUDA tensors -> `triton` if available else `cuda` else `reference`. The `backend=`
argument, then the environment variable ANISO_FAST_BACKEND, override the default; `backends()` shows the choice.

Each public function validates its arguments once (ValueError/TypeError naming the argument) and prepares them
for the backends (preconditions in csrc/subspace.h): u, v, base made contiguous (a copy for non-contiguous
views), scalars and basis tensors cast to the compute dtype (fp32, fp64 for fp64 inputs), labels and ids to
int64. It then calls a `torch.library` custom op (namespace `aniso_fast`) with a fake implementation, so
`torch.compile(fullgraph=True)` traces through it, and an autograd formula written with the same custom ops, so
double backward works. Outputs are always fresh tensors.
"""
from __future__ import annotations

import functools
import importlib
import os
import weakref

import torch
from torch import Tensor

from . import reference
from ..utils.checks import check_index

try:
    from .. import _C
    _C_ERROR = None
except ImportError as exc:  # source checkout without a build: the reference backend still works
    _C, _C_ERROR = None, f"aniso_fast._C is not built ({exc})"

__all__ = ["separable_combine", "separable_dot", "lowrank_combine", "lowrank_dot", "isotropic_combine", "isotropic_dot",
           "separable_block_combine", "lowrank_block_combine", "isotropic_block_combine", "backends", "BACKENDS"]

BACKENDS = ("reference", "cpp", "cuda", "triton")
ENV_VAR = "ANISO_FAST_BACKEND"


# ---------------------------------------------------------------- backend availability and choice

_triton_module = None
_triton_error = None


def _triton():
    """The Triton kernels module, imported on first use (importing triton is slow)."""
    global _triton_module, _triton_error
    if _triton_module is None and _triton_error is None:
        try:
            _triton_module = importlib.import_module("aniso_fast.kernels.subspace_triton")
        except Exception as exc:  # triton missing or broken: the backend is just unavailable
            _triton_error = f"aniso_fast.kernels.subspace_triton cannot be imported ({type(exc).__name__}: {exc})"
    return _triton_module


def _triton_block():
    """The Triton block_combine kernels (they reuse subspace_triton's helpers, so they import with it)."""
    return importlib.import_module("aniso_fast.kernels.block_triton")


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _unavailable(name: str, device_type: str) -> str | None:
    """Why backend `name` cannot run on tensors of `device_type`, or None if it can."""
    if name == "reference":
        return None
    if name == "cpp":
        if _C is None:
            return _C_ERROR
        return None if device_type == "cpu" else "it runs on CPU tensors only"
    if name == "cuda":
        if _C is None:
            return _C_ERROR
        if not getattr(_C, "with_cuda", False):
            return "aniso_fast._C was built without CUDA kernels (needs nvcc and a CUDA build of torch)"
        if device_type != "cuda":
            return "it runs on CUDA tensors only"
        return None if torch.cuda.is_available() else "no CUDA device"
    if name == "triton":
        if device_type == "cuda" and not torch.cuda.is_available():
            return "no CUDA device"
        if device_type != "cuda" and not _triton_interpreted():
            return "it runs on CUDA tensors, or on CPU tensors only under TRITON_INTERPRET=1"
        return None if _triton() is not None else _triton_error
    raise AssertionError(name)


def _available(device_type: str) -> list[str]:
    return [name for name in BACKENDS if _unavailable(name, device_type) is None]


def _default(device_type: str) -> str:
    order = ("cpp", "reference") if device_type == "cpu" else ("triton", "cuda", "reference")
    return next(name for name in order if _unavailable(name, device_type) is None)


def _resolve(backend: str | None, device: torch.device) -> str:
    source = "backend="
    if backend is None:
        backend, source = os.environ.get(ENV_VAR) or None, ENV_VAR
    if backend is None:
        return _default(device.type)
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"{source}: unknown backend {backend!r}; known backends are {list(BACKENDS)}, available for "
                         f"{device.type} tensors: {_available(device.type)}")
    why = _unavailable(backend, device.type)
    if why is not None:
        raise ValueError(f"{source}: backend {backend!r} is not available for {device.type} tensors ({why}); "
                         f"available: {_available(device.type)}")
    return backend


def backends() -> dict:
    """What is built and available, and which backend each device type uses by default (or by ANISO_FAST_BACKEND).

    Keys: `available` (backends usable for CPU or CUDA tensors), `cpu` and `cuda` (the backend a call without
    `backend=` picks; None when the environment override cannot run there), `unavailable` (backend -> reason,
    for CPU and CUDA tensors), `env` (ANISO_FAST_BACKEND or None), `triton_interpret`.
    """
    env = os.environ.get(ENV_VAR) or None
    picked = {}
    for device_type in ("cpu", "cuda"):
        try:
            picked[device_type] = _resolve(None, torch.device(device_type))
        except ValueError:
            picked[device_type] = None
    available = [n for n in BACKENDS if any(_unavailable(n, d) is None for d in ("cpu", "cuda"))]
    unavailable = {}
    for name in BACKENDS:
        reasons = {d: _unavailable(name, d) for d in ("cpu", "cuda")}
        if any(reasons.values()):
            unavailable[name] = {d: why for d, why in reasons.items() if why is not None}
    return {"available": available, "cpu": picked["cpu"], "cuda": picked["cuda"], "unavailable": unavailable,
            "env": env, "triton_interpret": _triton_interpreted()}


# ---------------------------------------------------------------- the dispatch table

# Each op's arguments in the positional order of the compiled kernels (csrc/bindings.cpp); the Python
# backends (reference, triton) take the same names as keywords.
_ARGS = {
    "separable_combine": ("u", "a", "v", "c", "base", "CH", "CW", "band"),
    "separable_dot": ("u", "v", "CH", "CW", "band", "K"),
    "lowrank_combine": ("u", "a", "v", "c", "base", "V", "vband", "ids"),
    "lowrank_dot": ("u", "v", "V", "vband", "ids", "K"),
    "separable_block_combine": ("x", "v", "B", "base_x", "base_v", "CH", "CW", "band"),
    "lowrank_block_combine": ("x", "v", "B", "base_x", "base_v", "V", "vband", "ids"),
}
_BLOCK_OPS = ("separable_block_combine", "lowrank_block_combine")  # Triton: kernels/block_triton.py


def _python_kernel(module, op: str):
    names = _ARGS[op]
    return lambda *args: getattr(module, op)(**dict(zip(names, args)))  # looked up per call: tests may patch it


_KERNELS = {  # backend -> op name -> the function that runs it on prepared arguments
    "cpp": lambda op: getattr(_C, f"{op}_cpu"),
    "cuda": lambda op: getattr(_C, f"{op}_cuda"),
    "triton": lambda op: _python_kernel(_triton_block() if op in _BLOCK_OPS else _triton(), op),
    "reference": lambda op: _python_kernel(reference, op),
}


@functools.cache
def _kernel(backend: str, op: str):
    """The function of `_KERNELS`, looked up once per (backend, op): no attribute lookups or closures per call."""
    return _KERNELS[backend](op)


def _run(op: str, backend: str, *args):
    return _kernel(backend, op)(*args)


# ---------------------------------------------------------------- custom ops, fake implementations, autograd

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
    """`torch.library` op `aniso_fast::<op>`: the arguments of `_ARGS[op]`, then the backend's name."""
    def run(*args):
        return _run(op, args[-1], *args[:-1])

    return torch.library.custom_op(f"aniso_fast::{op}", run, mutates_args=(), schema=_SCHEMAS[op])


(_separable_combine_op, _separable_dot_op, _lowrank_combine_op, _lowrank_dot_op, _separable_block_op,
 _lowrank_block_op) = map(_custom_op, _ARGS)


# Fake (meta) implementations: output shapes and dtypes only, for torch.compile / FakeTensor tracing.
def _combine_fake(u, a, v, c, base, basis0, basis1, basis2, backend):
    return torch.empty_like(u, memory_format=torch.contiguous_format)


def _dot_fake(u, v, basis0, basis1, basis2, K, backend):
    return u.new_empty((u.shape[0], K), dtype=reference.compute_dtype(u.dtype))


for _op in (_separable_combine_op, _lowrank_combine_op):
    _op.register_fake(_combine_fake)
for _op in (_separable_dot_op, _lowrank_dot_op):
    _op.register_fake(_dot_fake)


def _block_fake(x, v, B, base_x, base_v, basis0, basis1, basis2, backend):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(x, memory_format=torch.contiguous_format))


for _op in (_separable_block_op, _lowrank_block_op):
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


_register_autograd(_separable_combine_op, _separable_dot_op, 3)
_register_autograd(_lowrank_combine_op, _lowrank_dot_op, 3)


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


_register_block_autograd(_separable_block_op, _separable_dot_op, 3)
_register_block_autograd(_lowrank_block_op, _lowrank_dot_op, 3)


# ---------------------------------------------------------------- validation and preparation

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


_NAMES = {"u": "u", "a": "a", "v": "v", "c": "c", "base": "base"}


def _prepare_combine(u, a, v, c, base, names=None):
    """Checks and prepares combine's arguments; `names` maps u/a/v/c/base to the caller's own argument names
    (a basis's `scale(x, s)` reports `x` and `s`), so that errors name what the user passed."""
    n = {**_NAMES, **(names or {})}
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


def _prepare_separable(u, CH, CW, band, K, dt):
    H, W = u.shape[2], u.shape[3]
    CH = _check_basis("CH", CH, u, dt, 2, f"a [h<={H}, H={H}] tensor")
    CW = _check_basis("CW", CW, u, dt, 2, f"a [w<={W}, W={W}] tensor")
    if CH.shape[1] != H or not 1 <= CH.shape[0] <= H:
        raise ValueError(f"CH: expected shape [h<={H}, H={H}], got {tuple(CH.shape)}")
    if CW.shape[1] != W or not 1 <= CW.shape[0] <= W:
        raise ValueError(f"CW: expected shape [w<={W}, W={W}], got {tuple(CW.shape)}")
    band = _check_labels("band", band, (CH.shape[0], CW.shape[0]), K, u)
    return CH, CW, band


def _prepare_lowrank(u, V, vband, ids, K, dt):
    C, H, W = u.shape[1:]
    V = _check_basis("V", V, u, dt, 3, f"a [G, r, d] tensor with d = H*W = {H * W} or C*H*W = {C * H * W}")
    if V.shape[2] not in (H * W, C * H * W) or V.shape[0] < 1 or V.shape[1] < 1:
        raise ValueError(f"V: expected shape [G>=1, r>=1, d] with d = H*W = {H * W} or C*H*W = {C * H * W}, "
                         f"got {tuple(V.shape)}")
    vband = _check_labels("vband", vband, (V.shape[1],), K, u)
    ids = _check_ids(ids, u, V.shape[0])
    return V, vband, ids


def _prepare_block(x, v, B, base_x, base_v):
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


def _prepare_dot(u, v, K, names=None):
    n = {**_NAMES, **(names or {})}
    _check_image(u, n["u"])
    v = _check_like(n["v"], v, u, n["u"])
    return u.contiguous(), v, _check_K(K), reference.compute_dtype(u.dtype)


# ---------------------------------------------------------------- public API

def separable_combine(u: Tensor, a: Tensor, v: Tensor | None = None, c: Tensor | None = None,
                      base: Tensor | None = None, *, CH: Tensor, CW: Tensor, band: Tensor,
                      backend: str | None = None, names: dict[str, str] | None = None) -> Tensor:
    """`base + sum_k P_k (a[:, k] u + c[:, k] v)` for the separable basis (CH, CW, band); returns u.dtype."""
    u, a, v, c, base, dt = _prepare_combine(u, a, v, c, base, names)
    CH, CW, band = _prepare_separable(u, CH, CW, band, a.shape[1], dt)
    return _separable_combine_op(u, a, v, c, base, CH, CW, band, _resolve(backend, u.device))


def separable_dot(u: Tensor, v: Tensor, *, CH: Tensor, CW: Tensor, band: Tensor, K: int,
                  backend: str | None = None, names: dict[str, str] | None = None) -> Tensor:
    """`[B, K]`: `<P_k u_b, v_b>` for the separable basis; fp32 (fp64 for fp64 inputs)."""
    u, v, K, dt = _prepare_dot(u, v, K, names)
    CH, CW, band = _prepare_separable(u, CH, CW, band, K, dt)
    return _separable_dot_op(u, v, CH, CW, band, K, _resolve(backend, u.device))


def lowrank_combine(u: Tensor, a: Tensor, v: Tensor | None = None, c: Tensor | None = None,
                    base: Tensor | None = None, *, V: Tensor, vband: Tensor, ids: Tensor | None = None,
                    backend: str | None = None, names: dict[str, str] | None = None) -> Tensor:
    """`base + sum_k P_k (a[:, k] u + c[:, k] v)` for the low-rank basis V[ids] (one call for all groups)."""
    u, a, v, c, base, dt = _prepare_combine(u, a, v, c, base, names)
    V, vband, ids = _prepare_lowrank(u, V, vband, ids, a.shape[1], dt)
    return _lowrank_combine_op(u, a, v, c, base, V, vband, ids, _resolve(backend, u.device))


def lowrank_dot(u: Tensor, v: Tensor, *, V: Tensor, vband: Tensor, K: int, ids: Tensor | None = None,
                backend: str | None = None, names: dict[str, str] | None = None) -> Tensor:
    """`[B, K]`: `<P_k u_b, v_b>` for the low-rank basis V[ids]; fp32 (fp64 for fp64 inputs)."""
    u, v, K, dt = _prepare_dot(u, v, K, names)
    V, vband, ids = _prepare_lowrank(u, V, vband, ids, K, dt)
    return _lowrank_dot_op(u, v, V, vband, ids, K, _resolve(backend, u.device))


def isotropic_combine(u: Tensor, a: Tensor, v: Tensor | None = None, c: Tensor | None = None,
                      base: Tensor | None = None, *, names: dict[str, str] | None = None) -> Tensor:
    """K = 1 (P_0 = I): `base + a u + c v`, elementwise in the compute dtype (no kernel needed); returns u.dtype."""
    u, a, v, c, base, dt = _prepare_combine(u, a, v, c, base, names)
    if a.shape[1] != 1:
        raise ValueError(f"{(names or _NAMES).get('a', 'a')}: expected one subspace ([B, 1]), got {tuple(a.shape)}")
    out = a[:, :, None, None] * u.to(dt)
    if v is not None:
        out = out + c[:, :, None, None] * v.to(dt)
    if base is not None:
        out = out + base.to(dt)
    return out.to(u.dtype)


def isotropic_dot(u: Tensor, v: Tensor, *, names: dict[str, str] | None = None) -> Tensor:
    """`[B, 1]`: `<u_b, v_b>` in the compute dtype."""
    u, v, _, dt = _prepare_dot(u, v, 1, names)
    return (u.to(dt) * v.to(dt)).flatten(1).sum(1, keepdim=True)


def separable_block_combine(x: Tensor, v: Tensor, B: Tensor, base_x: Tensor | None = None,
                            base_v: Tensor | None = None, *, CH: Tensor, CW: Tensor, band: Tensor,
                            backend: str | None = None) -> tuple[Tensor, Tensor]:
    """`(x', v')`: `x' = base_x + sum_k P_k (B[:, k, 0, 0] x + B[:, k, 0, 1] v)`, `v'` likewise with row 1 of B
    [B, K, 2, 2], for the separable basis (CH, CW, band); both in x.dtype."""
    x, v, B, base_x, base_v, dt = _prepare_block(x, v, B, base_x, base_v)
    CH, CW, band = _prepare_separable(x, CH, CW, band, B.shape[1], dt)
    return _separable_block_op(x, v, B, base_x, base_v, CH, CW, band, _resolve(backend, x.device))


def lowrank_block_combine(x: Tensor, v: Tensor, B: Tensor, base_x: Tensor | None = None,
                          base_v: Tensor | None = None, *, V: Tensor, vband: Tensor, ids: Tensor | None = None,
                          backend: str | None = None) -> tuple[Tensor, Tensor]:
    """`(x', v')` of `separable_block_combine` for the low-rank basis V[ids] (one call for all groups)."""
    x, v, B, base_x, base_v, dt = _prepare_block(x, v, B, base_x, base_v)
    V, vband, ids = _prepare_lowrank(x, V, vband, ids, B.shape[1], dt)
    return _lowrank_block_op(x, v, B, base_x, base_v, V, vband, ids, _resolve(backend, x.device))


def isotropic_block_combine(x: Tensor, v: Tensor, B: Tensor, base_x: Tensor | None = None,
                            base_v: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """K = 1 (P_0 = I): `x' = base_x + B00 x + B01 v`, `v' = base_v + B10 x + B11 v`, elementwise in the compute
    dtype; both in x.dtype."""
    x, v, B, base_x, base_v, dt = _prepare_block(x, v, B, base_x, base_v)
    if B.shape[1] != 1:
        raise ValueError(f"B: expected one subspace ([B, 1, 2, 2]), got {tuple(B.shape)}")
    xc, vc, m = x.to(dt), v.to(dt), B[:, 0, :, :, None, None, None]
    outs = []
    for i, base in enumerate((base_x, base_v)):
        out = m[:, i, 0] * xc + m[:, i, 1] * vc
        outs.append((out if base is None else out + base.to(dt)).to(x.dtype))
    return tuple(outs)
