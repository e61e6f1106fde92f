"""Solvers on the exact Gaussian mixture: EDM equivalence, convergence order, NFE, seeds, grids, bad input."""
import ot
import pytest
import torch

from aniso_fast import sampling
from aniso_fast.sampling import grids as G, ode, spec
from aniso_fast.sampling.noise import MAX_SEED, seeded_labels, seeded_noise
from aniso_fast.networks.gmm import GaussianMixture
from aniso_fast.geometry.schedules import MatrixSchedule, karras_sigmas

f64 = torch.float64


class CountingModel:
    def __init__(self, model):
        self.model, self.calls = model, 0
        self.basis, self.num_classes, self.image_shape = model.basis, model.num_classes, model.image_shape

    def flow(self, x, g, labels=None):
        self.calls += 1
        return self.model.flow(x, g, labels)


def test_isotropic_heun_on_karras_grid_is_edm_algorithm_2(gmm):
    """METHOD §6.1/§6.2: with g = h = sigma^2 the matrix Heun step is EDM's, step for step (float64)."""
    N, B = 6, 3
    z = seeded_noise([1, 2, 3], (1, 6, 6), dtype=f64)
    sig = torch.cat([karras_sigmas(N), torch.zeros(1, dtype=f64)])
    x, edm_states = z * sig[0], []
    for i in range(N):  # EDM generate.py edm_sampler with S_churn = 0
        s0, s1 = sig[i], sig[i + 1]
        d = (x - gmm.denoise(x, torch.full((B, 2), float(s0 ** 2), dtype=f64))) / s0
        x_next = x + (s1 - s0) * d
        if i < N - 1:
            d2 = (x_next - gmm.denoise(x_next, torch.full((B, 2), float(s1 ** 2), dtype=f64))) / s1
            x_next = x + (s1 - s0) * (d + d2) / 2
        x = x_next
        edm_states.append(x)
    ours = []
    ode.heun(gmm, z * 80, G.karras_grid(N, 2), callback=lambda info: ours.append(info["x"]))
    assert len(ours) == N
    for a, b in zip(edm_states, ours):
        assert torch.allclose(a, b, rtol=0, atol=1e-11)


def _solve(gmm, sched, solver, n, secondary):
    g = G.schedule_grid(sched, G.uniform_t(n), None, secondary)
    z = seeded_noise(range(4), gmm.image_shape, dtype=f64)
    x = gmm.basis.scale(z, g.g[:, 0].expand(4, -1).sqrt())
    if solver == "euler":
        return ode.euler(gmm, x, g)
    return ode.heun(gmm, x, g, final_euler=False)


def test_convergence_orders(gmm, aniso_schedule):
    """Euler is first order and Heun (end point and midpoint) second order: error ratios when steps double."""
    ref = _solve(gmm, aniso_schedule, "heun", 384, "mid")

    def ratio(solver, secondary, n):
        e1 = (_solve(gmm, aniso_schedule, solver, n, secondary) - ref).pow(2).mean().sqrt()
        e2 = (_solve(gmm, aniso_schedule, solver, 2 * n, secondary) - ref).pow(2).mean().sqrt()
        return float(e1 / e2)

    assert 1.7 < ratio("euler", "end", 48) < 2.5
    assert 3.4 < ratio("heun", "end", 48) < 4.6
    assert 3.4 < ratio("heun", "mid", 48) < 4.6


@pytest.mark.parametrize("solver,secondary,nfe", [("heun", "end", 9), ("heun", "mid", 9), ("heun", "mid", 8),
                                                  ("euler", "end", 5), ("heun", "end", 3)])
def test_nfe_is_network_calls(gmm, aniso_schedule, solver, secondary, nfe):
    model = CountingModel(gmm)
    x, _, info = sampling.sample(model, aniso_schedule, nfe=nfe, solver=solver, secondary=secondary, seeds=[0, 1],
                          dtype=f64)
    assert model.calls == nfe == info["nfe"]
    assert torch.isfinite(x).all()


