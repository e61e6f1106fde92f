"""Knot and matrix schedules against docs/METHOD.md §2.1-2.2, §2.5, §8 and §10.7."""
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from aniso_fast.geometry.schedules import KnotSchedule, MatrixSchedule, karras_sigmas

T, G0 = 6400.0, 1e-9
F64 = torch.float64

# §2.2: sigma_j of the rho=7 grid on 32 uniform knots (j = 0..31; j = 0 becomes sqrt(g0) after the overwrite)
KARRAS_TABLE = [
    0.002, 0.00426683, 0.00845305, 0.0157575, 0.0279157, 0.0473637, 0.0774305, 0.122566, 0.1886,
    0.283044, 0.415432, 0.5977, 0.84462, 1.17427, 1.60857, 2.17386, 2.90153, 3.82873, 4.99911, 6.46366,
    8.28158, 10.5212, 13.2612, 16.5914, 20.6141, 25.4454, 31.2164, 38.0749, 46.1864, 55.7362, 66.9309, 80.0,
]


def _perturbed(schedule, seed=0, scale=0.5):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        schedule.psi.add_(scale * torch.randn(schedule.psi.shape, generator=gen, dtype=F64))
    return schedule


def _off_knot_times(n, seed=0):
    # random points at least 1 time unit away from every knot (spacing ~206)
    gen = torch.Generator().manual_seed(seed)
    tau = torch.arange(32, dtype=F64) * T / 31
    interval = torch.randint(0, 31, (n,), generator=gen)
    frac = 0.01 + 0.98 * torch.rand(n, generator=gen, dtype=F64)
    return tau[interval] + frac * (tau[1] - tau[0])


def _sig_round(x, digits):
    return float(f"{x:.{digits}g}")


