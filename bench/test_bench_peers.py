"""The sampling loop against its peers: one network, one sigma grid, one start noise, DPM-Solver++(2M) at NFE steps,
driven by each library's own loop. Time per image, and how far each output is from k-diffusion's.

The network is the shipped `fmnist-edm` (isotropic, class-conditional: labels = arange(B) % 10), the grid EDM's
Karras sigmas (0.002 to 80, rho 7, then 0) in float32 as k-diffusion makes them, the start `x = 80 z`, z one fixed
float32 draw [B, 1, 28, 28]. Drivers:
- `engine`: the engine's solver on the model itself (`sampling.spec.SOLVERS['dpmpp-2m'].run(model, x, grid, labels)`,
  every network call through `AnisoPrecond.flow`, every update a `combine`): what `sample` runs;
- `adapter`: `aniso_fast.k_diffusion.sample_dpmpp_2m` over the denoiser `D(x, sigma) = model.denoise(x, sigma^2)`;
- `k-diffusion`: `k_diffusion.sampling.sample_dpmpp_2m` over the same denoiser;
- `diffusers`: diffusers' `EDMDPMSolverMultistepScheduler` (EDM's Karras sigmas, its own preconditioning of the raw
  U-Net `net(c_in x, c_noise, one_hot(labels))`, dpmsolver++ order 2, first order on the last step) in a
  diffusers pipeline's loop (`scale_model_input`, the network, `step`); started at the same `80 z` (not at its
  `init_noise_sigma`, sqrt(80^2 + 1));
- `engine-scheduler`: `aniso_fast.diffusers_scheduler.EngineScheduler('dpmpp-2m', prediction_type='sample')` with
  `set_timesteps(sigmas=...)` in the same loop, the denoiser as its model.
Runs: `network` (the U-Net) and `stand-in` (the U-Net swapped for a module returning one precomputed tensor: what
is left is the driver's loop, the preconditioning and the updates). `max_abs_diff` (extra_info): max |x - x_kd| of
the network run's output against k-diffusion's (the images are in [-1, 1]).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from aniso_fast import k_diffusion as ours_kd
from aniso_fast import store
from aniso_fast.diffusers_scheduler import EngineScheduler
from aniso_fast.geometry.schedules import karras_sigmas
from aniso_fast.networks.precond import AnisoPrecond
from aniso_fast.sampling.adapters import sigma_grid
from aniso_fast.sampling.spec import SOLVERS
from bench import common
from tests.helpers import kdiffusion_sampling

MODEL = "fmnist-edm"
NFE = 9
BATCH = 64
DRIVERS = ("k-diffusion", "engine", "adapter", "diffusers", "engine-scheduler")  # k-diffusion first: the yardstick
RUNS = ("network", "stand-in")


@dataclass(frozen=True)
class PeerCase:
    driver: str
    run: str

    @property
    def group(self) -> str:
        return f"peers-{MODEL}-dpmpp-2m-nfe{NFE}-B{BATCH}-{self.run}"

    @property
    def id(self) -> str:
        return f"{self.group}-{self.driver}"


CASES = [PeerCase(d, r) for r in RUNS for d in DRIVERS]
_OUTPUTS: dict = {}  # (driver, run) -> output, for the comparison with k-diffusion's


class StandInNet(nn.Module):
    """The network's signature `(x, c_noise, class_labels)`; returns one precomputed tensor."""

    def __init__(self, out: torch.Tensor, label_dim: int):
        super().__init__()
        self.out, self.label_dim = out, label_dim

    def forward(self, x, c_noise, class_labels=None):
        return self.out


