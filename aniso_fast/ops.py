"""Dispatch layer for the subspace ops (docs/DESIGN.md, "The subspace op contract").

Every other module calls these four functions; this is the only module that will touch compiled code.
For now every backend resolves to the plain-PyTorch reference.
"""
from __future__ import annotations

from torch import Tensor

from . import reference

__all__ = ["separable_combine", "separable_dot", "lowrank_combine", "lowrank_dot", "backends"]


def separable_combine(u: Tensor, a: Tensor, v: Tensor | None = None, c: Tensor | None = None,
                      base: Tensor | None = None, *, CH: Tensor, CW: Tensor, band: Tensor,
                      backend: str | None = None) -> Tensor:
    return reference.separable_combine(u, a, v, c, base, CH=CH, CW=CW, band=band)


def separable_dot(u: Tensor, v: Tensor, *, CH: Tensor, CW: Tensor, band: Tensor, K: int,
                  backend: str | None = None) -> Tensor:
    return reference.separable_dot(u, v, CH=CH, CW=CW, band=band, K=K)


def lowrank_combine(u: Tensor, a: Tensor, v: Tensor | None = None, c: Tensor | None = None,
                    base: Tensor | None = None, *, V: Tensor, vband: Tensor, ids: Tensor | None = None,
                    backend: str | None = None) -> Tensor:
    return reference.lowrank_combine(u, a, v, c, base, V=V, vband=vband, ids=ids)


def lowrank_dot(u: Tensor, v: Tensor, *, V: Tensor, vband: Tensor, K: int, ids: Tensor | None = None,
                backend: str | None = None) -> Tensor:
    return reference.lowrank_dot(u, v, V=V, vband=vband, K=K, ids=ids)


def backends() -> dict:
    return {"available": ["reference"], "cpu": "reference", "cuda": "reference"}