def test_karras_sigmas_matches_edm_formula():
    s = karras_sigmas(18)
    assert s.dtype == F64 and s.shape == (18,)
    i = torch.arange(18, dtype=F64)
    edm = (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    torch.testing.assert_close(s, edm, rtol=1e-15, atol=0)
    assert s[0] == pytest.approx(80.0, rel=1e-14) and s[-1] == pytest.approx(0.002, rel=1e-14)
    assert bool((s.diff() < 0).all())
    assert karras_sigmas(5, dtype=torch.float32).dtype == torch.float32


def test_end_points_exact():
    for sched in (KnotSchedule(), _perturbed(KnotSchedule(), seed=1, scale=2.0)):
        g, _ = sched(torch.tensor([0.0, T], dtype=F64))
        assert abs(g[0].item() / G0 - 1) < 1e-12
        assert abs(g[1].item() / T - 1) < 1e-12
        ell = sched.knot_log_values()
        assert ell[0].item() == math.log(G0) and ell[-1].item() == math.log(T)


def test_strictly_monotone_on_fine_grid():
    for sched in (KnotSchedule(), _perturbed(KnotSchedule(), seed=2, scale=3.0)):
        g, gdot = sched(torch.linspace(0, T, 100_001, dtype=F64))
        assert bool((g.diff() > 0).all())
        assert bool((gdot > 0).all())


def test_gdot_matches_central_differences_away_from_knots():
    sched = _perturbed(KnotSchedule(), seed=3)
    t = _off_knot_times(200)
    h = 1e-4
    with torch.no_grad():
        _, gdot = sched(t)
        fd = (sched(t + h)[0] - sched(t - h)[0]) / (2 * h)
    torch.testing.assert_close(gdot, fd, rtol=1e-6, atol=0)


def test_left_interval_rule_at_knots():
    sched = _perturbed(KnotSchedule(), seed=4, scale=1.0)
    with torch.no_grad():
        tau = sched.knot_times
        ell = sched.knot_log_values()
        slopes = ell.diff() / tau.diff()  # slope of interval [tau_{j-1}, tau_j] is slopes[j-1]
        g, gdot = sched(tau)
    # t = tau_j (j >= 1) uses the LEFT interval; t = 0 uses interval 1
    torch.testing.assert_close(gdot[1:] / g[1:], slopes, rtol=1e-12, atol=0)
    torch.testing.assert_close(gdot[0] / g[0], slopes[0], rtol=1e-12, atol=0)
    assert not torch.allclose(gdot[1:-1] / g[1:-1], slopes[1:], rtol=1e-3)  # the right slope differs


def test_karras_knot_table():
    sigma = KnotSchedule().knot_values().detach().sqrt()
    for j in range(1, 31):
        assert _sig_round(sigma[j].item(), 6) == pytest.approx(KARRAS_TABLE[j], rel=1e-12), j
    assert sigma[0].item() == pytest.approx(math.sqrt(G0), rel=1e-12)
    assert sigma[31].item() == pytest.approx(80.0, rel=1e-12)


def test_init_round_trip():
    target = karras_sigmas(32).flip(0) ** 2
    target[0], target[-1] = G0, T
    for values in (target, torch.logspace(-9, math.log10(T), 32, dtype=F64)):
        values = values.clone()
        values[0], values[-1] = G0, T
        got = KnotSchedule(init=values).knot_values().detach()
        assert ((got - values).abs() / values).max().item() <= 1e-6


def test_uniform_grid_reproduces_edm_sigmas():
    g, _ = KnotSchedule()(torch.linspace(T, 0, 5, dtype=F64))
    sigma = g.detach().sqrt().tolist()
    expected = [80, 17.52, 2.511, 0.169, 3.2e-5]
    for s, e, digits in zip(sigma, expected, (2, 4, 4, 3, 2)):
        assert _sig_round(s, digits) == pytest.approx(e, rel=1e-12)


def test_gradients_reach_every_psi_and_match_finite_differences():
    sched = _perturbed(KnotSchedule(), seed=5)
    t = _off_knot_times(64, seed=5)
    g, gdot = sched(t)
    (g.log().sum() + (gdot / g).sum() * 100).backward()
    assert sched.psi.grad is not None and bool((sched.psi.grad != 0).all())

    weights = torch.linspace(0.5, 1.5, t.numel(), dtype=F64)
    def objective():
        g, gdot = sched(t)
        return (weights * (g.log() + 50 * gdot / g)).sum()
    sched.psi.grad = None
    objective().backward()
    i, h = 7, 1e-6
    with torch.no_grad():
        sched.psi[i] += h
        up = objective()
        sched.psi[i] -= 2 * h
        down = objective()
        sched.psi[i] += h
    fd = (up - down) / (2 * h)
    assert sched.psi.grad[i].item() == pytest.approx(fd.item(), rel=1e-6)


def test_knot_schedule_any_t_shape():
    sched = KnotSchedule()
    t = torch.rand(3, 4, 5, dtype=F64) * T
    g, gdot = sched(t)
    assert g.shape == gdot.shape == t.shape and g.dtype == F64
    g0d, _ = sched(torch.tensor(100.0, dtype=F64))
    assert g0d.shape == () and g0d.item() == pytest.approx(sched(torch.tensor([100.0], dtype=F64))[0].item())
    g32, _ = sched(t.float())
    assert g32.dtype == F64


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-20.0, 20.0, allow_nan=False), min_size=31, max_size=31))
def test_monotone_for_random_psi(values):
    sched = KnotSchedule()
    with torch.no_grad():
        sched.psi.copy_(torch.tensor(values, dtype=F64))
        t = torch.cat([torch.linspace(0, T, 4001, dtype=F64), sched.knot_times]).sort().values.unique()
        g, gdot = sched(t)
    assert bool((g.diff() > 0).all())
    assert bool((gdot > 0).all())
    assert g[0].item() == pytest.approx(G0, rel=1e-12) and g[-1].item() == pytest.approx(T, rel=1e-12)


def test_matrix_schedule_equals_knot_schedules():
    ms = _perturbed(MatrixSchedule(num_subspaces=3), seed=6)
    t = torch.rand(10, dtype=F64) * T
    g, gdot = ms(t)
    assert g.shape == gdot.shape == (10, 3) and g.dtype == F64
    for k in range(3):
        ks = KnotSchedule()
        with torch.no_grad():
            ks.psi.copy_(ms.psi[0, k])
        gk, gdotk = ks(t)
        torch.testing.assert_close(g[:, k], gk, rtol=1e-14, atol=0)
        torch.testing.assert_close(gdot[:, k], gdotk, rtol=1e-14, atol=0)


