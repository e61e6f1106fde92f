"""The engine's solvers as a diffusers-style scheduler, for isotropic models (a UNet predicting epsilon, x0 or v).

`EngineScheduler(solver)` follows the conventions of diffusers' Karras-sigma schedulers (`EulerDiscreteScheduler`,
`HeunDiscreteScheduler`, `DPMSolverMultistepScheduler` with `use_karras_sigmas=True`): the DDPM training betas
('linear' or 'scaled_linear') give the training sigmas; `set_timesteps(n)` puts n steps on the Karras grid between
their extremes (rho = 7), then sigma = 0, and maps each sigma to its fractional training timestep (linear in log
sigma); the sample is the variance-exploding one (`init_noise_sigma` = sigmas[0]), and `scale_model_input` divides it
by sqrt(sigma^2 + 1) (EulerDiscreteScheduler's convention for every solver: DPMSolverMultistepScheduler keeps
x / sqrt(sigma^2 + 1) as its sample instead, with `init_noise_sigma` = 1, and rounds its timesteps). Prediction types:
'epsilon', 'sample' and 'v_prediction' (EulerDiscreteScheduler's). Not supported: churn, thresholding, img2img starts
mid-schedule, zero-terminal-SNR betas, other sigma grids than Karras' or `set_timesteps(sigmas=...)`.

`timesteps[i]` and `sigmas[i]` belong to the i-th network call: Heun spends two per step but the last (2N - 1), so its
timesteps repeat as HeunDiscreteScheduler's do. The engine solver runs as one loop over the grid in a worker thread,
holding its own state (x, the multistep history); each `step` answers its pending network call with the model output
and returns the point of the next call (or the end point) as `prev_sample`. So every deterministic engine solver runs
here ('euler', 'heun', 'dpmpp-2m', 'dpmpp-3m', 'unipc', 'ipndm', 'deis'), and `sample` must be the last `prev_sample`.
"""
from __future__ import annotations

import queue
import threading
import weakref
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from .geometry.bases import IsotropicBasis
from .geometry.schedules import karras_sigmas
from .sampling.adapters import as_image, check_sigmas, check_solver_options, sigma_grid
from .sampling.spec import SOLVERS
from .utils.checks import check_int, check_number

__all__ = ["EngineScheduler", "EngineSchedulerOutput", "training_sigmas", "sigma_to_timestep"]

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
BETA_SCHEDULES = ("linear", "scaled_linear")


@dataclass
class EngineSchedulerOutput:
    prev_sample: Tensor  # where the model is called next (the end point after the last call)
    pred_original_sample: Tensor  # the denoised prediction of this call


