"""VSMD's learning and sampling (issue 13, items 3-4): the velocity DSM loss, the backward paths and the forward
c-update with its exact divergence, the PF-ODE (Heun, iPNDM) and Euler-Maruyama samplers.

On Gaussian data x0 ~ N(0, sum_k var_k P_k) the phase-space marginal is Gaussian per subspace, Cov_t =
E(t) diag(var_k, prior_v) E(t)^T + Sigma(t), so the exact velocity score is -(Cov_t^{-1} z)_v per subspace: the
`Oracle` below is a precond-shaped model with that score, against which the loss's minimum, the ODE's flow map
and the SDE's law are known in closed form."""
import pytest
import torch

from aniso_fast.bases import DCTBasis
from aniso_fast.vsmd import VSMDProcess, dsm_loss

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

    def __init__(self, process, basis, scale=1.0):
        self.process, self.basis, self.scale = process, basis, scale
        self.calls = 0

    def cov(self, t):
        """Cov_t [B, K, 2, 2] of z_t per subspace."""
        E = self.process.mean_blocks(t)
        start = torch.diag_embed(torch.stack([VAR, torch.full_like(VAR, self.process.prior_v)], -1))
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
        dsm_loss(process, oracle, torch.zeros(2, *SHAPE), noise=(torch.zeros(2, *SHAPE),) * 2 + (torch.zeros(3, *SHAPE),))
    with pytest.raises(ValueError, match=r"^basis: expected 2 subspaces \(one c each\), got a basis with 3"):
        dsm_loss(VSMDProcess(2), oracle, torch.zeros(2, *SHAPE))
    with pytest.raises(ValueError, match=r"^t: expected finite times in \[0, T=1\]"):
        dsm_loss(process, oracle, torch.zeros(2, *SHAPE), t=torch.tensor([0.5, 1.5], dtype=F64))