def test_same_seed_same_sample_whatever_the_batch(gmm, aniso_schedule):
    alone, _, _ = sampling.sample(gmm, aniso_schedule, nfe=7, seeds=[5])
    batch, _, _ = sampling.sample(gmm, aniso_schedule, nfe=7, seeds=[1, 5, 9])
    assert torch.allclose(alone[0], batch[1], atol=1e-6)
    assert not torch.allclose(batch[0], batch[1])


def test_seeds_outside_the_generator_range_are_refused(gmm, aniso_schedule):
    """Issue 10, defect 4: torch's CPU generator keeps 32 bits, so seed 2**32 silently repeated seed 0; negative
    seeds wrapped around. Both are refused; the largest seed is its own sample."""
    for bad in ([2 ** 32], [0, 2 ** 32 + 1], [-1], [1.5]):
        with pytest.raises(ValueError, match="seeds"):
            sampling.sample(gmm, aniso_schedule, nfe=3, seeds=bad)
        with pytest.raises(ValueError, match="seeds"):
            seeded_noise(bad, (1, 6, 6))
        with pytest.raises(ValueError, match="seeds"):
            seeded_labels(bad, 10)
    z = seeded_noise([0, MAX_SEED], (1, 6, 6))
    assert not torch.equal(z[0], z[1])


def test_labels_come_from_a_stream_apart_from_the_noise():
    """Issue 10, defect 4: the label generator's seed + 2**40 kept the same low 32 bits, so a seed's label was
    drawn from its own noise stream; now it is a separate stream, still one per seed whatever the batch."""
    seeds = list(range(200))
    labels = seeded_labels(seeds, 10)
    from_noise_stream = [int(torch.randint(10, (1,), generator=torch.Generator().manual_seed(s))) for s in seeds]
    assert labels.tolist() != from_noise_stream
    assert set(labels.tolist()) == set(range(10))
    assert seeded_labels([1, 5, 9], 10)[1] == labels[5]
    assert seeded_labels([MAX_SEED], 10).shape == (1,)


def test_uniform_t_grid_at_karras_init_is_edm_grid():
    """METHOD §2.2: 5 uniform t points give sigma = [80, 17.52, 2.511, 0.169, 3.2e-5] at initialisation."""
    g = G.schedule_grid(MatrixSchedule(2), G.uniform_t(4)).g[0]
    assert torch.allclose(g[:, 0], g[:, 1])
    sig = g[:, 0].sqrt()
    assert torch.allclose(sig, torch.tensor([80, 17.52, 2.511, 0.169, 3.16e-5], dtype=f64), rtol=2e-3)


def test_edm_sigma_grid_follows_karras_on_geometric_mean(aniso_schedule):
    t = G.edm_sigma_t(aniso_schedule, 6)
    g = G.schedule_grid(aniso_schedule, t).g[0]
    geo = g.log().mean(1).exp()  # sqrt(g h)
    assert torch.allclose(geo[:-1], karras_sigmas(6) ** 2, rtol=1e-6)
    assert t[-1] == 0


def test_class_conditional_schedules_per_sample():
    """The reference sampler used class 0's schedule for everyone (METHOD §10.7); each sample uses its own."""
    sched = MatrixSchedule(2, num_classes=3)
    with torch.no_grad():
        sched.psi[2] += 0.5
    labels = torch.tensor([0, 2, 1])
    for t in (G.uniform_t(5), G.edm_sigma_t(sched, 5, labels)):
        mixed = G.schedule_grid(sched, t, labels, "mid")
        if t.dim() == 1:  # on the uniform t grid the classes' variances differ (on the EDM grid g = sigma^2)
            assert not torch.allclose(mixed.g[0], mixed.g[1])
        for i, y in enumerate(labels.tolist()):
            ti = t if t.dim() == 1 else t[i]
            alone = G.schedule_grid(sched, ti, torch.tensor([y]), "mid")
            assert torch.allclose(mixed.g[i], alone.g[0]) and torch.allclose(mixed.g_sec[i], alone.g_sec[0])


def test_class_conditional_mixture_sampling_uses_labels():
    gm = GaussianMixture.toy(channels=1, height=6, width=6, bands=(2,), num_components=1, num_classes=2, seed=3)
    labels = torch.tensor([0, 1, 0, 1])
    x, lab, _ = sampling.sample(gm, MatrixSchedule(2), nfe=15, seeds=range(4), labels=labels, dtype=f64)
    assert torch.equal(lab, labels)
    # each sample is closer to its own class mean
    d = ((x[:, None] - gm.means[None]) ** 2).flatten(2).sum(-1)
    assert torch.equal(d.argmin(1), labels)