def test_per_sample_class_evaluation():
    ms = _perturbed(MatrixSchedule(num_subspaces=2, num_classes=5), seed=7)
    labels = torch.tensor([3, 0, 4, 3, 1, 2, 3, 0])
    t = torch.rand(labels.numel(), dtype=F64) * T
    g, gdot = ms(t, labels)
    for c in range(5):
        alone_g, alone_gdot = ms(t, torch.full_like(labels, c))
        rows = labels == c
        torch.testing.assert_close(g[rows], alone_g[rows], rtol=0, atol=0)
        torch.testing.assert_close(gdot[rows], alone_gdot[rows], rtol=0, atol=0)
    # classes really differ, so the per-sample result is not class 0 for everyone (§10.7)
    assert not torch.allclose(g, ms(t, torch.zeros_like(labels))[0])

    with torch.no_grad():
        ms.psi[3] += 0.3
    g2, _ = ms(t, labels)
    rows = labels == 3
    assert bool((g2[rows] != g[rows]).any(dim=1).all())
    torch.testing.assert_close(g2[~rows], g[~rows], rtol=0, atol=0)


def test_scalar_t_broadcasts_to_batch():
    ms = _perturbed(MatrixSchedule(num_classes=4), seed=8)
    labels = torch.tensor([0, 1, 2, 3])
    g, gdot = ms(torch.tensor(1234.5, dtype=F64), labels)
    g_ref, gdot_ref = ms(torch.full((4,), 1234.5, dtype=F64), labels)
    assert g.shape == (4, 2)
    torch.testing.assert_close(g, g_ref, rtol=0, atol=0)
    torch.testing.assert_close(gdot, gdot_ref, rtol=0, atol=0)
    assert ms.geometric_mean(1234.5, labels).shape == (4,)
    assert MatrixSchedule()(torch.tensor(5.0, dtype=F64))[0].shape == (1, 2)


def test_gradients_reach_every_class_subspace_psi():
    ms = _perturbed(MatrixSchedule(num_subspaces=2, num_classes=3), seed=9)
    labels = torch.arange(3).repeat(20)
    t = _off_knot_times(labels.numel(), seed=9)
    g, gdot = ms(t, labels)
    (g.log().sum() + (gdot / g).sum() * 100).backward()
    assert bool((ms.psi.grad != 0).all())


def test_tied_gives_equal_subspaces():
    ms = _perturbed(MatrixSchedule(num_subspaces=3, num_classes=2, tied=True), seed=10)
    assert ms.psi.shape == (2, 1, 31)
    labels = torch.tensor([0, 1, 1, 0])
    g, gdot = ms(torch.rand(4, dtype=F64) * T, labels)
    assert g.shape == (4, 3)
    assert bool((g == g[:, :1]).all()) and bool((gdot == gdot[:, :1]).all())


def test_untied_copies_start_equal_then_diverge():
    tied = _perturbed(MatrixSchedule(num_subspaces=2, tied=True), seed=11)
    ms = tied.untied(2)
    assert ms.psi.shape == (1, 2, 31) and not ms.tied
    t = torch.rand(16, dtype=F64) * T
    torch.testing.assert_close(ms(t)[0], tied(t)[0], rtol=0, atol=0)
    with torch.no_grad():
        ms.psi[0, 1] += 0.2
    g, _ = ms(t)
    torch.testing.assert_close(g[:, 0], tied(t)[0][:, 0], rtol=0, atol=0)
    assert bool((g[:, 1] != g[:, 0]).all())
    with pytest.raises(ValueError, match="tied"):
        ms.untied(2)


def test_per_class_copies_global_schedule():
    glob = _perturbed(MatrixSchedule(num_subspaces=2), seed=12)
    pc = glob.per_class(4)
    assert pc.psi.shape == (4, 2, 31) and pc.num_classes == 4
    t = torch.rand(8, dtype=F64) * T
    labels = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    torch.testing.assert_close(pc(t, labels)[0], glob(t)[0], rtol=0, atol=0)
    with pytest.raises(ValueError, match="global"):
        pc.per_class(2)


def test_geometric_mean_is_sqrt_gh_for_two_subspaces():
    ms = _perturbed(MatrixSchedule(num_subspaces=2, num_classes=3), seed=13, scale=1.0)
    labels = torch.tensor([2, 0, 1, 2, 1])
    t = torch.rand(5, dtype=F64) * T
    g, _ = ms(t, labels)
    assert not torch.allclose(g[:, 0], g[:, 1])
    torch.testing.assert_close(ms.geometric_mean(t, labels), (g[:, 0] * g[:, 1]).sqrt(), rtol=1e-13, atol=0)


