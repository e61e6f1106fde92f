"""Solvers on the exact Gaussian mixture: EDM equivalence, convergence order, NFE, seeds, grids, bad input."""
import ot
import pytest
import torch

from aniso_fast import solvers as S
from aniso_fast.gmm import GaussianMixture
from aniso_fast.schedules import MatrixSchedule, karras_sigmas

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
    z = S.seeded_noise([1, 2, 3], (1, 6, 6), dtype=f64)
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
    S.heun(gmm, z * 80, S.karras_grid(N, 2), callback=lambda info: ours.append(info["x"]))
    assert len(ours) == N
    for a, b in zip(edm_states, ours):
        assert torch.allclose(a, b, rtol=0, atol=1e-11)


def _solve(gmm, sched, solver, n, secondary):
    g = S.schedule_grid(sched, S.uniform_t(n), None, secondary)
    z = S.seeded_noise(range(4), gmm.image_shape, dtype=f64)
    x = gmm.basis.scale(z, g.g[:, 0].expand(4, -1).sqrt())
    if solver == "euler":
        return S.euler(gmm, x, g)
    return S.heun(gmm, x, g, final_euler=False)


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
    x, _, info = S.sample(model, aniso_schedule, nfe=nfe, solver=solver, secondary=secondary, seeds=[0, 1],
                          dtype=f64)
    assert model.calls == nfe == info["nfe"]
    assert torch.isfinite(x).all()


def test_same_seed_same_sample_whatever_the_batch(gmm, aniso_schedule):
    alone, _, _ = S.sample(gmm, aniso_schedule, nfe=7, seeds=[5])
    batch, _, _ = S.sample(gmm, aniso_schedule, nfe=7, seeds=[1, 5, 9])
    assert torch.allclose(alone[0], batch[1], atol=1e-6)
    assert not torch.allclose(batch[0], batch[1])


def test_seeds_outside_the_generator_range_are_refused(gmm, aniso_schedule):
    """Issue 10, defect 4: torch's CPU generator keeps 32 bits, so seed 2**32 silently repeated seed 0; negative
    seeds wrapped around. Both are refused; the largest seed is its own sample."""
    for bad in ([2 ** 32], [0, 2 ** 32 + 1], [-1], [1.5]):
        with pytest.raises(ValueError, match="seeds"):
            S.sample(gmm, aniso_schedule, nfe=3, seeds=bad)
        with pytest.raises(ValueError, match="seeds"):
            S.seeded_noise(bad, (1, 6, 6))
        with pytest.raises(ValueError, match="seeds"):
            S.seeded_labels(bad, 10)
    z = S.seeded_noise([0, S.MAX_SEED], (1, 6, 6))
    assert not torch.equal(z[0], z[1])


def test_labels_come_from_a_stream_apart_from_the_noise():
    """Issue 10, defect 4: the label generator's seed + 2**40 kept the same low 32 bits, so a seed's label was
    drawn from its own noise stream; now it is a separate stream, still one per seed whatever the batch."""
    seeds = list(range(200))
    labels = S.seeded_labels(seeds, 10)
    from_noise_stream = [int(torch.randint(10, (1,), generator=torch.Generator().manual_seed(s))) for s in seeds]
    assert labels.tolist() != from_noise_stream
    assert set(labels.tolist()) == set(range(10))
    assert S.seeded_labels([1, 5, 9], 10)[1] == labels[5]
    assert S.seeded_labels([S.MAX_SEED], 10).shape == (1,)


def test_uniform_t_grid_at_karras_init_is_edm_grid():
    """METHOD §2.2: 5 uniform t points give sigma = [80, 17.52, 2.511, 0.169, 3.2e-5] at initialisation."""
    g = S.schedule_grid(MatrixSchedule(2), S.uniform_t(4)).g[0]
    assert torch.allclose(g[:, 0], g[:, 1])
    sig = g[:, 0].sqrt()
    assert torch.allclose(sig, torch.tensor([80, 17.52, 2.511, 0.169, 3.16e-5], dtype=f64), rtol=2e-3)


def test_edm_sigma_grid_follows_karras_on_geometric_mean(aniso_schedule):
    t = S.edm_sigma_t(aniso_schedule, 6)
    g = S.schedule_grid(aniso_schedule, t).g[0]
    geo = g.log().mean(1).exp()  # sqrt(g h)
    assert torch.allclose(geo[:-1], karras_sigmas(6) ** 2, rtol=1e-6)
    assert t[-1] == 0


