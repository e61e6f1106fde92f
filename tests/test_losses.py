"""Losses of METHOD §4 against independent dense computations (explicit projector matrices), and the full
schedule gradient of the trajectory loss (§5.4: weight + pathwise + estimator terms) on the exact mixture."""
import math

import pytest
import torch

from aniso_fast.geometry.bases import DCTBasis, IsotropicBasis
from aniso_fast.networks.gmm import GaussianMixture
from aniso_fast.processes.losses import forward_process, iso_loss, target_flow, trajectory_loss
from aniso_fast.networks.precond import AnisoPrecond
from aniso_fast.geometry.schedules import MatrixSchedule

from nets import TinyNet, pca_mixture

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def _schedule(K, num_classes=None, tied=False, seed=0):
    schedule = MatrixSchedule(K, num_classes=num_classes, tied=tied)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        schedule.psi.add_(0.3 * torch.randn(schedule.psi.shape, generator=gen, dtype=F64))
    return schedule


def _draws(B, x0, seed, lo=1500.0, hi=3000.0):
    gen = torch.Generator().manual_seed(seed)
    t = lo + (hi - lo) * torch.rand(B, generator=gen, dtype=F64)
    eps = torch.randn(x0.shape, generator=gen, dtype=x0.dtype)
    return t, eps


def _dense_projectors(basis, C, labels):
    """Per sample: the K dense [n, n] projectors of its basis group."""
    ids = basis.group_ids(labels)
    cache = {}
    out = []
    for b in range(len(labels) if labels is not None else 1):
        grp = int(ids[b]) if ids is not None else 0
        if grp not in cache:
            cache[grp] = [basis.projector_matrix(k, C, grp) for k in range(basis.num_subspaces)]
        out.append(cache[grp])
    return out


def _dense_trajectory(model, g, gdot, x0, eps, labels, c, conditioning):
    """l_b = sum_k gdot^2/(g (g + c)) ||P_k (F(x; cond) - M^{-1/2}(x0 - x))||^2 with dense projectors, [B]."""
    B, C = x0.shape[:2]
    P = _dense_projectors(model.basis, C, labels)
    if labels is None:
        P = P * B
    x0f, ef = x0.flatten(1).to(F64), eps.flatten(1).to(F64)
    x = torch.stack([x0f[b] + sum(g[b, k].sqrt() * P[b][k] @ ef[b] for k in range(g.shape[1])) for b in range(B)])
    cond = {"attached": g, "detached": g.detach()}[conditioning]
    F = model.flow(x.reshape(x0.shape).to(x0.dtype), cond, labels).flatten(1).to(F64)
    ells = []
    for b in range(B):
        tgt = sum(g[b, k].rsqrt() * P[b][k] @ (x0f[b] - x[b]) for k in range(g.shape[1]))
        r = F[b] - tgt
        ells.append(sum(gdot[b, k] ** 2 / (g[b, k] * (g[b, k] + c)) * (r @ P[b][k] @ r) for k in range(g.shape[1])))
    return torch.stack(ells)


def _psi_grad(loss, schedule):
    (grad,) = torch.autograd.grad(loss, schedule.psi, retain_graph=True)
    return grad


# ---------------------------------------------------------------------------------------------------------
# §4.1: isotropic warm-up loss

@pytest.mark.parametrize("basis", [DCTBasis(8, bands=(3,)), DCTBasis(8, bands=(2, 5)), IsotropicBasis((8, 8))],
                         ids=["dct-K2", "dct-K3", "isotropic"])
