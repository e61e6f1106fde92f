"""Noise schedules: the monotone log-linear knot schedule (docs/METHOD.md §2.1-2.2), K-subspace matrix schedules with
optional per-class parameters (§1.2, §8), and the geometric mean with its bisection inverse (§2.5).

All schedule math is float64. `forward` is free of `.item()` and Python branches on tensor values. Times must be
finite and in [0, T] and class labels in [0, num_classes): checked on every call (`aniso_fast.checks`: a
ValueError on CPU tensors, an asynchronous device assert elsewhere, so no host sync in the loops).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..utils.checks import check_in_range, check_index, check_int

__all__ = ["karras_sigmas", "KnotSchedule", "MatrixSchedule", "as_time"]

_F64 = torch.float64
_INCREMENT_EPS = 1e-8  # added to every softplus increment (§2.1)


def karras_sigmas(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                  dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> Tensor:
    """EDM's rho-grid (§6.1 without the appended 0), descending: `sigma_max` first, `sigma_min` last."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    if not rho > 0:
        raise ValueError(f"rho must be > 0, got {rho}")
    ramp = torch.arange(n, dtype=_F64, device=device) / max(n - 1, 1)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return ((hi + ramp * (lo - hi)) ** rho).to(dtype)


def _softplus_inverse(y: Tensor) -> Tensor:
    # log(e^y - 1) without overflow for large y or cancellation for small y
    return y + torch.log(-torch.expm1(-y))


def _check_knot_args(num_knots: Any, T: Any, g0: Any) -> None:
    if isinstance(num_knots, bool) or not isinstance(num_knots, int) or num_knots < 2:
        raise ValueError(f"num_knots must be an int >= 2, got {num_knots!r}")
    if not isinstance(g0, (int, float)) or not math.isfinite(g0) or g0 <= 0:
        raise ValueError(f"g0 must be a finite positive number, got {g0!r}")
    if not isinstance(T, (int, float)) or not math.isfinite(T) or T <= g0:
        raise ValueError(f"T must be a finite number > g0={g0}, got {T!r}")


def _knot_times(num_knots: int, T: float) -> Tensor:
    # tau_j = j T / (N-1); the last one is T exactly
    return torch.arange(num_knots, dtype=_F64) * float(T) / (num_knots - 1)


def _karras_knot_values(num_knots: int, T: float, g0: float) -> Tensor:
    """§2.2: EDM rho=7 sigmas (0.002 .. sqrt(T)) ascending, g = sigma^2, end points overwritten by g0 and T."""
    g = karras_sigmas(num_knots, sigma_max=math.sqrt(T)).flip(0) ** 2
    g[0], g[-1] = g0, T
    if num_knots > 2 and not bool((g.diff() > 0).all()):
        raise ValueError(f"init='karras' needs g0 < 0.002**2 < T so that the knots increase; got g0={g0}, T={T}")
    return g


def _check_knot_values(values: Any, num_knots: int, T: float, g0: float) -> Tensor:
    """Validate explicit knot values [..., N]: first g0, last T, strictly increasing, finite."""
    values = torch.as_tensor(values, dtype=_F64)
    if values.dim() < 1 or values.shape[-1] != num_knots:
        raise ValueError(f"init must hold {num_knots} knot values on its last axis, got shape {tuple(values.shape)}")
    if not bool(torch.isfinite(values).all()):
        raise ValueError("init knot values must be finite")
    if not bool(torch.isclose(values[..., 0], torch.tensor(g0, dtype=_F64), rtol=1e-9, atol=0).all()):
        raise ValueError(f"init[0] must equal g0={g0}, got {values[..., 0].flatten()[:4].tolist()}")
    if not bool(torch.isclose(values[..., -1], torch.tensor(T, dtype=_F64), rtol=1e-9, atol=0).all()):
        raise ValueError(f"init[-1] must equal T={T}, got {values[..., -1].flatten()[:4].tolist()}")
    if not bool((values.diff(dim=-1) > 0).all()):
        raise ValueError("init knot values must be strictly increasing")
    return values


def _psi_from_knot_values(values: Tensor) -> Tensor:
    # §2.1: psi_j = softplus^{-1}(ln g_{j+1} - ln g_j)
    return _softplus_inverse(values.log().diff(dim=-1))