def test_distribution_matches_exact_samples(gmm, aniso_schedule):
    """Sliced Wasserstein (POT) to exact samples: a fine solve is at the two-sample noise floor, NFE 3 is not."""
    n = 1500
    exact_a = gmm.sample(n, generator=torch.Generator().manual_seed(0))[0].flatten(1).numpy()
    exact_b = gmm.sample(n, generator=torch.Generator().manual_seed(1))[0].flatten(1).numpy()
    fine, _, _ = sampling.sample(gmm, aniso_schedule, nfe=31, seeds=range(n), dtype=f64)
    coarse, _, _ = sampling.sample(gmm, aniso_schedule, nfe=3, solver="heun", secondary="end", seeds=range(n), dtype=f64)

    def sw(a, b):
        return ot.sliced_wasserstein_distance(a, b, n_projections=200, seed=0)

    floor = sw(exact_a, exact_b)
    assert sw(fine.flatten(1).numpy(), exact_a) < 1.5 * floor
    assert sw(coarse.flatten(1).numpy(), exact_a) > 2 * floor


def test_bad_inputs(gmm, aniso_schedule):
    with pytest.raises(ValueError, match="nfe"):
        sampling.sample(gmm, aniso_schedule, nfe=8, secondary="end")
    with pytest.raises(ValueError, match="nfe"):
        sampling.sample(gmm, aniso_schedule, nfe=1, solver="heun")
    with pytest.raises(ValueError, match="nfe"):
        sampling.sample(gmm, aniso_schedule, nfe=0, solver="euler")
    with pytest.raises(ValueError, match="solver"):
        sampling.sample(gmm, aniso_schedule, solver="rk4")
    with pytest.raises(ValueError, match="grid"):
        sampling.sample(gmm, aniso_schedule, grid="cosine")
    with pytest.raises(ValueError, match="schedule"):
        sampling.sample(gmm, None, grid="uniform_t")
    with pytest.raises(ValueError, match="labels"):
        sampling.sample(gmm, aniso_schedule, labels=torch.tensor([0]))
    cond = GaussianMixture.toy(num_classes=2, num_components=1)
    with pytest.raises(ValueError, match="labels"):
        sampling.sample(cond, MatrixSchedule(2), seeds=[0, 1], labels=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="secondary"):
        sampling.sample(gmm, aniso_schedule, secondary="start")


# ---- the multistep solvers through sample() and resolve_sampler (issue 11) ----

@pytest.mark.parametrize("solver", ["dpmpp-2m", "dpmpp-3m", "unipc", "ipndm", "deis"])
@pytest.mark.parametrize("grid", ["karras", "logsnr", "uniform_t", "edm_sigma"])
def test_sample_dispatches_multistep_solvers_with_exact_nfe(gmm, aniso_schedule, solver, grid):

    counted = CountingModel(gmm)
    x, _, info = sampling.sample(counted, aniso_schedule, nfe=6, solver=solver, grid=grid, seeds=[0, 1], dtype=f64)
    assert counted.calls == 6 == info["nfe"] and info["order"] == spec.SOLVERS[solver].default_order
    # the same solver called on the same grid and start point by hand
    plan = spec.resolve_sampler(solver, grid, None, 6)
    t = {"karras": None, "uniform_t": G.uniform_t(6, aniso_schedule.T),
         "edm_sigma": G.edm_sigma_t(aniso_schedule, 6), "logsnr": G.logsnr_grid(aniso_schedule, 6)}[grid]
    g = G.karras_grid(6, 2) if t is None else G.schedule_grid(aniso_schedule, t)
    x0 = gmm.basis.scale(seeded_noise([0, 1], gmm.image_shape, dtype=f64), g.g[:, 0].expand(2, -1).sqrt())
    expected = spec.SOLVERS[solver].run(gmm, x0, g, order=plan.order)
    assert torch.equal(x, expected)


