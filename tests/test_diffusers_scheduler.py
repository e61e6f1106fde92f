"""The diffusers-style scheduler (aniso_fast.diffusers_scheduler): diffusers' own Karras-sigma schedulers as the
oracle (same sigmas and timesteps, same samples), the k-diffusion adapter for the other solvers, the worker thread's
lifetime and bad input."""
import threading

import pytest
import torch

from aniso_fast import k_diffusion as KD
from aniso_fast.diffusers_scheduler import EngineScheduler

pytestmark = pytest.mark.usefixtures("one_thread")

f64 = torch.float64
N = 8
SD = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}  # Stable Diffusion's betas


@pytest.fixture(scope="module")
def diffusers():
    return pytest.importorskip("diffusers", reason="diffusers is not installed (bash scripts/setup.sh --test)")


def _denoised(gmm, x, sigma):
    """The mixture's exact isotropic denoiser at one sigma, float64."""
    return gmm.denoise(x.to(f64), torch.full((x.shape[0], 2), float(sigma) ** 2, dtype=f64))


def _network(gmm, prediction_type):
    """An exact 'UNet' in diffusers' conventions: input x / sqrt(sigma^2 + 1), output epsilon, x0 or v."""
    def net(x_in, sigma):
        sigma = float(sigma)
        c = (sigma ** 2 + 1) ** 0.5
        x = x_in.to(f64) * c
        D = _denoised(gmm, x, sigma)
        out = {"epsilon": (x - D) / sigma, "sample": D, "v_prediction": (x / c ** 2 - D) * c / sigma}[prediction_type]
        return out.to(x_in.dtype)
    return net


def _noise(gmm, B=3):
    return torch.randn(B, *gmm.image_shape, generator=torch.Generator().manual_seed(0))


def _run(scheduler, net, x, outputs=None):
    """A pipeline's denoising loop; the network sees the sigma of each call."""
    for i, t in enumerate(scheduler.timesteps):
        out = scheduler.step(net(scheduler.scale_model_input(x, t), scheduler.sigmas[i]), t, x)
        x = out.prev_sample
        if outputs is not None:
            outputs.append(out.pred_original_sample)
    return x


def _close(ours, theirs, rel):
    assert float((ours - theirs).abs().max()) <= rel * float(theirs.abs().max())


@pytest.mark.parametrize("solver, name, prediction_type", [
    ("euler", "EulerDiscreteScheduler", "epsilon"), ("euler", "EulerDiscreteScheduler", "sample"),
    ("euler", "EulerDiscreteScheduler", "v_prediction"), ("heun", "HeunDiscreteScheduler", "epsilon")])
def test_same_schedule_and_samples_as_diffusers(gmm, diffusers, solver, name, prediction_type):
    theirs = getattr(diffusers, name)(use_karras_sigmas=True, prediction_type=prediction_type, **SD)
    ours = EngineScheduler.from_config(theirs.config, solver)
    theirs.set_timesteps(N)
    ours.set_timesteps(N)
    assert torch.equal(ours.timesteps, theirs.timesteps) and torch.equal(ours.sigmas, theirs.sigmas)
    assert len(ours.timesteps) == (2 * N - 1 if solver == "heun" else N) and ours.order == theirs.order
    assert float(ours.init_noise_sigma) == float(theirs.init_noise_sigma)
    net, z = _network(gmm, prediction_type), _noise(gmm)
    D_ours, D_theirs = [], []
    x_ours = _run(ours, net, z * ours.init_noise_sigma, D_ours)
    x_theirs = _run(theirs, net, z * theirs.init_noise_sigma, D_theirs)
    _close(x_ours, x_theirs, 1e-5)
    for a, b in zip(D_ours, D_theirs):
        _close(a, b, 1e-5)


def test_dpmpp_2m_as_diffusers_dpm_solver_multistep(gmm, diffusers):
    """Same sigmas and samples; diffusers' DPM-Solver keeps x / sqrt(sigma^2 + 1) as its sample (start it there)."""
    theirs = diffusers.DPMSolverMultistepScheduler(use_karras_sigmas=True, **SD)
    ours = EngineScheduler.from_config(theirs.config, "dpmpp-2m")
    theirs.set_timesteps(N)
    ours.set_timesteps(N)
    assert torch.equal(ours.sigmas, theirs.sigmas)
    net, z = _network(gmm, "epsilon"), _noise(gmm)
    s0 = float(ours.sigmas[0])
    x_theirs = _run(theirs, net, z * s0 / (s0 ** 2 + 1) ** 0.5)  # ends at sigma = 0, where the two samples agree
    _close(_run(ours, net, z * s0), x_theirs, 1e-5)


@pytest.mark.parametrize("solver, sampler", [("dpmpp-3m", KD.sample_dpmpp_3m), ("unipc", KD.sample_unipc),
                                             ("ipndm", KD.sample_ipndm), ("deis", KD.sample_deis)])
