"""VSMD's phase space through a VE denoiser (`aniso_fast.processes.phase_space`): the transition of the PF-ODE's linear part
against RK4, the denoiser view's velocity score against autograd of the exact phase-space density of a Gaussian
mixture, and the phase-space DPM-Solver++(2M): exact for point data, first and second order on the mixture."""
import math

import pytest
import torch

from aniso_fast.processes import families
from aniso_fast.geometry.bases import DCTBasis
from aniso_fast.processes.phase_space import GRIDS, VSMDDenoiser, dpmpp_2m, flow_transition, given_data, sigma_grid
from aniso_fast.networks.precond import AnisoPrecond
from aniso_fast.sampling.spec import resolve_sampler
from aniso_fast.processes.vsmd import VSMDPrecond, VSMDProcess, sample_ode

F64 = torch.float64
SHAPE = (1, 4, 4)

pytestmark = pytest.mark.usefixtures("one_thread")


def _basis():
    return DCTBasis(4, 4, bands=(2, 3))  # subspaces of 4, 5 and 7 dimensions


def _process(zeta=1.0, classes=None):
    c = [0.0, -0.3, 0.2] if classes is None else [[0.1 * i, -0.3, 0.2 - 0.1 * i] for i in range(classes)]
    return VSMDProcess(3, classes, c=c, zeta=zeta).double()


class _Shape(torch.nn.Module):
    """A stand-in network that only reports its shape (the mixture below denoises exactly)."""
    label_dim = 0

    def config(self):
        return {"in_channels": 1, "img_resolution": 4}


class Mixture(AnisoPrecond):
    """The exact posterior mean E[x0 | x0 + N(0, sum_k g_k P_k) = y] of a Gaussian mixture with isotropic
    components N(mu_m, s_m^2 I) on 4x4 images."""

    def __init__(self, basis, seed=0, point=False):
        super().__init__(_Shape(), basis)
        gen = torch.Generator().manual_seed(seed)
        self.mu = torch.randn(3, 16, generator=gen, dtype=F64) * 0.6
        self.s2 = torch.zeros(3, dtype=F64) if point else torch.tensor([0.05, 0.1, 0.2], dtype=F64)
        self.logw = torch.tensor([0.2, 0.5, 0.3], dtype=F64).log()
        if point:
            self.mu, self.s2, self.logw = self.mu[:1], self.s2[:1], self.logw[:1]
        eye = torch.eye(16, dtype=F64).reshape(16, *SHAPE)
        self.P = torch.stack([basis.scale(eye, torch.eye(3, dtype=F64)[k].expand(16, 3)).reshape(16, 16)
                              for k in range(3)])  # [K, 16, 16], symmetric projectors

    def noise(self, g):  # [B, 16, 16]
        return torch.einsum("bk,kij->bij", g.to(F64), self.P)

    def denoise(self, y, g, labels=None):
        y = y.reshape(y.shape[0], 16).to(F64)
        C = self.s2[:, None, None, None] * torch.eye(16, dtype=F64) + self.noise(g)[None]  # [M, B, 16, 16]
        r = y[None] - self.mu[:, None]
        sol = torch.linalg.solve(C, r[..., None])[..., 0]
        logp = self.logw[:, None] - 0.5 * (r * sol).sum(-1) - 0.5 * torch.linalg.slogdet(C)[1]
        w = logp.softmax(0)
        means = self.mu[:, None] + self.s2[:, None, None] * sol
        return (w[..., None] * means).sum(0).reshape(-1, *SHAPE)


def _blocks_to_matrix(mix, blocks):
    """sum_k blocks[:, k] P_k as [B, 16, 16] for per-subspace scalars blocks [B, K]."""
    return torch.einsum("bk,kij->bij", blocks, mix.P)


def test_transition_solves_the_linear_flow_like_rk4():
    """Phi(t_b, t_a) against RK4 on dz/du = t A(t) z, u = ln t (300 steps; the quadrature of theta leaves ~4e-7)."""
    for zeta, spans in ((1.0, ((0.9, 0.2), (0.05, 0.004))), (0.7, ((0.05, 0.004),))):
        process = _process(zeta, classes=3)
        labels = torch.tensor([0, 2, 1])
        F = process.drift_blocks(labels).detach()

        def f(u, Phi):
            t = math.exp(u)
            _, S = given_data(process, torch.full((3,), t, dtype=F64), labels)
            Q = torch.zeros_like(S)
            Q[..., 1, 1] = process.gamma * process.beta
            return t * (F + 0.5 * Q @ torch.linalg.inv(S)).detach() @ Phi

        for ta, tb in spans:
            n, u = 300, math.log(ta)
            h = (math.log(tb) - u) / n
            Phi = torch.eye(2, dtype=F64).expand(3, 3, 2, 2).clone()
            for _ in range(n):
                k1 = f(u, Phi)
                k2 = f(u + h / 2, Phi + h / 2 * k1)
                k3 = f(u + h / 2, Phi + h / 2 * k2)
                k4 = f(u + h, Phi + h * k3)
                Phi, u = Phi + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4), u + h
            with torch.no_grad():
                mine = flow_transition(process, torch.full((3,), tb, dtype=F64), torch.full((3,), ta, dtype=F64),
                                       labels)
            assert torch.allclose(mine, Phi, atol=2e-6, rtol=0), (zeta, ta, tb, (mine - Phi).abs().max())
            assert not torch.allclose(mine, torch.eye(2, dtype=F64), atol=1e-2)