def test_inversion_accuracy():
    ms = _perturbed(MatrixSchedule(num_subspaces=2), seed=14)
    y = karras_sigmas(40) ** 2
    t48 = ms.invert_geometric_mean(y, iterations=48)
    assert t48.shape == (40,)
    with torch.no_grad():
        torch.testing.assert_close(ms.geometric_mean(t48), y, rtol=1e-6, atol=0)
    t32 = ms.invert_geometric_mean(y)
    t_ref = ms.invert_geometric_mean(y, iterations=60)
    assert ((t32 - t_ref).abs() / t_ref).max().item() <= 1e-5
    assert (t32 - t_ref).abs().max().item() <= T / 2 ** 32
    # the target is clamped to [g0, T]
    ends = ms.invert_geometric_mean(torch.tensor([1e-12, 1e9], dtype=F64), iterations=40)
    assert ends[0].item() <= T / 2 ** 40 and ends[1].item() >= T * (1 - 2 ** -39)


def test_per_class_inversion_returns_one_grid_per_sample():
    ms = _perturbed(MatrixSchedule(num_subspaces=2, num_classes=4), seed=15, scale=1.0)
    y = karras_sigmas(7) ** 2
    labels = torch.tensor([1, 3, 1, 0, 2])
    grid = ms.invert_geometric_mean(y, labels, iterations=48)
    assert grid.shape == (5, 7)
    for b, c in enumerate(labels.tolist()):
        torch.testing.assert_close(grid[b], ms.invert_geometric_mean(y, torch.tensor([c]), iterations=48)[0],
                                   rtol=0, atol=0)
        f = ms.geometric_mean(grid[b], torch.full((7,), c))
        torch.testing.assert_close(f.detach(), y, rtol=1e-6, atol=0)
    assert not torch.allclose(grid[0], grid[1])
    torch.testing.assert_close(grid[0], grid[2], rtol=0, atol=0)
    # a global schedule gives one grid, labels or not
    glob = MatrixSchedule()
    assert glob.invert_geometric_mean(y).shape == (7,)
    assert glob.invert_geometric_mean(y, labels).shape == (7,)


def test_config_round_trip():
    ms = _perturbed(MatrixSchedule(num_subspaces=3, num_classes=2, num_knots=9, T=100.0, g0=1e-6), seed=16)
    cfg = json.loads(json.dumps(ms.config()))
    clone = MatrixSchedule.from_config(cfg)
    clone.load_state_dict(ms.state_dict())
    t, labels = torch.rand(6, dtype=F64) * 100, torch.tensor([0, 1, 1, 0, 1, 0])
    torch.testing.assert_close(clone(t, labels)[0], ms(t, labels)[0], rtol=0, atol=0)
    assert list(ms.state_dict()) == ["psi"]
    values = torch.logspace(-6, 2, 9, dtype=F64)
    with_values = MatrixSchedule(num_knots=9, T=100.0, g0=1e-6, init=values)
    again = MatrixSchedule.from_config(json.loads(json.dumps(with_values.config())))
    torch.testing.assert_close(again.knot_values(), with_values.knot_values(), rtol=0, atol=0)


def test_tensor_init_per_class_and_subspace():
    base = torch.logspace(-9, math.log10(T), 32, dtype=F64)
    base[0], base[-1] = G0, T
    values = torch.stack([base, base]).clone()
    values[1, 1:-1] = values[1, 1:-1] ** 0.98
    ms = MatrixSchedule(num_subspaces=2, num_classes=3, init=values[None])
    torch.testing.assert_close(ms.knot_values()[2].detach(), values, rtol=1e-6, atol=0)
    pc = MatrixSchedule(num_subspaces=2, init=values[None]).per_class(3)
    torch.testing.assert_close(pc.knot_values().detach(), ms.knot_values().detach(), rtol=0, atol=0)
    un = MatrixSchedule(num_subspaces=3, tied=True, init=base).untied()
    assert un.psi.shape == (1, 3, 31)
    with pytest.raises(ValueError, match="init"):
        MatrixSchedule(num_subspaces=3, init=values)