def training_sigmas(num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str) -> Tensor:
    """The DDPM training noise levels sigma_t = sqrt((1 - alphabar_t) / alphabar_t), t = 0..T-1, in float32 as
    diffusers computes them ('scaled_linear': betas linear in sqrt(beta), Stable Diffusion's)."""
    if beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    else:
        betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=torch.float32) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def sigma_to_timestep(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """The fractional training timestep of each sigma: linear in log sigma between the two training steps around it,
    clamped to [0, T-1] (`log_sigmas` ascending, float32 as diffusers keeps them, so the timesteps are the same)."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    low = np.clip(np.searchsorted(log_sigmas, log_sigma, side="right") - 1, 0, len(log_sigmas) - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)


class _Stopped(Exception):
    """Raised inside the worker's network call to end a loop that will not be finished."""


class _SolverLoop:
    """An engine solver's loop in a worker thread, as an isotropic model whose network calls the caller answers."""

    num_classes = None

    def __init__(self, run: Callable[[object], Tensor]):
        self.basis = IsotropicBasis()
        self._calls: queue.SimpleQueue = queue.SimpleQueue()  # worker -> caller: ("call", x, g), ("done", x), ("error", e)
        self._answers: queue.SimpleQueue = queue.SimpleQueue()  # caller -> worker: a flow, or None to stop
        self._thread = threading.Thread(target=self._work, args=(run,), daemon=True, name="EngineScheduler")
        self._thread.start()

    def flow(self, x: Tensor, g: Tensor, labels: Tensor | None = None) -> Tensor:
        self._calls.put(("call", x, g))
        F = self._answers.get()
        if F is None:
            raise _Stopped
        return F

    def _work(self, run: Callable[[object], Tensor]) -> None:
        try:
            with torch.no_grad():  # grad mode is per thread
                x = run(self)
        except _Stopped:
            return
        except BaseException as err:  # handed to the caller, raised by `next_call`
            self._calls.put(("error", err))
            return
        self._calls.put(("done", x))

    def next_call(self) -> tuple:
        """("call", x, g) for the next network call, or ("done", x) at the end."""
        message = self._calls.get()
        if message[0] == "error":
            raise message[1]
        return message

    def answer(self, F: Tensor) -> tuple:
        self._answers.put(F)
        return self.next_call()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._answers.put(None)
            self._thread.join()


class EngineScheduler:
    """A diffusers-style scheduler running an engine solver (module docstring). `solver_options`: the solver's
    (`order`, `lower_order_final`, `variant`)."""

    def __init__(self, solver: str = "euler", *, num_train_timesteps: int = 1000, beta_start: float = 0.0001,
                 beta_end: float = 0.02, beta_schedule: str = "linear", prediction_type: str = "epsilon",
                 sigma_min: float | None = None, sigma_max: float | None = None, rho: float = 7.0,
                 **solver_options):
        if solver not in SOLVERS or SOLVERS[solver].stochastic:
            choices = ", ".join(s.name for s in SOLVERS.values() if not s.stochastic)
            raise ValueError(f"solver: expected one of {choices}, got {solver!r}")
        self.spec = SOLVERS[solver]
        self.solver_options = check_solver_options(self.spec, solver_options)
        check_int("num_train_timesteps", num_train_timesteps, 2)
        check_number("beta_start", beta_start, "a number in (0, 1)", lambda v: 0 < v < 1)
        check_number("beta_end", beta_end, f"a number in (beta_start = {beta_start}, 1)", lambda v: beta_start < v < 1)
        if beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"beta_schedule: expected one of {', '.join(BETA_SCHEDULES)}, got {beta_schedule!r}")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type: expected one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}")
        for name, value in (("sigma_min", sigma_min), ("sigma_max", sigma_max)):
            if value is not None:
                check_number(name, value, "None or a positive number", lambda v: v > 0)
        check_number("rho", rho, "a positive number", lambda v: v > 0)
        self.prediction_type, self.rho = prediction_type, float(rho)
        train = training_sigmas(num_train_timesteps, beta_start, beta_end, beta_schedule)
        self._log_sigmas = np.log(train.numpy())
        self.sigma_min = float(train[0]) if sigma_min is None else float(sigma_min)
        self.sigma_max = float(train[-1]) if sigma_max is None else float(sigma_max)
        if not self.sigma_min < self.sigma_max:
            raise ValueError(f"sigma_min, sigma_max: expected sigma_min < sigma_max, got {self.sigma_min:g}, "
                             f"{self.sigma_max:g}")
        self.order = self.spec.calls_per_step  # as diffusers' `order`: Heun 2, the others 1
        self.num_inference_steps: int | None = None
        self.timesteps: Tensor | None = None
        self.sigmas: Tensor | None = None
        self._loop: _SolverLoop | None = None

    @classmethod
    def from_config(cls, config: Mapping, solver: str = "euler", **kwargs) -> "EngineScheduler":
        """From a diffusers scheduler's `config` (a pipeline's `pipe.scheduler.config`): its training betas and
        prediction type; `kwargs` override them."""
        if config.get("trained_betas") is not None or config.get("rescale_betas_zero_snr") \
                or config.get("timestep_type", "discrete") != "discrete":
            raise ValueError("config: trained betas, zero-terminal-SNR betas and continuous timesteps are not "
                             "supported by EngineScheduler")
        keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type", "sigma_min",
                "sigma_max")
        return cls(solver, **{**{k: config[k] for k in keys if config.get(k) is not None}, **kwargs})

    @property
    def init_noise_sigma(self) -> Tensor:
        self._need_timesteps()
        return self.sigmas.max()

    def set_timesteps(self, num_inference_steps: int | None = None, device: torch.device | str | None = None,
                      sigmas: Sequence[float] | Tensor | None = None) -> None:
        """N steps on the Karras grid then 0, or the given `sigmas` (N+1 levels, descending, the last >= 0)."""
        if (num_inference_steps is None) == (sigmas is None):
            raise ValueError("num_inference_steps, sigmas: pass exactly one of them")
        if sigmas is None:
            check_int("num_inference_steps", num_inference_steps, 1)
            levels = karras_sigmas(num_inference_steps, self.sigma_min, self.sigma_max, self.rho).numpy()
            steps = np.concatenate([levels, [0.0]])
        else:
            steps = check_sigmas(sigmas, "sigmas", end_at_zero=False).detach().to("cpu", torch.float64).numpy()
            levels = steps[:-1]
        t = sigma_to_timestep(levels, self._log_sigmas)
        calls = np.arange(len(levels))
        if self.spec.secondaries:  # Heun: each step's start and its end point, the last step Euler
            calls = np.concatenate([[0], np.repeat(calls[1:], 2)])
        self._close()
        self.num_inference_steps = len(levels)
        self._step_sigmas = torch.from_numpy(steps.astype(np.float32))
        self.sigmas = torch.cat([self._step_sigmas[calls], self._step_sigmas[-1:]])
        self.timesteps = torch.from_numpy(t[calls].astype(np.float32)).to(device)
        self._call, self._prev = 0, None

    def scale_model_input(self, sample: Tensor, timestep: float | Tensor) -> Tensor:
        """The model's input x / sqrt(sigma^2 + 1) at this call."""
        sigma = self.sigmas[self._expect(timestep)]
        return sample / (sigma ** 2 + 1) ** 0.5

    def step(self, model_output: Tensor, timestep: float | Tensor, sample: Tensor,
             return_dict: bool = True) -> EngineSchedulerOutput | tuple[Tensor, Tensor]:
        """Answer this network call with `model_output`; returns where the next call is (or the end point)."""
        i = self._expect(timestep)
        if not isinstance(sample, Tensor) or not sample.is_floating_point() or sample.dim() < 1:
            raise ValueError(f"sample: expected a floating tensor [B, ...], got {type(sample).__name__}")
        if not isinstance(model_output, Tensor) or model_output.shape != sample.shape:
            got = tuple(model_output.shape) if isinstance(model_output, Tensor) else type(model_output).__name__
            raise ValueError(f"model_output: expected sample's shape {tuple(sample.shape)}, got {got}")
        if i == 0:
            self._start(sample)
        elif not torch.equal(sample, self._prev):
            raise ValueError("sample: expected the prev_sample of the last step (the solver integrates from its own "
                             "state; editing the sample between steps needs a diffusers scheduler)")
        _, x, g = self._pending
        sigma = g[:, 0].sqrt().to(x.dtype).view(-1, *(1,) * (sample.dim() - 1))
        x = x.reshape(sample.shape)
        denoised = self._denoised(model_output.to(x.dtype), x, sigma)
        message = self._loop.answer(as_image((denoised - x) / sigma))
        self._pending = message
        self._prev = message[1].reshape(sample.shape).to(model_output.dtype)
        self._call += 1
        if message[0] == "done":
            self._close()
        out = (self._prev, denoised.to(model_output.dtype))
        return EngineSchedulerOutput(*out) if return_dict else out

    def _denoised(self, output: Tensor, x: Tensor, sigma: Tensor) -> Tensor:
        if self.prediction_type == "epsilon":
            return x - sigma * output
        if self.prediction_type == "sample":
            return output
        return output * (-sigma / (sigma ** 2 + 1) ** 0.5) + x / (sigma ** 2 + 1)  # v on x / sqrt(sigma^2 + 1)

    def _start(self, sample: Tensor) -> None:
        """Start the solver's loop at `sample` over the grid g = sigma^2, up to its first network call."""
        self._close()
        x = as_image(sample.to(torch.promote_types(sample.dtype, torch.float32)))
        grid, run, options = sigma_grid(self._step_sigmas, sample.device), self.spec.run, self.solver_options
        self._loop = _SolverLoop(lambda model: run(model, x, grid, **options))
        self._finalizer = weakref.finalize(self, self._loop.stop)
        self._pending = self._loop.next_call()

    def _expect(self, timestep: float | Tensor) -> int:
        """The index of this network call; ValueError naming `timestep` when it is not the schedule's next one."""
        self._need_timesteps()
        if self._call >= len(self.timesteps):
            raise ValueError("timestep: the schedule is done; call set_timesteps for another run")
        expected = float(self.timesteps[self._call])
        if isinstance(timestep, bool) or not isinstance(timestep, (int, float, Tensor)) or \
                (isinstance(timestep, Tensor) and timestep.numel() != 1) or float(timestep) != expected:
            raise ValueError(f"timestep: expected the schedule's next timestep {expected:g} "
                             f"(timesteps[{self._call}]), got {timestep!r}")
        return self._call

    def _need_timesteps(self) -> None:
        if self.timesteps is None:
            raise ValueError("set_timesteps: call it before sampling")

    def _close(self) -> None:
        if self._loop is not None:
            self._finalizer()
            self._loop = None