def test_class_conditional_schedules_per_sample():
    """The reference sampler used class 0's schedule for everyone (METHOD §10.7); each sample uses its own."""
    sched = MatrixSchedule(2, num_classes=3)
    with torch.no_grad():
        sched.psi[2] += 0.5
    labels = torch.tensor([0, 2, 1])
    for t in (S.uniform_t(5), S.edm_sigma_t(sched, 5, labels)):
        mixed = S.schedule_grid(sched, t, labels, "mid")
        if t.dim() == 1:  # on the uniform t grid the classes' variances differ (on the EDM grid g = sigma^2)
            assert not torch.allclose(mixed.g[0], mixed.g[1])
        for i, y in enumerate(labels.tolist()):
            ti = t if t.dim() == 1 else t[i]
            alone = S.schedule_grid(sched, ti, torch.tensor([y]), "mid")
            assert torch.allclose(mixed.g[i], alone.g[0]) and torch.allclose(mixed.g_sec[i], alone.g_sec[0])


def test_class_conditional_mixture_sampling_uses_labels():
    gm = GaussianMixture.toy(channels=1, height=6, width=6, bands=(2,), num_components=1, num_classes=2, seed=3)
    labels = torch.tensor([0, 1, 0, 1])
    x, lab, _ = S.sample(gm, MatrixSchedule(2), nfe=15, seeds=range(4), labels=labels, dtype=f64)
    assert torch.equal(lab, labels)
    # each sample is closer to its own class mean
    d = ((x[:, None] - gm.means[None]) ** 2).flatten(2).sum(-1)
    assert torch.equal(d.argmin(1), labels)


def test_distribution_matches_exact_samples(gmm, aniso_schedule):
    """Sliced Wasserstein (POT) to exact samples: a fine solve is at the two-sample noise floor, NFE 3 is not."""
    n = 1500
    exact_a = gmm.sample(n, generator=torch.Generator().manual_seed(0))[0].flatten(1).numpy()
    exact_b = gmm.sample(n, generator=torch.Generator().manual_seed(1))[0].flatten(1).numpy()
    fine, _, _ = S.sample(gmm, aniso_schedule, nfe=31, seeds=range(n), dtype=f64)
    coarse, _, _ = S.sample(gmm, aniso_schedule, nfe=3, solver="heun", secondary="end", seeds=range(n), dtype=f64)

    def sw(a, b):
        return ot.sliced_wasserstein_distance(a, b, n_projections=200, seed=0)

    floor = sw(exact_a, exact_b)
    assert sw(fine.flatten(1).numpy(), exact_a) < 1.5 * floor
    assert sw(coarse.flatten(1).numpy(), exact_a) > 2 * floor


def test_bad_inputs(gmm, aniso_schedule):
    with pytest.raises(ValueError, match="nfe"):
        S.sample(gmm, aniso_schedule, nfe=8, secondary="end")
    with pytest.raises(ValueError, match="nfe"):
        S.sample(gmm, aniso_schedule, nfe=1, solver="heun")
    with pytest.raises(ValueError, match="nfe"):
        S.sample(gmm, aniso_schedule, nfe=0, solver="euler")
    with pytest.raises(ValueError, match="solver"):
        S.sample(gmm, aniso_schedule, solver="rk4")
    with pytest.raises(ValueError, match="grid"):
        S.sample(gmm, aniso_schedule, grid="cosine")
    with pytest.raises(ValueError, match="schedule"):
        S.sample(gmm, None, grid="uniform_t")
    with pytest.raises(ValueError, match="labels"):
        S.sample(gmm, aniso_schedule, labels=torch.tensor([0]))
    cond = GaussianMixture.toy(num_classes=2, num_components=1)
    with pytest.raises(ValueError, match="labels"):
        S.sample(cond, MatrixSchedule(2), seeds=[0, 1], labels=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="secondary"):
        S.sample(gmm, aniso_schedule, secondary="start")


# ---- the multistep solvers through sample() and resolve_sampler (issue 11) ----

