"""Schedule-gradient estimator (METHOD §5) against the exact Gaussian mixture, whose flow F* is closed-form and
differentiable in g: the estimator must reproduce d<delta, F*(x; g)>/dg at fixed x (exactly with the exact
trace, in expectation with one random direction), and have zero mean when the network is exact (§5.4)."""
import pytest
import torch
from torch import nn
from torch.func import functional_call

from aniso_fast.geometry.bases import DCTBasis
from aniso_fast.processes.estimator import flow_schedule_derivative, schedule_gradient_surrogate, unit_directions
from aniso_fast.networks.gmm import GaussianMixture
from aniso_fast.processes.losses import trajectory_loss
from aniso_fast.networks.precond import AnisoPrecond
from aniso_fast.geometry.schedules import MatrixSchedule

from nets import TinyNet, pca_mixture

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


MIXTURES = {
    "dct-K2": lambda: GaussianMixture.toy(bands=(3,)),
    "dct-K3": lambda: GaussianMixture.toy(bands=(2, 5), seed=1),
    "dct-K2-2ch-classes": lambda: GaussianMixture.toy(channels=2, bands=(4,), num_classes=2, seed=2),
    "pca-per-class": pca_mixture,
}


def _point(gmm, B=3, seed=0):
    """A noised point x (fixed), per-sample anisotropic g [B, K] spanning small to large noise, a fixed delta."""
    gen = torch.Generator().manual_seed(seed)
    K = gmm.basis.num_subspaces
    labels = None if gmm.num_classes is None else torch.arange(B) % gmm.num_classes
    x0, labels = gmm.sample(B, labels=labels, generator=gen)
    g = torch.exp(torch.empty(B, K, dtype=F64).uniform_(-4, 1, generator=gen))
    ids = gmm.basis.group_ids(labels)
    x = gmm.basis.combine(torch.randn(x0.shape, generator=gen, dtype=F64), g.sqrt(), base=x0, ids=ids)
    delta = torch.randn(x0.shape, generator=gen, dtype=F64)
    return x, g, delta, labels


def _lhs(gmm, x, g, delta, labels):
    """d<delta, F*(x; g)>/dg at fixed x, by autograd through the closed-form mixture flow."""
    gg = g.clone().requires_grad_()
    (grad,) = torch.autograd.grad((delta * gmm.flow(x.detach(), gg, labels)).sum(), gg)
    return grad


def _central_difference(gmm, x, g, delta, labels, rel=1e-5):
    out = torch.zeros_like(g)
    for b in range(g.shape[0]):
        for k in range(g.shape[1]):
            h = rel * g[b, k]
            gp, gm = g.clone(), g.clone()
            gp[b, k] += h
            gm[b, k] -= h
            diff = gmm.flow(x, gp, labels) - gmm.flow(x, gm, labels)
            out[b, k] = (delta[b] * diff[b]).sum() / (2 * h)
    return out


def _rhs(gmm, x, g, delta, labels, **kw):
    x = x.detach().requires_grad_()
    F = gmm.flow(x, g, labels)
    return flow_schedule_derivative(gmm, x, F, delta, g, labels, **kw)


@pytest.mark.parametrize("name", list(MIXTURES))
def test_exact_trace_identity_on_gaussian_mixture(name):
    """§5.3 / Cor. 4.2 with the exact trace: RHS (x-derivatives only) == d<delta, F*>/dg (LHS), per subspace."""
    gmm = MIXTURES[name]()
    x, g, delta, labels = _point(gmm)
    lhs = _lhs(gmm, x, g, delta, labels)
    fd = _central_difference(gmm, x, g, delta, labels)
    torch.testing.assert_close(lhs, fd, rtol=1e-6, atol=1e-6 * float(lhs.abs().max()))
    rhs = _rhs(gmm, x, g, delta, labels, trace="exact")
    torch.testing.assert_close(rhs["total"], lhs, rtol=1e-9, atol=1e-10 * float(lhs.abs().max()))
    # every term matters: dropping any one breaks the identity
    for name_ in ("trace", "jacobian", "scale"):
        assert (rhs["total"] - rhs[name_] - lhs).abs().max() > 1e-3 * lhs.abs().max()


def test_identity_rejects_the_non_debug_bug():
    """§5.6: the unused non-debug code scales the Jacobian term by sqrt(g) instead of 1/sqrt(g); the identity
    test must be able to tell."""
    gmm = MIXTURES["dct-K2"]()
    x, g, delta, labels = _point(gmm)
    lhs = _lhs(gmm, x, g, delta, labels)
    rhs = _rhs(gmm, x, g, delta, labels, trace="exact")
    buggy = rhs["trace"] + rhs["jacobian"] * g + rhs["scale"]  # <u, P F> sqrt(g) instead of / sqrt(g)
    assert (buggy - lhs).abs().max() > 0.1 * lhs.abs().max()


def test_one_direction_trace_is_unbiased():
    """n <He, P_k e> with e uniform on the unit sphere: mean over R draws == exact trace within 4 standard errors."""
    gmm = MIXTURES["dct-K3"]()
    x, g, delta, labels = _point(gmm, B=1, seed=2)
    exact = _rhs(gmm, x, g, delta, labels, trace="exact")
    R = 4000  # the same point replicated: one independent direction per replica
    rep = lambda z: z.expand(R, *z.shape[1:]).contiguous()  # noqa: E731
    est = _rhs(gmm, rep(x), rep(g), rep(delta), labels, trace="hutchinson",
               generator=torch.Generator().manual_seed(7))
    for term in ("jacobian", "scale"):  # deterministic terms agree sample by sample
        torch.testing.assert_close(est[term], exact[term].expand(R, -1), rtol=1e-10, atol=1e-12)
    mean, se = est["trace"].mean(0), est["trace"].std(0) / R ** 0.5
    z = (mean - exact["trace"][0]) / se
    assert bool((z.abs() < 4).all()), f"z {z.tolist()}, mean {mean.tolist()}, exact {exact['trace'][0].tolist()}"
    assert bool((se < 0.1 * exact["trace"][0].abs()).all())  # resolving power: a 40% bias would be > 4 SE