def test_iso_loss_is_edm_weighting_when_subspaces_share_g(basis):
    """With one tied schedule (g_k = g for all k): gdot^2/(g^2 (g+1)) ||D - x0||^2, batch mean; nothing detached,
    so the schedule gradient (through weights, x and the network's conditioning) must match too."""
    K = basis.num_subspaces
    model = AnisoPrecond(TinyNet(), basis)
    schedule = _schedule(K, tied=True)
    B = 4
    x0 = 0.5 * torch.randn(B, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=F64)
    t, eps = _draws(B, x0, 2, lo=10.0, hi=6000.0)
    loss, stats = iso_loss(model, schedule, x0, t=t, noise=eps)

    g, gdot = schedule(t)
    g, gdot = g[:, 0], gdot[:, 0]  # the shared scalar schedule
    x = x0 + g.sqrt()[:, None, None, None] * eps
    D = model.denoise(x, g[:, None].expand(B, K))
    ref = (gdot ** 2 / (g ** 2 * (g + 1)) * (D - x0).flatten(1).square().sum(1)).mean()
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=0)
    torch.testing.assert_close(_psi_grad(loss, schedule), _psi_grad(ref, schedule), rtol=1e-8, atol=1e-14)
    assert stats["loss_per_subspace"].shape == (K,)
    torch.testing.assert_close(stats["loss_per_subspace"].sum(), loss.detach(), rtol=1e-10, atol=0)


def test_iso_loss_conditioning_is_differentiated():
    """§4.1 / §10.1: the warm-up back-propagates through the network's conditioning; dropping that path (here by
    building the same loss with a detached conditioning) changes the schedule gradient."""
    basis = DCTBasis(8, bands=(3,))
    model = AnisoPrecond(TinyNet(), basis)
    schedule = _schedule(2, tied=True)
    x0 = 0.5 * torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=F64)
    t, eps = _draws(3, x0, 2, lo=10.0, hi=6000.0)
    loss, _ = iso_loss(model, schedule, x0, t=t, noise=eps)
    g, gdot = schedule(t)
    x = forward_process(basis, x0, eps, g)
    D = model.denoise(x, g.detach())
    cut = (gdot ** 2 / (g ** 2 * (g + 1)) * basis.sqnorms(D - x0)).sum(1).mean()
    full, part = _psi_grad(loss, schedule), _psi_grad(cut, schedule)
    assert (full - part).norm() > 1e-3 * full.norm()


# ---------------------------------------------------------------------------------------------------------
# §4.2: trajectory loss

def test_target_flow_is_minus_noise_with_zero_schedule_derivative():
    for gmm, labels in ((GaussianMixture.toy(bands=(2, 5)), None), (pca_mixture(), torch.tensor([0, 1, 1, 0]))):
        basis = gmm.basis
        schedule = _schedule(basis.num_subspaces)
        x0, labels = gmm.sample(4, labels=labels, generator=torch.Generator().manual_seed(0))
        ids = basis.group_ids(labels)
        t, eps = _draws(4, x0, 1, lo=1.0, hi=6400.0)
        g, _ = schedule(t)
        x = forward_process(basis, x0, eps, g, ids)
        F_tgt = target_flow(basis, x0, x, g, ids)
        torch.testing.assert_close(F_tgt, -eps, rtol=0, atol=1e-10)
        v = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3), dtype=F64)
        d_tgt = _psi_grad((v * F_tgt).sum(), schedule)
        d_x = _psi_grad((v * x).sum(), schedule)
        assert d_tgt.abs().max() < 1e-10 * d_x.abs().max(), (d_tgt.abs().max(), d_x.abs().max())


@pytest.mark.parametrize("estimator", [False, True])
def test_trajectory_loss_matches_dense_computation(estimator):
    """K = 3 DCT bands, exact mixture as the model: value == dense; estimator=False gradient == dense autograd with
    the conditioning attached (plain back-propagation)."""
    gmm = GaussianMixture.toy(bands=(2, 5), seed=1)
    schedule = _schedule(3)
    B, c = 3, 0.5
    x0, _ = gmm.sample(B, generator=torch.Generator().manual_seed(0))
    t, eps = _draws(B, x0, 1, lo=1.0, hi=6400.0)
    loss, stats = trajectory_loss(gmm, schedule, x0, t=t, noise=eps, c=c, estimator=estimator,
                                  generator=torch.Generator().manual_seed(5))
    g, gdot = schedule(t)
    ref = _dense_trajectory(gmm, g, gdot, x0, eps, None, c, "attached").sum()
    torch.testing.assert_close(loss, ref, rtol=1e-9, atol=0)
    torch.testing.assert_close(stats["loss_per_subspace"].sum() * B, loss.detach(), rtol=1e-10, atol=0)
    if not estimator:
        torch.testing.assert_close(_psi_grad(loss, schedule), _psi_grad(ref, schedule), rtol=1e-7, atol=1e-14)