def _exact_velocity_score(mix, process, z, t):
    """grad_v log p_t(z) by autograd of the mixture's phase-space density (full 32 x 32 covariances)."""
    B = z.shape[0]
    with torch.no_grad():
        e, S = given_data(process, torch.full((B,), t, dtype=F64))
    e, S = e.expand(B, -1, -1), S.expand(B, -1, -1, -1)
    Ex, Ev = _blocks_to_matrix(mix, e[..., 0]), _blocks_to_matrix(mix, e[..., 1])
    Sm = [[_blocks_to_matrix(mix, S[..., i, j]) for j in range(2)] for i in range(2)]
    z = z.reshape(B, 32).clone().requires_grad_(True)
    terms = []
    for m in range(len(mix.s2)):
        mean = torch.cat([Ex @ mix.mu[m], Ev @ mix.mu[m]], -1)
        s2 = mix.s2[m]
        cov = torch.cat([torch.cat([s2 * Ex @ Ex + Sm[0][0], s2 * Ex @ Ev + Sm[0][1]], -1),
                         torch.cat([s2 * Ev @ Ex + Sm[1][0], s2 * Ev @ Ev + Sm[1][1]], -1)], -2)
        r = z - mean
        quad = (r * torch.linalg.solve(cov, r[..., None])[..., 0]).sum(-1)
        terms.append(mix.logw[m] - 0.5 * quad - 0.5 * torch.linalg.slogdet(cov)[1])
    grad, = torch.autograd.grad(torch.logsumexp(torch.stack(terms), 0).sum(), z)
    return grad[:, 16:].reshape(B, *SHAPE)


@pytest.mark.parametrize("zeta", [1.0, 0.8])
def test_denoiser_view_gives_the_exact_velocity_score_of_a_mixture(zeta):
    basis, process = _basis(), _process(zeta)
    mix = Mixture(basis)
    model = VSMDDenoiser(mix, process)
    gen = torch.Generator().manual_seed(1)
    for t in (0.003, 0.1, 0.5, 1.0):
        z = torch.randn(5, 2, 4, 4, generator=gen, dtype=F64) * 0.8
        with torch.no_grad():
            mine = model(z, torch.full((5,), t, dtype=F64))
        exact = _exact_velocity_score(mix, process, z, t)
        err = (mine - exact).abs().max() / exact.abs().max()
        assert err < 1e-7, (t, err)


def _start(process, basis, B, seed=3):
    gen = torch.Generator().manual_seed(seed)
    eps = [torch.randn(B, *SHAPE, generator=gen, dtype=F64) for _ in range(2)]
    with torch.no_grad():
        return process.prior_sample(basis, *eps)


def test_first_order_step_is_exact_for_point_data():
    """With one data point the ODE's solution is z = e x0 + Phi (z_T - e_T x0); DDIM-type steps hold D fixed."""
    basis, process = _basis(), _process()
    mix = Mixture(basis, point=True)
    model = VSMDDenoiser(mix, process)
    x, v = _start(process, basis, 4)
    T, t0 = torch.full((4,), process.T, dtype=F64), torch.full((4,), process.t0, dtype=F64)
    with torch.no_grad():
        ts = sigma_grid(process, "logsnr", 3, 4, None)
        got, got_v = dpmpp_2m(process, model, x, v, ts, None, order=2)
        x0 = mix.mu[0].reshape(1, *SHAPE).expand(4, -1, -1, -1)
        e_T, _ = given_data(process, T)
        e_0, _ = given_data(process, t0)
        rx, rv = basis.block_combine(x0, x0, torch.diag_embed(-e_T.expand(4, -1, -1)), x, v)
        rx, rv = basis.block_combine(rx, rv, flow_transition(process, t0, T))
        want = basis.block_combine(x0, x0, torch.diag_embed(e_0.expand(4, -1, -1)), rx, rv)
    assert torch.allclose(got, want[0], atol=1e-9) and torch.allclose(got_v, want[1], atol=1e-9)