def test_multistep_rules_in_resolve_sampler():
    assert spec.resolve_sampler("dpmpp-2m", "karras", None, 3).steps == 3
    assert spec.resolve_sampler("unipc", "logsnr", None, 3, order=2).order == 2
    assert "DPM-Solver++(3M), log-SNR grid" in spec.resolve_sampler("dpmpp-3m", "logsnr", None, 5).name
    for args, match in [(("dpmpp-3m", "karras", None, 4), "^nfe: dpmpp-3m of order 3 needs at least 5"),
                        (("ipndm", "karras", None, 3, 4), "^nfe: ipndm of order 4 needs at least 4"),
                        (("unipc", "karras", None, 9, 5), "^order: unipc takes order 2 or 3"),
                        (("heun", "karras", None, 9, 2), "^order: only the multistep solvers"),
                        (("dpmpp-2m", "uniform_t", "mid", 9), "^secondary: dpmpp-2m uses no secondary point"),
                        (("bogus", "karras", None, 9), "^solver: expected one of"),
                        (("dpmpp-2m", "bogus", None, 9), "^grid: expected one of")]:
        with pytest.raises(ValueError, match=match):
            spec.resolve_sampler(*args)


def test_a_grid_that_does_not_apply_to_the_schedule_is_refused(gmm, aniso_schedule):
    """Grids on the geometric mean need its inverse (issue 11, bad input)."""

    class NoInverse(torch.nn.Module):  # a schedule with values but no geometric-mean inverse
        T, num_classes = aniso_schedule.T, None

        def forward(self, t, labels=None):
            return aniso_schedule(t, labels)

    for grid in ("logsnr", "edm_sigma"):
        with pytest.raises(ValueError, match=f"^grid: '{grid}' is placed on the geometric mean"):
            sampling.sample(gmm, NoInverse(), nfe=5, solver="dpmpp-2m", grid=grid)
    x, _, info = sampling.sample(gmm, NoInverse(), nfe=5, solver="dpmpp-2m", grid="uniform_t")
    assert info["nfe"] == 5 and torch.isfinite(x).all()


@pytest.mark.parametrize("solver", ["heun", "dpmpp-2m", "dpmpp-3m", "unipc", "deis"])
@pytest.mark.parametrize("grid", ["logsnr", "edm_sigma"])
def test_geometric_mean_grids_stay_inside_a_narrow_schedule(gmm, solver, grid):
    """VSDM's view spans sigma in about [0.03, 16], inside EDM's [0.002, 80]: the grid is clipped to the schedule's
    span (it used to repeat its end points, and the zero-length steps gave NaN)."""
    from aniso_fast.processes.vsdm import VSDMProcess

    view = VSDMProcess(2).ve_schedule()
    lo, hi = G.geometric_sigma_span(view)
    assert 0.002 < lo < hi < 80
    x, _, info = sampling.sample(gmm, view, nfe=7, solver=solver, grid=grid, seeds=[0, 1], dtype=f64)
    assert torch.isfinite(x).all() and info["nfe"] == 7
    assert G.geometric_sigma_span(MatrixSchedule(2)) == (0.002, 80.0)  # the engine's schedules: EDM's range


# ---- Euler-Maruyama on the reverse SDE (issues 12 and 13: the families' stochastic sampler, also in the engine) ----

def _second_moments(gm):
    """Exact E|P_k x0|^2 per diffusion subspace of a mixture: sum_m w_m (|P_k mu_m|^2 + sum_{j in k} n_j lam_mj)."""
    comp, w = gm.comp[0], gm.log_weights.exp()[0]
    var = torch.zeros(len(comp), gm.basis.num_subspaces, dtype=f64).index_add_(1, gm.parent,
                                                                                gm.variances[comp] * gm.dims)
    return (w[:, None] * (gm.basis.sqnorms(gm.means[comp]) + var)).sum(0)