@pytest.mark.parametrize("kwargs, name", [
    ({"num_knots": 1}, "num_knots"),
    ({"T": 1e-9}, "T"),
    ({"T": 1e-10}, "T"),
    ({"g0": 0.0}, "g0"),
    ({"g0": -1.0}, "g0"),
    ({"init": "linear"}, "init"),
])
def test_bad_schedule_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        KnotSchedule(**kwargs)
    with pytest.raises(ValueError, match=name):
        MatrixSchedule(**kwargs)


def test_bad_matrix_arguments():
    with pytest.raises(ValueError, match="num_subspaces"):
        MatrixSchedule(num_subspaces=0)
    with pytest.raises(ValueError, match="num_classes"):
        MatrixSchedule(num_classes=0)


def test_bad_init_values():
    good = torch.logspace(-9, math.log10(T), 32, dtype=F64)
    good[0], good[-1] = G0, T
    KnotSchedule(init=good)
    for bad in (good[:-1], good * 2, torch.cat([good[:-1], good[-1:] * 1.5])):
        with pytest.raises(ValueError, match="init"):
            KnotSchedule(init=bad)
    swapped = good.clone()
    swapped[[5, 6]] = swapped[[6, 5]]
    with pytest.raises(ValueError, match="increasing"):
        KnotSchedule(init=swapped)


def test_bad_t_and_labels():
    ms = MatrixSchedule(num_classes=3)
    t = torch.rand(4, dtype=F64) * T
    with pytest.raises(ValueError, match="labels"):
        ms(t)
    with pytest.raises(ValueError, match="labels"):
        ms.geometric_mean(t)
    with pytest.raises(ValueError, match="labels"):
        ms.invert_geometric_mean(t)
    with pytest.raises(ValueError, match="labels"):
        ms(t, torch.zeros(4, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        ms(t, torch.zeros(4))
    with pytest.raises(ValueError, match="labels"):
        ms(t, torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="t must"):
        ms(torch.arange(4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="t must"):
        KnotSchedule()(torch.arange(4))
    with pytest.raises(ValueError, match="t must"):
        ms(t.reshape(2, 2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels.*\[0, 3\)"):
        ms.check_labels(torch.tensor([0, 3, 1]))
    with pytest.raises(ValueError, match=r"labels.*\[0, 3\)"):
        ms.check_labels(torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match="labels"):
        ms.check_labels(torch.tensor([0.0, 1.0]))
    ms.check_labels(torch.tensor([0, 2, 1]))


# ---- issue 10, defects 5 and 10: labels and times outside the schedule's domain raise, naming the argument ----

@pytest.mark.parametrize("bad", [-1, 10, 1_000_000])
def test_class_labels_out_of_range_raise_naming_labels(bad):
    s = MatrixSchedule(2, num_classes=10)
    t = torch.tensor([100.0, 200.0], dtype=torch.float64)
    with pytest.raises(ValueError, match="^labels: expected class labels in \\[0, 10\\)"):
        s(t, torch.tensor([3, bad]))
    with pytest.raises(ValueError, match="^labels"):
        s.geometric_mean(t, torch.tensor([bad, 0]))
    with pytest.raises(ValueError, match="^labels"):
        s.invert_geometric_mean(torch.tensor([1.0, 2.0]), torch.tensor([bad]))


@pytest.mark.parametrize("bad", [-1e-6, 6400.5, float("nan"), float("inf"), -float("inf")])
def test_times_outside_0_T_raise(bad):
    t = torch.tensor([0.0, 6400.0, bad], dtype=torch.float64)
    for call in (lambda: MatrixSchedule(2)(t), lambda: MatrixSchedule(3).geometric_mean(t),
                 lambda: KnotSchedule()(t), lambda: MatrixSchedule(2, num_classes=3)(t, torch.tensor([0, 1, 2]))):
        with pytest.raises(ValueError, match="^t: expected finite times in \\[0, T=6400\\]"):
            call()


def test_times_at_the_ends_of_the_domain_are_accepted():
    g, _ = MatrixSchedule(2)(torch.tensor([0.0, 6400.0], dtype=torch.float64))
    assert torch.allclose(g[:, 0], torch.tensor([1e-9, 6400.0], dtype=torch.float64))


def test_inverse_refuses_non_finite_targets():
    with pytest.raises(ValueError, match="^y: expected finite, non-negative"):
        MatrixSchedule(2).invert_geometric_mean(torch.tensor([1.0, float("nan")]))
