"""VSMD's learning and sampling (issue 13, items 3-4): the velocity DSM loss, the backward paths and the forward
c-update with its exact divergence, the PF-ODE (Heun, iPNDM) and Euler-Maruyama samplers.

On Gaussian data x0 ~ N(0, sum_k var_k P_k) the phase-space marginal is Gaussian per subspace, Cov_t =
E(t) diag(var_k, prior_v) E(t)^T + Sigma(t), so the exact velocity score is -(Cov_t^{-1} z)_v per subspace: the
`Oracle` below is a precond-shaped model with that score, against which the loss's minimum, the ODE's flow map
and the SDE's law are known in closed form."""
import math
from itertools import pairwise

import pytest
import torch

from aniso_fast.geometry.bases import DCTBasis, IsotropicBasis
from aniso_fast.networks.unet import SongUNet
from aniso_fast.sampling.noise import seeded_labels, seeded_noise
from aniso_fast.sampling.spec import MAX_NFE
from aniso_fast.processes.vsmd import (
    Trajectories,
    VelocityScoreNet,
    VSMDPrecond,
    VSMDProcess,
    dsm_loss,
    forward_sb_loss,
    forward_score,
    forward_score_divergence,
    sample_em,
    sample_ode,
    simulate_backward,
)

F64 = torch.float64
SHAPE = (1, 4, 4)
VAR = torch.tensor([2.0, 0.5, 0.1], dtype=F64)  # the data's variance per subspace

pytestmark = pytest.mark.usefixtures("one_thread")


def _basis():
    return DCTBasis(4, 4, bands=(2, 3))  # subspaces of 4, 5 and 7 dimensions


def _process(**kwargs):
    return VSMDProcess(3, c=[0.0, -0.3, 0.2], **kwargs)


class Oracle:
    """The exact velocity score of the Gaussian data set under `process`, times `scale`; precond-shaped."""

    num_classes = None
    image_shape = SHAPE

    def __init__(self, process, basis, scale=1.0, var=VAR):
        self.process, self.basis, self.scale, self.var = process, basis, scale, var
        self.calls = 0

    def cov(self, t):
        """Cov_t [B, K, 2, 2] of z_t per subspace."""
        E = self.process.mean_blocks(t)
        start = torch.diag_embed(torch.stack([self.var, torch.full_like(self.var, self.process.prior_v)], -1))
        return E @ start @ E.mT + self.process.cov_blocks(t)

    def __call__(self, z, t, labels=None):
        self.calls += 1
        with torch.no_grad():
            x, v = z.chunk(2, dim=1)
            inv = torch.linalg.inv(self.cov(t)).expand(z.shape[0], -1, -1, -1)
            return self.scale * self.basis.combine(x, -inv[..., 1, 0], v, -inv[..., 1, 1])


def _data(n, seed=0):
    z = torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return _basis().scale(z, VAR.sqrt().expand(n, -1))