def test_trajectory_loss_isotropic_basis():
    model = AnisoPrecond(TinyNet(), IsotropicBasis((8, 8)))
    schedule = _schedule(1)
    x0 = 0.5 * torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=F64)
    t, eps = _draws(2, x0, 2)
    g, gdot = schedule(t)
    ref = _dense_trajectory(model, g, gdot, x0, eps, None, 2.0, "detached").sum()
    for est in (False, True):
        loss, _ = trajectory_loss(model, schedule, x0, t=t, noise=eps, c=2.0, estimator=est)
        torch.testing.assert_close(loss, ref, rtol=1e-9, atol=0)
        assert torch.isfinite(_psi_grad(loss, schedule)).all()


def test_full_schedule_gradient_on_the_exact_mixture():
    """§5.4 for one sample with F_theta = F*: dL/dpsi = weight + pathwise terms (dense, conditioning detached)
    + <delta, dF*/dpsi> (dense autograd of the mixture flow in g at fixed x). With the exact trace the loss
    reproduces plain back-propagation through F*, which here is the true gradient; with one random direction the
    difference to weight + pathwise is exactly the surrogate's gradient, and its mean over 2000 directions is
    unbiased."""
    gmm = GaussianMixture.toy(bands=(3,))
    schedule = _schedule(2, seed=4)
    c = 0.5
    x0, _ = gmm.sample(1, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([2200.0], dtype=F64)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(4), dtype=F64)
    g, gdot = schedule(t)
    # independent assembly
    total = _psi_grad(_dense_trajectory(gmm, g, gdot, x0, eps, None, c, "attached").sum(), schedule)
    weight_pathwise = _psi_grad(_dense_trajectory(gmm, g, gdot, x0, eps, None, c, "detached").sum(), schedule)
    x = forward_process(gmm.basis, x0, eps, g.detach())
    F = gmm.flow(x, g.detach())
    delta = gmm.basis.combine(F + eps, 2 * (gdot ** 2 / (g * (g + c))).detach())  # 2 W^2 r
    gg = g.detach().requires_grad_()
    (dphi_dg,) = torch.autograd.grad((delta * gmm.flow(x, gg)).sum(), gg)  # <delta, dF*/dg> at fixed x
    est_term = _psi_grad((g * dphi_dg).sum(), schedule)
    torch.testing.assert_close(weight_pathwise + est_term, total, rtol=1e-8, atol=1e-12 * total.abs().max())
    assert est_term.norm() > 0.05 * total.norm()  # the estimator term is not negligible here

    def ours(estimator, trace="hutchinson", B=1, seed=9):
        rep = lambda z: z.expand(B, *z.shape[1:]).contiguous()  # noqa: E731
        loss, stats = trajectory_loss(gmm, schedule, rep(x0), t=rep(t), noise=rep(eps), c=c, estimator=estimator,
                                      trace=trace, reduction="mean", generator=torch.Generator().manual_seed(seed))
        return _psi_grad(loss, schedule), stats

    tol = dict(rtol=1e-7, atol=1e-10 * float(total.abs().max()))
    torch.testing.assert_close(ours(False)[0], total, **tol)
    torch.testing.assert_close(ours(True, "exact")[0], total, **tol)
    grad, stats = ours(True)
    torch.testing.assert_close(grad - weight_pathwise, _psi_grad((g * stats["dA_dg"]).sum(), schedule), **tol)
    R = 2000
    _, stats = ours(True, B=R)
    per = stats["dA_dg"] * R  # reduction="mean" scales delta by 1/R
    z = (per.mean(0) - dphi_dg[0]) / (per.std(0) / math.sqrt(R))
    assert bool((z.abs() < 4).all()), z