@pytest.mark.parametrize("solver", ["dpmpp-2m", "dpmpp-3m", "unipc", "ipndm", "deis"])
@pytest.mark.parametrize("grid", ["karras", "logsnr", "uniform_t", "edm_sigma"])
def test_sample_dispatches_multistep_solvers_with_exact_nfe(gmm, aniso_schedule, solver, grid):
    from aniso_fast import multistep

    counted = CountingModel(gmm)
    x, _, info = S.sample(counted, aniso_schedule, nfe=6, solver=solver, grid=grid, seeds=[0, 1], dtype=f64)
    assert counted.calls == 6 == info["nfe"] and info["order"] == multistep.DEFAULT_ORDER[solver]
    # the same solver called on the same grid and start point by hand
    plan = S.resolve_sampler(solver, grid, None, 6)
    t = {"karras": None, "uniform_t": S.uniform_t(6, aniso_schedule.T),
         "edm_sigma": S.edm_sigma_t(aniso_schedule, 6), "logsnr": S.logsnr_grid(aniso_schedule, 6)}[grid]
    g = S.karras_grid(6, 2) if t is None else S.schedule_grid(aniso_schedule, t)
    x0 = gmm.basis.scale(S.seeded_noise([0, 1], gmm.image_shape, dtype=f64), g.g[:, 0].expand(2, -1).sqrt())
    expected = multistep.MULTISTEP[solver](gmm, x0, g, order=plan.order)
    assert torch.equal(x, expected)


def test_multistep_rules_in_resolve_sampler():
    assert S.resolve_sampler("dpmpp-2m", "karras", None, 3).steps == 3
    assert S.resolve_sampler("unipc", "logsnr", None, 3, order=2).order == 2
    assert "DPM-Solver++(3M), log-SNR grid" in S.resolve_sampler("dpmpp-3m", "logsnr", None, 5).name
    for args, match in [(("dpmpp-3m", "karras", None, 4), "^nfe: dpmpp-3m of order 3 needs at least 5"),
                        (("ipndm", "karras", None, 3, 4), "^nfe: ipndm of order 4 needs at least 4"),
                        (("unipc", "karras", None, 9, 5), "^order: unipc takes order 2 or 3"),
                        (("heun", "karras", None, 9, 2), "^order: only the multistep solvers"),
                        (("dpmpp-2m", "uniform_t", "mid", 9), "^secondary: dpmpp-2m uses no secondary point"),
                        (("bogus", "karras", None, 9), "^solver: expected one of"),
                        (("dpmpp-2m", "bogus", None, 9), "^grid: expected one of")]:
        with pytest.raises(ValueError, match=match):
            S.resolve_sampler(*args)


def test_a_grid_that_does_not_apply_to_the_schedule_is_refused(gmm, aniso_schedule):
    """Grids on the geometric mean need its inverse (issue 11, bad input)."""

    class NoInverse(torch.nn.Module):  # a schedule with values but no geometric-mean inverse
        T, num_classes = aniso_schedule.T, None

        def forward(self, t, labels=None):
            return aniso_schedule(t, labels)

    for grid in ("logsnr", "edm_sigma"):
        with pytest.raises(ValueError, match=f"^grid: '{grid}' is placed on the geometric mean"):
            S.sample(gmm, NoInverse(), nfe=5, solver="dpmpp-2m", grid=grid)
    x, _, info = S.sample(gmm, NoInverse(), nfe=5, solver="dpmpp-2m", grid="uniform_t")
    assert info["nfe"] == 5 and torch.isfinite(x).all()


@pytest.mark.parametrize("solver", ["heun", "dpmpp-2m", "dpmpp-3m", "unipc", "deis"])
@pytest.mark.parametrize("grid", ["logsnr", "edm_sigma"])
def test_geometric_mean_grids_stay_inside_a_narrow_schedule(gmm, solver, grid):
    """VSDM's view spans sigma in about [0.03, 16], inside EDM's [0.002, 80]: the grid is clipped to the schedule's
    span (it used to repeat its end points, and the zero-length steps gave NaN)."""
    from aniso_fast.vsdm import VSDMProcess

    view = VSDMProcess(2).ve_schedule()
    lo, hi = S.geometric_sigma_span(view)
    assert 0.002 < lo < hi < 80
    x, _, info = S.sample(gmm, view, nfe=7, solver=solver, grid=grid, seeds=[0, 1], dtype=f64)
    assert torch.isfinite(x).all() and info["nfe"] == 7
    assert S.geometric_sigma_span(MatrixSchedule(2)) == (0.002, 80.0)  # the engine's schedules: EDM's range