def test_dsm_loss_is_minimal_at_the_exact_score_with_the_known_excess():
    """At the exact score L_vv s* = -E[eps_v | z_t], so the loss is E Var(eps_v | z_t) = sum_k n_k (1 - L_vv^2
    (Cov^-1)_vv) per sample; a score scaled by lam adds (lam - 1)^2 sum_k n_k L_vv^2 (Cov^-1)_vv (the cross term
    vanishes). 4096 samples of 16 coordinates: the estimate's relative std is ~0.6%; tolerance 2.5%."""
    process, basis = _process(), _basis()
    B = 4096
    x0 = _data(B)
    t = torch.tensor([0.01, 0.1, 0.3, 1.0], dtype=F64).repeat(B // 4)
    with torch.no_grad():
        ratio = process.chol_blocks(t)[..., 1, 1] ** 2 * torch.linalg.inv(Oracle(process, basis).cov(t))[..., 1, 1]
    dims = torch.tensor(basis.subspace_dims(1), dtype=F64)
    minimum, excess = float(((1 - ratio) * dims).sum(1).mean()), float((ratio * dims).sum(1).mean())
    losses = {}
    for scale in (1.0, 1.3, 0.7):
        loss = dsm_loss(process, Oracle(process, basis, scale), x0, generator=torch.Generator().manual_seed(1), t=t)
        assert loss.dtype == F64 and loss.dim() == 0
        losses[scale] = float(loss)
        assert losses[scale] == pytest.approx(minimum + (scale - 1) ** 2 * excess, rel=0.025)
    # same draws: the exact score is below either perturbation, by about the predicted excess
    assert losses[1.3] - losses[1.0] == pytest.approx(0.09 * excess, rel=0.1)
    assert losses[0.7] - losses[1.0] == pytest.approx(0.09 * excess, rel=0.1)


def test_dsm_loss_draws_in_the_documented_order_and_reaches_only_the_model():
    """t ~ U(t0, T), then v0 ~ N(0, prior_v), eps_x, eps_v from the one generator; the overrides give the same
    loss; gradients reach the model's parameters and not c."""
    process, basis = _process(prior_v=0.5), _basis()
    x0 = _data(8).float()
    weight = torch.nn.Parameter(torch.tensor(1.0))

    def model(z, t, labels=None):
        return weight * Oracle(process, basis)(z.double(), t).float()

    model.basis = basis
    loss = dsm_loss(process, model, x0, generator=torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)
    t = process.t0 + (process.T - process.t0) * torch.rand(8, generator=gen, dtype=F64)
    v0 = process.velocity_std * torch.randn(x0.shape, generator=gen)
    eps_x, eps_v = torch.randn(x0.shape, generator=gen), torch.randn(x0.shape, generator=gen)
    again = dsm_loss(process, model, x0, t=t, noise=(v0, eps_x, eps_v))
    torch.testing.assert_close(again, loss, rtol=1e-6, atol=0)
    assert float(t.min()) >= process.t0
    loss.backward()
    assert weight.grad is not None and torch.isfinite(weight.grad)
    assert process.log_damping.grad is None


def test_dsm_loss_bad_input_raises_naming_the_argument():
    process, basis = _process(), _basis()
    oracle = Oracle(process, basis)
    with pytest.raises(ValueError, match=r"^x0: expected images \[B, C, H, W\], got \(1, 4, 4\)"):
        dsm_loss(process, oracle, torch.zeros(SHAPE))
    with pytest.raises(ValueError, match=r"^noise: expected \(v0, eps_x, eps_v\)"):
        dsm_loss(process, oracle, torch.zeros(2, *SHAPE), noise=torch.zeros(2, *SHAPE))
    with pytest.raises(ValueError, match=r"^eps_v: expected the shape of the other images"):
        dsm_loss(process, oracle, torch.zeros(2, *SHAPE), noise=[torch.zeros(2, *SHAPE)] * 2 + [torch.zeros(3, *SHAPE)])
    with pytest.raises(ValueError, match=r"^basis: expected 2 subspaces \(one c each\), got a basis with 3"):
        dsm_loss(VSMDProcess(2), oracle, torch.zeros(2, *SHAPE))
    with pytest.raises(ValueError, match=r"^t: expected finite times in \[0, T=1\]"):
        dsm_loss(process, oracle, torch.zeros(2, *SHAPE), t=torch.tensor([0.5, 1.5], dtype=F64))


def _prior_draws(process, basis, seeds):
    """(x_T, v_T) as the samplers document it: eps_x is `seeded_noise`'s draw, eps_v the seed's next one."""
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    eps_x = torch.stack([torch.randn(SHAPE, generator=g, dtype=F64) for g in gens])
    eps_v = torch.stack([torch.randn(SHAPE, generator=g, dtype=F64) for g in gens])
    torch.testing.assert_close(eps_x, seeded_noise(seeds, SHAPE, dtype=F64), rtol=0, atol=0)
    with torch.no_grad():
        return process.prior_sample(basis, eps_x, eps_v)


def _flow_map(process, oracle, M=2048):
    """Phi [K, 2, 2]: the exact PF-ODE map from T to t0 of each subspace, dz/dt = (F + 1/2 gamma beta e_v e_v^T
    Cov_t^-1) z, by RK4 on M steps (within 1e-9 of M/2 steps)."""
    ts = torch.linspace(process.T, process.t0, 2 * M + 1, dtype=F64)
    with torch.no_grad():
        F = process.drift_blocks()[0]
        inv = torch.linalg.inv(oracle.cov(ts))
    A = F + process.gamma * process.beta / 2 * torch.stack([torch.zeros_like(inv[..., 1, :]), inv[..., 1, :]], -2)
    Phi = torch.eye(2, dtype=F64).expand_as(F)
    h = float(ts[2] - ts[0])
    for i in range(M):
        A0, A1, A2 = A[2 * i], A[2 * i + 1], A[2 * i + 2]
        k1 = A0 @ Phi
        k2 = A1 @ (Phi + h / 2 * k1)
        k3 = A1 @ (Phi + h / 2 * k2)
        k4 = A2 @ (Phi + h * k3)
        Phi = Phi + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return Phi


def _subspace_variance(basis, x):
    dims = torch.tensor(basis.subspace_dims(x.shape[1]), dtype=F64)
    return basis.sqnorms(x).mean(0) / dims, dims


def test_pf_ode_converges_to_the_exact_flow_heun_at_second_order():
    """sample_ode with the exact score against the exact flow map applied to the same start points: Heun's error
    falls ~4x per doubling of the steps (measured 4.4, 4.2), Euler's (iPNDM of order 1) ~2x (2.2, 2.15); Heun
    beats Euler at equal NFE; iPNDM of order 4 (its Euler warm-up keeps it second order) beats Heun."""
    process, basis = _process(), _basis()
    oracle = Oracle(process, basis)
    seeds = list(range(32))
    x_T, v_T = _prior_draws(process, basis, seeds)
    Phi = _flow_map(process, oracle)
    exact = basis.combine(x_T, Phi[:, 0, 0].expand(32, -1), v_T, Phi[:, 0, 1].expand(32, -1))

    def error(nfe, **kwargs):
        oracle.calls = 0
        x, labels, info = sample_ode(process, oracle, seeds, nfe, dtype=F64, **kwargs)
        assert labels is None and info["nfe"] == nfe == oracle.calls
        return float((x - exact).abs().max())

    heun = [error(n) for n in (31, 63, 127)]
    euler = [error(n, solver="ipndm", order=1) for n in (32, 64, 128)]
    ipndm = error(64, solver="ipndm", order=4)
    for a, b in pairwise(heun):
        assert 3.5 < a / b < 5
    for a, b in pairwise(euler):
        assert 1.8 < a / b < 2.5
    assert heun[-1] < euler[-1] / 10 and ipndm < heun[1] / 5
    # the exact flow carries p_T to the data's law (a check of the oracle and of Phi)
    with torch.no_grad():
        cov_T = oracle.cov(process.T)[0]
    torch.testing.assert_close((Phi @ cov_T @ Phi.mT)[:, 0, 0], VAR, rtol=2e-3, atol=0)


def test_pf_ode_reproduces_the_data_variance_at_high_nfe():
    """1024 samples at NFE 255: the per-subspace x variance matches the exact flow of VSMD's prior N(0, Sigma(T))
    (within 4 standard errors, sqrt(2 / (1024 n_k)) relative), which is the data's to 1.2% (the prior leaves
    out the data's share E(T) Sigma_0 E(T)^T)."""
    process, basis = _process(), _basis()
    oracle = Oracle(process, basis)
    x, _, info = sample_ode(process, oracle, range(1024), 255, dtype=F64)
    assert info == {"nfe": 255, "steps": 128, "solver": "heun", "order": None, "grid": "uniform_t"}
    Phi = _flow_map(process, oracle)
    with torch.no_grad():
        expected = (Phi @ process.cov_blocks(process.T)[0] @ Phi.mT)[:, 0, 0]
    torch.testing.assert_close(expected, VAR, rtol=0.012, atol=0)
    var, dims = _subspace_variance(basis, x)
    assert torch.all((var / expected - 1).abs() < 4 * (2 / (1024 * dims)).sqrt())


def _em_law(process, oracle, steps):
    """The exact x variance per subspace of the Euler-Maruyama chain with the exact score: z <- M_i z + noise,
    M_i = I - h F - h gamma beta e_v (Cov^-1)_v, noise covariance h gamma beta e_v e_v^T, from Sigma(T)."""
    ts = torch.linspace(process.T, process.t0, steps + 1, dtype=F64)
    g2 = process.gamma * process.beta
    with torch.no_grad():
        F, C = process.drift_blocks()[0], process.cov_blocks(process.T)[0]
        inv = torch.linalg.inv(oracle.cov(ts[:-1]))
    ev = torch.tensor([[0.0, 0.0], [0.0, 1.0]], dtype=F64)
    for i in range(steps):
        h = float(ts[i] - ts[i + 1])
        M = torch.eye(2, dtype=F64) - h * F - h * g2 * ev @ inv[i]
        C = M @ C @ M.mT + h * g2 * ev
    return C[:, 0, 0]


def test_euler_maruyama_reproduces_the_data_variance_at_many_steps():
    """1024 paths of 200 steps: the per-subspace x variance is the chain's exact law within 4 standard errors
    (sqrt(2 / (1024 n_k)) relative, 9-11%), and that law is the data's within 2% at 200 steps."""
    process, basis = _process(), _basis()
    oracle = Oracle(process, basis)
    x, labels, info = sample_em(process, oracle, range(1024), 200, dtype=F64)
    assert labels is None and info == {"nfe": 200, "steps": 200, "solver": "euler_maruyama"}
    law = _em_law(process, oracle, 200)
    torch.testing.assert_close(law, VAR, rtol=0.02, atol=0)
    var, dims = _subspace_variance(basis, x)
    assert torch.all((var / law - 1).abs() < 4 * (2 / (1024 * dims)).sqrt())
    assert torch.all(basis.dot(x, torch.ones_like(x)).mean(0).abs() < 0.2)


def test_backward_paths_record_the_states_and_vsmds_frozen_policy():
    process, basis = _process(), _basis()
    oracle = Oracle(process, basis)
    seeds = [4, 1, 7]
    paths = simulate_backward(process, oracle, seeds, steps=5, dtype=F64)
    assert isinstance(paths, Trajectories) and paths.x.shape == paths.v.shape == paths.z_b.shape == (5, 3, *SHAPE)
    torch.testing.assert_close(paths.t, torch.linspace(1, process.t0, 6, dtype=F64)[:-1])
    torch.testing.assert_close(paths.dt, torch.full((5,), (1 - process.t0) / 5, dtype=F64))
    x_T, v_T = _prior_draws(process, basis, seeds)
    assert torch.equal(paths.x[0], x_T) and torch.equal(paths.v[0], v_T)
    g = math.sqrt(process.gamma * process.beta)
    for i in range(5):
        score = oracle(torch.cat([paths.x[i], paths.v[i]], 1), paths.t[i])
        torch.testing.assert_close(paths.z_b[i], g * score, rtol=1e-12, atol=1e-12)
    # the chain, densely: z <- M_i z + sqrt(h gamma beta) (0, xi_i), M_i = I - h F - h gamma beta e_v (Cov^-1)_v per
    # subspace, xi_i each seed's draws after eps_x and eps_v
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    for _ in range(2):
        [torch.randn(SHAPE, generator=g, dtype=F64) for g in gens]
    P = torch.stack([basis.projector_matrix(k, 1) for k in range(3)])
    ev = torch.tensor([[0.0, 0.0], [0.0, 1.0]], dtype=F64)
    with torch.no_grad():
        F, inv = process.drift_blocks()[0], torch.linalg.inv(oracle.cov(paths.t))
    z = torch.cat([x_T.flatten(1), v_T.flatten(1)], 1)
    for i in range(5):
        h = float(paths.dt[i])
        M = torch.eye(2, dtype=F64) - h * F - h * g ** 2 * ev @ inv[i]
        dense = sum(torch.kron(M[k], P[k]) for k in range(3))  # [32, 32] on z = (x, v)
        xi = torch.stack([torch.randn(SHAPE, generator=gen, dtype=F64) for gen in gens]).flatten(1)
        z = z @ dense.T + math.sqrt(h) * g * torch.cat([torch.zeros_like(xi), xi], 1)
        x_next = paths.x[i + 1] if i < 4 else paths.final
        torch.testing.assert_close(z[:, :16].reshape(3, *SHAPE), x_next, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(z[:, 16:].reshape(3, *SHAPE), paths.final_v, rtol=1e-10, atol=1e-10)
    x, _, _ = sample_em(process, oracle, seeds, 5, dtype=F64)
    assert torch.equal(x, paths.final)
    bare = simulate_backward(process, oracle, seeds, steps=5, dtype=F64, record=False)
    assert bare.x.shape[0] == bare.v.shape[0] == bare.z_b.shape[0] == 0 and torch.equal(bare.final_v, paths.final_v)


def test_a_seed_gives_the_same_sample_whatever_the_batch():
    process, basis = _process(), _basis()
    oracle = Oracle(process, basis)
    for sampler, n in ((sample_ode, 9), (sample_em, 6)):
        alone = sampler(process, oracle, [3], n)[0]
        batch = sampler(process, oracle, [5, 3, 9], n)[0]
        assert alone.dtype == torch.float32
        torch.testing.assert_close(batch[1:2], alone, rtol=1e-6, atol=1e-6)
        assert not torch.allclose(batch[0], batch[1])
    ode = sample_ode(process, oracle, [3, 5], 9, solver="ipndm", order=3)
    assert ode[2] == {"nfe": 9, "steps": 9, "solver": "ipndm", "order": 3, "grid": "uniform_t"}


def test_class_conditional_process_draws_seeded_labels():
    """Per-class c: labels are `seeded_labels` of the seeds unless given, and each sample uses its class's c."""
    process = VSMDProcess(3, num_classes=2, c=[[0.0, -0.3, 0.2], [0.3, 0.1, -0.5]])
    basis = _basis()

    def zero_score(z, t, labels=None):
        return torch.zeros_like(z[:, :1])

    zero_score.basis = basis
    seeds = list(range(6))
    x, labels, _ = sample_ode(process, zero_score, seeds, 5, image_shape=SHAPE)
    assert torch.equal(labels, seeded_labels(seeds, 2))
    flipped = sample_ode(process, zero_score, seeds, 5, image_shape=SHAPE, labels=1 - labels)[0]
    assert not torch.allclose(x, flipped)
    one = sample_ode(process, zero_score, seeds[2:3], 5, image_shape=SHAPE, labels=labels[2:3])[0]
    torch.testing.assert_close(one, x[2:3], rtol=1e-6, atol=1e-6)


def test_exact_divergence_matches_autograd():
    """div_v (g z_f) = gamma beta sum_k n_k c_k against the trace of autograd's Jacobian, per-class c."""
    process = VSMDProcess(3, num_classes=2, c=[[0.0, -0.3, 0.2], [0.3, 0.1, -0.5]], zeta=0.8, gamma=1.5)
    basis = _basis()
    gen = torch.Generator().manual_seed(2)
    x, v = torch.randn(2, *SHAPE, generator=gen, dtype=F64), torch.randn(2, *SHAPE, generator=gen, dtype=F64)
    labels = torch.tensor([1, 0])
    g = math.sqrt(process.gamma * process.beta)
    div = forward_score_divergence(process, basis, SHAPE, labels)
    for b in range(2):
        def g_zf(vb, b=b):
            return g * forward_score(process, basis, x[b:b + 1], vb.reshape(1, *SHAPE), labels[b:b + 1]).reshape(-1)
        jac = torch.autograd.functional.jacobian(g_zf, v[b].reshape(-1))
        torch.testing.assert_close(div[b], jac.trace(), rtol=1e-10, atol=1e-10)


def test_forward_score_is_vsmds_policy():
    """z_f = sqrt(gamma beta) sum_k P_k (a_k x + c_k v), against dense projectors."""
    process, basis = _process(zeta=0.9), _basis()
    gen = torch.Generator().manual_seed(3)
    x, v = torch.randn(2, *SHAPE, generator=gen, dtype=F64), torch.randn(2, *SHAPE, generator=gen, dtype=F64)
    P = torch.stack([basis.projector_matrix(k, 1) for k in range(3)])
    with torch.no_grad():
        a, c = process.a[0], process.c[0]
        expected = math.sqrt(process.gamma * process.beta) * (
            torch.einsum("k,kij,bj->bi", a, P, x.flatten(1)) + torch.einsum("k,kij,bj->bi", c, P, v.flatten(1)))
        assert a.abs().min() > 0.01  # a is tied to c and not zero here
        torch.testing.assert_close(forward_score(process, basis, x, v).flatten(1), expected, rtol=1e-12, atol=1e-12)


def test_forward_sb_loss_is_vsmds_alternate_loss_and_its_gradient_reaches_c():
    """On recorded paths: sum_i dt_i mean_b [z_f . (1/2 z_f + z_b) + zeta_sb div]; the gradient reaches
    log_damping, finite, and matches central differences."""
    process, basis = _process(), _basis()
    paths = simulate_backward(process, Oracle(process, basis), [0, 1, 2, 3], steps=6, dtype=F64)
    loss = forward_sb_loss(process, basis, paths, 0.75)
    expected = 0
    for i in range(6):
        z_f = forward_score(process, basis, paths.x[i], paths.v[i])
        energy = (z_f * (0.5 * z_f + paths.z_b[i])).flatten(1).sum(1)
        expected = expected + paths.dt[i] * (energy + 0.75 * forward_score_divergence(process, basis, SHAPE)).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    loss.backward()
    grad = process.log_damping.grad.clone()
    assert torch.isfinite(grad).all() and grad.abs().min() > 0
    step = 1e-6
    for k in range(3):
        with torch.no_grad():
            process.log_damping[0, k] += step
            up = forward_sb_loss(process, basis, paths, 0.75)
            process.log_damping[0, k] -= 2 * step
            down = forward_sb_loss(process, basis, paths, 0.75)
            process.log_damping[0, k] += step
        assert float(grad[0, k]) == pytest.approx(float(up - down) / (2 * step), rel=1e-5)


def test_sampler_and_forward_loss_bad_input_raises_naming_the_argument():
    process, basis = _process(), _basis()
    oracle = Oracle(process, basis)
    for steps in (0, MAX_NFE + 1, 2.5, True):
        with pytest.raises(ValueError, match=rf"^steps: expected an int in \[1, {MAX_NFE}\], got"):
            sample_em(process, oracle, [0], steps)
    for seeds in ([], [-1], ["a"]):
        with pytest.raises(ValueError, match=r"^seeds: expected"):
            simulate_backward(process, oracle, seeds, 2)
    with pytest.raises(ValueError, match=r"^nfe: end-point Heun uses 2N-1 calls"):
        sample_ode(process, oracle, [0], 8)
    with pytest.raises(ValueError, match=r"^nfe: ipndm of order 4 needs at least 4 network calls, got 3"):
        sample_ode(process, oracle, [0], 3, solver="ipndm", order=4)
    with pytest.raises(ValueError, match=r"^order: ipndm takes order 1 or 2 or 3 or 4, got 5"):
        sample_ode(process, oracle, [0], 9, solver="ipndm", order=5)
    with pytest.raises(ValueError, match=r"^solver: expected one of heun, ipndm, dpmpp-2m \(the phase-space ODE"):
        sample_ode(process, oracle, [0], 9, solver="unipc")
    with pytest.raises(ValueError, match=r"^solver: dpmpp-2m needs the denoiser head"):
        sample_ode(process, oracle, [0], 9, solver="dpmpp-2m")
    with pytest.raises(ValueError, match=r"^image_shape: expected \(C, H, W\), three ints >= 1, got \(4, 4\)"):
        sample_ode(process, oracle, [0], 9, image_shape=(4, 4))

    def bare(z, t, labels=None):
        return z[:, :1]

    bare.basis = basis
    with pytest.raises(ValueError, match=r"^image_shape: required, the model reports no image shape"):
        sample_em(process, bare, [0], 2)
    with pytest.raises(ValueError, match=r"^labels: the model and the process are unconditional"):
        sample_ode(process, oracle, [0, 1], 9, labels=torch.tensor([0, 1]))
    conditional = VSMDProcess(3, num_classes=2)
    with pytest.raises(ValueError, match=r"^labels: expected one class label per seed, shape \(2,\), got \(3,\)"):
        sample_ode(conditional, oracle, [0, 1], 9, labels=torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match=r"^labels: expected class labels in \[0, 2\), got values in \[0, 2\]"):
        sample_em(conditional, oracle, [0, 1], 2, labels=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match=r"^basis: expected 2 subspaces \(one c each\), got a basis with 3"):
        sample_ode(VSMDProcess(2), oracle, [0], 9)
    paths = simulate_backward(process, oracle, [0, 1], 2)
    with pytest.raises(ValueError, match=r"^paths: expected Trajectories recorded by vsmd.simulate_backward"):
        forward_sb_loss(process, basis, simulate_backward(process, oracle, [0], 2, record=False))
    with pytest.raises(ValueError, match=r"^zeta_sb: expected a finite number, got nan"):
        forward_sb_loss(process, basis, paths, float("nan"))
    with pytest.raises(ValueError, match=r"^basis: expected 1 subspaces \(one c each\), got a basis with 3"):
        forward_sb_loss(VSMDProcess(1), basis, paths)
    with pytest.raises(ValueError, match=r"^basis: its subspaces span 0 dimensions, not the images' C\*H\*W = 16"):
        forward_sb_loss(VSMDProcess(1), IsotropicBasis(), paths)
    forward_sb_loss(VSMDProcess(1), IsotropicBasis((4, 4)), paths)  # with its image size it fits


def test_the_velocity_network_trains_and_samples_through_vsmd_precond():
    """A tiny class-conditional VelocityScoreNet inside VSMDPrecond: the loss trains the network, the paths train
    c, and the samplers take the image shape and classes from the model."""
    net = VelocityScoreNet(SongUNet(img_resolution=8, in_channels=2, out_channels=1, label_dim=2, model_channels=8,
                                    channel_mult=[1, 1], num_blocks=1, attn_resolutions=[]))
    basis = DCTBasis(8, 8, bands=(2, 4))
    process = VSMDProcess(3, num_classes=2, c=[[0.1, -0.2, 0.0], [0.0, 0.3, -0.1]])
    precond = VSMDPrecond(net, process, basis)
    assert precond.num_classes == 2 and precond.image_shape == (1, 8, 8)
    x0, labels = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 1, 0])
    loss = dsm_loss(process, precond, x0, labels, torch.Generator().manual_seed(1))
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in net.parameters() if p.requires_grad)
    assert process.log_damping.grad is None
    paths = simulate_backward(process, precond, [0, 1, 2], steps=3)
    assert paths.x.shape == (3, 3, 1, 8, 8) and torch.equal(paths.labels, seeded_labels([0, 1, 2], 2))
    forward_sb_loss(process, basis, paths).backward()
    assert torch.isfinite(process.log_damping.grad).all() and process.log_damping.grad.abs().sum() > 0
    x, labels, info = sample_ode(process, precond, [0, 1, 2], 5)
    assert x.shape == (3, 1, 8, 8) and torch.isfinite(x).all() and info["steps"] == 3
    x, _, _ = sample_em(process, precond, [0, 1], 3, labels=torch.tensor([1, 1]))
    assert x.shape == (2, 1, 8, 8) and torch.isfinite(x).all()