def test_class_conditional_schedule_rows():
    """Labels select rows: only the classes present get gradient, and the loss equals the sum over classes of the
    loss computed with a global schedule holding that class's row."""
    gmm = GaussianMixture.toy(bands=(3,), num_classes=3)
    schedule = _schedule(2, num_classes=3)
    labels = torch.tensor([0, 2, 0, 2])
    x0, labels = gmm.sample(labels=labels, generator=torch.Generator().manual_seed(0))
    t, eps = _draws(4, x0, 1)
    for fn in (iso_loss, trajectory_loss):
        loss, _ = fn(gmm, schedule, x0, labels, t=t, noise=eps, reduction="sum",
                     generator=torch.Generator().manual_seed(2))
        grad = _psi_grad(loss, schedule)
        assert bool((grad[1] == 0).all())
        assert bool((grad[0].abs() > 0).any()) and bool((grad[2].abs() > 0).any())
        parts = []
        for y in (0, 2):
            row = MatrixSchedule(2)
            with torch.no_grad():
                row.psi.copy_(schedule.psi[y:y + 1])
            m = labels == y
            parts.append(fn(gmm, row, x0[m], labels[m], t=t[m], noise=eps[m], reduction="sum")[0])
        torch.testing.assert_close(loss, sum(parts), rtol=1e-10, atol=0)


def test_per_class_basis():
    """Per-class PCA basis (per-sample ids): value == dense with each sample's own projectors; with the exact mixture
    the exact-trace estimator reproduces plain back-propagation."""
    gmm = pca_mixture()
    schedule = _schedule(2)
    labels = torch.tensor([0, 1, 1, 0])
    x0, labels = gmm.sample(labels=labels, generator=torch.Generator().manual_seed(0))
    t, eps = _draws(4, x0, 1, lo=1.0, hi=6400.0)
    g, gdot = schedule(t)
    ref = _dense_trajectory(gmm, g, gdot, x0, eps, labels, 1.0, "attached").sum()
    grads = {}
    for est, trace in ((False, "hutchinson"), (True, "exact")):
        loss, _ = trajectory_loss(gmm, schedule, x0, labels, t=t, noise=eps, c=1.0, estimator=est, trace=trace)
        torch.testing.assert_close(loss, ref, rtol=1e-9, atol=0)
        grads[est] = _psi_grad(loss, schedule)
    torch.testing.assert_close(grads[True], grads[False], rtol=1e-7, atol=1e-10 * float(grads[False].abs().max()))
    with pytest.raises(ValueError, match="labels"):
        trajectory_loss(gmm, schedule, x0)


