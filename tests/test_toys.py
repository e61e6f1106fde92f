"""Issue 12, items 2-4: VSDM's learning rules and samplers (aniso_fast/vsdm.py) and the 2-D toy study
(aniso_fast/toys.py): data scalings, metrics on known cases, the exact divergence, gradients to the rates,
per-seed determinism and the CLI's bad-input checks. Issue 13, item 5: VSMD's toy methods (a point network in
VSMDPrecond, c learned by the alternating rule, the PF-ODE's recorded x paths)."""
import json
import math

import numpy as np
import pytest
import torch

from aniso_fast.studies import toys
from aniso_fast.geometry.bases import DCTBasis
from aniso_fast.processes.losses import trajectory_loss
from aniso_fast.networks.precond import AnisoPrecond
from aniso_fast.geometry.schedules import karras_sigmas
from aniso_fast.sampling.grids import edm_sigma_t, schedule_grid
from aniso_fast.sampling.noise import seeded_noise
from aniso_fast.sampling.ode import heun
from aniso_fast.sampling.sampler import sample
from aniso_fast.sampling.spec import SOLVERS
from aniso_fast.networks.unet import SongUNet
from aniso_fast.processes.vsdm import (Trajectories, VSDMProcess, dsm_loss, forward_sb_loss, forward_score,
                             forward_score_divergence, sample_em, score, simulate_backward)
from aniso_fast.processes.vsmd import VSMDPrecond, VSMDProcess, sample_ode

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def _point_model(seed=0):
    torch.manual_seed(seed)
    return AnisoPrecond(toys.PointMLP(width=32, depth=2), toys.axis_basis(), sigma_data=2.0)


# ---- data ----

def test_data_generators_apply_vsdm_axis_scalings():
    spiral, board, gauss = (toys.draw(name, 20_000, 0) for name in ("spiral", "checkerboard", "gaussian"))
    # the unscaled spiral has radius up to 3.5 pi (+ noise 0.25): y is 8x that, x is not scaled
    assert np.abs(spiral[:, 0]).max() < 3.5 * np.pi + 1.5 and 7 * 3.5 * np.pi < np.abs(spiral[:, 1]).max()
    assert np.abs(spiral[:, 1]).max() < 8 * (3.5 * np.pi + 1.5)
    # the checkerboard lives on [-2 pi, 2 pi]^2, x scaled 6x; its squares have sin(x / 6) sin(y) > 0
    assert np.abs(board[:, 1]).max() <= 2 * np.pi and np.abs(board[:, 0]).max() > 5.5 * 2 * np.pi
    assert (np.sin(board[:, 0] / 6) * np.sin(board[:, 1]) > 0).all()
    np.testing.assert_allclose(gauss.std(0), [1.0, 8.0], rtol=0.03)
    assert toys.on_squares(board) == 1.0
    uniform = np.random.default_rng(1).uniform(-1, 1, (20_000, 2)) * [12 * np.pi, 2 * np.pi]
    assert toys.on_squares(uniform) == pytest.approx(0.5, abs=0.02)
    assert np.array_equal(toys.draw("spiral", 5, 3), toys.draw("spiral", 5, 3))
    with pytest.raises(ValueError, match=r"^data: expected one of"):
        toys.draw("moons", 5, 0)


# ---- metrics ----

def test_metrics_on_known_cases():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((800, 2))
    assert toys.histogram_rmse(x, x.copy(), (-4, 4, -4, 4)) == 0.0
    assert toys.mmd_rbf(x, x.copy()) == pytest.approx(0.0, abs=1e-12)
    assert toys.mmd_rbf(x, x + 3.0) > 0.5
    # W2 of N(0, I) and N(m, I) is |m|; for the empirical sets shifted exactly it is exactly |m|
    shift = np.array([3.0, -4.0])
    assert toys.wasserstein2(x, x + shift) == pytest.approx(5.0, rel=1e-9)
    # two independent draws of the shifted Gaussians: |m| up to the sampling error of W2
    assert toys.wasserstein2(x, rng.standard_normal((800, 2)) + shift) == pytest.approx(5.0, abs=0.3)
    # disjoint histograms: every occupied bin is a full mismatch
    far = toys.histogram_rmse(np.zeros((10, 2)), np.ones((10, 2)), (-2, 2, -2, 2), bins=4)
    assert far == pytest.approx(math.sqrt(2 / 16))