class _ZeroNet(torch.nn.Module):
    """A velocity network whose output is zero: the precond's score is then its Gaussian skip alone."""

    label_dim = 0
    image_shape = SHAPE

    def forward(self, z, noise_labels, class_labels=None, augment_labels=None):
        return torch.zeros_like(z[:, :SHAPE[0]])


def test_gaussian_skip_is_the_exact_score_of_gaussian_data():
    """VSMDPrecond(sigma_data=s) with a zero network is the exact velocity score when the data are N(0, s^2 I)
    (the Oracle with every subspace's variance s^2), at small and large t; with sigma_data=None it is zero."""
    process, basis = _process(), _basis()
    oracle = Oracle(process, basis, var=torch.full_like(VAR, 0.7 ** 2))
    z = torch.randn(5, 2, 4, 4, generator=torch.Generator().manual_seed(3), dtype=F64)
    for t in (1e-3, 0.05, 0.5, 1.0):
        tt = torch.full((5,), t, dtype=F64)
        exact = oracle(z, tt)
        skip = VSMDPrecond(_ZeroNet(), process, basis, sigma_data=0.7)(z, tt)
        torch.testing.assert_close(skip, exact, rtol=1e-9, atol=1e-9)
    assert not VSMDPrecond(_ZeroNet(), process, basis)(z, tt).any()
    with pytest.raises(ValueError, match="sigma_data"):
        VSMDPrecond(_ZeroNet(), process, basis, sigma_data=0.0)