def test_network_float32_and_the_surrogate_leaves_the_network_alone():
    """An AnisoPrecond network on float32 images, class-conditional network and schedule: estimator True/False give
    identical network gradients (the surrogate only reaches the schedule) and different schedule gradients."""
    model = AnisoPrecond(TinyNet(label_dim=3), DCTBasis(8, bands=(3,)))
    schedule = _schedule(2, num_classes=3)
    x0 = 0.5 * torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2, 1])
    out = {}
    for est in (False, True):
        loss, _ = trajectory_loss(model, schedule, x0, labels, estimator=est,
                                  generator=torch.Generator().manual_seed(3))
        params = list(model.parameters()) + [schedule.psi]
        out[est] = torch.autograd.grad(loss, params)
        assert all(torch.isfinite(p).all() for p in out[est])
    for a, b in zip(out[False][:-1], out[True][:-1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (out[False][-1] - out[True][-1]).norm() > 1e-6 * out[False][-1].norm()
    loss, _ = iso_loss(model, schedule, x0, labels, generator=torch.Generator().manual_seed(3))
    assert all(torch.isfinite(p).all() for p in torch.autograd.grad(loss, params))


@pytest.mark.parametrize("fn", [iso_loss, trajectory_loss])
def test_reduction_and_random_draws(fn):
    gmm = GaussianMixture.toy(bands=(3,))
    schedule = _schedule(2)
    x0, _ = gmm.sample(5, generator=torch.Generator().manual_seed(0))
    res = {}
    for red in ("mean", "sum"):
        loss, stats = fn(gmm, schedule, x0, reduction=red, generator=torch.Generator().manual_seed(4), tmin=100.0)
        res[red] = (loss, _psi_grad(loss, schedule), stats["t"])
        assert bool(((stats["t"] >= 100.0) & (stats["t"] <= schedule.T)).all())
    torch.testing.assert_close(res["sum"][0], 5 * res["mean"][0], rtol=1e-12, atol=0)
    torch.testing.assert_close(res["sum"][1], 5 * res["mean"][1], rtol=1e-9, atol=1e-18)
    torch.testing.assert_close(res["sum"][2], res["mean"][2], rtol=0, atol=0)


def _bad_cases():
    gmm = GaussianMixture.toy(bands=(3,))
    gmm_cls = GaussianMixture.toy(bands=(3,), num_classes=2)
    s2, s3, s2c = _schedule(2), _schedule(3), _schedule(2, num_classes=2)
    x0 = torch.zeros(2, 1, 8, 8, dtype=F64)
    lab = torch.tensor([0, 1])
    return [
        ("x0", (gmm, s2, x0[0]), {}),
        ("x0", (gmm, s2, x0.long()), {}),
        ("x0", (gmm, s2, torch.zeros(2, 1, 6, 6, dtype=F64)), {}),
        ("x0", (gmm, s2, torch.zeros(2, 2, 8, 8, dtype=F64)), {}),
        ("schedule", (gmm, s3, x0), {}),
        ("labels", (gmm, s2c, x0), {}),
        ("labels", (gmm_cls, s2, x0), {}),
        ("labels", (gmm, s2c, x0, lab[:1]), {}),
        ("labels", (gmm, s2c, x0, lab.float()), {}),
        ("labels", (gmm, s2c, x0, lab.int()), {}),
        ("c", (gmm, s2, x0), {"c": 0.0}),
        ("c", (gmm, s2, x0), {"c": -1.0}),
        ("c", (gmm, s2, x0), {"c": float("nan")}),
        ("reduction", (gmm, s2, x0), {"reduction": "max"}),
        ("tmin", (gmm, s2, x0), {"tmin": -1.0}),
        ("tmin", (gmm, s2, x0), {"tmin": 6400.0}),
        ("t", (gmm, s2, x0), {"t": torch.ones(3, dtype=F64)}),
        ("noise", (gmm, s2, x0), {"noise": torch.zeros(1, 1, 8, 8, dtype=F64)}),
    ]


@pytest.mark.parametrize("fn", [iso_loss, trajectory_loss])
def test_bad_inputs(fn):
    for name, args, kw in _bad_cases():
        with pytest.raises(ValueError, match=name):
            fn(*args, **kw)
    gmm, s2 = GaussianMixture.toy(bands=(3,)), _schedule(2)
    with pytest.raises(TypeError, match="model"):
        fn(object(), s2, torch.zeros(2, 1, 8, 8, dtype=F64))
    if fn is trajectory_loss:
        with pytest.raises(ValueError, match="trace"):
            fn(gmm, s2, torch.zeros(2, 1, 8, 8, dtype=F64), trace="full")


def test_edm_loss_is_edms_weighting():
    """edm_loss = EDM's EDMLoss: lambda(sigma) ||D - x0||^2 with ln sigma ~ N(-1.2, 1.2^2)."""
    from aniso_fast.networks.gmm import GaussianMixture
    from aniso_fast.processes.losses import edm_loss
    from aniso_fast.geometry.schedules import MatrixSchedule

    gm = GaussianMixture.toy(channels=1, height=6, width=6, bands=(2,), num_components=2, seed=2)
    x0, _ = gm.sample(2000, generator=torch.Generator().manual_seed(0))
    loss, stats = edm_loss(gm, MatrixSchedule(2), x0, generator=torch.Generator().manual_seed(1))
    # recompute with the same draws
    gen = torch.Generator().manual_seed(1)
    s = (-1.2 + 1.2 * torch.randn(2000, generator=gen, dtype=torch.float64)).exp()
    assert abs(float(s.log().mean()) + 1.2) < 0.1 and abs(float(s.log().std()) - 1.2) < 0.1
    assert torch.allclose(stats["log_sigma_mean"], s.log().mean())
    eps = torch.randn(x0.shape, generator=gen, dtype=x0.dtype)
    x = x0 + s[:, None, None, None] * eps
    D = gm.denoise(x, (s ** 2)[:, None].expand(-1, 2))
    expect = ((s ** 2 + 0.25) / (s * 0.5) ** 2 * (D - x0).square().flatten(1).sum(1)).mean()
    assert torch.allclose(loss, expect, rtol=1e-10)
