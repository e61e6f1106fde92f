"""The VSMD process and its velocity-score network (issue 13, items 1 and 3 in part): the closed-form 2x2
transition against matrix_exp and the matrix-fraction covariance (docs/METHOD.md §12.2) in float64, critical damping,
the dense phase-space SDE through a real basis, the velocity prior, gradients to c, the EDM start of the
network, VSMD's preconditioning and the bad-input checks."""
import math

import pytest
import torch

from aniso_fast.geometry.bases import DCTBasis, IsotropicBasis, PCABasis
from aniso_fast.networks.unet import SongUNet
from aniso_fast.processes.velocity import VelocityScoreNet, VSMDPrecond
from aniso_fast.processes.vsmd import VSMDProcess

F64 = torch.float64
SHAPE = (1, 4, 4)
D = 16
TIMES = [0.0, 1e-6, 1e-3, 0.05, 0.3, 0.55, 1.0]
ZETAS = [1.0, 0.8]


pytestmark = pytest.mark.usefixtures("one_thread")


def _pca_basis(groups=1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    V = torch.stack([torch.linalg.qr(torch.randn(D, D, generator=gen, dtype=F64))[0][:10] for _ in range(groups)])
    return PCABasis(V, SHAPE, [3, 4, 3], torch.arange(groups) if groups > 1 else None)


BASES = {"dct": lambda: DCTBasis(4, 4, bands=(1, 2)), "pca": _pca_basis}


def _c(S, K, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return -1.5 + 1.9 * torch.rand(S, K, generator=gen, dtype=F64)  # c in (-1.5, 0.4)


def _dense_blocks(F, t, Sigma0=None):
    """Van Loan: expm(h [[F, Q], [0, -F^T]]) = [[E_h, G], [0, E_h^-T]], Sigma_h = G E_h^T, Q = noise on v (unit);
    then Sigma <- E_h Sigma E_h^T + Sigma_h over steps h <= 0.1 (the e^{-F^T t} block loses digits at once)."""
    n = F.shape[-1]
    Q = torch.zeros(n, n, dtype=F64)
    Q[n // 2:, n // 2:] = torch.eye(n // 2, dtype=F64)
    ham = torch.zeros(*F.shape[:-2], 2 * n, 2 * n, dtype=F64)
    ham[..., :n, :n], ham[..., :n, n:], ham[..., n:, n:] = F, Q, -F.mT
    steps = max(1, math.ceil(t / 0.1))
    X = torch.linalg.matrix_exp(t / steps * ham)
    E_h = X[..., :n, :n]
    cov_h = X[..., :n, n:] @ E_h.mT
    E = torch.eye(n, dtype=F64).expand_as(F)
    cov = torch.zeros_like(F) if Sigma0 is None else Sigma0
    for _ in range(steps):
        E, cov = E_h @ E, E_h @ cov @ E_h.mT + cov_h
    return E, cov


def _close(actual, expected, rtol=1e-10):
    # entries of one block differ by e^{-x}: compare against the block's scale
    scale = expected.abs().amax(dim=(-2, -1), keepdim=True).clamp_min(1e-300)
    torch.testing.assert_close(actual / scale, expected / scale, rtol=0, atol=rtol)


@pytest.mark.parametrize("zeta", ZETAS)
def test_closed_form_blocks_match_matrix_exp_and_matrix_fraction(zeta):
    process = VSMDProcess(8, c=_c(1, 8), zeta=zeta, gamma=2.5, beta=7.0)
    F = process.drift_blocks().detach()[0]
    for tv in TIMES:
        E, cov = _dense_blocks(F, tv)
        cov = cov * (process.gamma * process.beta)
        with torch.no_grad():
            _close(process.mean_blocks(tv)[0], E)
            if tv > 0:
                _close(process.cov_blocks(tv)[0], cov)
            L = process.chol_blocks(tv)[0]
        assert torch.all(L[:, 0, 1] == 0) and torch.all(L[:, 0, 0] >= 0) and torch.all(L[:, 1, 1] >= 0)
        if tv > 0:
            _close(L @ L.mT, cov)
        else:
            assert torch.all(L == 0) and torch.all(process.cov_blocks(tv) == 0)


def _quadrature_cov(mp, gamma, p, omega, s):
    """Sigma(s) by quadrature: e^{uN} e_v = (g, g') with g = e^{-pu/2} sin(omega u) / omega (u at omega = 0)."""
    S = (lambda u: mp.sin(omega * u) / omega) if omega else (lambda u: u)
    C = (lambda u: mp.cos(omega * u)) if omega else (lambda u: 1)
    g = lambda u: mp.exp(-p * u / 2) * S(u)
    dg = lambda u: mp.exp(-p * u / 2) * (C(u) - p * S(u) / 2)
    xx = 2 * gamma * mp.quad(lambda u: g(u) ** 2, [0, s])
    vv = 2 * gamma * mp.quad(lambda u: dg(u) ** 2, [0, s])
    xv = gamma * g(s) ** 2
    return torch.tensor([[float(xx), float(xv)], [float(xv), float(vv)]], dtype=F64)


@pytest.mark.parametrize("zeta", ZETAS)
def test_covariance_entries_are_accurate_to_1e_13_against_25_digit_quadrature(zeta):
    # entrywise, also where Sigma_xv ~ e^{-x} is tiny and where the closed form switches branch (x = 1, 2 kappa x = 1)
    mp = pytest.importorskip("mpmath")
    with mp.workdps(25):
        for c in (0.45, -1.0):
            process = VSMDProcess(1, c=c, zeta=zeta)
            p = process.gamma * (1 - 2 * mp.mpf(c))
            omega = mp.sqrt(1 / mp.mpf(zeta) - 1) / 2 * p
            for t in (1e-5, 0.01, 0.3, 1.0):
                expected = _quadrature_cov(mp, process.gamma, p, omega, mp.mpf(process.beta) * mp.mpf(t) / 2)
                torch.testing.assert_close(process.cov_blocks(t).detach()[0, 0], expected, rtol=1e-13, atol=0)


def test_drift_is_vsmd_and_critical_damping_has_a_repeated_eigenvalue():
    c = _c(1, 6, seed=2)
    for zeta in (1.0, 0.8, 0.3):
        process = VSMDProcess(6, c=c, zeta=zeta, gamma=2.0, beta=10.0)
        g, b = process.gamma, process.beta
        a = (1 - (g - 2 * g * c) ** 2 / (4 * zeta)) / (2 * g)
        torch.testing.assert_close(process.c.detach(), c, rtol=1e-14, atol=1e-15)
        torch.testing.assert_close(process.a.detach(), a, rtol=1e-13, atol=1e-14)
        M = process.drift_blocks().detach()[0]
        expected = torch.stack([torch.stack([torch.zeros(6, dtype=F64), torch.ones(6, dtype=F64)], -1),
                                torch.stack([-(1 - 2 * g * a[0]), -g * (1 - 2 * c[0])], -1)], -2) * b / 2
        torch.testing.assert_close(M, expected, rtol=1e-13, atol=1e-13)
        tr, det = M.diagonal(dim1=-2, dim2=-1).sum(-1), torch.linalg.det(M)
        disc = tr ** 2 - 4 * det
        assert torch.all(tr < 0) and torch.all(det > 0)  # both eigenvalues in the left half-plane
        if zeta == 1:
            assert disc.abs().max() <= 1e-13 * (tr ** 2).max()
        else:  # under-damped: the complex pair tr/2 +- i sqrt(-disc)/2 (eigvals is ill-conditioned at disc = 0)
            assert torch.all(disc < 0)
            eig = torch.linalg.eigvals(M)
            torch.testing.assert_close(eig.real, (tr / 2)[:, None].expand(-1, 2), rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(eig.imag.abs().max(-1).values, (-disc).sqrt() / 2, rtol=1e-10, atol=0)


def test_near_critical_under_damping_is_continuous_and_long_times_reach_the_stationary_law():
    c = _c(1, 5, seed=3)
    t = torch.tensor([1e-4, 0.02, 0.4, 1.0], dtype=F64)
    critical = VSMDProcess(5, c=c, zeta=1.0)
    nearly = VSMDProcess(5, c=c, zeta=1 - 1e-12)  # the processes differ by (kappa p s)^2 / 6 < 1e-9
    with torch.no_grad():
        _close(nearly.cov_blocks(t), critical.cov_blocks(t), rtol=1e-9)
        _close(nearly.mean_blocks(t), critical.mean_blocks(t), rtol=1e-9)
    for zeta in (1.0, 0.8):
        process = VSMDProcess(5, c=c, zeta=zeta, T=200.0)
        p = process.gamma * (1 - 2 * c[0])
        q = p ** 2 / (4 * zeta)
        # the Lyapunov solution of N S + S N^T + 2 gamma e_v e_v^T = 0
        stationary = torch.zeros(5, 2, 2, dtype=F64)
        stationary[:, 0, 0], stationary[:, 1, 1] = process.gamma / (p * q), process.gamma / p
        with torch.no_grad():
            _close(process.cov_blocks(200.0)[0], stationary, rtol=1e-12)
    # c = 0 with gamma = 2 and zeta = 1: a = 0, VSMD's default, and N(0, I) is stationary
    default = VSMDProcess(3, T=100.0)
    assert torch.all(default.a == 0)
    torch.testing.assert_close(default.cov_blocks(100.0).detach()[0], torch.eye(2, dtype=F64).expand(3, 2, 2),
                               rtol=0, atol=1e-13)


def _phase_drift(process, P, label=0):
    """The dense 2d x 2d drift (beta/2) [[0, I], [-sum q_k P_k, -sum p_k P_k]]."""
    blocks = process.drift_blocks().detach()[label] if process.num_classes is None else \
        process.drift_blocks(torch.tensor([label])).detach()[0]
    F = torch.zeros(2 * D, 2 * D, dtype=F64)
    for i in range(2):
        for j in range(2):
            F[i * D:(i + 1) * D, j * D:(j + 1) * D] = torch.einsum("k,kab->ab", blocks[:, i, j], P)
    return F


def _projectors(basis, group=0):
    return torch.stack([basis.projector_matrix(k, 1, group) for k in range(basis.num_subspaces)])


def _map(process, basis, t, slot, labels=None):
    """The dense [2d, d] map from one of perturb's four inputs (x0, v0, eps_x, eps_v) to (x_t, v_t)."""
    eye = torch.eye(D, dtype=F64).reshape(D, *SHAPE)
    args = [torch.zeros_like(eye) for _ in range(4)]
    args[slot] = eye
    lab = None if labels is None else labels.expand(D)
    with torch.no_grad():
        xt, vt = process.perturb(basis, *args, torch.full((D,), t, dtype=F64), lab)
    return torch.cat([xt.reshape(D, D).T, vt.reshape(D, D).T])


@pytest.mark.parametrize("zeta", ZETAS)
@pytest.mark.parametrize("name", list(BASES))
def test_perturb_is_the_dense_phase_space_transition(name, zeta):
    basis = BASES[name]()
    K = basis.num_subspaces
    process = VSMDProcess(K, c=_c(1, K, seed=4), zeta=zeta, beta=8.0, prior_v=0.7)
    P = _projectors(basis)
    F = _phase_drift(process, P)
    for tv in (0.01, 0.4, 1.0):
        E, cov = _dense_blocks(F, tv)
        cov = cov * (process.gamma * process.beta)
        mean_map = torch.cat([_map(process, basis, tv, 0), _map(process, basis, tv, 1)], 1)
        noise_map = torch.cat([_map(process, basis, tv, 2), _map(process, basis, tv, 3)], 1)
        torch.testing.assert_close(mean_map, E, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(noise_map @ noise_map.T, cov, rtol=1e-10, atol=1e-12)
        # the velocity prior: z_t given x0 alone, v0 ~ N(0, prior_v I)
        Sigma0 = torch.zeros(2 * D, 2 * D, dtype=F64)
        Sigma0[D:, D:] = process.prior_v * torch.eye(D, dtype=F64)
        _, cov_x0 = _dense_blocks(F, tv, Sigma0 / (process.gamma * process.beta))
        v_map = mean_map[:, D:] * process.velocity_std
        torch.testing.assert_close(v_map @ v_map.T + noise_map @ noise_map.T, cov_x0 * process.gamma * process.beta,
                                   rtol=1e-10, atol=1e-12)
    # the prior is the transition from z = 0 at T
    eye = torch.eye(D, dtype=F64).reshape(D, *SHAPE)
    with torch.no_grad():
        cols = [torch.cat([u.reshape(D, D).T, w.reshape(D, D).T]) for u, w in
                (process.prior_sample(basis, eye, torch.zeros_like(eye)),
                 process.prior_sample(basis, torch.zeros_like(eye), eye))]
    prior = torch.cat(cols, 1)
    torch.testing.assert_close(prior @ prior.T, _dense_blocks(F, 1.0)[1] * process.gamma * process.beta,
                               rtol=1e-10, atol=1e-12)


def test_per_class_c_with_per_class_basis():
    basis = _pca_basis(groups=2, seed=5)
    K = basis.num_subspaces
    c = _c(2, K, seed=6)
    process = VSMDProcess(K, num_classes=2, c=c, zeta=0.8)
    labels = torch.tensor([1, 0, 1])
    t = torch.tensor([0.3, 0.8, 1.0], dtype=F64)
    with torch.no_grad():
        cov, mean = process.cov_blocks(t, labels), process.mean_blocks(t, labels)
    for b in range(3):
        single = VSMDProcess(K, c=c[labels[b]], zeta=0.8)
        torch.testing.assert_close(cov[b], single.cov_blocks(float(t[b])).detach()[0], rtol=1e-14, atol=0)
        torch.testing.assert_close(mean[b], single.mean_blocks(float(t[b])).detach()[0], rtol=1e-14, atol=0)
        F = _phase_drift(process, _projectors(basis, int(labels[b])), int(labels[b]))
        E = _dense_blocks(F, float(t[b]))[0]
        mean_map = torch.cat([_map(process, basis, float(t[b]), 0, labels[b:b + 1]),
                              _map(process, basis, float(t[b]), 1, labels[b:b + 1])], 1)
        torch.testing.assert_close(mean_map, E, rtol=1e-10, atol=1e-12)


def test_velocity_prior_draws():
    process = VSMDProcess(2, prior_v=0.25)
    x0 = torch.zeros(3, 1, 4, 4, dtype=F64)
    v0 = process.sample_velocity(x0, torch.Generator().manual_seed(7))
    assert v0.shape == x0.shape and v0.dtype == F64
    torch.testing.assert_close(v0, 0.5 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(7),
                                                     dtype=F64), rtol=0, atol=0)


@pytest.mark.parametrize("zeta", ZETAS)
def test_gradients_reach_c(zeta):
    basis = DCTBasis(4, 4, bands=(1, 2))
    process = VSMDProcess(3, c=[0.3, -0.2, -1.0], zeta=zeta)
    gen = torch.Generator().manual_seed(8)
    x0, v0, ex, ev = (torch.randn(2, *SHAPE, generator=gen, dtype=F64) for _ in range(4))
    t = torch.tensor([0.05, 0.6], dtype=F64)
    weights = torch.randn(2, 3, 2, 2, generator=gen, dtype=F64)

    def loss():
        xt, vt = process.perturb(basis, x0, v0, ex, ev, t)
        return (xt * v0).sum() + vt.square().sum() + (weights * process.chol_blocks(t)).sum()

    (grad,) = torch.autograd.grad(loss(), process.log_damping)
    assert torch.all(grad != 0)
    h = 1e-6
    base = process.log_damping.detach().clone()
    for k in range(3):
        values = []
        for sign in (1, -1):
            with torch.no_grad():
                process.log_damping.copy_(base)
                process.log_damping[0, k] += sign * h
                values.append(float(loss()))
        assert float(grad[0, k]) == pytest.approx((values[0] - values[1]) / (2 * h), rel=1e-6, abs=1e-8)
    with torch.no_grad():
        process.log_damping.copy_(base)
    # no 0/0 in the gradient at t = 0 (L = 0) or across the closed form's branches
    t_all = torch.tensor([0.0, 1e-8, 0.1, 1 / 40, 1.0], dtype=F64)
    (grad,) = torch.autograd.grad(process.chol_blocks(t_all).sum() + process.mean_blocks(t_all).sum(),
                                  process.log_damping)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("kwargs, name", [
    ({"zeta": 0.0}, "zeta"), ({"zeta": -0.5}, "zeta"), ({"zeta": 1.5}, "zeta"), ({"zeta": float("nan")}, "zeta"),
    ({"zeta": True}, "zeta"),
    ({"c": 0.5}, "c"), ({"c": 0.7}, "c"), ({"c": float("inf")}, "c"), ({"c": [0.1, float("nan"), 0.0]}, "c"),
    ({"c": [0.0, 0.1]}, "c"), ({"c": "abc"}, "c"),
    ({"beta": 0.0}, "beta"), ({"beta": -10.0}, "beta"), ({"beta": float("inf")}, "beta"),
    ({"gamma": 0.0}, "gamma"), ({"gamma": -2.0}, "gamma"), ({"T": 0.0}, "T"),
    ({"prior_v": 0.0}, "prior_v"), ({"prior_v": -1.0}, "prior_v"), ({"prior_v": float("nan")}, "prior_v"),
    ({"num_subspaces": 0}, "num_subspaces"), ({"num_classes": 0}, "num_classes"),
])
def test_bad_process_arguments_raise_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name}: expected"):
        VSMDProcess(**dict({"num_subspaces": 3}, **kwargs))


def test_non_finite_drift_from_a_state_dict_is_refused():
    process = VSMDProcess(3)
    state = process.state_dict()
    state["log_damping"] = torch.tensor([[0.0, float("nan"), 0.0]], dtype=F64)
    process.load_state_dict(state)
    for call in (process.drift_blocks, lambda: process.mean_blocks(0.5), lambda: process.chol_blocks(0.5)):
        with pytest.raises(ValueError, match=r"^c: expected finite values"):
            call()


def test_bad_times_labels_basis_and_images_raise_naming_them():
    process = VSMDProcess(3, num_classes=2)
    labels = torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"^t: expected finite times in \[0, T=1\]"):
        process.mean_blocks(torch.tensor([0.1, 1.5], dtype=F64), labels)
    with pytest.raises(ValueError, match=r"^labels: required"):
        process.cov_blocks(0.5)
    with pytest.raises(ValueError, match=r"^labels: expected class labels in \[0, 2\)"):
        process.cov_blocks(0.5, torch.tensor([0, 2]))
    with pytest.raises(ValueError, match=r"^t: batch size 3 does not match labels' 2"):
        process.cov_blocks(torch.full((3,), 0.5, dtype=F64), labels)
    x = torch.zeros(2, *SHAPE, dtype=F64)
    with pytest.raises(ValueError, match=r"^basis: expected 3 subspaces \(one c each\), got a basis with 4"):
        process.perturb(_pca_basis(), x, x, x, x, 0.5, labels)
    basis = DCTBasis(4, 4, bands=(1, 2))
    with pytest.raises(ValueError, match=r"^eps_v: expected images"):
        process.perturb(basis, x, x, x, x[0], 0.5, labels)
    with pytest.raises(ValueError, match=r"^v0: expected the shape"):
        process.perturb(basis, x, x[:1], x, x, 0.5, labels)
    with pytest.raises(ValueError, match=r"^t: batch size 3 does not match the images' 2"):
        process.perturb(basis, x, x, x, x, torch.full((3,), 0.5, dtype=F64), torch.tensor([0, 1, 1]))


def _tiny_edm(channels=2, label_dim=3, encoder_type="standard", seed=0):
    torch.manual_seed(seed)
    net = SongUNet(img_resolution=8, in_channels=channels, out_channels=channels, label_dim=label_dim,
                   model_channels=8, channel_mult=[1, 1], num_blocks=1, attn_resolutions=[4], dropout=0.0,
                   encoder_type=encoder_type)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # trained-like weights: EDM zero-initialises every block's last conv
        for name, p in net.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p[0].numel()) if p.ndim > 1 else
                    torch.randn(p.shape, generator=gen) * 0.1 + (1.0 if name.endswith("norm0.weight") else 0.0))
    return net.double().eval()


