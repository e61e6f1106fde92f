"""The one-step ODE and SDE solvers (METHOD §6.2): Euler, matrix Heun, and Euler-Maruyama on the reverse SDE.

Each is a loop over a `Grid` and accepts any `model` with `.basis` and `.flow(x, g, labels)` (an
`AnisoPrecond`-wrapped network, or the exact `GaussianMixture`). The flow ODE run in reverse is `dx = -dS F` with
`S = M^{1/2}`; `em` integrates the reverse SDE instead (docs/SOLVERS.md). Same signature as the multistep solvers.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .grids import Grid, step_indices

__all__ = ["euler", "heun", "em"]


def _at(g: Tensor, i: int, B: int) -> Tensor:
    return g[:, i].expand(B, -1)


def euler(model, x: Tensor, grid: Grid, labels: Tensor | None = None, *, progress: bool = False,
          callback: Callable[[dict], None] | None = None) -> Tensor:
    """Euler: x_b = x_a - (S_b - S_a) F(x_a). One network call per step."""
    basis, ids, B = model.basis, model.basis.group_ids(labels), x.shape[0]
    for i in step_indices(grid.num_steps, progress):
        g_a, g_b = _at(grid.g, i, B), _at(grid.g, i + 1, B)
        F_a = model.flow(x, g_a, labels)
        x = basis.combine(F_a, -(g_b.sqrt() - g_a.sqrt()), base=x, ids=ids)
        if callback is not None:
            callback({"i": i, "x": x, "g": g_b, "flow": F_a})
    return x


def heun(model, x: Tensor, grid: Grid, labels: Tensor | None = None, *, final_euler: bool = True,
         progress: bool = False, callback: Callable[[dict], None] | None = None) -> Tensor:
    """Matrix Heun (METHOD §6.2): secondary point s = the end point, or the midpoint when grid.g_sec is set.

    With `final_euler` the last step is Euler (EDM's convention: 2N-1 network calls for N steps, and no call
    at the end point, where sigma may be 0).
    """
    basis, ids, B = model.basis, model.basis.group_ids(labels), x.shape[0]
    N = grid.num_steps
    for i in step_indices(N, progress, calls_per_step=2, last_step_calls=1 if final_euler else 2):
        g_a, g_b = _at(grid.g, i, B), _at(grid.g, i + 1, B)
        g_s = g_b if grid.g_sec is None else _at(grid.g_sec, i, B)
        S_a, S_b, S_s = g_a.sqrt(), g_b.sqrt(), g_s.sqrt()
        F_a = model.flow(x, g_a, labels)
        if final_euler and i == N - 1:
            x = basis.combine(F_a, -(S_b - S_a), base=x, ids=ids)  # Euler step
        else:
            x_s = basis.combine(F_a, -(S_s - S_a), base=x, ids=ids)  # Euler predictor to s
            F_s = model.flow(x_s, g_s, labels)
            dS, R = S_b - S_a, (S_b - S_a) / (S_s - S_a)  # R = 1 at the end point
            x = basis.combine(F_a, -dS * (1 - R / 2), F_s, -dS * R / 2, base=x, ids=ids)  # x_a - dS[F_a + R/2 (F_s - F_a)]
        if callback is not None:
            callback({"i": i, "x": x, "g": g_b, "flow": F_a})
    return x


def em(model, x: Tensor, grid: Grid, labels: Tensor | None = None, *, noise: Callable[[], Tensor] | None = None,
       progress: bool = False, callback: Callable[[dict], None] | None = None) -> Tensor:
    """Euler-Maruyama on the reverse SDE of the matrix VE process, dx = -gdot score ds + sqrt(gdot) dW with
    score = M^{-1/2} F per subspace, each step's gdot ds taken as the grid's g_a - g_b:
    x_b = x_a + (g_a - g_b) g_a^{-1/2} F(x_a) + (g_a - g_b)^{1/2} xi. One network call per step, on any grid.

    `noise()` draws each step's standard normal xi like x (default `torch.randn_like`; `sample` passes per-seed
    generators, so a sample does not depend on the rest of the batch).
    """
    if grid.g_sec is not None:
        raise ValueError("grid: Euler-Maruyama uses no secondary points; build the grid with secondary='end'")
    basis, ids, B = model.basis, model.basis.group_ids(labels), x.shape[0]
    draw = noise if noise is not None else lambda: torch.randn_like(x)
    for i in step_indices(grid.num_steps, progress):
        g_a, g_b = _at(grid.g, i, B), _at(grid.g, i + 1, B)
        F_a = model.flow(x, g_a, labels)
        dg = g_a - g_b
        x = basis.combine(F_a, dg * g_a.rsqrt(), draw(), dg.sqrt(), base=x, ids=ids)
        if callback is not None:
            callback({"i": i, "x": x, "g": g_b, "flow": F_a})
    return x
