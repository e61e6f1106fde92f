"""What the OU process families (`vsdm.VSDMProcess`, `vsmd.VSMDProcess`) share: per-subspace values x_k learned
through `ln(1 - 2 x_k)`, so that `1 - 2 x_k > 0` (a contracting drift) holds whatever the optimiser does, and the
config round trip, the samplers' step-count check and time column."""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor, nn

from ..utils.checks import check_in_range, check_index
from ..geometry.schedules import as_time
from ..sampling.spec import MAX_NFE

__all__ = ["ProcessFamily", "check_steps", "time_column"]


def check_steps(steps: Any) -> int:
    """A sampler's step count: an int in [1, MAX_NFE] (ValueError naming `steps`)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_NFE:
        raise ValueError(f"steps: expected an int in [1, {MAX_NFE}], got {steps!r}")
    return steps


def time_column(t: float, B: int, device) -> Tensor:
    """One process time per sample, [B] float64 (the families' samplers call their models per sample)."""
    return torch.full((B,), float(t), dtype=torch.float64, device=device)


class ProcessFamily(nn.Module):
    """Base of the process families: subclasses give `config()` (their constructor arguments, JSON-able)."""

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
