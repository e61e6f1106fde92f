"""The engine's solvers for k-diffusion users: any denoiser `model(x, sigma, **extra_args) -> denoised` on any sigma
sequence ending in 0 (`get_sigmas_karras` and friends), every solver with k-diffusion's one signature:

    x = sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None, **solver_options)

x is the start, already scaled by sigmas[0]. The denoiser is seen as an isotropic engine model (K = 1): g = sigma^2
and flow F = (denoised - x) / sigma. `callback` receives k-diffusion's dict (x, i, sigma, sigma_hat, denoised) once per
step, before the step's update, x being the point where `denoised` was evaluated (no churn: sigma_hat = sigma).
`disable` hides the progress bar (None: shown on a terminal only, as tqdm and k-diffusion do). `solver_options` go to
the engine solver (`order`, `lower_order_final`, `variant`: sampling/ode.py, sampling/multistep.py).

Same method as k-diffusion's sampler of the same name: `sample_euler`, `sample_heun` (the last step, to sigma = 0, is
Euler), `sample_dpmpp_2m`; `sample_dpmpp_3m` is `sample_dpmpp_3m_sde` with eta = 0 (with lower_order_final=False).
Engine solvers without a k-diffusion counterpart: `sample_unipc`, `sample_ipndm`, `sample_deis`, and
`sample_euler_maruyama` (the reverse SDE; `noise_sampler(sigma, sigma_next)` as k-diffusion's SDE samplers take it).
"""
from __future__ import annotations

import sys
from typing import Callable, Mapping

import torch
from torch import Tensor

from .geometry.bases import IsotropicBasis
from .sampling.adapters import as_image, check_sigmas, check_solver_options, sigma_grid
from .sampling.spec import EM, SOLVERS

__all__ = ["DenoiserModel", "sample_euler", "sample_heun", "sample_dpmpp_2m", "sample_dpmpp_3m", "sample_unipc",
           "sample_ipndm", "sample_deis", "sample_euler_maruyama"]


class DenoiserModel:
    """A k-diffusion denoiser as an isotropic engine model on x flattened to [B, 1, 1, n] (`as_image`).

    It counts steps (`end_step`, the engine solver's callback) to hand k-diffusion's callback the first network
    call of each step: every engine solver evaluates the model at the step's start point first.
    """

    num_classes = None

    def __init__(self, denoiser: Callable[..., Tensor], shape: torch.Size, sigmas: Tensor,
                 extra_args: Mapping | None = None, callback: Callable[[dict], None] | None = None):
        self.denoiser, self.shape, self.sigmas = denoiser, shape, sigmas
        self.extra_args, self.callback = dict(extra_args or {}), callback
        self.basis = IsotropicBasis()
        self.step, self._step_started = 0, False

    def flow(self, x: Tensor, g: Tensor, labels: Tensor | None = None) -> Tensor:
        sigma = g[:, 0].sqrt().to(x.dtype)  # [B], as k-diffusion's `sigmas[i] * s_in`
        x = x.reshape(self.shape)
        denoised = self.denoiser(x, sigma, **self.extra_args)
        if not isinstance(denoised, Tensor) or denoised.shape != x.shape:
            got = tuple(denoised.shape) if isinstance(denoised, Tensor) else type(denoised).__name__
            raise ValueError(f"model: expected a denoised tensor of x's shape {tuple(x.shape)}, got {got}")
        if not self._step_started and self.callback is not None:
            s = self.sigmas[self.step]
            self.callback({"x": x, "i": self.step, "sigma": s, "sigma_hat": s, "denoised": denoised})
        self._step_started = True
        return as_image((denoised.to(x.dtype) - x) / sigma.view(-1, *(1,) * (x.dim() - 1)))

    def end_step(self, info: dict) -> None:
        self.step, self._step_started = self.step + 1, False


def _check_call(model, x, extra_args, callback, disable) -> None:
    if not callable(model):
        raise ValueError(f"model: expected a denoiser model(x, sigma, **extra_args), got {type(model).__name__}")
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 1 or x.shape[0] < 1:
        got = f"{x.dtype} of shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x: expected a floating tensor [B, ...] with B >= 1, got {got}")
    if extra_args is not None and not isinstance(extra_args, Mapping):
        raise ValueError(f"extra_args: expected a dict of the model's keyword arguments, got {type(extra_args).__name__}")
    for key, value in (extra_args or {}).items():
        if isinstance(value, Tensor) and value.dim() >= 1 and value.shape[0] != x.shape[0]:
            raise ValueError(f"extra_args['{key}']: expected x's batch size {x.shape[0]} first, got shape "
                             f"{tuple(value.shape)}")
    if callback is not None and not callable(callback):
        raise ValueError(f"callback: expected None or a callable taking a dict, got {type(callback).__name__}")
    if disable is not None and not isinstance(disable, bool):
        raise ValueError(f"disable: expected None or a bool, got {disable!r}")