def test_path_metrics_straight_line_and_bend():
    s = np.linspace(0, 1, 11)[:, None, None]
    line = np.concatenate([s * 2.0, s * -1.0], axis=2).repeat(3, axis=1)  # constant speed (2, -1)
    m = toys.path_metrics(line)
    assert m["straightness_x"] == pytest.approx(0, abs=1e-9) and m["straightness_y"] == pytest.approx(0, abs=1e-9)
    assert m["kinetic_x"] == pytest.approx(4.0) and m["kinetic_y"] == pytest.approx(1.0)
    assert m["chord_ratio"] == pytest.approx(1.0)
    bend = np.concatenate([np.minimum(s, 0.5), np.maximum(s - 0.5, 0)], axis=2)  # right, then up
    mb = toys.path_metrics(bend)
    assert mb["straightness_x"] > 0 and mb["chord_ratio"] == pytest.approx(math.sqrt(0.5))


# ---- the learning rules ----

@pytest.mark.parametrize("make", [toys.axis_basis, lambda: DCTBasis(4, 4, bands=(1, 2))])
def test_exact_divergence_of_the_linear_forward_score_equals_autograd_trace(make):
    basis = make()
    K = basis.num_subspaces
    process = VSDMProcess(K, rates=torch.linspace(-0.8, 0.3, K).tolist())
    shape = (1, 1, 2) if K == 2 else (1, 4, 4)
    n = math.prod(shape)
    x = torch.randn(3, *shape, dtype=F64, requires_grad=True)
    t = torch.tensor([0.05, 0.4, 0.9], dtype=F64)
    g_zf = forward_score(process, basis, x, t) * process.beta.beta(t).sqrt()[:, None, None, None]
    trace = torch.zeros(3, dtype=F64)
    for i in range(n):
        (row,) = torch.autograd.grad(g_zf.flatten(1)[:, i].sum(), x, retain_graph=True)
        trace += row.flatten(1)[:, i]
    torch.testing.assert_close(forward_score_divergence(process, basis, 1, t).detach(), trace, rtol=1e-12, atol=1e-12)


def _paths(process, model, seeds=range(6), steps=8):
    return simulate_backward(process, model, seeds, steps, image_shape=toys.SHAPE)


def test_forward_sb_loss_gradient_reaches_the_rates_and_matches_its_closed_form():
    process = VSDMProcess(2, rates=[0.2, -0.5])
    model = _point_model()
    paths = _paths(process, model)
    assert isinstance(paths, Trajectories) and paths.x.shape == (8, 6, 1, 1, 2) and paths.z_b.shape == paths.x.shape
    loss = forward_sb_loss(process, model.basis, paths, zeta=0.75)
    (grad,) = torch.autograd.grad(loss, process.log_decay)
    assert bool((grad != 0).all()) and bool(torch.isfinite(grad).all())
    # the same loss written per axis: sum_i dt mean_b [beta/2 lam^2 x^2 + sqrt(beta) lam x z_b + zeta beta lam]
    lam = process.rates.detach()[0]
    beta = process.beta.beta(paths.t)[:, None, None]
    x, z = paths.x.reshape(8, 6, 2).to(F64), paths.z_b.reshape(8, 6, 2).to(F64)
    per = (beta / 2 * lam ** 2 * x ** 2 + beta.sqrt() * lam * x * z + 0.75 * beta * lam).sum(2).mean(1)
    torch.testing.assert_close(loss.detach(), (paths.dt * per).sum(), rtol=1e-5, atol=1e-6)


def test_dsm_loss_freezes_the_rates_and_trains_the_network():
    process = VSDMProcess(2, rates=[0.2, -0.5])
    model = _point_model()
    x0 = torch.as_tensor(toys.draw("gaussian", 16, 0), dtype=torch.float32).reshape(16, *toys.SHAPE)
    loss = dsm_loss(process, model, x0, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert process.log_decay.grad is None
    assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in model.parameters())
    # the label is the transition score: a model whose flow is exactly -eps has zero loss
    t = torch.full((16,), 0.5, dtype=F64)
    eps = torch.randn(x0.shape)

    class Oracle:
        basis = model.basis

        @staticmethod
        def flow(y, g, labels=None):
            return model.basis.scale(x0 - y, g.rsqrt())  # M^{-1/2}(x0 - y) = -eps

    assert float(dsm_loss(process, Oracle, x0, t=t, noise=eps)) == pytest.approx(0.0, abs=1e-6)