@pytest.mark.parametrize("grid,orders", [("edm_sigma", (1, 2)), ("logsnr", (2,))])
def test_dpmpp_2m_converges_at_its_order_on_the_mixture(grid, orders):
    """RMS error against 512 steps at 32, 64 and 128 steps: halves per doubling at order 1, quarters at order 2
    (uniform t at order 2 and logsnr at order 1 are not yet asymptotic at these step counts: not asserted)."""
    basis, process = _basis(), _process()
    model = VSMDDenoiser(Mixture(basis), process)
    x, v = _start(process, basis, 6)

    def run(n, order):
        with torch.no_grad():
            return dpmpp_2m(process, model, x, v, sigma_grid(process, grid, n, 6, None), None, order=order)[0]

    ref = run(512, 2)
    bounds = {1: (1.7, 2.7), 2: (3.4, 5.5)}
    for order in orders:
        errs = [(run(n, order) - ref).square().mean().sqrt().item() for n in (32, 64, 128)]
        ratios = [a / b for a, b in zip(errs, errs[1:])]
        lo, hi = bounds[order]
        assert all(lo < r < hi for r in ratios), (order, grid, errs, ratios)


def test_grids_run_from_T_to_t0_and_follow_the_mean_log_sigma():
    process = _process(classes=3)
    labels = torch.tensor([0, 1, 2, 1])
    for grid in GRIDS:
        ts = sigma_grid(process, grid, 6, 4, labels)
        assert ts.shape == (4, 7)
        assert torch.all(ts[:, 0] == process.T) and torch.all(ts[:, -1] == process.t0)
        assert torch.all(ts.diff(dim=1) < 0)
        assert torch.equal(ts[1], ts[3])  # the grid depends on the class only
        if grid == "logsnr":  # the mean log sigma steps evenly down to its clipped end, then t0
            from aniso_fast.processes.phase_space import denoiser_view
            with torch.no_grad():
                logsig = denoiser_view(process, ts[:, :-1].reshape(-1), labels.repeat_interleave(6)).g.log()
            steps = logsig.mean(-1).reshape(4, 6).diff(dim=1) / 2
            assert torch.allclose(steps, steps[:, :1].expand_as(steps), rtol=1e-4), steps
    with pytest.raises(ValueError, match="^grid: "):
        sigma_grid(process, "karras", 6, 4, labels)


def test_sampler_rules_for_the_phase_space():
    families.resolve_sampler("vsmd", "dpmpp-2m", "logsnr", None, 5)
    families.resolve_sampler("vsmd", "dpmpp-2m", "edm_sigma", None, 5)
    with pytest.raises(ValueError, match="^grid: "):
        families.resolve_sampler("vsmd", "heun", "logsnr", None, 5)
    with pytest.raises(ValueError, match="^grid: "):
        families.resolve_sampler("vsmd", "dpmpp-2m", "karras", None, 5)
    basis, process = _basis(), _process()
    velocity = VSMDPrecond(_ShapeNet(), process, basis)
    with pytest.raises(ValueError, match="^solver: dpmpp-2m needs the denoiser head"):
        sample_ode(process, velocity, [0], 5, solver="dpmpp-2m", grid="logsnr")
    with pytest.raises(ValueError, match="^denoiser: "):
        VSMDDenoiser(velocity, process)
    model = VSMDDenoiser(Mixture(basis), process)
    with pytest.raises(ValueError, match="^z: "):
        model(torch.zeros(2, 1, 4, 4, dtype=F64), 0.5)
    with pytest.raises(ValueError, match="^t: "):
        model(torch.zeros(2, 2, 4, 4, dtype=F64), 0.0)
    x, _, info = sample_ode(process, model, [0, 1], 4, solver="dpmpp-2m", grid="edm_sigma", dtype=F64)
    assert info["nfe"] == 4 and x.shape == (2, *SHAPE) and torch.isfinite(x).all()
    assert resolve_sampler("dpmpp-2m", "logsnr", None, 4).steps == 4


class _ShapeNet(torch.nn.Module):
    label_dim = 0
    image_shape = SHAPE


def test_velocity_score_is_finite_near_the_end_time():
    basis, process = _basis(), _process()
    model = VSMDDenoiser(Mixture(basis), process)
    z = torch.randn(3, 2, 4, 4, dtype=F64)
    with torch.no_grad():
        s = model(z, process.t0)
    assert torch.isfinite(s).all() and s.abs().max() < 1e6 * math.sqrt(16)


class _Calls(torch.nn.Module):
    """A stand-in for the trainer's DistributedDataParallel wrapper: counts the calls it forwards."""

    def __init__(self, net):
        super().__init__()
        self.module, self.calls = net, 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.module(*args, **kwargs)


def test_set_network_reaches_the_network_inside_the_denoiser_head():
    from aniso_fast.networks.unet import SongUNet

    net = SongUNet(img_resolution=4, in_channels=1, out_channels=1, model_channels=8, channel_mult=(1,),
                   num_blocks=1, attn_resolutions=()).double()
    basis, process = _basis(), _process()
    denoiser = VSMDDenoiser(AnisoPrecond(net, basis), process)
    wrapped = _Calls(net)
    denoiser.set_network(wrapped)
    z, t = torch.randn(2, 2, 4, 4, dtype=F64), torch.full((2,), 0.5, dtype=F64)
    with torch.no_grad():
        denoiser(z, t)
    assert wrapped.calls == 1 and denoiser.net is wrapped and denoiser.denoiser.net is wrapped
    assert not any(m is wrapped for name, m in denoiser.named_children() if name != "denoiser")