def test_em_weak_error_is_first_order(gmm, aniso_schedule):
    """The second moment per subspace of 2000 EM samples against the mixture's exact one: the error falls like
    1/steps (slope ~1 on a log-log scale, 1.1-1.3 measured), far above the Monte Carlo noise (~0.01)."""
    exact = _second_moments(gmm)
    errors = []
    for steps in (16, 32, 64):
        x, _, info = sampling.sample(gmm, aniso_schedule, nfe=steps, solver="em", seeds=range(2000), dtype=f64)
        assert info["nfe"] == info["steps"] == steps
        errors.append((gmm.basis.sqnorms(x).mean(0) - exact).abs())
    slope = (errors[0] / errors[2]).log2() / 2
    assert ((0.8 < slope) & (slope < 1.6)).all(), slope
    assert (errors[1] < errors[0]).all() and (errors[2] < errors[1]).all()


def test_em_sample_depends_on_its_seed_only(gmm, aniso_schedule):
    """Start noise = `seeded_noise`'s draw, then the step noises from the same per-seed stream: a seed's sample is
    the same alone or in any batch, and equals the solver run by hand with that stream."""
    alone, _, _ = sampling.sample(gmm, aniso_schedule, nfe=6, solver="em", seeds=[5], dtype=f64)
    batch, _, _ = sampling.sample(gmm, aniso_schedule, nfe=6, solver="em", seeds=[1, 5, 9], dtype=f64)
    assert torch.equal(alone[0], batch[1]) and not torch.allclose(batch[0], batch[1])
    deterministic, _, _ = sampling.sample(gmm, aniso_schedule, nfe=6, solver="euler", seeds=[5], dtype=f64)
    assert not torch.allclose(alone, deterministic)  # the step noises are really drawn
    grid = G.schedule_grid(aniso_schedule, G.uniform_t(6))
    gen = torch.Generator().manual_seed(5)
    z = torch.randn(gmm.image_shape, generator=gen, dtype=f64)[None]
    assert torch.equal(z, seeded_noise([5], gmm.image_shape, dtype=f64))
    x0 = gmm.basis.scale(z, grid.g[:, 0].sqrt())
    by_hand = ode.em(gmm, x0, grid, noise=lambda: torch.randn(gmm.image_shape, generator=gen, dtype=f64)[None])
    assert torch.equal(by_hand, alone)


@pytest.mark.parametrize("grid", ["uniform_t", "karras", "logsnr", "edm_sigma"])
def test_em_runs_on_every_grid_with_one_call_per_step(gmm, aniso_schedule, grid):
    counted = CountingModel(gmm)
    x, _, info = sampling.sample(counted, aniso_schedule, nfe=7, solver="em", grid=grid, seeds=[0, 1], dtype=f64)
    assert counted.calls == 7 == info["nfe"] and torch.isfinite(x).all()
    assert spec.resolve_sampler("em", grid, None, 7).name == f"Euler-Maruyama, {G.GRIDS[grid].label}"


def test_em_rules_in_resolve_sampler(gmm, aniso_schedule):
    for args, match in [(("em", "uniform_t", "mid", 9), "^secondary: em uses no secondary point"),
                        (("euler", "uniform_t", "mid", 9), "^secondary: euler uses no secondary point"),
                        (("em", "uniform_t", None, 9, 2), "^order: only the multistep solvers"),
                        (("em", "uniform_t", None, 0), "^nfe: Euler-Maruyama needs at least 1")]:
        with pytest.raises(ValueError, match=match):
            spec.resolve_sampler(*args)
    with pytest.raises(ValueError, match="^grid: Euler-Maruyama uses no secondary points"):
        ode.em(gmm, torch.zeros(1, *gmm.image_shape), G.schedule_grid(aniso_schedule, G.uniform_t(3), None, "mid"))


# ---- one sampler entry for every process family (families.sample, families.check_sampler) ----

class PhaseStub:
    """A VSMD precond stand-in: the velocity score -v (a N(0, I) velocity), on the mixture's basis."""

    num_classes, image_shape = None, (1, 6, 6)

    def __init__(self, basis):
        self.basis = basis

    def __call__(self, z, t, labels=None):
        return -z[:, 1:]