def test_rule_b_trajectory_loss_on_the_view_reaches_the_rates():
    process = VSDMProcess(2, rates=[0.1, -0.3])
    model = _point_model()
    x0 = torch.as_tensor(toys.draw("spiral", 8, 1), dtype=torch.float32).reshape(8, *toys.SHAPE) / 10
    loss, _ = trajectory_loss(model, process.ve_schedule(), x0, c=1.0, generator=torch.Generator().manual_seed(2))
    loss.backward()
    assert process.log_decay.grad is not None and bool((process.log_decay.grad != 0).all())


# ---- samplers ----

def test_em_sampling_is_per_seed_deterministic_and_starts_at_the_adaptive_prior():
    process = VSDMProcess(2, rates=[0.3, -0.6])
    model = _point_model()
    a, _, info = sample_em(process, model, [5, 9, 11], steps=6, image_shape=toys.SHAPE)
    b, _, _ = sample_em(process, model, [11, 2, 5], steps=6, image_shape=toys.SHAPE)
    assert info["nfe"] == 6
    torch.testing.assert_close(a[0], b[2], rtol=0, atol=0)
    torch.testing.assert_close(a[2], b[0], rtol=0, atol=0)
    assert not torch.equal(a[1], b[1])
    with torch.no_grad():
        prior = process.prior_sample(model.basis, seeded_noise([5, 9], toys.SHAPE))
        first = _paths(process, model, [5, 9], steps=3).x[0]
    torch.testing.assert_close(first, prior, rtol=0, atol=0)


def test_em_and_pf_ode_agree_on_an_exact_gaussian_score():
    """With the exact score of Gaussian data both samplers return the data's covariance (EM: the reverse SDE;
    the PF-ODE through the engine's solver on the VE view)."""
    process = VSDMProcess(2, rates=[0.3, -0.8], beta_max=10.0)
    basis = toys.axis_basis()
    var = torch.tensor([1.0, 4.0], dtype=F64)

    class Exact:  # the Gaussian N(0, diag(var)) denoiser in the VE view: F = M^{-1/2}(D - y), D = var/(var+g) y
        def __init__(self):
            self.basis = basis

        def flow(self, y, g, labels=None):
            return basis.scale(y, -g.sqrt() / (var + g))

    n = 1200
    seeds = range(n)
    with torch.no_grad():
        x_em, _, _ = sample_em(process, Exact(), seeds, steps=100, image_shape=toys.SHAPE, dtype=F64)
        y, _, _ = sample(Exact(), process.ve_schedule(), nfe=60, seeds=seeds, image_shape=toys.SHAPE, dtype=F64)
        x_ode = process.from_ve(basis, y, process.t0)
    for x in (x_em, x_ode):
        np.testing.assert_allclose(x.reshape(n, 2).var(0).numpy(), [1.0, 4.0], rtol=0.13)  # 3 sigma of n = 1200