@functools.cache
def _setup(run: str):
    model, _ = store.StoredModel.open(MODEL).load("cpu")
    shape = model.image_shape
    if run == "stand-in":
        out = 0.01 * torch.randn((BATCH, *shape), generator=torch.Generator().manual_seed(1))
        model = AnisoPrecond(StandInNet(out, model.label_dim), model.basis, model.sigma_data)
    sigmas = torch.cat([karras_sigmas(NFE, 0.002, 80.0, 7.0), torch.zeros(1, dtype=torch.float64)]).float()
    z = torch.randn((BATCH, *shape), generator=torch.Generator().manual_seed(0))
    labels = torch.arange(BATCH) % model.num_classes if model.num_classes else None
    return model, sigmas, z * sigmas[0], labels


def _denoiser(model):
    def denoise(x, sigma, labels=None):
        return model.denoise(x, (sigma.double() ** 2)[:, None], labels)
    return denoise


def _driver(driver: str, run: str):
    """(the sampling call, extra facts to record) for a driver, or a pytest.skip."""
    model, sigmas, x, labels = _setup(run)
    den, extra = _denoiser(model), {"labels": labels}
    if driver == "engine":
        grid = sigma_grid(sigmas)
        return lambda: SOLVERS["dpmpp-2m"].run(model, x, grid, labels), {}
    if driver == "adapter":
        return lambda: ours_kd.sample_dpmpp_2m(den, x, sigmas, extra_args=extra, disable=True), {}
    if driver == "k-diffusion":
        kd = kdiffusion_sampling()
        if kd is None:
            pytest.skip("k-diffusion is not installed (bash scripts/setup.sh --test)")
        return lambda: kd.sample_dpmpp_2m(den, x, sigmas, extra_args=extra, disable=True), {}
    if driver == "engine-scheduler":
        def loop():
            sched = EngineScheduler("dpmpp-2m", prediction_type="sample")
            sched.set_timesteps(sigmas=sigmas)
            y = x
            for i, t in enumerate(sched.timesteps):
                y = sched.step(den(y, sched.sigmas[i].expand(BATCH), labels), t, y).prev_sample
            return y
        return loop, {}
    diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (bash scripts/setup.sh --test)")
    onehot = nn.functional.one_hot(labels, model.label_dim).float() if labels is not None else None
    config = dict(sigma_min=0.002, sigma_max=80.0, sigma_data=model.sigma_data, rho=7.0, solver_order=2,
                  prediction_type="epsilon", algorithm_type="dpmsolver++", final_sigmas_type="zero")
    probe = diffusers.EDMDPMSolverMultistepScheduler(**config)
    probe.set_timesteps(NFE)
    their_sigmas = probe.sigmas.float()

    def loop():
        sched = diffusers.EDMDPMSolverMultistepScheduler(**config)
        sched.set_timesteps(NFE)
        y = x
        with torch.no_grad():
            for t in sched.timesteps:
                out = model.net(sched.scale_model_input(y, t), t.expand(BATCH), onehot)
                y = sched.step(out, t, y).prev_sample
        return y
    return loop, {"sigmas_max_rel_diff": float(((their_sigmas - sigmas).abs() / sigmas.clamp_min(1e-30))[:-1].max())}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_peer(benchmark, case: PeerCase, opts: common.Options):
    if MODEL not in store.shipped_models():
        pytest.skip(f"{MODEL} is not shipped here")
    fn, extra = _driver(case.driver, case.run)

    def go():
        with torch.no_grad():
            return fn()

    def check(out):
        assert out.shape == _setup(case.run)[2].shape and bool(torch.isfinite(out).all())
        _OUTPUTS[(case.driver, case.run)] = out
        ref = _OUTPUTS.get(("k-diffusion", case.run))
        if ref is not None and case.run == "network":
            benchmark.extra_info["max_abs_diff"] = float((out.float() - ref.float()).abs().max())

    benchmark.group = case.group
    benchmark.extra_info.update(suite="peers", op="sample", model=MODEL, solver="dpmpp-2m", nfe=NFE, batch=BATCH,
                                run=case.run, driver=case.driver, impl=case.driver, images=BATCH, **extra)
    common.measure(benchmark, go, "cpu", opts, check=check, cpu_time=True)