@pytest.mark.parametrize("encoder_type", ["standard", "skip", "residual"])
def test_from_edm_starts_as_the_edm_network(encoder_type):
    edm = _tiny_edm(encoder_type=encoder_type)
    vel = VelocityScoreNet.from_edm(edm)
    cfg = vel.config()
    assert (cfg["in_channels"], cfg["out_channels"], vel.channels) == (4, 2, 2)
    assert next(vel.parameters()).dtype == F64 and not vel.training
    gen = torch.Generator().manual_seed(2)
    x, v = (torch.randn(3, 2, 8, 8, generator=gen, dtype=F64) for _ in range(2))
    noise = torch.tensor([0.1, 5.0, 700.0], dtype=F64)
    onehot = torch.nn.functional.one_hot(torch.tensor([0, 2, 1]), 3).to(F64)
    with torch.no_grad():
        expected = edm(x, noise, onehot)
        torch.testing.assert_close(vel(torch.cat([x, v], 1), noise, onehot), expected, rtol=0, atol=1e-13)
        torch.testing.assert_close(vel(torch.cat([x, 10 * v], 1), noise, onehot), expected, rtol=0, atol=1e-13)
    # every EDM weight copied; what is new reads v and starts at zero
    edm_state = edm.state_dict()
    widened = 0
    for name, value in vel.net.state_dict().items():
        src = edm_state[name]
        if value.shape == src.shape:
            assert torch.equal(value, src), name
        else:
            widened += 1
            assert torch.equal(value[:, :2], src) and torch.all(value[:, 2:] == 0), name
    assert widened == {"standard": 1, "skip": 2, "residual": 2}[encoder_type]
    # the copy is a new network: training it leaves the EDM one alone
    with torch.no_grad():
        next(vel.parameters()).add_(1.0)
    assert not torch.equal(next(vel.parameters()), next(edm.parameters()))