def _run(solver: str, model, x: Tensor, sigmas: Tensor, extra_args, callback, disable, options: dict,
         noise_sampler: Callable[[Tensor, Tensor], Tensor] | None = None) -> Tensor:
    """Check the call, then integrate with the engine solver over the grid g = sigmas^2."""
    spec = SOLVERS[solver]
    _check_call(model, x, extra_args, callback, disable)
    sigmas = check_sigmas(sigmas, "sigmas", end_at_zero=True)
    options = check_solver_options(spec, options)
    if noise_sampler is not None and not callable(noise_sampler):
        raise ValueError(f"noise_sampler: expected None or a callable (sigma, sigma_next) -> noise, got "
                         f"{type(noise_sampler).__name__}")
    denoiser = DenoiserModel(model, x.shape, sigmas, extra_args, callback)
    if spec.stochastic:
        options["noise"] = (lambda: torch.randn_like(as_image(x))) if noise_sampler is None else \
            (lambda: as_image(noise_sampler(sigmas[denoiser.step], sigmas[denoiser.step + 1])))
    progress = not disable if disable is not None else sys.stderr.isatty()  # tqdm's disable=None
    with torch.no_grad():
        out = spec.run(denoiser, as_image(x), sigma_grid(sigmas, x.device), progress=progress,
                       callback=denoiser.end_step, **options)
    return out.reshape(x.shape)


def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None, **solver_options) -> Tensor:
    """Euler (k-diffusion's `sample_euler` without churn): one network call per step."""
    return _run("euler", model, x, sigmas, extra_args, callback, disable, solver_options)


def sample_heun(model, x, sigmas, extra_args=None, callback=None, disable=None, **solver_options) -> Tensor:
    """Heun at the end point, the last step Euler (k-diffusion's `sample_heun`): 2N - 1 network calls."""
    return _run("heun", model, x, sigmas, extra_args, callback, disable, solver_options)


def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None, **solver_options) -> Tensor:
    """DPM-Solver++(2M) (k-diffusion's `sample_dpmpp_2m`); option `lower_order_final`."""
    return _run("dpmpp-2m", model, x, sigmas, extra_args, callback, disable, solver_options)


def sample_dpmpp_3m(model, x, sigmas, extra_args=None, callback=None, disable=None, **solver_options) -> Tensor:
    """DPM-Solver++(3M) (k-diffusion's `sample_dpmpp_3m_sde` at eta = 0 with lower_order_final=False); options
    `lower_order_final`, `variant` ('published' or the third-order 'exact')."""
    return _run("dpmpp-3m", model, x, sigmas, extra_args, callback, disable, solver_options)


def sample_unipc(model, x, sigmas, extra_args=None, callback=None, disable=None, **solver_options) -> Tensor:
    """UniPC-bh2; options `order` (2 or 3), `lower_order_final`. `callback`'s x is the predicted point."""
    return _run("unipc", model, x, sigmas, extra_args, callback, disable, solver_options)


def sample_ipndm(model, x, sigmas, extra_args=None, callback=None, disable=None, **solver_options) -> Tensor:
    """iPNDM; option `order` (1 to 4)."""
    return _run("ipndm", model, x, sigmas, extra_args, callback, disable, solver_options)


def sample_deis(model, x, sigmas, extra_args=None, callback=None, disable=None, **solver_options) -> Tensor:
    """DEIS-tAB; option `order` (1 to 4)."""
    return _run("deis", model, x, sigmas, extra_args, callback, disable, solver_options)


def sample_euler_maruyama(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None,
                          **solver_options) -> Tensor:
    """Euler-Maruyama on the reverse SDE: x_b = x_a + (s_a^2 - s_b^2) / s_a^2 (D - x_a) + sqrt(s_a^2 - s_b^2) z, z
    from `noise_sampler(sigma, sigma_next)` (default `torch.randn_like(x)`)."""
    return _run(EM, model, x, sigmas, extra_args, callback, disable, solver_options, noise_sampler)
