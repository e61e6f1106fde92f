"""The VSDM process (issue 12, "The process"): closed form against a dense float64 path (matrix_exp and the
matrix-fraction covariance of docs/METHOD.md §11.2), the Gaussian transition, the adaptive prior, the mapping onto
the engine's matrix VE process, and the bad-input checks."""
import json
import math

import pytest
import torch
from scipy.integrate import quad

from aniso_fast.geometry.bases import DCTBasis, PCABasis
from aniso_fast.networks.gmm import GaussianMixture
from aniso_fast.sampling.grids import schedule_grid, uniform_t
from aniso_fast.sampling.noise import seeded_noise
from aniso_fast.sampling.sampler import sample
from aniso_fast.processes.vsdm import PowerBeta, VSDMProcess

F64 = torch.float64
SHAPE = (1, 4, 4)
D = 16
TIMES = [0.0, 0.01, 0.2, 0.55, 1.0]


def _identity_basis():
    # one subspace per pixel (VSDM's image code): 15 unit directions and the last pixel as the complement
    return PCABasis(torch.eye(D, dtype=F64)[:-1], SHAPE, [1] * (D - 1))


def _pca_basis(groups=1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    V = torch.stack([torch.linalg.qr(torch.randn(D, D, generator=gen, dtype=F64))[0][:10] for _ in range(groups)])
    return PCABasis(V, SHAPE, [3, 4, 3], torch.arange(groups) if groups > 1 else None)


pytestmark = pytest.mark.usefixtures("one_thread")


BASES = {"identity": _identity_basis, "dct": lambda: DCTBasis(4, 4, bands=(1, 2)), "pca": _pca_basis}


def _rates(S, K, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return -1.0 + 1.45 * torch.rand(S, K, generator=gen, dtype=F64)  # lambda in (-1, 0.45)


def _projectors(basis, group=0):
    return torch.stack([basis.projector_matrix(k, 1, group) for k in range(basis.num_subspaces)])


def _B_quad(beta: PowerBeta, t: float) -> float:
    return quad(beta.beta, 0.0, t, epsabs=1e-13, epsrel=1e-13)[0]


def _dense_transition(Dmat, Bt, Sigma0=None):
    """Mean map expm(-B D / 2); covariance C H^{-1} with [C; H] = expm(B [[-D/2, I], [0, D^T/2]]) [S0; I]."""
    d = Dmat.shape[0]
    eye = torch.eye(d, dtype=F64)
    Sigma0 = torch.zeros(d, d, dtype=F64) if Sigma0 is None else Sigma0
    ham = torch.zeros(2 * d, 2 * d, dtype=F64)
    ham[:d, :d], ham[:d, d:], ham[d:, d:] = -Dmat / 2, eye, Dmat.T / 2
    CH = torch.linalg.matrix_exp(Bt * ham) @ torch.cat([Sigma0, eye])
    return torch.linalg.matrix_exp(-Bt * Dmat / 2), CH[:d] @ torch.linalg.inv(CH[d:])


def _drift_matrix(process, P, label=0):
    lam = process.rates.detach()[label]
    return torch.eye(D, dtype=F64) - 2 * torch.einsum("k,kij->ij", lam, P)


def _operator(values, P):
    """sum_k values[k] P_k."""
    return torch.einsum("k,kij->ij", values, P)


def _images_to_matrix(x):
    return x.reshape(x.shape[0], -1)


def test_power_beta_matches_vsdm_formula_and_quadrature():
    beta = PowerBeta()
    assert (beta.beta_min, beta.beta_max, beta.beta_r, beta.T) == (0.1, 20.0, 1.7, 1.0)
    t = torch.tensor([0.0, 0.3, 1.0], dtype=F64)
    torch.testing.assert_close(beta.beta(t), 0.1 + t ** 1.7 * 19.9, rtol=1e-15, atol=0)
    for b in (beta, PowerBeta(0.5, 3.0, 0.0, 2.0), PowerBeta(1.0, 0.2, 2.5, 1.0)):
        for tv in (0.0, 0.37, b.T):
            assert float(b.integral(torch.tensor(tv, dtype=F64))) == pytest.approx(_B_quad(b, tv), rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("name", list(BASES))
def test_closed_form_matches_matrix_exp_and_matrix_fraction(name):
    basis = BASES[name]()
    K = basis.num_subspaces
    process = VSDMProcess(K, rates=_rates(1, K))
    P = _projectors(basis)
    Dmat = _drift_matrix(process, P)
    eye = torch.eye(D, dtype=F64).reshape(D, *SHAPE)
    zero = torch.zeros_like(eye)
    for tv in TIMES:
        mean_map, cov = _dense_transition(Dmat, _B_quad(process.beta, tv))
        alpha, sigma = process.alpha(tv)[0][0].detach(), process.sigma(tv)[0][0].detach()
        torch.testing.assert_close(_operator(alpha, P), mean_map, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(_operator(sigma ** 2, P), cov, rtol=1e-10, atol=1e-12)
        # the same through the basis ops: x_t = alpha x0 + sigma eps, columns of the identity
        with torch.no_grad():
            A_t = _images_to_matrix(process.perturb(basis, eye, zero, tv))
            S_t = _images_to_matrix(process.perturb(basis, zero, eye, tv))
        torch.testing.assert_close(A_t, mean_map, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(S_t @ S_t.T, cov, rtol=1e-10, atol=1e-12)


def test_per_class_rates_with_per_class_basis():
    basis = _pca_basis(groups=2, seed=3)
    process = VSDMProcess(basis.num_subspaces, num_classes=2, rates=_rates(2, basis.num_subspaces, seed=4))
    labels = torch.tensor([1, 0, 1])
    t = torch.tensor([0.3, 0.8, 1.0], dtype=F64)
    alpha, sigma = process.alpha(t, labels)[0].detach(), process.sigma(t, labels)[0].detach()
    for b in range(3):
        P = _projectors(basis, group=int(labels[b]))
        mean_map, cov = _dense_transition(_drift_matrix(process, P, int(labels[b])), _B_quad(process.beta, float(t[b])))
        torch.testing.assert_close(_operator(alpha[b], P), mean_map, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(_operator(sigma[b] ** 2, P), cov, rtol=1e-10, atol=1e-12)


def test_time_derivatives_match_autograd_and_finite_differences():
    process = VSDMProcess(4, rates=[0.4, 0.1, -0.5, -2.0], beta_r=2.3)
    view = process.ve_schedule()
    t = torch.tensor([0.05, 0.3, 0.61, 0.97], dtype=F64, requires_grad=True)
    h = 1e-6
    for fn in (process.alpha, process.sigma, process.g, view):
        value, deriv = fn(t)
        for k in range(4):
            (grad,) = torch.autograd.grad(value[:, k].sum(), t, retain_graph=True)
            # atol: autograd's own chain cancels where e^{-rB} ~ 1e-12
            torch.testing.assert_close(deriv[:, k], grad, rtol=1e-10, atol=1e-13)
        with torch.no_grad():
            fd = (fn(t + h)[0] - fn(t - h)[0]) / (2 * h)
        torch.testing.assert_close(deriv.detach(), fd, rtol=1e-6, atol=1e-9)
    # the relations the engine relies on: g = sigma^2 / alpha^2, dg/dt = beta / alpha^2
    with torch.no_grad():
        (a, _), (s, _), (g, gdot) = process.alpha(t), process.sigma(t), process.g(t)
        torch.testing.assert_close(g, s ** 2 / a ** 2, rtol=1e-12, atol=0)
        torch.testing.assert_close(gdot, process.beta.beta(t)[:, None] / a ** 2, rtol=1e-12, atol=0)


def test_start_point_and_vanishing_decay_are_finite():
    process = VSDMProcess(3, rates=[0.3, 0.0, -1.0])
    alpha, sigma, g = (fn(0.0)[0] for fn in (process.alpha, process.sigma, process.g))
    assert torch.equal(alpha, torch.ones(1, 3, dtype=F64)) and not sigma.any() and not g.any()
    assert bool(torch.isinf(process.sigma(0.0)[1]).all())  # d sigma/dt ~ 1/sqrt(t): honest, not NaN
    # 1 - 2 lambda underflowing to 0: the limit sigma^2 = g = B(t), alpha = 1, with finite gradients
    with torch.no_grad():
        process.log_decay.fill_(-800.0)
    B = float(process.beta.integral(torch.tensor(0.7, dtype=F64)))
    s, g = process.sigma(0.7)[0], process.g(0.7)[0]
    torch.testing.assert_close(s ** 2, torch.full_like(s, B), rtol=1e-14, atol=0)
    torch.testing.assert_close(g, torch.full_like(g, B), rtol=1e-14, atol=0)
    (grad,) = torch.autograd.grad(s.sum() + g.sum(), process.log_decay)
    assert bool(torch.isfinite(grad).all())


@pytest.mark.parametrize("name", ["dct", "identity"])
def test_adaptive_prior_is_the_transition_covariance_at_T(name):
    basis = BASES[name]()
    K = basis.num_subspaces
    process = VSDMProcess(K, rates=_rates(1, K, seed=5))
    std = process.prior_std().detach()
    torch.testing.assert_close(std, process.sigma(process.T)[0].detach(), rtol=0, atol=0)
    _, cov_T = _dense_transition(_drift_matrix(process, _projectors(basis)), _B_quad(process.beta, 1.0))
    with torch.no_grad():
        S = _images_to_matrix(process.prior_sample(basis, torch.eye(D, dtype=F64).reshape(D, *SHAPE)))
    torch.testing.assert_close(S @ S.T, cov_T, rtol=1e-10, atol=1e-12)
    # lambda = 0 is VP: the prior tends to N(0, I) as B(T) grows; other rates give another prior
    vp = VSDMProcess(K).prior_std().detach()
    torch.testing.assert_close(vp, torch.full_like(vp, math.sqrt(-math.expm1(-_B_quad(process.beta, 1.0)))))
    assert (std - 1).abs().max() > 0.1


def test_gaussian_data_pushed_forward_matches_analytic_and_empirical_marginal():
    basis = DCTBasis(4, 4, bands=(1, 2))
    process = VSDMProcess(3, rates=[0.35, -0.2, -0.8])
    P = _projectors(basis)
    gen = torch.Generator().manual_seed(7)
    m = torch.randn(D, generator=gen, dtype=F64)
    L = torch.randn(D, D, generator=gen, dtype=F64) / 4
    C = L @ L.T + 0.05 * torch.eye(D, dtype=F64)  # not diagonal in the basis
    n = 100_000
    x0 = (m + torch.randn(n, D, generator=gen, dtype=F64) @ L.T
          + math.sqrt(0.05) * torch.randn(n, D, generator=gen, dtype=F64)).reshape(n, *SHAPE)
    eps = torch.randn(n, *SHAPE, generator=gen, dtype=F64)
    for tv in (0.1, 0.5, 1.0):
        mean_map, cov = _dense_transition(_drift_matrix(process, P), _B_quad(process.beta, tv), C)
        alpha, sigma = process.alpha(tv)[0][0].detach(), process.sigma(tv)[0][0].detach()
        A_t = _operator(alpha, P)
        torch.testing.assert_close(A_t @ C @ A_t + _operator(sigma ** 2, P), cov, rtol=1e-10, atol=1e-12)
        with torch.no_grad():
            xt = _images_to_matrix(process.perturb(basis, x0, eps, tv))
        torch.testing.assert_close(xt.mean(0), mean_map @ m, rtol=0, atol=0.02)
        torch.testing.assert_close(torch.cov(xt.T), cov, rtol=0, atol=0.03)


def test_mapped_ve_process_has_the_same_marginals():
    basis = _pca_basis(seed=11)
    K = basis.num_subspaces
    process = VSDMProcess(K, rates=_rates(1, K, seed=12))
    view = process.ve_schedule()
    P = _projectors(basis)
    gen = torch.Generator().manual_seed(13)
    L = torch.randn(D, D, generator=gen, dtype=F64) / 3
    C = L @ L.T
    s = torch.tensor([0.0, 0.25, 0.8, 1.0], dtype=F64)
    t = view.process_time(s)
    assert float(t[0]) == process.t0 and float(t[-1]) == process.T
    g_view, _ = view(s)
    torch.testing.assert_close(g_view, process.g(t)[0], rtol=0, atol=0)
    for b in range(len(s)):
        # y = x / alpha is x0 + M^{1/2} eps, M = sum_k g_k P_k: mapped back by alpha it is VSDM's marginal
        A = _operator(process.alpha(t[b])[0][0].detach(), P)
        _, cov = _dense_transition(_drift_matrix(process, P), _B_quad(process.beta, float(t[b])), C)
        # tolerance: g reaches e^{rB} ~ 1e9 here and alpha^2 ~ 1e-9, the matrix fraction inverts H ~ e^{rB/2}
        torch.testing.assert_close(A @ (C + _operator(g_view[b].detach(), P)) @ A, cov, rtol=1e-7, atol=1e-9)
    # the solvers' grid is the view evaluated on their times; to_ve / from_ve are inverse maps
    grid = schedule_grid(view, uniform_t(6, view.T), secondary="mid")
    torch.testing.assert_close(grid.g[0], view(uniform_t(6, view.T))[0].detach(), rtol=0, atol=0)
    x = torch.randn(5, *SHAPE, generator=gen, dtype=F64)
    with torch.no_grad():
        torch.testing.assert_close(process.from_ve(basis, process.to_ve(basis, x, 0.4), 0.4), x, rtol=1e-12, atol=1e-12)
        # the solvers' start y_T = g(T)^{1/2} z is the adaptive prior draw divided by alpha(T)
        z = seeded_noise(range(5), SHAPE, dtype=F64)
        y_T = basis.scale(z, view(view.T)[0].sqrt().expand(5, -1))
        torch.testing.assert_close(process.to_ve(basis, process.prior_sample(basis, z), process.T), y_T,
                                   rtol=1e-10, atol=1e-12)


def _gaussian_model():
    gmm = GaussianMixture.toy(1, 4, 4, bands=(1, 2), num_components=1, seed=2)
    Q = _projectors(gmm.fine)
    return gmm, gmm.means[0].reshape(D), _operator(gmm.variances[0], Q)


def _dense_velocity(process, Dmat, mu, Sigma0, x, t):
    """VSDM's probability-flow ODE in x: dx/dt = -beta/2 (D x + grad log p_t(x)), p_t Gaussian (dense)."""
    mean_map, cov = _dense_transition(Dmat, float(process.beta.integral(torch.tensor(t, dtype=F64))), Sigma0)
    score = -torch.linalg.solve(cov, (x - mean_map @ mu).T).T
    return -0.5 * float(process.beta.beta(torch.tensor(t, dtype=F64))) * (x @ Dmat.T + score)


def test_engine_flow_on_the_view_is_vsdm_probability_flow():
    gmm, mu, Sigma0 = _gaussian_model()
    basis = gmm.basis
    process = VSDMProcess(basis.num_subspaces, rates=[0.3, -0.4, -1.2])
    view = process.ve_schedule()
    Dmat = _drift_matrix(process, _projectors(basis))
    x = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(3), dtype=F64)
    dsdt = view.T / (view.T - process.t0)
    with torch.no_grad():
        for s in (0.0, 0.1, 0.5, 1.0):
            t = float(view.process_time(s))
            g, dgds = (v.expand(4, -1) for v in view(s))
            y = process.to_ve(basis, x, t)
            dyds = basis.scale(gmm.flow(y, g), -dgds / (2 * g.sqrt()))  # the engine's ODE: dy = -dS F
            a, adot = (v.expand(4, -1) for v in process.alpha(t))
            dxdt = basis.combine(y, adot, dyds, a * dsdt)  # x = alpha y
            want = _dense_velocity(process, Dmat, mu, Sigma0, _images_to_matrix(x), t)
            torch.testing.assert_close(_images_to_matrix(dxdt), want, rtol=1e-9, atol=1e-9)


def test_solvers_sample_vsdm_through_the_view():
    gmm, mu, Sigma0 = _gaussian_model()
    basis = gmm.basis
    process = VSDMProcess(basis.num_subspaces, rates=[0.3, -0.4, -1.2])
    view = process.ve_schedule()
    Dmat = _drift_matrix(process, _projectors(basis))
    seeds = range(4)
    with torch.no_grad():
        y, _, info = sample(gmm, view, nfe=100, solver="heun", grid="uniform_t", secondary="mid", seeds=seeds,
                            image_shape=SHAPE, dtype=F64)
        x = _images_to_matrix(process.from_ve(basis, y, process.t0))
        # reference: RK4 on VSDM's own probability-flow ODE from the same adaptive-prior draw (1e-7 accurate)
        xr = _images_to_matrix(process.prior_sample(basis, seeded_noise(seeds, SHAPE, dtype=F64)))
    ts = torch.linspace(process.T, process.t0, 101, dtype=F64).tolist()
    for ta, tb in zip(ts[:-1], ts[1:]):
        h, tm = tb - ta, (ta + tb) / 2
        k1 = _dense_velocity(process, Dmat, mu, Sigma0, xr, ta)
        k2 = _dense_velocity(process, Dmat, mu, Sigma0, xr + h / 2 * k1, tm)
        k3 = _dense_velocity(process, Dmat, mu, Sigma0, xr + h / 2 * k2, tm)
        k4 = _dense_velocity(process, Dmat, mu, Sigma0, xr + h * k3, tb)
        xr = xr + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    assert info["steps"] == 50 and float(xr.abs().max()) > 0.5
    torch.testing.assert_close(x, xr, rtol=0, atol=1e-4)  # midpoint Heun, 50 steps: 2e-5 measured


def test_rates_stay_contracting_and_learnable():
    process = VSDMProcess(2, rates=[0.2, -0.3])
    torch.testing.assert_close(process.rates.detach(), torch.tensor([[0.2, -0.3]], dtype=F64))
    loss = process.sigma(torch.tensor([0.5, 1.0], dtype=F64))[0].sum() + process.alpha(0.3)[0].sum()
    loss.backward()
    assert bool((process.log_decay.grad != 0).all())
    with torch.no_grad():
        process.log_decay.copy_(torch.tensor([[-30.0, 30.0]]))  # any parameter value is a valid process
    assert bool((1 - 2 * process.rates > 0).all())


def test_config_state_dict_round_trip():
    process = VSDMProcess(3, num_classes=2, rates=[[0.1, 0.0, -0.5], [0.2, 0.3, -1.0]], beta_min=0.2,
                          beta_max=10.0, beta_r=0.0, T=2.0, t0=0.05)
    with torch.no_grad():
        process.log_decay.add_(0.1)
    cfg = json.loads(json.dumps(process.config()))
    copy = VSDMProcess.from_config(cfg)
    copy.load_state_dict(process.state_dict())
    labels = torch.tensor([0, 1, 1])
    t = torch.tensor([0.0, 1.0, 2.0], dtype=F64)
    for fn in ("alpha", "sigma", "g"):
        for got, want in zip(getattr(copy, fn)(t, labels), getattr(process, fn)(t, labels)):
            torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    assert VSDMProcess.from_config(VSDMProcess(4).config()).config() == VSDMProcess(4).config()


@pytest.mark.parametrize("kwargs, name", [
    ({"rates": 0.5}, "rates"), ({"rates": [0.1, 0.7, 0.0]}, "rates"), ({"rates": float("nan")}, "rates"),
    ({"rates": [0.0, float("-inf"), 0.0]}, "rates"), ({"rates": [0.1, 0.2]}, "rates"),
    ({"rates": [[0.1, 0.2, 0.3]] * 2}, "rates"),
    ({"beta_min": 0.0}, "beta_min"), ({"beta_min": -0.1}, "beta_min"), ({"beta_min": float("nan")}, "beta_min"),
    ({"beta_max": 0.0}, "beta_max"), ({"beta_max": float("inf")}, "beta_max"), ({"beta_max": -5.0}, "beta_max"),
    ({"beta_r": -1.0}, "beta_r"), ({"T": 0.0}, "T"), ({"t0": 0.0}, "t0"), ({"t0": 1.0}, "t0"),
    ({"num_subspaces": 0}, "num_subspaces"), ({"num_classes": 0}, "num_classes"),
])
def test_bad_process_arguments_raise_naming_them(kwargs, name):
    args = {"num_subspaces": 3, **kwargs}
    with pytest.raises(ValueError, match=rf"^{name}: expected"):
        VSDMProcess(**args)


def test_basis_with_other_K_than_the_rates_is_refused():
    process = VSDMProcess(4, rates=[0.1, 0.0, -0.2, 0.3])
    basis = DCTBasis(4, 4, bands=(1, 2))  # K = 3
    x = torch.zeros(2, *SHAPE, dtype=F64)
    for call in (lambda: process.perturb(basis, x, x, 0.5), lambda: process.prior_sample(basis, x),
                 lambda: process.to_ve(basis, x, 0.5), lambda: process.from_ve(basis, x, 0.5)):
        with pytest.raises(ValueError, match=r"^basis: expected 4 subspaces \(one rate each\), got a basis with 3"):
            call()


def test_bad_times_and_labels_raise_naming_them():
    process = VSDMProcess(2, num_classes=3)
    labels = torch.tensor([0, 2])
    for t in (-0.1, 1.5, float("nan"), torch.tensor([0.2, float("inf")], dtype=F64)):
        with pytest.raises(ValueError, match=r"^t: expected finite times in \[0, T=1\]"):
            process.alpha(t, labels)
    with pytest.raises(ValueError, match=r"^s: expected finite times"):
        process.ve_schedule()(1.2, labels)
    with pytest.raises(ValueError, match=r"^labels: required"):
        process.g(0.5)
    with pytest.raises(ValueError, match=r"^labels: expected class labels in \[0, 3\)"):
        process.sigma(0.5, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"^t: batch size 3 does not match labels' 2"):
        process.sigma(torch.tensor([0.1, 0.2, 0.3], dtype=F64), labels)
    basis = DCTBasis(4, 4, bands=(2,))
    with pytest.raises(ValueError, match=r"^t: batch size 2 does not match the images' 3"):
        VSDMProcess(2).perturb(basis, torch.zeros(3, *SHAPE), torch.zeros(3, *SHAPE), torch.tensor([0.1, 0.2]))