def _knot_log_values(psi: Tensor, g0: float, T: float) -> Tensor:
    """psi [..., N-1] -> ell [..., N]: ell_0 = ln g0, increments Lambda r_j / sum r, ell_{N-1} = ln T exactly."""
    log_g0, log_T = math.log(g0), math.log(T)
    r = F.softplus(psi.to(_F64)) + _INCREMENT_EPS
    frac = torch.cumsum(r, dim=-1)[..., :-1] / r.sum(dim=-1, keepdim=True)
    end_shape = psi.shape[:-1] + (1,)
    first = torch.full(end_shape, log_g0, dtype=_F64, device=psi.device)
    last = torch.full(end_shape, log_T, dtype=_F64, device=psi.device)
    return torch.cat([first, log_g0 + (log_T - log_g0) * frac, last], dim=-1)


def _locate(knot_times: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Interval index j = clamp(searchsorted_left(tau, t), 1, N-1), weight w in it, and its width (§2.1)."""
    tau = knot_times.to(_F64)
    j = torch.searchsorted(tau, t.contiguous(), right=False).clamp(1, tau.numel() - 1)
    t0, t1 = tau[j - 1], tau[j]
    return j, (t - t0) / (t1 - t0), t1 - t0


def as_time(t: Any, device: torch.device) -> Tensor:
    if isinstance(t, Tensor):
        if not t.is_floating_point():
            raise TypeError(f"t must be a floating-point tensor, got dtype {t.dtype}")
        return t.to(_F64)
    if isinstance(t, (int, float)) and not isinstance(t, bool):
        return torch.tensor(float(t), dtype=_F64, device=device)
    raise TypeError(f"t must be a floating-point tensor or a number, got {type(t).__name__}")


class KnotSchedule(nn.Module):
    """Scalar variance schedule g(t) on [0, T]: monotone, log-linear between uniform knots, g(0) = g0, g(T) = T.

    This is the reference code's `GFn` (§2.1). Trainable: `psi` [N-1]; `forward(t) -> (g, gdot)`, any t shape.
    """

    def __init__(self, num_knots: int = 32, T: float = 6400.0, g0: float = 1e-9, init: str | Tensor = "karras"):
        super().__init__()
        _check_knot_args(num_knots, T, g0)
        self.num_knots, self.T, self.g0 = num_knots, float(T), float(g0)
        if isinstance(init, str):
            if init != "karras":
                raise ValueError(f"init must be 'karras' or a tensor of {num_knots} knot values, got {init!r}")
            values = _karras_knot_values(num_knots, self.T, self.g0)
        else:
            values = _check_knot_values(init, num_knots, self.T, self.g0)
            if values.dim() != 1:
                raise ValueError(f"init must have shape [{num_knots}], got {tuple(values.shape)}")
        self.psi = nn.Parameter(_psi_from_knot_values(values))
        self.register_buffer("knot_times", _knot_times(num_knots, self.T), persistent=False)

    def knot_log_values(self) -> Tensor:
        """ell [N]: ln g at the knots."""
        return _knot_log_values(self.psi, self.g0, self.T)

    def knot_values(self) -> Tensor:
        """g at the knots [N]."""
        return self.knot_log_values().exp()

    def forward(self, t: Tensor) -> tuple[Tensor, Tensor]:
        t = as_time(t, self.psi.device)
        check_in_range("t", t, 0.0, self.T, f"finite times in [0, T={self.T:g}]")
        ell = self.knot_log_values()
        j, w, dt = _locate(self.knot_times, t)
        l0, l1 = ell[j - 1], ell[j]
        g = torch.exp(l0 + w * (l1 - l0))
        return g, g * (l1 - l0) / dt  # exact derivative of the log-linear interpolant

    def extra_repr(self) -> str:
        return f"num_knots={self.num_knots}, T={self.T}, g0={self.g0}"


class MatrixSchedule(nn.Module):
    """M(t) = sum_k g_k(t) P_k: K knot schedules (§1.2), optionally one set per class (§8).

    `psi` has shape [S, P, N-1] with S = num_classes (1 if None) and P = 1 if `tied` (isotropic: every g_k is
    the same schedule, §2.2 step 1) else K. `forward(t, labels) -> (g, gdot)`, each [B, K] float64, where
    sample b uses the schedules of class labels[b] (the reference sampler used class 0 for all, §10.7).
    """

    def __init__(self, num_subspaces: int = 2, num_classes: int | None = None, tied: bool = False,
                 num_knots: int = 32, T: float = 6400.0, g0: float = 1e-9, init: str | Tensor = "karras"):
        super().__init__()
        check_int("num_subspaces", num_subspaces)
        check_int("num_classes", num_classes, optional=True)
        _check_knot_args(num_knots, T, g0)
        self.num_subspaces, self.num_classes, self.tied = num_subspaces, num_classes, bool(tied)
        self.num_knots, self.T, self.g0 = num_knots, float(T), float(g0)
        shape = (num_classes or 1, 1 if self.tied else num_subspaces, num_knots)
        if isinstance(init, str):
            if init != "karras":
                raise ValueError(f"init must be 'karras' or a tensor of knot values, got {init!r}")
            values = _karras_knot_values(num_knots, self.T, self.g0)
            self._init: str | list = init
        else:
            values = _check_knot_values(init, num_knots, self.T, self.g0)
            self._init = values.tolist()
            try:
                values = values.expand(shape)
            except RuntimeError:
                raise ValueError(f"init must have shape [{num_knots}] or broadcast to {list(shape)}, "
                                 f"got {tuple(values.shape)}") from None
        self.psi = nn.Parameter(_psi_from_knot_values(values).expand(shape[:2] + (num_knots - 1,)).clone())
        self.register_buffer("knot_times", _knot_times(num_knots, self.T), persistent=False)

    def config(self) -> dict:
        """JSON-able constructor arguments; the trained state lives in `state_dict()`."""
        return {"num_subspaces": self.num_subspaces, "num_classes": self.num_classes, "tied": self.tied,
                "num_knots": self.num_knots, "T": self.T, "g0": self.g0, "init": self._init}

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "MatrixSchedule":
        cfg = dict(cfg)
        if not isinstance(cfg.get("init", "karras"), str):
            cfg["init"] = torch.tensor(cfg["init"], dtype=_F64)
        return cls(**cfg)

    def _copy_with(self, psi: Tensor, **changes: Any) -> "MatrixSchedule":
        cfg = self.config()
        cfg.update(changes)
        if not isinstance(cfg["init"], str):
            # psi is overwritten below; one knot row is a valid init for any shape
            cfg["init"] = torch.tensor(cfg["init"], dtype=_F64).reshape(-1, self.num_knots)[0]
        new = MatrixSchedule(**cfg).to(self.psi.device)
        with torch.no_grad():
            new.psi.copy_(psi)
        return new

    def untied(self, num_subspaces: int | None = None) -> "MatrixSchedule":
        """Anisotropic copy of a tied schedule: every subspace starts as this schedule (§2.2, step 3)."""
        if self.psi.shape[1] != 1:
            raise ValueError("untied() needs a tied schedule (one schedule shared by all subspaces)")
        k = self.num_subspaces if num_subspaces is None else num_subspaces
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"num_subspaces must be an int >= 1, got {k!r}")
        psi = self.psi.detach().expand(self.psi.shape[0], k, self.num_knots - 1)
        return self._copy_with(psi, num_subspaces=k, tied=False)

    def per_class(self, num_classes: int) -> "MatrixSchedule":
        """Class-conditional copy of a global schedule: every class starts as this schedule (§2.2, steps 2-3)."""
        if self.num_classes is not None:
            raise ValueError(f"per_class() needs a global schedule, this one has num_classes={self.num_classes}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
        psi = self.psi.detach().expand(num_classes, -1, -1)
        return self._copy_with(psi, num_classes=num_classes)

    def _labels_required(self) -> str:
        return (f"labels is required: this schedule has num_classes={self.num_classes}; "
                f"pass labels as an int64 tensor [B] with values in [0, {self.num_classes})")

    def _as_labels(self, labels: Tensor | None) -> Tensor | None:
        if labels is None:
            if self.num_classes is not None:
                raise ValueError(self._labels_required())
            return None
        if not isinstance(labels, Tensor):
            raise ValueError(f"labels must be an integer tensor [B], got {type(labels).__name__}")
        if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
            raise ValueError(f"labels must be an integer tensor [B], got dtype {labels.dtype}")
        if labels.dim() != 1:
            raise ValueError(f"labels must have shape [B], got {tuple(labels.shape)}")
        return labels.long()

    def check_labels(self, labels: Tensor | None) -> Tensor | None:
        """Validate labels: dtype, shape [B] and range [0, num_classes) (a class-conditional schedule indexes its
        table with them: a negative label would silently pick a class from the end)."""
        labels = self._as_labels(labels)
        if labels is not None and self.num_classes is not None:
            labels = check_index("labels", labels, self.num_classes, "class labels")
        return labels

    def _batch(self, t: Any, labels: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """t [B] or 0-d and labels [B] or None -> t [B] float64 and per-sample class ids (None if global).

        t must be finite and in [0, T]: outside it the knots would be extrapolated."""
        t = as_time(t, self.psi.device)
        check_in_range("t", t, 0.0, self.T, f"finite times in [0, T={self.T:g}]")
        labels = self.check_labels(labels)
        if t.dim() > 1:
            raise ValueError(f"t must have shape [B] or be a scalar, got {tuple(t.shape)}")
        if t.dim() == 0:
            t = t.expand(labels.shape[0]) if labels is not None else t.reshape(1)
        elif labels is not None and labels.shape[0] != t.shape[0]:
            raise ValueError(f"t has batch size {t.shape[0]} but labels has {labels.shape[0]}")
        return t, (labels if self.num_classes is not None else None)

    def knot_log_values(self) -> Tensor:
        """ell [S, P, N]: ln g at the knots of every (class, subspace schedule)."""
        return _knot_log_values(self.psi, self.g0, self.T)

    def knot_values(self) -> Tensor:
        return self.knot_log_values().exp()

    def _log_g(self, ell_snp: Tensor, t: Tensor, labels: Tensor | None) -> tuple[Tensor, Tensor]:
        """ln g and its t-slope [..., P] at t [...] (labels [...] or None) from ell laid out [S, N, P]."""
        j, w, dt = _locate(self.knot_times, t)
        if labels is None:
            l0, l1 = ell_snp[0, j - 1], ell_snp[0, j]
        else:
            l0, l1 = ell_snp[labels, j - 1], ell_snp[labels, j]
        return l0 + w[..., None] * (l1 - l0), (l1 - l0) / dt[..., None]

    def forward(self, t: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        t, labels = self._batch(t, labels)
        log_g, slope = self._log_g(self.knot_log_values().transpose(1, 2), t, labels)
        g = log_g.exp()
        shape = (t.shape[0], self.num_subspaces)
        return g.expand(shape).contiguous(), (g * slope).expand(shape).contiguous()

    def geometric_mean(self, t: Tensor, labels: Tensor | None = None) -> Tensor:
        """exp(mean_k ln g_k(t)) [B]; for K = 2 this is sqrt(g h), sigma_eff^2 of §3.2 and f of §2.5."""
        t, labels = self._batch(t, labels)
        return self._log_g(self.knot_log_values().transpose(1, 2), t, labels)[0].mean(-1).exp()

    def invert_geometric_mean(self, y: Tensor, labels: Tensor | None = None, iterations: int = 32) -> Tensor:
        """t with geometric_mean(t) = y, by bisection on [0, T] exactly as §2.5 (result detached).

        y is a grid [N]. Returns [N] for a global schedule (labels ignored), and [B, N] (one grid per sample,
        each on its own class's schedule) for a class-conditional one with labels [B]; there y may also be [B, N],
        one grid of values per sample (a per-class learned grid).
        """
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
            raise ValueError(f"iterations must be an int >= 1, got {iterations!r}")
        if not isinstance(y, Tensor) or not y.is_floating_point():
            raise TypeError(f"y must be a floating-point tensor [N], got {getattr(y, 'dtype', type(y).__name__)}")
        labels = self.check_labels(labels)
        per_sample = y.dim() == 2 and self.num_classes is not None and labels is not None \
            and y.shape[0] == labels.shape[0]
        if y.dim() > 1 and not per_sample:
            raise ValueError(f"y must have shape [N] (or [B, N] with labels [B] on a class-conditional schedule), "
                             f"got {tuple(y.shape)}")
        check_in_range("y", y, 0.0, math.inf, "finite, non-negative variances")
        target = (y if per_sample else y.reshape(-1)).to(_F64).clamp(self.g0, self.T)
        if self.num_classes is None:
            labels = None
        else:
            target = target.expand(labels.shape[0], -1)
            labels = labels[:, None].expand_as(target)
        with torch.no_grad():
            ell = self.knot_log_values().transpose(1, 2)
            lo, hi = torch.zeros_like(target), torch.full_like(target, self.T)
            for _ in range(iterations):
                mid = (lo + hi) / 2
                below = self._log_g(ell, mid, labels)[0].mean(-1).exp() < target
                lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
            return (lo + hi) / 2

    def extra_repr(self) -> str:
        return (f"num_subspaces={self.num_subspaces}, num_classes={self.num_classes}, tied={self.tied}, "
                f"num_knots={self.num_knots}, T={self.T}, g0={self.g0}")
