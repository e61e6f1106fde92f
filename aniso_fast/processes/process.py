"""What the OU processes (`vsdm.VSDMProcess`, `vsmd.VSMDProcess`) share: per-subspace values x_k learned through
`ln(1 - 2 x_k)`, so that `1 - 2 x_k > 0` (a contracting drift) holds whatever the optimiser does, the config round
trip, the samplers' step-count check and time column, and the backward paths of the alternating
rule with the path integral of its forward loss."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from ..utils.checks import check_in_range, check_index
from ..geometry.schedules import as_time
from ..sampling.spec import MAX_NFE

__all__ = ["ContractingProcess", "Trajectories", "check_steps", "time_column", "path_integral"]

_F64 = torch.float64


def check_steps(steps: Any) -> int:
    """A sampler's step count: an int in [1, MAX_NFE] (ValueError naming `steps`)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_NFE:
        raise ValueError(f"steps: expected an int in [1, {MAX_NFE}], got {steps!r}")
    return steps


def time_column(t: float, B: int, device) -> Tensor:
    """One process time per sample, [B] float64 (the families' samplers call their models per sample)."""
    return torch.full((B,), float(t), dtype=torch.float64, device=device)


@dataclass
class Trajectories:
    """Backward Euler-Maruyama paths, the alternating rule's training data (docs/METHOD.md §11.4, §12.4).

    t [N] process times, descending from T; dt [N] their step sizes; x [N, B, C, H, W] the states at t and z_b the
    frozen backward policy there (detached); final: x at t0; labels [B] or None. The phase space (VSMD) adds v and
    final_v. The recorded tensors are empty ([0, ...]) when the paths were not recorded.
    """
    t: Tensor
    dt: Tensor
    x: Tensor
    z_b: Tensor
    final: Tensor
    labels: Tensor | None
    v: Tensor | None = None
    final_v: Tensor | None = None


def path_integral(paths: Trajectories, z_f: Tensor, divergence: Tensor, zeta: float) -> Tensor:
    """sum_i dt_i mean_b [z_f . (1/2 z_f + z_b) + zeta div]: the forward SB loss on paths, with z_f [N B, ...] and
    the divergence [N B] flattened node-major as the paths."""
    N, B = paths.x.shape[:2]
    energy = (z_f * (0.5 * z_f + paths.z_b.flatten(0, 1))).flatten(1).sum(1).to(_F64)
    per_time = (energy + zeta * divergence).reshape(N, B).mean(1)
    return (paths.dt.to(per_time.device) * per_time).sum()


class ContractingProcess(nn.Module):
    """Base of the OU processes: subclasses give `config()` (their constructor arguments, JSON-able)."""

    @staticmethod
    def contracting_parameter(values: Tensor) -> nn.Parameter:
        """The unconstrained parameter `ln(1 - 2 x)` of values x < 1/2."""
        return nn.Parameter(torch.log1p(-2 * values).clone())

    @staticmethod
    def contracting_values(parameter: Tensor) -> Tensor:
        """x = (1 - e^p) / 2 < 1/2 from its parameter p."""
        return (1 - parameter.exp()) / 2

    def config(self) -> dict:
        raise NotImplementedError

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]):
        return cls(**cfg)

    def per_sample(self, values: Tensor, t: Any, labels: Tensor | None, what: str) -> tuple[Tensor | None, Tensor]:
        """(t [B] float64 in [0, T], or None when t is None; per-class `values` [S, K] picked by labels, [B, K] or
        [1, K]). Times and labels are checked here, once for both families."""
        if t is not None:
            t = as_time(t, values.device)
            check_in_range("t", t, 0.0, self.T, f"finite times in [0, T={self.T:g}]")
            if t.dim() > 1:
                raise ValueError(f"t: expected shape [B] or a scalar, got {tuple(t.shape)}")
        if self.num_classes is not None:
            if labels is None:
                raise ValueError(f"labels: required, this process has per-class {what} ({self.num_classes} classes)")
            if not isinstance(labels, Tensor) or labels.dim() != 1:
                raise ValueError(f"labels: expected an integer tensor [B], got "
                                 f"{tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__}")
            values = values[check_index("labels", labels, self.num_classes, "class labels")]
            if t is not None and t.dim() == 1 and t.shape[0] != labels.shape[0]:
                raise ValueError(f"t: batch size {t.shape[0]} does not match labels' {labels.shape[0]}")
        if t is None:
            return None, values
        t = t.expand(values.shape[0]) if t.dim() == 0 else t
        return t, values.expand(t.shape[0], -1)