def test_pf_ode_through_every_engine_solver_on_the_view():
    """VSDM's probability flow through each engine solver (Euler, Heun, the multistep family) on the uniform t
    grid, and through EDM's sigma grid on the view's geometric mean (`VESchedule.invert_geometric_mean`)."""
    process = VSDMProcess(2, rates=[0.3, -0.8], beta_max=10.0)
    view = process.ve_schedule()
    basis = toys.axis_basis()
    var = torch.tensor([1.0, 4.0], dtype=F64)

    class Exact:
        def __init__(self):
            self.basis = basis

        def flow(self, y, g, labels=None):
            return basis.scale(y, -g.sqrt() / (var + g))

        def denoise(self, y, g, labels=None):
            return basis.scale(y, var / (var + g))

    seeds = range(16)
    with torch.no_grad():
        ref = sample(Exact(), view, nfe=200, seeds=seeds, image_shape=toys.SHAPE, dtype=F64)[0]
        for solver in [s.name for s in SOLVERS.values() if not s.stochastic]:  # em samples the SDE, not the PF-ODE
            y = sample(Exact(), view, nfe=41, solver=solver, grid="uniform_t", seeds=seeds, image_shape=toys.SHAPE,
                       dtype=F64)[0]
            assert float((y - ref).abs().max()) < (0.2 if solver == "euler" else 0.01), solver
        # EDM's sigma grid inside the view's range [sqrt(g(0)), sqrt(g(T))] of geometric-mean sigmas
        lo, hi = view.geometric_mean(torch.tensor([0.0, 1.0], dtype=F64)).sqrt().tolist()
        t = edm_sigma_t(view, 30, sigma_min=lo, sigma_max=hi)
        torch.testing.assert_close(view.geometric_mean(t[:-1]).sqrt(), karras_sigmas(30, lo, hi), rtol=1e-9, atol=0)
        assert float(t[0]) == pytest.approx(view.T) and float(t[-2]) == pytest.approx(0, abs=1e-9)
        x = basis.scale(seeded_noise(seeds, toys.SHAPE, dtype=F64), view(view.T)[0].sqrt().expand(16, -1))
        y = heun(Exact(), x, schedule_grid(view, t))
        assert float((y - ref).abs().max()) < 0.05


def test_view_inverts_its_geometric_mean_per_class():
    process = VSDMProcess(2, num_classes=2, rates=[[0.3, -0.8], [0.0, 0.2]])
    view = process.ve_schedule()
    labels = torch.tensor([1, 0, 1])
    y = torch.tensor([5.0, 0.5, 0.01], dtype=F64)
    s = view.invert_geometric_mean(y, labels)
    assert s.shape == (3, 3)
    gm = view.geometric_mean(s.reshape(-1), labels[:, None].expand(3, 3).reshape(-1)).reshape(3, 3)
    torch.testing.assert_close(gm, y.expand(3, 3), rtol=1e-9, atol=0)
    with pytest.raises(ValueError, match=r"^labels: required"):
        view.invert_geometric_mean(y)
    with pytest.raises(ValueError, match=r"^y: expected a floating tensor \[N\]"):
        view.invert_geometric_mean(torch.ones(2, 2, dtype=F64), labels)


def test_score_matches_the_gaussian_transition():
    process = VSDMProcess(2, rates=[0.3, -0.8])
    basis = toys.axis_basis()

    class Exact:  # data = the point 0: the VE denoiser is 0, F = -M^{-1/2} y
        def __init__(self):
            self.basis = basis

        def flow(self, y, g, labels=None):
            return basis.scale(y, -g.rsqrt())

    x = torch.randn(5, 1, 1, 2, dtype=F64)
    t = torch.full((5,), 0.37, dtype=F64)
    sigma = process.sigma(t)[0].reshape(5, 1, 1, 2)
    torch.testing.assert_close(score(process, Exact(), x, t), -x / sigma ** 2, rtol=1e-10, atol=1e-12)


def test_bad_rule_inputs_raise_naming_them():
    process = VSDMProcess(2)
    model = _point_model()
    for steps in (0, 1.5, True, 10 ** 9):
        with pytest.raises(ValueError, match=r"^steps: expected an int"):
            sample_em(process, model, [0], steps=steps, image_shape=toys.SHAPE)
    with pytest.raises(ValueError, match=r"^seeds: "):
        sample_em(process, model, [-1], steps=2, image_shape=toys.SHAPE)
    empty = simulate_backward(process, model, [0], 2, image_shape=toys.SHAPE, record=False)
    with pytest.raises(ValueError, match=r"^paths: expected Trajectories recorded"):
        forward_sb_loss(process, model.basis, empty)
    with pytest.raises(ValueError, match=r"^zeta: expected a finite number"):
        forward_sb_loss(process, model.basis, _paths(process, model, [0], 2), zeta=float("nan"))
    with pytest.raises(ValueError, match=r"^x0: expected images"):
        dsm_loss(process, model, torch.zeros(4, 2))
    with pytest.raises(ValueError, match=r"^basis: expected 3 subspaces"):
        forward_score(VSDMProcess(3), model.basis, torch.zeros(2, *toys.SHAPE), 0.5)


# ---- VSMD (issue 13, item 5) ----