def test_families_sample_dispatches_each_family(gmm, aniso_schedule):
    from aniso_fast.processes import families as F
    from aniso_fast.processes import vsdm
    from aniso_fast.processes import vsmd

    def same(plan, process, expected, model=gmm):
        x, _, info = F.sample(model, process, plan, [0, 3])
        assert torch.equal(x, expected[0]) and info["nfe"] == plan.nfe and info["solver"] == plan.solver

    core = F.resolve_sampler("core", "em", "karras", None, 5)
    same(core, aniso_schedule, sampling.sample(gmm, aniso_schedule, nfe=5, solver="em", grid="karras", seeds=[0, 3]))
    process = vsdm.VSDMProcess(2, rates=[[0.2, -0.5]])
    same(F.resolve_sampler("vsdm", "em", "uniform_t", None, 4), process, vsdm.sample_em(process, gmm, [0, 3], 4))
    same(F.resolve_sampler("vsdm", "dpmpp-2m", "logsnr", None, 5), process,
         vsdm.sample_ode(process, gmm, [0, 3], 5, solver="dpmpp-2m", grid="logsnr"))
    phase, stub = vsmd.VSMDProcess(2), PhaseStub(gmm.basis)
    heun = F.resolve_sampler("vsmd", "heun", "uniform_t", None, 5)
    assert heun.secondary == "end" and heun.steps == 3  # VSMD's Heun: end point, last step Euler
    same(heun, phase, vsmd.sample_ode(phase, stub, [0, 3], 5), stub)
    same(F.resolve_sampler("vsmd", "ipndm", "uniform_t", None, 4, 2), phase,
         vsmd.sample_ode(phase, stub, [0, 3], 4, solver="ipndm", order=2), stub)
    same(F.resolve_sampler("vsmd", "em", "uniform_t", None, 4), phase, vsmd.sample_em(phase, stub, [0, 3], 4), stub)


@pytest.mark.parametrize("family,solver,grid,secondary,match", [
    ("vsdm", "heun", "karras", "end", "^grid: 'karras' ignores the process"),
    ("vsdm", "em", "logsnr", None, "^grid: a vsdm model's Euler-Maruyama runs on the uniform t grid"),
    ("vsmd", "unipc", "uniform_t", None, "^solver: a vsmd model samples with em, heun, ipndm, dpmpp-2m"),
    ("vsmd", "dpmpp-2m", "karras", None, "^grid: a vsmd model's dpmpp-2m runs on uniform_t, logsnr, edm_sigma"),
    ("vsmd", "euler", "uniform_t", None, "^solver: a vsmd model"),
    ("vsmd", "heun", "logsnr", None, "^grid: a vsmd model's heun on the phase space runs on the uniform t grid"),
    ("vsmd", "em", "edm_sigma", None, "^grid: a vsmd model's Euler-Maruyama"),
    ("vsmd", "heun", "uniform_t", "mid", "^secondary: a vsmd model's Heun steps to the end point"),
])
def test_families_refuse_samplers_they_do_not_take(gmm, family, solver, grid, secondary, match):
    from aniso_fast.processes import families as F
    from aniso_fast.processes import vsdm
    from aniso_fast.processes import vsmd

    with pytest.raises(ValueError, match=match):
        F.resolve_sampler(family, solver, grid, secondary, 9)
    plan = spec.resolve_sampler(solver, grid, secondary, 9)
    F.check_sampler("core", plan)  # the engine takes every sampler
    process = vsdm.VSDMProcess(2) if family == "vsdm" else vsmd.VSMDProcess(2)
    with pytest.raises(ValueError, match=match):  # and families.sample checks at its own boundary
        F.sample(gmm, process, plan, [0])


def test_families_sample_bad_input(gmm):
    from aniso_fast.processes import families as F
    from aniso_fast.processes import vsdm

    plan = spec.resolve_sampler("em", "uniform_t", None, 3)
    with pytest.raises(ValueError, match="^family: expected one of core, vsdm, vsmd"):
        F.check_sampler("vp", plan)
    with pytest.raises(ValueError, match="^plan: expected a sampling.Sampler"):
        F.sample(gmm, vsdm.VSDMProcess(2), {"solver": "em"}, [0])
    cond = GaussianMixture.toy(channels=1, height=6, width=6, bands=(2,), num_components=1, num_classes=2)
    with pytest.raises(ValueError, match="^labels: expected classes in"):
        F.sample(cond, vsdm.VSDMProcess(2), plan, [0, 1], labels=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="^seeds"):
        F.sample(gmm, vsdm.VSDMProcess(2), plan, [-1])