def test_precond_is_minus_net_over_L_vv_per_subspace():
    edm = _tiny_edm(channels=1, label_dim=0).float()
    vel = VelocityScoreNet.from_edm(edm)
    basis = DCTBasis(8, 8, bands=(2, 4))
    process = VSMDProcess(3, c=[0.2, -0.3, 0.0], zeta=0.8)
    precond = VSMDPrecond(vel, process, basis)
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(2, 2, 8, 8, generator=gen)
    t = torch.tensor([0.02, 0.7], dtype=F64)
    with torch.no_grad():
        score = precond(z, t)
        out = vel(z, (999 * t).float(), None).double()
        lvv = process.chol_blocks(t)[..., 1, 1]
    P = torch.stack([basis.projector_matrix(k, 1) for k in range(3)])
    for b in range(2):
        expected = -torch.einsum("k,kij,j->i", 1 / lvv[b], P, out[b].reshape(-1))
        torch.testing.assert_close(score[b].double().reshape(-1), expected, rtol=1e-5, atol=1e-5)
    # isotropic basis: VSMD's PrecondGeneral exactly, -net(z, 999 t) / L_vv
    iso = VSMDPrecond(vel, VSMDProcess(1), IsotropicBasis())
    with torch.no_grad():
        lvv = VSMDProcess(1).chol_blocks(t)[:, 0, 1, 1]
        torch.testing.assert_close(iso(z, t), (-out / lvv[:, None, None, None]).float(), rtol=1e-6, atol=1e-6)