def test_unit_directions():
    x = torch.zeros(5000, 1, 4, 4, dtype=F64)
    e = unit_directions(x, torch.Generator().manual_seed(0))
    torch.testing.assert_close(e.flatten(1).norm(dim=1), torch.ones(5000, dtype=F64))
    cov = torch.einsum("bi,bj->ij", e.flatten(1), e.flatten(1)) / 5000  # E[e e^T] = I / n
    torch.testing.assert_close(cov, torch.eye(16, dtype=F64) / 16, rtol=0, atol=0.01)


def test_surrogate_is_zero_and_leaves_the_network_alone():
    basis = DCTBasis(8, bands=(3,))
    model = AnisoPrecond(TinyNet(), basis)
    gen = torch.Generator().manual_seed(0)
    g = torch.tensor([[0.3, 0.05], [2.0, 0.5]], dtype=F64, requires_grad=True)
    x = torch.randn(2, 1, 8, 8, generator=gen, dtype=F64).requires_grad_()
    F = model.flow(x, g.detach())
    delta = torch.randn(2, 1, 8, 8, generator=gen, dtype=F64)
    s, terms = schedule_gradient_surrogate(model, x, F, delta, g, generator=gen, return_terms=True)
    assert s.item() == 0.0 and s.requires_grad
    params = list(model.parameters())
    grads = torch.autograd.grad(s, params + [g, x], allow_unused=True, retain_graph=True)
    for p, gp in zip(params, grads[:-2]):
        assert gp is None or bool((gp == 0).all()), "the surrogate must not train the network"
    assert grads[-1] is None or bool((grads[-1] == 0).all()), "the surrogate must not move x"
    torch.testing.assert_close(grads[-2], terms["total"], rtol=1e-12, atol=0)  # dA/dg = the estimated terms
    assert bool((terms["trace"] != 0).all())  # the network is curved: the HVP is exercised


def _mixture_schedule(seed=0):
    schedule = MatrixSchedule(2)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        schedule.psi.add_(0.3 * torch.randn(schedule.psi.shape, generator=gen, dtype=F64))
    return schedule


class _Scaled(nn.Module):
    """A deliberately wrong 'network': factor * F*."""

    def __init__(self, gmm, factor):
        super().__init__()
        self.gmm, self.factor, self.basis = gmm, factor, gmm.basis

    def denoise(self, x, g, labels=None):
        return self.gmm.denoise(x, g, labels)

    def flow(self, x, g, labels=None):
        return self.factor * self.gmm.flow(x, g, labels)


def _psi_contributions(schedule, times, which, dA_dg):
    """Per-sample contribution of the estimator to dL/dpsi, sum_k dA/dg_k dg_k(t_b)/dpsi, [B, P], for samples
    at t_b = times[which[b]] (few distinct times: one reverse-mode Jacobian each)."""
    psi = schedule.psi.detach()
    J = torch.autograd.functional.jacobian(lambda p: functional_call(schedule, {"psi": p}, (times,))[0], psi)
    return torch.einsum("bk,bkp->bp", dA_dg, J.flatten(2)[which])


def test_estimator_has_zero_mean_when_the_network_is_exact():
    """§5.4: E[delta | x, t] = 2 W^2 (F_theta - F*), so with F_theta = F* the estimator term averages to 0 over
    (x0, eps); with F_theta = 1.2 F* it does not. N = 4000 samples at 8 times in [1500, 3000] (g ~ the data
    variances)."""
    gmm = MIXTURES["dct-K2"]()
    schedule = _mixture_schedule()
    N = 4000
    gen = torch.Generator().manual_seed(11)
    x0, _ = gmm.sample(N, generator=gen)
    times = torch.linspace(1500, 3000, 8, dtype=F64)
    which = torch.arange(N) % 8
    t = times[which]
    z = {}
    for factor in (1.0, 1.2):
        model = gmm if factor == 1.0 else _Scaled(gmm, factor)
        _, stats = trajectory_loss(model, schedule, x0, t=t, generator=torch.Generator().manual_seed(12))
        c = _psi_contributions(schedule, times, which, stats["dA_dg"])
        z[factor] = c.mean(0) / (c.std(0) / N ** 0.5)
    # 62 correlated components, |z| < 4.5 each (Bonferroni-level false alarm < 5e-4)
    assert float(z[1.0].abs().max()) < 4.5, z[1.0]
    assert float(z[1.2].abs().max()) > 10, z[1.2]


def test_estimator_argument_checks():
    gmm = MIXTURES["dct-K2"]()
    x, g, delta, labels = _point(gmm)
    with pytest.raises(ValueError, match="trace"):
        _rhs(gmm, x, g, delta, labels, trace="full")
    with pytest.raises(ValueError, match="x, F"):
        flow_schedule_derivative(gmm, x, gmm.flow(x, g), delta, g)
    xr = x.detach().requires_grad_()
    with pytest.raises(ValueError, match="delta"):
        flow_schedule_derivative(gmm, xr, gmm.flow(xr, g), delta[:1], g)