@pytest.mark.parametrize("method", ["vsmd-crit", "vsmd-under"])
def test_vsmd_methods_train_c_in_the_forward_stages_and_evaluate(method, monkeypatch):
    monkeypatch.setattr(toys, "EM_STEPS", 4)  # the same code paths, fewer steps
    monkeypatch.setattr(toys, "VSMD_NFE", 5)
    trained = toys.train(method, "gaussian", steps=12)
    assert isinstance(trained.model, VSMDPrecond) and isinstance(trained.process, VSMDProcess)
    assert trained.process.zeta == toys.ZETA[method] and trained.schedule is None
    # DSM never touches c (its gradient is cut); only the 20 forward stages move it from its start 0
    assert len(trained.log["loss"]) == 12 and len(trained.log["forward_loss"]) == 20
    assert all(abs(c) > 1e-4 for c in trained.log["c"])
    result = toys.evaluate(trained, "gaussian", n=100, paths=20)
    assert set(result["samples"]) == {"em", "ode"}
    assert all(v.shape == (100, 2) and np.isfinite(v).all() for v in result["samples"].values())
    assert result["paths"].shape == (3 + 1, 20, 2)  # NFE 5 = 3 Heun steps, the last Euler
    np.testing.assert_array_equal(result["paths"][-1], result["samples"]["ode"][:20])
    assert set(result["metrics"]) == {"em", "ode", "paths"}


def test_vsmd_recorded_paths_are_the_heun_states():
    """With a zero score the PF-ODE is dz = F z per axis: Heun's state after a step is (I + h F + h^2 F^2 / 2) z,
    the last (Euler) step's (I + h F) z; the recorded x paths must follow it from VSMD's prior."""
    process = VSMDProcess(2, c=[0.2, -0.4], zeta=0.9)
    net = toys.PointMLP(width=8, depth=1, phase=True)
    torch.nn.init.zeros_(net.body[-1].weight)
    torch.nn.init.zeros_(net.body[-1].bias)
    trained = toys.Trained(VSMDPrecond(net, process, toys.axis_basis(), time_scale=1.0), process, None, {})
    seeds = [3, 8]
    samples, paths = toys._vsmd_samples(trained, seeds)
    steps = (toys.VSMD_NFE + 1) // 2
    assert paths.shape == (steps + 1, 2, 2)
    with torch.no_grad():
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        eps = [torch.stack([torch.randn(toys.SHAPE, generator=g, dtype=F64) for g in gens]) for _ in range(2)]
        x, v = process.prior_sample(toys.axis_basis(), *(e.float() for e in eps))
        z = torch.stack([x.reshape(2, 2), v.reshape(2, 2)], -1).double()  # [B, axis, (x, v)]
        F = process.drift_blocks()[0]
        ts = torch.linspace(process.T, process.t0, steps + 1, dtype=F64)
        expected = [z[..., 0].numpy()]
        for i in range(steps):
            h = float(ts[i + 1] - ts[i])
            step = torch.eye(2, dtype=F64) + h * F + (h * h / 2 * F @ F if i < steps - 1 else 0)
            z = torch.einsum("kij,bkj->bki", step, z)
            expected.append(z[..., 0].numpy())
    np.testing.assert_allclose(paths, np.stack(expected), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(samples["ode"], paths[-1])
    x_ode, _, _ = sample_ode(process, trained.model, seeds, toys.VSMD_NFE, image_shape=toys.SHAPE)
    np.testing.assert_array_equal(paths[-1], x_ode.reshape(2, 2).numpy())


def test_vsmd_prior_match_is_the_forward_x_std_at_T_over_the_prior():
    c, std = [0.3, 0.1], np.array([5.0, 20.0])  # the data share E_xx s at T is of the order of the prior std
    process = VSMDProcess(2, c=c, zeta=0.9)
    basis = toys.axis_basis()
    n = 40_000
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(n, *toys.SHAPE, generator=gen, dtype=F64) * torch.as_tensor(std).reshape(1, 1, 1, 2)
    noise = [torch.randn(n, *toys.SHAPE, generator=gen, dtype=F64) for _ in range(3)]
    with torch.no_grad():
        x_T, _ = process.perturb(basis, x0, noise[0], noise[1], noise[2], process.T)
        prior_std = process.cov_blocks(process.T)[0, :, 0, 0].sqrt().numpy()
    measured = x_T.reshape(n, 2).std(0).numpy() / prior_std
    np.testing.assert_allclose(toys.prior_match("vsmd-under", c, std), measured, rtol=0.02)  # 3 sigma ~ 1%


def test_vsmd_precond_takes_a_point_network_and_still_refuses_bad_ones():
    process = VSMDProcess(2)
    precond = VSMDPrecond(toys.PointMLP(width=8, depth=1, phase=True), process, toys.axis_basis())
    assert precond.image_shape == toys.SHAPE and precond.num_classes is None
    assert precond(torch.zeros(3, 2, 1, 2), 0.5).shape == (3, *toys.SHAPE)
    with pytest.raises(ValueError, match=r"^z: expected the phase space \[B, 2, 1, 2\]"):
        precond(torch.zeros(3, 1, 1, 2), 0.5)
    unet = SongUNet(img_resolution=8, in_channels=2, out_channels=1, model_channels=8, channel_mult=[1, 1],
                    num_blocks=1, attn_resolutions=[])
    bad_shape = toys.PointMLP(width=8, depth=1, phase=True)
    bad_shape.image_shape = (1, 2)
    for net in (unet, bad_shape, toys.PointMLP):
        with pytest.raises(ValueError, match=r"^net: expected a VelocityScoreNet"):
            VSMDPrecond(net, process, toys.axis_basis())


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match=r"^method: expected one of .*vsmd-crit, vsmd-under, got 'vsmd'"):
        toys.train("vsmd", "gaussian", 10)


