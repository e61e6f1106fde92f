"""The k-diffusion adapter (aniso_fast.k_diffusion): k-diffusion's own samplers as the oracle where the method is the
same, the engine solvers on an isotropic model for the others, callback, progress bar, data of any shape, bad input."""
import pytest
import torch

from aniso_fast import k_diffusion as KD
from aniso_fast.geometry.bases import IsotropicBasis
from aniso_fast.geometry.schedules import karras_sigmas
from aniso_fast.sampling import grids as G
from aniso_fast.sampling.spec import SOLVERS

pytestmark = pytest.mark.usefixtures("one_thread")

f64 = torch.float64
N = 8
SAMPLERS = {"euler": KD.sample_euler, "heun": KD.sample_heun, "dpmpp-2m": KD.sample_dpmpp_2m,
            "dpmpp-3m": KD.sample_dpmpp_3m, "unipc": KD.sample_unipc, "ipndm": KD.sample_ipndm,
            "deis": KD.sample_deis, "em": KD.sample_euler_maruyama}


def _sigmas(n=N, dtype=torch.float32):
    return torch.cat([karras_sigmas(n, 0.002, 80.0), torch.zeros(1, dtype=f64)]).to(dtype)


def _denoiser(gmm):
    """The mixture's exact isotropic denoiser (one sigma for both subspaces), k-diffusion style."""
    def denoiser(x, sigma):
        return gmm.denoise(x.to(f64), (sigma.to(f64) ** 2)[:, None].expand(-1, 2)).to(x.dtype)
    return denoiser


def _start(gmm, sigmas, dtype=torch.float32, B=3):
    return (torch.randn(B, *gmm.image_shape, generator=torch.Generator().manual_seed(0), dtype=f64)
            * float(sigmas[0])).to(dtype)


def _close(ours, theirs, rel):
    assert float((ours - theirs).abs().max()) <= rel * float(theirs.abs().max())


# ---- k-diffusion as the oracle ----

ORACLES = [("euler", "sample_euler", {}, {}), ("heun", "sample_heun", {}, {}), ("dpmpp-2m", "sample_dpmpp_2m", {}, {}),
           ("dpmpp-3m", "sample_dpmpp_3m_sde", {"lower_order_final": False}, {"eta": 0.0})]


@pytest.mark.parametrize("dtype, rel", [(torch.float32, 1e-6), (f64, 1e-12)])
@pytest.mark.parametrize("solver, oracle, ours_kw, theirs_kw", ORACLES, ids=[o[0] for o in ORACLES])
def test_same_samples_as_kdiffusion(gmm, kdiffusion, solver, oracle, ours_kw, theirs_kw, dtype, rel):
    sigmas = _sigmas(dtype=dtype)
    x = _start(gmm, sigmas, dtype)
    den = _denoiser(gmm)
    if oracle == "sample_dpmpp_3m_sde":
        theirs_kw = {**theirs_kw, "noise_sampler": lambda s, t: torch.zeros_like(x)}
    theirs = getattr(kdiffusion, oracle)(den, x, sigmas, disable=True, **theirs_kw)
    ours = SAMPLERS[solver](den, x, sigmas, disable=True, **ours_kw)
    assert ours.dtype == dtype and ours.shape == x.shape
    _close(ours, theirs, rel)


@pytest.mark.parametrize("solver, oracle", [o[:2] for o in ORACLES[:3]], ids=[o[0] for o in ORACLES[:3]])
def test_callback_as_kdiffusion(gmm, kdiffusion, solver, oracle):
    """k-diffusion's keys, one call per step, before the step's update: the same x, sigma and denoised."""
    sigmas = _sigmas()
    x = _start(gmm, sigmas)
    ours, theirs = [], []
    SAMPLERS[solver](_denoiser(gmm), x, sigmas, callback=ours.append, disable=True)
    getattr(kdiffusion, oracle)(_denoiser(gmm), x, sigmas, callback=theirs.append, disable=True)
    assert len(ours) == len(theirs) == N
    for a, b in zip(ours, theirs):
        assert set(a) == set(b) == {"x", "i", "sigma", "sigma_hat", "denoised"}
        assert a["i"] == b["i"] and float(a["sigma"]) == float(b["sigma"]) == float(a["sigma_hat"])
        _close(a["x"], b["x"], 1e-6)
        _close(a["denoised"], b["denoised"], 1e-6)


# ---- every engine solver, through the adapter ----

class IsotropicGMM:
    """The mixture as an isotropic engine model, for the engine's own solvers."""

    def __init__(self, gmm):
        self.gmm, self.basis, self.num_classes = gmm, IsotropicBasis(), None

    def flow(self, x, g, labels=None):
        return self.gmm.flow(x, g.expand(-1, 2).contiguous(), labels)


