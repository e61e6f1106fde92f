"""What the k-diffusion and diffusers adapters (`aniso_fast.k_diffusion`, `aniso_fast.diffusers_scheduler`) share:
a sigma sequence checked and turned into an engine grid, data of any shape seen as the isotropic engine's image, and
the solver options a caller may pass on.

An isotropic model (K = 1, `IsotropicBasis`) has g = sigma^2 and flow F = (denoised - x) / sigma, so the engine's
solvers run any noise-level-conditioned denoiser on any sigma sequence as the published scalar methods.
"""
from __future__ import annotations

import inspect
from typing import Mapping

import torch
from torch import Tensor

from .grids import Grid
from .spec import SolverSpec

__all__ = ["check_sigmas", "sigma_grid", "as_image", "check_solver_options"]

_ENGINE_OPTIONS = ("progress", "callback", "noise", "final_euler")  # set by the adapters, not by their callers


def check_sigmas(sigmas, name: str = "sigmas", *, end_at_zero: bool = True) -> Tensor:
    """A 1-D tensor (or sequence) of at least 2 finite noise levels, strictly decreasing, positive but for the last,
    which is 0 when `end_at_zero` (>= 0 otherwise); returned as a tensor. ValueError naming `name`."""
    if not isinstance(sigmas, Tensor):
        try:
            sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"{name}: expected a 1-D tensor of noise levels, got {type(sigmas).__name__}") from None
    if sigmas.dim() != 1 or sigmas.numel() < 2 or not sigmas.is_floating_point():
        raise ValueError(f"{name}: expected a 1-D floating tensor of at least 2 noise levels, got "
                         f"{sigmas.dtype} of shape {tuple(sigmas.shape)}")
    s = sigmas.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(s).all()) or not bool((s[:-1] > 0).all()) or not bool((s[1:] < s[:-1]).all()):
        raise ValueError(f"{name}: expected finite, positive, strictly decreasing noise levels, got "
                         f"{s.tolist() if s.numel() <= 8 else s[:8].tolist() + ['...']}")
    if end_at_zero and float(s[-1]) != 0:
        raise ValueError(f"{name}: expected the last noise level to be 0 (as k-diffusion's get_sigmas_* append it), "
                         f"got {float(s[-1]):g}")
    return sigmas


def sigma_grid(sigmas: Tensor, device: torch.device | str | None = None) -> Grid:
    """The isotropic engine grid of a descending sigma sequence [N+1]: g = sigma^2, [1, N+1, 1] in float64."""
    return Grid(g=(sigmas.detach().to(device=device, dtype=torch.float64) ** 2)[None, :, None])


def as_image(x: Tensor) -> Tensor:
    """x [B, ...] as the isotropic engine's [B, 1, 1, n] image: P_0 = I ignores the layout, so any shape will do."""
    return x.reshape(x.shape[0], 1, 1, -1)


def check_solver_options(spec: SolverSpec, options: Mapping) -> dict:
    """The options a caller passes to the solver's `run` (`order`, `lower_order_final`, `variant`, ...), checked by
    name (ValueError naming the option) and `order` by the solver table."""
    known = [p.name for p in inspect.signature(spec.run).parameters.values()
             if p.kind is p.KEYWORD_ONLY and p.name not in _ENGINE_OPTIONS]
    for key in options:
        if key not in known:
            raise ValueError(f"{key}: not an option of {spec.name}; expected "
                             f"{' or '.join(known) if known else 'none'}")
    if "order" in options:
        spec.check_order(options["order"])
    if "lower_order_final" in options and not isinstance(options["lower_order_final"], bool):
        raise ValueError(f"lower_order_final: expected a bool, got {options['lower_order_final']!r}")
    return dict(options)