# ---- the CLI ----

@pytest.mark.parametrize("argv, option", [
    (["run", "--steps", "0"], "--steps"), (["run", "--steps", "x"], "--steps"),
    (["run", "--samples", "10"], "--samples"), (["run", "--data", "moons"], "--data"),
    (["run", "--methods", "vp10,bogus"], "--methods"), (["run", "--methods", ""], "--methods"),
    (["run", "--methods", "vsmd-crit,vsmd"], "--methods"),
    (["run", "--seed", "-1"], "--seed"), (["run", "--out", "a_file/sub"], "--out"),
    (["report", "--out", "missing"], "--out"), (["report", "--doc", "a_dir"], "--doc"),
    (["bogus"], "command"),
])
def test_cli_refuses_bad_input_before_any_work(argv, option, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "a_dir").mkdir()
    (tmp_path / "docs" / "toys").mkdir(parents=True)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert toys.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {option}") and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_cli_refuses_to_overwrite_without_force(tmp_path, capsys):
    out = tmp_path / "toys"
    out.mkdir()
    (out / "gaussian-vp10.json").write_text("{}")
    assert toys.main(["run", "--data", "gaussian", "--methods", "vp10", "--out", str(out)]) == 2
    assert "pass --force" in capsys.readouterr().err
    doc = tmp_path / "TOYS.md"
    doc.write_text("old")
    assert toys.main(["report", "--out", str(out), "--doc", str(doc)]) == 2
    assert doc.read_text() == "old"


def test_cli_run_and_report_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setattr(toys, "EM_STEPS", 10)  # the same code paths, fewer steps
    monkeypatch.setattr(toys, "ODE_NFE", 10)
    monkeypatch.setattr(toys, "VSMD_NFE", 5)
    out, doc = tmp_path / "toys", tmp_path / "TOYS.md"
    assert toys.main(["run", "--data", "gaussian", "--methods", "vp10,vsdm-a,vsmd-crit", "--steps", "12",
                      "--samples", "100", "--out", str(out)]) == 0
    assert toys.main(["report", "--out", str(out), "--doc", str(doc)]) == 0
    text = doc.read_text()
    assert "python -m aniso_fast.studies.toys run" in text.splitlines()[2] and "| vsdm-a:" in text
    assert (out / "gaussian-samples.png").stat().st_size > 0 and (out / "gaussian-paths.png").stat().st_size > 0
    c = json.loads((out / "gaussian-vsmd-crit.json").read_text())["c"]
    assert f"| {c[0]:.3f}, {c[1]:.3f} |" in text.split("| vsmd-crit:")[1].splitlines()[0]
    assert "## VSMD against VSDM and isotropic diffusion" in text and "  - vsmd-crit: lower on" in text