def test_other_solvers_as_the_k_diffusion_adapter(gmm, solver, sampler):
    """Custom sigmas; the scheduler's epsilon network and the adapter's denoiser are the same exact model."""
    sigmas = torch.tensor([40.0, 12.0, 4.0, 1.5, 0.5, 0.1, 0.02, 0.0])
    sched = EngineScheduler(solver)
    sched.set_timesteps(sigmas=sigmas)
    z = _noise(gmm)
    ours = _run(sched, _network(gmm, "epsilon"), z * sched.init_noise_sigma)
    ref = sampler(lambda x, s: _denoised(gmm, x, s[0]).float(), z * sigmas[0], sigmas, disable=True)
    _close(ours, ref, 1e-5)


def test_return_tuple_and_worker_lifetime(gmm):
    """return_dict=False gives (prev_sample, pred_original_sample); the loop's thread ends with the run, and an
    abandoned run's thread ends at the next set_timesteps."""
    def workers():
        return sum(t.name == "EngineScheduler" for t in threading.enumerate())

    sched, net, z = EngineScheduler("dpmpp-2m"), _network(gmm, "epsilon"), _noise(gmm)
    before = workers()
    sched.set_timesteps(3)
    x = z * sched.init_noise_sigma
    t = sched.timesteps[0]
    prev, D = sched.step(net(sched.scale_model_input(x, t), sched.sigmas[0]), t, x, return_dict=False)
    assert prev.shape == D.shape == x.shape and workers() == before + 1
    sched.set_timesteps(3)
    assert workers() == before
    _run(sched, net, z * sched.init_noise_sigma)
    assert workers() == before


# ---- bad input ----

@pytest.mark.parametrize("kwargs, match", [
    ({"solver": "em"}, r"^solver: expected one of euler, heun, dpmpp-2m"),
    ({"solver": "dpmpp-2m", "order": 3}, r"^order: dpmpp-2m takes order 2"),
    ({"solver": "euler", "order": 2}, r"^order: not an option of euler"),
    ({"prediction_type": "flow"}, r"^prediction_type: expected one of epsilon, sample, v_prediction"),
    ({"beta_schedule": "squaredcos_cap_v2"}, r"^beta_schedule: expected one of linear, scaled_linear"),
    ({"beta_start": 0.1, "beta_end": 0.01}, r"^beta_end: expected a number in \(beta_start"),
    ({"num_train_timesteps": 1}, r"^num_train_timesteps: expected an int >= 2"),
    ({"sigma_min": 5.0, "sigma_max": 1.0}, r"^sigma_min, sigma_max: expected sigma_min < sigma_max")])
def test_bad_construction(kwargs, match):
    with pytest.raises(ValueError, match=match) as err:
        EngineScheduler(**kwargs)
    assert "\n" not in str(err.value)


def test_bad_config():
    with pytest.raises(ValueError, match=r"^config: trained betas"):
        EngineScheduler.from_config({"rescale_betas_zero_snr": True})


def test_bad_calls(gmm):
    sched, net, z = EngineScheduler("heun"), _network(gmm, "epsilon"), _noise(gmm)
    with pytest.raises(ValueError, match=r"^set_timesteps: call it before sampling"):
        sched.scale_model_input(z, 999.0)
    with pytest.raises(ValueError, match=r"^num_inference_steps, sigmas: pass exactly one"):
        sched.set_timesteps(4, sigmas=[2.0, 1.0, 0.0])
    with pytest.raises(ValueError, match=r"^num_inference_steps: expected an int >= 1"):
        sched.set_timesteps(0)
    with pytest.raises(ValueError, match=r"^sigmas: expected finite, positive, strictly decreasing"):
        sched.set_timesteps(sigmas=[1.0, 2.0, 0.0])
    sched.set_timesteps(3)
    x = z * sched.init_noise_sigma
    t = sched.timesteps[0]
    with pytest.raises(ValueError, match=r"^timestep: expected the schedule's next timestep"):
        sched.step(torch.zeros_like(x), 0, x)
    with pytest.raises(ValueError, match=r"^model_output: expected sample's shape"):
        sched.step(torch.zeros(1, 1, 6, 6), t, x)
    x = sched.step(net(sched.scale_model_input(x, t), sched.sigmas[0]), t, x).prev_sample
    t = sched.timesteps[1]
    with pytest.raises(ValueError, match=r"^sample: expected the prev_sample of the last step"):
        sched.step(net(sched.scale_model_input(x, t), sched.sigmas[1]), t, x + 1)
    for i in range(1, len(sched.timesteps)):
        t = sched.timesteps[i]
        x = sched.step(net(sched.scale_model_input(x, t), sched.sigmas[i]), t, x).prev_sample
    with pytest.raises(ValueError, match=r"^timestep: the schedule is done"):
        sched.step(torch.zeros_like(x), t, x)