@pytest.mark.parametrize("solver", list(SAMPLERS))
def test_adapter_runs_the_engine_solver(gmm, solver):
    """On a Karras grid the adapter's sample is the engine solver's on the isotropic model (float64), NFE included."""
    sigmas = _sigmas(dtype=f64)
    x = _start(gmm, sigmas, f64)
    grid = G.Grid(g=(sigmas ** 2)[None, :, None])
    noise = torch.randn(N, *x.shape, generator=torch.Generator().manual_seed(1), dtype=f64)
    draws = iter(noise)
    kw = {"noise": lambda: next(draws)} if solver == "em" else {}
    expected = SOLVERS[solver].run(IsotropicGMM(gmm), x, grid, **kw)
    calls = []

    def den(x, sigma):
        assert bool((sigma > 0).all()), "denoiser called at sigma = 0"
        calls.append(sigma)
        return _denoiser(gmm)(x, sigma)

    pairs = []

    def noise_sampler(sigma, sigma_next):
        pairs.append((sigma, sigma_next))
        return noise[len(pairs) - 1]

    kw = {"noise_sampler": noise_sampler} if solver == "em" else {}
    ours = SAMPLERS[solver](den, x, sigmas, disable=True, **kw)
    _close(ours, expected, 1e-12)
    assert len(calls) == (2 * N - 1 if solver == "heun" else N)
    if solver == "em":
        assert [(float(s), float(t)) for s, t in pairs] == list(zip(sigmas[:-1].tolist(), sigmas[1:].tolist()))


def test_any_data_shape_and_extra_args(kdiffusion):
    """[B, D] and [B, C, T, H, W] data, keyword arguments passed through: Gaussian data N(mu, I)."""
    sigmas = _sigmas()

    def den(x, sigma, mu):
        s = sigma.view(-1, *(1,) * (x.dim() - 1))
        return (x + s ** 2 * mu) / (1 + s ** 2)

    for shape in [(4, 5), (2, 3, 2, 4, 4)]:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(2)) * sigmas[0]
        mu = torch.linspace(-1, 1, x.numel()).reshape(shape)
        ours = KD.sample_heun(den, x, sigmas, extra_args={"mu": mu}, disable=True)
        theirs = kdiffusion.sample_heun(den, x, sigmas, extra_args={"mu": mu}, disable=True)
        assert ours.shape == x.shape
        _close(ours, theirs, 1e-6)


def test_disable_hides_the_progress_bar(gmm, capsys):
    sigmas = _sigmas()
    x = _start(gmm, sigmas)
    KD.sample_euler(_denoiser(gmm), x, sigmas, disable=False)
    assert "sampling" in capsys.readouterr().err
    KD.sample_euler(_denoiser(gmm), x, sigmas, disable=True)
    KD.sample_euler(_denoiser(gmm), x, sigmas)  # None: no bar off a terminal, as tqdm
    assert capsys.readouterr().err == ""


# ---- bad input ----

def _good(gmm):
    sigmas = _sigmas()
    return {"model": _denoiser(gmm), "x": _start(gmm, sigmas), "sigmas": sigmas}


BAD = [({"sigmas": torch.ones(2, 3)}, r"^sigmas: expected a 1-D"),
       ({"sigmas": torch.tensor([1.0])}, r"^sigmas: expected a 1-D"),
       ({"sigmas": torch.tensor([1.0, 2.0, 0.0])}, r"^sigmas: expected finite, positive, strictly decreasing"),
       ({"sigmas": torch.tensor([2.0, -1.0, 0.0])}, r"^sigmas: expected finite, positive"),
       ({"sigmas": torch.tensor([2.0, float("nan"), 0.0])}, r"^sigmas: expected finite"),
       ({"sigmas": torch.tensor([2.0, 1.0, 0.5])}, r"^sigmas: expected the last noise level to be 0"),
       ({"sigmas": "karras"}, r"^sigmas: expected a 1-D tensor"),
       ({"x": [1.0, 2.0]}, r"^x: expected a floating tensor"),
       ({"x": torch.zeros(3, 1, 6, 6, dtype=torch.long)}, r"^x: expected a floating tensor"),
       ({"model": "unet"}, r"^model: expected a denoiser"),
       ({"model": lambda x, s: x[:1]}, r"^model: expected a denoised tensor of x's shape"),
       ({"extra_args": {"cond": torch.zeros(2, 7)}}, r"^extra_args\['cond'\]: expected x's batch size 3"),
       ({"extra_args": [1]}, r"^extra_args: expected a dict"),
       ({"callback": 3}, r"^callback: expected None or a callable"),
       ({"disable": "yes"}, r"^disable: expected None or a bool"),
       ({"ordr": 2}, r"^ordr: not an option of dpmpp-2m"),
       ({"order": 3}, r"^order: dpmpp-2m takes order 2"),
       ({"final_euler": False}, r"^final_euler: not an option"),
       ({"lower_order_final": 1}, r"^lower_order_final: expected a bool")]


@pytest.mark.parametrize("change, match", BAD, ids=[m.split(":")[0].strip("^\\") for _, m in BAD])
def test_bad_input_is_one_line_value_error(gmm, change, match):
    args = {**_good(gmm), "disable": True, **change}
    with pytest.raises(ValueError, match=match) as err:
        KD.sample_dpmpp_2m(**args)
    assert "\n" not in str(err.value)


def test_bad_noise_sampler(gmm):
    with pytest.raises(ValueError, match=r"^noise_sampler: expected None or a callable"):
        KD.sample_euler_maruyama(**_good(gmm), noise_sampler=1.0)
