"""Value checks that the API boundaries share: class labels and group ids in range, times in [0, T], ints and
finite numbers (process constants).

On CPU tensors a failed check raises ValueError naming the argument and the offending values. On accelerator
tensors, and while `torch.compile` traces, it is a `torch._assert_async`: no host-device sync in the
sampling and training loops, and still no silent wrong answer (a negative label would otherwise index from the
end of a table).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor

__all__ = ["check_index", "check_in_range", "check_int", "check_subspace_values", "check_number"]


def _deferred(t: Tensor) -> bool:
    return t.device.type != "cpu" or torch.compiler.is_compiling()


def check_in_range(name: str, t: Tensor, low: float, high: float, expected: str) -> None:
    """Every value of t finite and in [low, high]; `expected` words the rule for the message."""
    if t.numel() == 0:
        return
    ok = torch.isfinite(t).all() & (t >= low).all() & (t <= high).all()
    if _deferred(t):
        torch._assert_async(ok, f"{name}: expected {expected}")
    elif not bool(ok):
        bad = t[~(torch.isfinite(t) & (t >= low) & (t <= high))].flatten()[:4].tolist()
        raise ValueError(f"{name}: expected {expected}, got {', '.join(f'{v:g}' for v in bad)}"
                         + (" ..." if int((~(torch.isfinite(t) & (t >= low) & (t <= high))).sum()) > 4 else ""))


def check_index(name: str, t, n: int, what: str = "values") -> Tensor:
    """An integer tensor of any shape with every value in [0, n); returned as int64."""
    if not isinstance(t, Tensor) or t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        got = t.dtype if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{name}: expected an integer tensor of {what} in [0, {n}), got {got}")
    if t.numel() > 0:
        ok = ((t >= 0) & (t < n)).all()
        if _deferred(t):
            torch._assert_async(ok, f"{name}: expected {what} in [0, {n})")
        elif not bool(ok):
            raise ValueError(f"{name}: expected {what} in [0, {n}), got values in [{int(t.min())}, {int(t.max())}]")
    return t.long()


def check_int(name: str, value, minimum: int = 1, *, optional: bool = False) -> int | None:
    """A Python int (not a bool) >= minimum, or None when `optional`."""
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected {'None or ' if optional else ''}an int >= {minimum}, got {value!r}")
    return value


def check_number(name: str, value: Any, expected: str, ok: Callable[[float], bool]) -> float:
    """A finite Python int or float (not a bool) for which `ok` holds, returned as float; `expected` words the rule."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
        raise ValueError(f"{name}: expected {expected}, got {value!r}")
    return float(value)


def check_subspace_values(name: str, value: Any, shape: tuple[int, int], what: str, rule: str,
                          ok: Callable[[Tensor], Tensor]) -> Tensor:
    """A number or array of per-subspace values (`what`), broadcast to [S, K] float64 (S classes, K subspaces);
    every value finite and `ok` (elementwise), else ValueError naming `name` and the `rule`."""
    try:
        values = torch.as_tensor(value, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{name}: expected a number or an array of {what}, got {type(value).__name__}") from None
    try:
        values = values.expand(shape)
    except RuntimeError:
        per_class = ", per class" if shape[0] > 1 else ""
        raise ValueError(f"{name}: expected {what} of shape [{shape[1]}] or [{shape[0]}, {shape[1]}] (one per "
                         f"subspace{per_class}), got {tuple(values.shape)}") from None
    bad = values[~(torch.isfinite(values) & ok(values))]
    if bad.numel():
        raise ValueError(f"{name}: expected {rule}, got {', '.join(f'{v:g}' for v in bad[:4].tolist())}")
    return values
