"""Which backend runs a subspace op, and the one table from a backend to its kernels: the only module that touches
compiled code (`aniso_fast._C`) and the Triton kernels (`aniso_fast.kernels`).

Backends: `reference` (plain PyTorch, always), `cpp` (C++ CPU extension `aniso_fast._C`), `cuda` (CUDA kernels of
the same extension, when it was built with them), `triton` (`aniso_fast.kernels.subspace_triton`: CUDA tensors
when triton and a GPU exist, or any tensors under TRITON_INTERPRET=1, as in CI). Default: CPU tensors -> `cpp`
if built else `reference`; CUDA tensors -> `triton` if available else `cuda` else `reference`. The `backend=`
argument, then the environment variable ANISO_FAST_BACKEND, override the default; `backends()` shows the choice.
"""
from __future__ import annotations

import functools
import importlib
import os

import torch

from . import reference
from .build import load_extension

_C, _C_ERROR = load_extension()

__all__ = ["BACKENDS", "ENV_VAR", "OP_ARGS", "backends", "resolve", "run"]

BACKENDS = ("reference", "cpp", "cuda", "triton")
ENV_VAR = "ANISO_FAST_BACKEND"

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


def resolve(backend: str | None, device: torch.device) -> str:
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


def _cpu_isa() -> str | None:
    isa = getattr(_C, "cpu_isa", None)  # None without the extension (or with one built before it had cpu_isa)
    return isa() if isa is not None else None


def backends() -> dict:
    """What is built and available, and which backend each device type uses by default (or by ANISO_FAST_BACKEND).

    Keys: `available` (backends usable for CPU or CUDA tensors), `cpu` and `cuda` (the backend a call without
    `backend=` picks; None when the environment override cannot run there), `unavailable` (backend -> reason,
    for CPU and CUDA tensors), `env` (ANISO_FAST_BACKEND or None), `triton_interpret`, `cpu_isa` (the instruction
    set of the cpp kernels: `avx512`, `avx` or `base`, the CPU's widest capped by ANISO_FAST_CPU_ISA; None without
    the extension).
    """
    env = os.environ.get(ENV_VAR) or None
    picked = {}
    for device_type in ("cpu", "cuda"):
        try:
            picked[device_type] = resolve(None, torch.device(device_type))
        except ValueError:
            picked[device_type] = None
    available = [n for n in BACKENDS if any(_unavailable(n, d) is None for d in ("cpu", "cuda"))]
    unavailable = {}
    for name in BACKENDS:
        reasons = {d: _unavailable(name, d) for d in ("cpu", "cuda")}
        if any(reasons.values()):
            unavailable[name] = {d: why for d, why in reasons.items() if why is not None}
    return {"available": available, "cpu": picked["cpu"], "cuda": picked["cuda"], "unavailable": unavailable,
            "env": env, "triton_interpret": _triton_interpreted(), "cpu_isa": _cpu_isa()}


# Each op's arguments in the positional order of the compiled kernels (csrc/bindings.cpp); the Python
# backends (reference, triton) take the same names as keywords.
OP_ARGS = {
    "separable_combine": ("u", "a", "v", "c", "base", "CH", "CW", "band"),
    "separable_dot": ("u", "v", "CH", "CW", "band", "K"),
    "lowrank_combine": ("u", "a", "v", "c", "base", "V", "vband", "ids"),
    "lowrank_dot": ("u", "v", "V", "vband", "ids", "K"),
    "separable_block_combine": ("x", "v", "B", "base_x", "base_v", "CH", "CW", "band"),
    "lowrank_block_combine": ("x", "v", "B", "base_x", "base_v", "V", "vband", "ids"),
}
_BLOCK_OPS = ("separable_block_combine", "lowrank_block_combine")  # Triton: kernels/block_triton.py


def _python_kernel(module, op: str):
    names = OP_ARGS[op]
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


def run(op: str, backend: str, *args):
    return _kernel(backend, op)(*args)