def test_network_channels_must_fit_the_phase_space():
    with pytest.raises(ValueError, match=r"^in_channels: expected 2 x out_channels = 2 \(the phase space"):
        VelocityScoreNet(SongUNet(img_resolution=8, in_channels=1, out_channels=1, model_channels=8,
                                  channel_mult=[1, 1], num_blocks=1, attn_resolutions=[]))
    wide = SongUNet(img_resolution=8, in_channels=2, out_channels=1, model_channels=8, channel_mult=[1, 1],
                    num_blocks=1, attn_resolutions=[])
    with pytest.raises(ValueError, match=r"^in_channels: expected an EDM network with as many input as output"):
        VelocityScoreNet.from_edm(wide)
    with pytest.raises(ValueError, match=r"^net: expected an EDM SongUNet"):
        VelocityScoreNet.from_edm(torch.nn.Conv2d(1, 1, 3))
    vel = VelocityScoreNet(wide)
    with pytest.raises(ValueError, match=r"^z: expected the phase space \[B, 2, H, W\]"):
        vel(torch.zeros(1, 1, 8, 8), torch.zeros(1), None)
    precond = VSMDPrecond(vel, VSMDProcess(1), IsotropicBasis())
    for t in (0.0, 1.5):
        with pytest.raises(ValueError, match=r"^t: expected finite times in \(0, T=1\]"):
            precond(torch.zeros(1, 2, 8, 8), t)
    with pytest.raises(ValueError, match=r"^basis: expected a SubspaceBasis with the process's 3 subspaces"):
        VSMDPrecond(vel, VSMDProcess(3), IsotropicBasis())


def test_config_state_dict_round_trip():
    process = VSMDProcess(3, num_classes=2, c=[[0.1, -0.2, 0.0], [0.3, 0.2, -1.0]], zeta=0.9, beta=6.0,
                          prior_v=0.5)
    with torch.no_grad():
        process.log_damping.add_(0.05)
    again = VSMDProcess.from_config(process.config())
    again.load_state_dict(process.state_dict())
    labels = torch.tensor([1, 0])
    torch.testing.assert_close(again.cov_blocks(0.4, labels), process.cov_blocks(0.4, labels), rtol=0, atol=0)
    assert again.config() == process.config()
