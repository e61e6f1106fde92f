"""Grids learned for a solver by matching a teacher (`aniso_fast.sampling.grid_learn`, `--grid learned`, LD3-style):
the differentiable grid against the sampler's grid and finite differences, gradients through a solver, the learned
grid against its start on held-out seeds of the exact mixture, storage with a shipped model, sampling on it, and
bad input."""
import json

import pytest
import torch
from helpers import one_line_error

from aniso_fast import models, sampling, store
from aniso_fast.evaluate import main as evaluate_main
from aniso_fast.geometry.schedules import MatrixSchedule
from aniso_fast.sample import main as sample_main
from aniso_fast.sampling import grid_learn, spec
from aniso_fast.sampling import grids as G
from aniso_fast.store.manifest import entry_problem

F64 = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def class_schedule():
    """A class-conditional K = 3 schedule whose subspaces and classes differ."""
    sched = MatrixSchedule(3, num_classes=2)
    with torch.no_grad():
        sched.psi += 0.3 * torch.randn(sched.psi.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    return sched


def _levels(schedule, n, labels=None):
    return G.logsnr_levels(schedule, n, labels)


@pytest.mark.parametrize("which", ["aniso", "class"])
def test_level_grid_is_the_samplers_grid(which, aniso_schedule, class_schedule):
    schedule = aniso_schedule if which == "aniso" else class_schedule
    labels = torch.tensor([0, 1, 1]) if which == "class" else None
    levels = _levels(schedule, 5, None if labels is None else torch.arange(2)) * torch.tensor(
        [1.0, 1.3, 0.8, 1.1, 2.0], dtype=F64)
    levels = levels.sort(descending=True).values
    mine = grid_learn.level_grid(schedule, levels, labels)
    fitted = G.FittedGrids({}, {"ipndm-4": {5: levels.tolist()}})
    theirs = G.build_grid("learned", schedule, 5, labels, fitted=fitted, learned_key="ipndm-4")
    assert torch.equal(mine.g, theirs.g)


@pytest.mark.parametrize("which", ["aniso", "class"])
def test_level_grid_mid_is_the_samplers_grid(which, aniso_schedule, class_schedule):
    """Midpoint Heun on a learned grid: g at the midpoints in t, as the sampler builds them."""
    schedule = aniso_schedule if which == "aniso" else class_schedule
    labels = torch.tensor([0, 1, 1]) if which == "class" else None
    levels = _levels(schedule, 4, None if labels is None else torch.arange(2))
    mine = grid_learn.level_grid(schedule, levels, labels, "mid")
    fitted = G.FittedGrids({}, {"heun-mid": {4: levels.tolist()}})
    theirs = G.build_grid("learned", schedule, 4, labels, secondary="mid", fitted=fitted, learned_key="heun-mid")
    assert torch.equal(mine.g, theirs.g) and torch.equal(mine.g_sec, theirs.g_sec)
    assert spec.learned_key("heun", None, "mid") == "heun-mid" and spec.learned_key("heun", None, "end") == "heun"
    assert spec.learned_key("ipndm", 4, "mid") == "ipndm-4" and "heun-mid" in spec.LEARNED_KEYS


@pytest.mark.parametrize("which,secondary", [("aniso", "end"), ("class", "end"), ("aniso", "mid"), ("class", "mid")])
def test_level_grid_gradient_matches_finite_differences(which, secondary, aniso_schedule, class_schedule):
    """d g / d level by the implicit function theorem against central differences of the bisection's grid (and of
    the midpoints' g for midpoint Heun)."""
    schedule = aniso_schedule if which == "aniso" else class_schedule
    labels = torch.tensor([1, 0]) if which == "class" else None
    base = _levels(schedule, 4, None if labels is None else torch.arange(2))
    gen = torch.Generator().manual_seed(2)
    weights = torch.randn(2 if labels is not None else 1, 5, schedule.num_subspaces, generator=gen, dtype=F64)
    w_sec = torch.randn(2 if labels is not None else 1, 4, schedule.num_subspaces, generator=gen, dtype=F64)

    def f(lv):
        grid = grid_learn.level_grid(schedule, lv, labels, secondary)
        return (grid.g.log() * weights).sum() + (0 if grid.g_sec is None else (grid.g_sec.log() * w_sec).sum())

    lv = base.clone().requires_grad_(True)
    f(lv).backward()
    eps = 1e-5
    for i in range(1, 4):  # the interior levels
        up, down = base.clone(), base.clone()
        up[i] *= 1 + eps
        down[i] *= 1 - eps
        fd = (f(up) - f(down)) / (2 * eps * base[i])
        assert float(lv.grad[i]) == pytest.approx(float(fd), rel=1e-4, abs=1e-8)
    assert torch.isfinite(lv.grad).all()


def test_level_parameters_stay_descending_inside_the_span():
    start = torch.tensor([80.0, 5.0, 0.3, 0.002], dtype=F64)
    p = grid_learn.LevelParameters(start, 1e-4, 80.0)
    assert torch.allclose(p(), start, rtol=1e-9)
    with torch.no_grad():
        for scale in (0.0, 30.0, -30.0):
            p.theta.copy_(scale * torch.randn(4, generator=torch.Generator().manual_seed(3), dtype=F64))
            lv = p()
            assert lv[0] == pytest.approx(80.0) and (lv[1:] < lv[:-1]).all() and (lv > 1e-4).all()
    with pytest.raises(ValueError, match="start"):
        grid_learn.LevelParameters(start[:1], 1e-4, 80.0)


@pytest.mark.parametrize("solver,order,secondary", [("ipndm", 4, None), ("dpmpp-2m", None, None),
                                                    ("heun", None, "end"), ("heun", None, "mid")])
def test_gradients_flow_through_the_solver(solver, order, secondary, gmm, aniso_schedule):
    """The endpoint's derivative in the logits, by autograd through the solver and the subspace ops, against
    central differences."""
    nfe = 5
    plan = spec.resolve_sampler(solver, "learned", secondary, nfe, order)
    ref = grid_learn.teacher(gmm, aniso_schedule, range(100, 104), steps=16)
    ref = grid_learn.Teacher(ref.seeds, ref.z.double(), ref.labels, ref.x0.double())  # float64: central differences
    p = grid_learn.LevelParameters(_levels(aniso_schedule, plan.steps), 1e-4, 80.0)

    def loss():
        return (grid_learn._run(gmm, aniso_schedule, plan, p(), ref) - ref.x0).square().mean()

    p.theta.grad = None
    loss().backward()
    grad = p.theta.grad.clone()
    assert grad.abs().sum() > 0
    eps = 1e-6
    for i in range(plan.steps):
        with torch.no_grad():
            p.theta[i] += eps
            up = float(loss())
            p.theta[i] -= 2 * eps
            down = float(loss())
            p.theta[i] += eps
        assert float(grad[i]) == pytest.approx((up - down) / (2 * eps), rel=1e-4, abs=1e-9)


@pytest.mark.parametrize("solver,order,nfe", [("ipndm", 4, 4), ("dpmpp-2m", None, 3)])
def test_learned_grid_beats_its_start_on_held_out_seeds(solver, order, nfe, gmm, aniso_schedule):
    """On the exact mixture the learned grid's endpoint error against the teacher is lower than the starting
    (log-SNR) grid's on seeds used neither for training nor for picking the grid."""
    levels, how = grid_learn.learn_grids(gmm, aniso_schedule, solver, [nfe], order=order, samples=64, val=32,
                                         teacher_steps=48, epochs=6, batch=16, lr=0.05, start="logsnr")
    plan = spec.resolve_sampler(solver, "learned", None, nfe, order)
    fit = how[plan.steps]
    assert fit["best_val"] < fit["start_val"] and fit["start_grid"] == "logsnr"
    test = grid_learn.teacher(gmm, aniso_schedule, range(grid_learn.LEARN_SEED + 1000, grid_learn.LEARN_SEED + 1064),
                              steps=48)
    learned = grid_learn.endpoint_error(gmm, aniso_schedule, plan, torch.tensor(levels[plan.steps], dtype=F64), test)
    start = grid_learn.endpoint_error(gmm, aniso_schedule, plan, torch.tensor(fit["start"], dtype=F64), test)
    assert learned < 0.9 * start, (learned, start)
    # the sampler places the stored levels as learned: its endpoint is the learning's student
    fitted = G.FittedGrids({}, {spec.learned_key(solver, order): levels})
    x = sampling.sample(gmm, aniso_schedule, nfe=nfe, solver=solver, order=order, grid="learned",
                        seeds=test.seeds[:4], fitted=fitted)[0]
    with torch.no_grad():
        mine = grid_learn._run(gmm, aniso_schedule, plan, torch.tensor(levels[plan.steps], dtype=F64), test.part(
            slice(0, 4)))
    assert torch.allclose(x, mine, atol=1e-6)


def test_sampling_refuses_a_missing_learned_grid(gmm, aniso_schedule):
    lv = _levels(aniso_schedule, 4).tolist()
    cases = [(None, "ipndm-4 on the model.*has none"), (G.FittedGrids({4: lv}), "has none"),
             (G.FittedGrids({}, {"dpmpp-2m": {4: lv}}), "ipndm-4.*dpmpp-2m"),
             (G.FittedGrids({}, {"ipndm-4": {5: lv + [0.001]}}), "at 4 steps.*5 steps"),
             (G.FittedGrids({}, {"ipndm-4": {4: lv[::-1]}}), "descending")]
    for fitted, words in cases:
        with pytest.raises(ValueError, match=f"^grid: .*{words}"):
            sampling.sample(gmm, aniso_schedule, nfe=4, solver="ipndm", order=4, grid="learned", seeds=[0],
                            fitted=fitted)
    assert spec.resolve_sampler("heun", "learned", "mid", 5).secondary == "mid"  # midpoint Heun learns its own
    with pytest.raises(ValueError, match="^grid: .*heun-mid.*heun"):  # the end-point grid is not the midpoint's
        sampling.sample(gmm, aniso_schedule, nfe=5, solver="heun", secondary="mid", grid="learned", seeds=[0],
                        fitted=G.FittedGrids({}, {"heun": {3: _levels(aniso_schedule, 3).tolist()}}))


def test_other_families_refuse_the_learned_grid():
    from aniso_fast.processes import registry

    plan = spec.resolve_sampler("dpmpp-2m", "learned", None, 5)
    for family in ("vsdm", "vsmd"):
        with pytest.raises(ValueError, match="^grid: 'learned'"):
            registry.get(family).check_sampler(plan)


def test_learned_keys():
    assert spec.learned_key("ipndm", 4) == "ipndm-4" and spec.learned_key("ipndm") == "ipndm-4"
    assert spec.learned_key("dpmpp-2m") == "dpmpp-2m" and spec.learned_key("heun") == "heun"
    assert "em" not in spec.LEARNED_KEYS and "unipc-2" in spec.LEARNED_KEYS
    with pytest.raises(ValueError, match="order"):
        spec.learned_key("ipndm", 7)


def test_manifest_validates_learned_grids():
    entry = {"file": "m.safetensors", "sha256": "0" * 64, "grids": {"optimized": {}}}
    good = [80.0, 2.0, 0.1]
    assert entry_problem({**entry, "grids": {"optimized": {}, "learned": {"ipndm-4": {"3": good}}}}) is None
    bad = [({"em": {"3": good}}, "deterministic solver"), ({"ipndm": {"3": good}}, "deterministic solver"),
           ({"ipndm-4": {"3": good[::-1]}}, "descending"), ({"ipndm-4": {"4": good}}, "descending"),
           ({"ipndm-4": {"0": []}}, "descending"), ({"ipndm-4": [good]}, "not an object"), ([1], "not an object")]
    for learned, words in bad:
        problem = entry_problem({**entry, "grids": {"optimized": {}, "learned": learned}})
        assert problem is not None and words in problem, (learned, problem)


def test_store_keeps_learned_and_fitted_grids_apart(tiny_checkpoint, assets):
    assert models.main(["export", str(tiny_checkpoint), "--name", "tiny"]) == 0
    three, four = [3.0, 2.0, 0.5], [3.0, 2.0, 0.5, 0.1]
    store.set_learned_grids("tiny", "ipndm-4", {3: three}, {3: {"how": "test"}})
    store.set_learned_grids("tiny", "ipndm-4", {4: four}, {4: {"how": "test"}})  # adds a step count
    store.set_learned_grids("tiny", "dpmpp-2m", {3: three}, {})
    store.set_fitted_grids("tiny", {3: [3.0, 1.0, 0.2]}, {"teacher": "test"})  # keeps the learned ones
    grids = store.fitted_grids("tiny")
    assert grids == {3: [3.0, 1.0, 0.2]} and grids.learned == {"ipndm-4": {3: three, 4: four}, "dpmpp-2m": {3: three}}
    entry = store.shipped_models()["tiny"]
    assert entry["grids"]["learned_fit"]["ipndm-4"]["4"] == {"how": "test"}
    assert store.StoredModel.open("tiny").fitted_grids.learned["ipndm-4"][4] == four
    before = (assets / "manifest.json").read_text()
    for args, words in [(("tiny", "em", {3: three}, {}), "deterministic"),
                        (("tiny", "ipndm-4", {3: three[::-1]}, {}), "descending"),
                        (("nope", "ipndm-4", {3: three}, {}), "not a shipped model")]:
        with pytest.raises(ValueError, match=words):
            store.set_learned_grids(*args)
    assert (assets / "manifest.json").read_text() == before
    # a recorded per-NFE choice on the learned grid must have its grid
    doc = json.loads(before)
    doc["defaults"] = {"5": {"model": "tiny", "solver": "ipndm", "grid": "learned", "order": 4}}
    (assets / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="no grid learned for ipndm-4 at 5 steps"):
        store.shipped_models()
    (assets / "manifest.json").write_text(before)
    assert models.main(["export", str(tiny_checkpoint), "--name", "tiny", "--force"]) == 0  # a new network
    assert store.fitted_grids("tiny").learned == {}


def test_learn_grid_cli_stores_a_grid_that_sample_uses(tiny_checkpoint, assets, tmp_path, capsys):
    assert models.main(["export", str(tiny_checkpoint), "--name", "tiny"]) == 0
    capsys.readouterr()
    out = tmp_path / "out"
    assert sample_main(["--model", "tiny", "--grid", "learned", "--solver", "ipndm", "--nfe", "4",
                        "--outdir", str(out)]) == 2
    one_line_error(capsys, "--grid", "learn-grid")
    assert not out.exists()
    assert evaluate_main(["learn-grid", "--model", "tiny", "--solver", "ipndm", "--nfe", "4,5", "--samples", "4",
                          "--val", "2", "--teacher-steps", "8", "--epochs", "1", "--batch", "2", "--start", "logsnr",
                          "--cache", str(tmp_path / "teacher.pt"), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "ipndm-4 NFE   4" in printed and "held-out endpoint RMS" in printed
    assert (tmp_path / "teacher.pt").is_file()
    grids = store.fitted_grids("tiny").learned
    assert sorted(grids["ipndm-4"]) == [4, 5]
    fit = store.shipped_models()["tiny"]["grids"]["learned_fit"]["ipndm-4"]["4"]
    assert fit["teacher_steps"] == 8 and fit["best_val"] <= fit["start_val"] and fit["samples"] == 4
    assert sample_main(["--model", "tiny", "--grid", "learned", "--solver", "ipndm", "--nfe", "4", "--count", "2",
                        "--outdir", str(out), "--no-progress"]) == 0
    assert any(out.iterdir())
    capsys.readouterr()
    assert sample_main(["--model", "tiny", "--grid", "learned", "--solver", "ipndm", "--nfe", "6",
                        "--outdir", str(out / "b")]) == 2
    one_line_error(capsys, "--grid", "6 steps", "4, 5")
    assert sample_main(["--model", "tiny", "--grid", "learned", "--solver", "dpmpp-2m", "--nfe", "4",
                        "--outdir", str(out / "c")]) == 2
    one_line_error(capsys, "--grid", "dpmpp-2m", "ipndm-4")


@pytest.mark.parametrize("argv,words", [
    (["--model", "nope", "--solver", "ipndm"], ("--model", "shipped model")),
    (["--model", "tiny", "--solver", "em"], ("--solver",)),
    (["--model", "tiny", "--solver", "ipndm", "--nfe", "3"], ("--nfe", "at least 4")),
    (["--model", "tiny", "--solver", "euler", "--nfe", "1"], ("--nfe", "nothing to learn")),
    (["--model", "tiny", "--solver", "ipndm", "--order", "7", "--nfe", "9"], ("--order",)),
    (["--model", "tiny", "--solver", "heun", "--order", "2", "--nfe", "5"], ("--order", "no order")),
    (["--model", "tiny", "--solver", "heun", "--nfe", "4"], ("--nfe", "odd")),
    (["--model", "tiny", "--solver", "ipndm", "--nfe", "4", "--teacher-steps", "4"], ("--teacher-steps",)),
    (["--model", "tiny", "--solver", "ipndm", "--nfe", "4", "--samples", "1"], ("--samples", "per class")),
    (["--model", "tiny", "--solver", "ipndm", "--nfe", "4", "--start", "optimized"], ("--start", "fit-grid")),
    (["--model", "tiny", "--solver", "ipndm", "--nfe", "4", "--cache", "t.npz"], ("--cache", ".pt")),
    (["--model", "tiny", "--solver", "ipndm", "--lr", "0"], ("--lr",)),
    (["--model", "tiny", "--solver", "ipndm", "--nfe", "4", "--secondary", "mid"], ("--secondary", "Heun")),
    (["--model", "tiny", "--solver", "ipndm", "--nfe", "4", "--loss", "lpips"], ("--loss",)),
    (["--model", "tiny", "--solver", "heun", "--secondary", "mid", "--nfe", "3,4"], ("--nfe", "2 steps")),
])
def test_learn_grid_bad_input(tiny_checkpoint, assets, capsys, argv, words):
    assert models.main(["export", str(tiny_checkpoint), "--name", "tiny"]) == 0
    capsys.readouterr()
    before = (assets / "manifest.json").read_text()
    assert evaluate_main(["learn-grid", *argv, "--no-progress"]) == 2
    one_line_error(capsys, *words)
    assert (assets / "manifest.json").read_text() == before


def test_paired_difference_cancels_shared_noise():
    """Two feature sets sharing most of their per-seed noise: the paired SE is far below the unpaired ones, the
    difference is the difference of the FDs, and a set against itself differs by exactly 0."""
    import numpy as np

    from aniso_fast.evaluation.table import bootstrap_se, paired_difference

    rng = np.random.default_rng(0)
    shared = rng.normal(size=(400, 6))
    a, b = shared + 0.05 * rng.normal(size=shared.shape), shared + 0.05 * rng.normal(size=shared.shape) + 0.1
    mu, sigma = np.ones(6), np.eye(6)  # the sets' means are off the reference's: FD moves with them
    diff, se = paired_difference(a, b, mu, sigma, draws=100)
    from aniso_fast.evaluation.metrics import feature_statistics, frechet_distance_from_statistics

    fd = [frechet_distance_from_statistics(*feature_statistics(f), mu, sigma) for f in (a, b)]
    assert diff == pytest.approx(fd[0] - fd[1], rel=1e-6)
    assert se < 0.3 * bootstrap_se([a], mu, sigma, draws=100)
    assert paired_difference(a, a, mu, sigma, draws=10) == (0.0, 0.0)
    with pytest.raises(ValueError, match="feats_b"):
        paired_difference(a, b[:10], mu, sigma)


def test_choose_for_nfe_needs_the_learned_grid():
    choice = {"model": "m", "solver": "ipndm", "grid": "learned", "order": 4}
    lv = [80.0, 2.0, 0.5, 0.01]
    with_grid = G.FittedGrids({}, {"ipndm-4": {4: lv}})
    assert spec.choose_for_nfe({4: choice}, 4, fitted_steps=lambda m: with_grid) is choice
    assert spec.choose_for_nfe({4: choice}, 4, fitted_steps=lambda m: G.FittedGrids({4: lv})) is None
    assert spec.choose_for_nfe({4: choice}, 5, fitted_steps=lambda m: with_grid) is None  # none for 5 steps


def test_invert_geometric_mean_takes_one_grid_per_sample(class_schedule):
    """[B, N] targets with labels [B] (a per-class learned grid): each row is that row's own [N] inversion."""
    labels = torch.tensor([0, 1, 1, 0])
    y = torch.stack([_levels(class_schedule, 5, torch.arange(2)) ** 2 * s for s in (1.0, 0.9, 0.7, 0.95)])
    t = class_schedule.invert_geometric_mean(y, labels, iterations=40)
    for i in range(4):
        one = class_schedule.invert_geometric_mean(y[i], labels[i:i + 1], iterations=40)[0]
        assert torch.equal(t[i], one)
    with pytest.raises(ValueError, match=r"\[B, N\]"):
        class_schedule.invert_geometric_mean(y[:3], labels)


def test_per_class_levels_place_each_class_on_its_own_grid(class_schedule):
    """A per-class learned grid [C, N]: the sampler's grid for a sample is the one-grid result of its class's
    levels, the differentiable grid agrees with it, and a class's levels get gradient from its own samples only."""
    base = _levels(class_schedule, 4, torch.arange(2))
    per = torch.stack([base, base * torch.tensor([1.0, 1.4, 0.8, 0.5], dtype=F64)])
    labels = torch.tensor([1, 0, 1])
    fitted = G.FittedGrids({}, {"ipndm-4": {4: per.tolist()}})
    grid = G.build_grid("learned", class_schedule, 4, labels, fitted=fitted, learned_key="ipndm-4")
    for i, c in enumerate(labels.tolist()):
        one = G.build_grid("learned", class_schedule, 4, labels[i:i + 1],
                           fitted=G.FittedGrids({}, {"ipndm-4": {4: per[c].tolist()}}), learned_key="ipndm-4")
        assert torch.equal(grid.g[i], one.g[0])
    lv = per.clone().requires_grad_(True)
    mine = grid_learn.level_grid(class_schedule, lv, labels)
    assert torch.equal(mine.g.detach(), grid.g)
    mine.g[labels == 1].log().sum().backward()
    assert lv.grad[0].abs().sum() == 0 and lv.grad[1, 1:].abs().sum() > 0
    with pytest.raises(ValueError, match="class-conditional"):
        G.per_class_levels(MatrixSchedule(3), per, labels)
    with pytest.raises(ValueError, match="3 classes"):
        G.per_class_levels(class_schedule, torch.cat([per, per[:1]]), labels)
    params = grid_learn.LevelParameters(per, 1e-4, 80.0)
    assert params().shape == (2, 4) and torch.allclose(params()[:, 1:], per[:, 1:], rtol=1e-9)


def test_manifest_takes_per_class_learned_grids_on_class_schedules_only():
    entry = {"file": "m.safetensors", "sha256": "0" * 64}
    per = [[80.0, 2.0, 0.1], [80.0, 3.0, 0.2]]
    grids = {"optimized": {}, "learned": {"ipndm-4": {"3": per}}}
    assert entry_problem({**entry, "class_schedules": True, "grids": grids}) is None
    assert "not class-conditional" in entry_problem({**entry, "class_schedules": False, "grids": grids})
    bad = {"optimized": {}, "learned": {"ipndm-4": {"3": [per[0], per[1][::-1]]}}}
    assert "one such list per class" in entry_problem({**entry, "class_schedules": True, "grids": bad})


def test_learn_grid_per_class_cli_stores_a_grid_per_class_that_sample_uses(tiny_checkpoint, assets, tmp_path,
                                                                           capsys):
    assert models.main(["export", str(tiny_checkpoint), "--name", "tiny"]) == 0
    assert evaluate_main(["learn-grid", "--model", "tiny", "--solver", "ipndm", "--nfe", "4", "--samples", "4",
                          "--val", "2", "--teacher-steps", "8", "--epochs", "1", "--batch", "2", "--start", "uniform_t",
                          "--per-class", "--no-progress"]) == 0
    assert "(per class)" in capsys.readouterr().out
    levels = store.fitted_grids("tiny").learned["ipndm-4"][4]
    assert len(levels) == 2 and all(len(row) == 4 for row in levels)
    fit = store.shipped_models()["tiny"]["grids"]["learned_fit"]["ipndm-4"]["4"]
    assert fit["per_class"] and fit["start_grid"] == "uniform_t"
    out = tmp_path / "out"
    assert sample_main(["--model", "tiny", "--grid", "learned", "--solver", "ipndm", "--nfe", "4", "--count", "2",
                        "--outdir", str(out), "--no-progress"]) == 0
    assert any(out.iterdir())


def test_learning_per_class_refuses_a_global_schedule(gmm, aniso_schedule):
    ref = grid_learn.teacher(gmm, aniso_schedule, range(100, 104), steps=8)
    with pytest.raises(ValueError, match="per_class"):
        grid_learn.learn_levels(gmm, aniso_schedule, "ipndm", 4, ref, ref, _levels(aniso_schedule, 4), order=4,
                                epochs=1, per_class=True)


def test_feature_distance_learns_and_picks_by_its_own_distance(gmm, aniso_schedule):
    """A caller's distance drives the learning and the held-out pick (`val` is that distance); the pixel RMS of the
    start and the kept grid is reported beside it."""
    calls = []

    def distance(x, x0):
        calls.append(x.requires_grad)
        return (x - x0).flatten(1).abs().mean(1)

    ref = grid_learn.teacher(gmm, aniso_schedule, range(200, 232), steps=32)
    out = grid_learn.learn_levels(gmm, aniso_schedule, "ipndm", 4, ref.part(slice(0, 24)), ref.part(slice(24, 32)),
                                  _levels(aniso_schedule, 4), order=4, epochs=2, batch=8, lr=0.05, distance=distance)
    assert True in calls and False in calls  # training (with gradient) and validation
    plan = spec.resolve_sampler("ipndm", "learned", None, 4, 4)
    val = ref.part(slice(24, 32))
    best = torch.tensor(out["levels"], dtype=F64)
    assert out["best_val"] == pytest.approx(grid_learn.endpoint_error(gmm, aniso_schedule, plan, best, val,
                                                                      distance=distance))
    assert out["best_rms"] == pytest.approx(grid_learn.endpoint_error(gmm, aniso_schedule, plan, best, val))


def test_classifier_feature_distance():
    """`--loss classifier`: zero for an image against itself, positive otherwise, per sample, differentiable, and
    the teacher side carries no gradient."""
    from aniso_fast.evaluation.features import feature_distance

    distance = feature_distance()
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(3, 1, 28, 28, generator=gen) * 2 - 1
    x = (x0 + 0.3 * torch.randn(3, 1, 28, 28, generator=gen)).requires_grad_(True)
    assert torch.equal(distance(x0, x0), torch.zeros(3))
    d = distance(x, x0)
    assert d.shape == (3,) and bool((d > 0).all())
    d.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    teacher = x0.clone().requires_grad_(True)
    assert not distance(x.detach(), teacher).requires_grad


def test_uniform_t_start_is_the_papers_grid_on_the_geometric_mean(aniso_schedule, class_schedule):
    name, lv = grid_learn.start_levels(aniso_schedule, 5, "uniform_t", None)
    t = G.uniform_t(5, aniso_schedule.T)[1:-1]
    assert name == "uniform_t" and torch.allclose(lv[1:] ** 2, aniso_schedule.geometric_mean(t), rtol=1e-9)
    name, lv = grid_learn.start_levels(class_schedule, 5, "uniform_t", 2)
    assert lv.shape == (5,) and bool((lv[1:] < lv[:-1]).all())
    with pytest.raises(ValueError, match="start"):
        grid_learn.start_levels(aniso_schedule, 5, "karras", None)


def test_offset_grid_moves_each_subspace_and_keeps_the_end(aniso_schedule):
    """Per-subspace offsets of a learned grid: each level's log-variance moved per subspace, the end point kept,
    the midpoints by the mean of their ends' offsets; the learnable offsets are zero-mean per level, 0 at the
    start, and the sampler's grid is the learning's."""
    levels = _levels(aniso_schedule, 3)
    offsets = torch.tensor([[0.0, 0.0], [0.2, -0.2], [-0.1, 0.1]], dtype=F64)
    base = G.build_grid("learned", aniso_schedule, 3, secondary="mid",
                        fitted=G.FittedGrids({}, {"heun-mid": {3: levels.tolist()}}), learned_key="heun-mid")
    moved = G.build_grid("learned", aniso_schedule, 3, secondary="mid", learned_key="heun-mid", fitted=G.FittedGrids(
        {}, {"heun-mid": {3: {"levels": levels.tolist(), "offsets": offsets.tolist()}}}))
    assert torch.allclose(moved.g[0, :3], base.g[0, :3] * offsets.exp(), rtol=1e-12)
    assert torch.equal(moved.g[0, 3], base.g[0, 3])
    for i in range(3):  # a midpoint moves by the mean of its two ends' offsets (the end point's is 0)
        right = offsets[i + 1] if i < 2 else torch.zeros(2, dtype=F64)
        assert torch.allclose(moved.g_sec[0, i], base.g_sec[0, i] * ((offsets[i] + right) / 2).exp(), rtol=1e-12)
    with pytest.raises(ValueError, match="offsets"):
        G.offset_grid(base, offsets[:, :1])
    p = grid_learn.LevelParameters(levels, 1e-4, 80.0, subspaces=2)
    with torch.no_grad():
        p.shift.copy_(torch.tensor([[0.5, 0.1], [-0.3, 0.4]], dtype=F64))
    o = p.offsets()
    assert torch.equal(o[0], torch.zeros(2, dtype=F64)) and torch.allclose(o.mean(1), torch.zeros(3, dtype=F64))
    mine = G.offset_grid(grid_learn.level_grid(aniso_schedule, levels, None, "mid"), o)
    theirs = G.build_grid("learned", aniso_schedule, 3, secondary="mid", learned_key="heun-mid", fitted=G.FittedGrids(
        {}, {"heun-mid": {3: {"levels": levels.tolist(), "offsets": o.tolist()}}}))
    assert torch.allclose(mine.g, theirs.g, rtol=1e-12) and torch.allclose(mine.g_sec, theirs.g_sec, rtol=1e-12)


def test_per_subspace_offsets_learn_through_the_solver(gmm, aniso_schedule):
    """The offsets get the endpoint loss's gradient (autograd against central differences), and learning them
    returns them with the levels."""
    plan = spec.resolve_sampler("ipndm", "learned", None, 4, 4)
    ref = grid_learn.teacher(gmm, aniso_schedule, range(300, 304), steps=16)
    ref = grid_learn.Teacher(ref.seeds, ref.z.double(), ref.labels, ref.x0.double())
    p = grid_learn.LevelParameters(_levels(aniso_schedule, 4), 1e-4, 80.0, subspaces=2)

    def loss():
        return (grid_learn._run(gmm, aniso_schedule, plan, p(), ref, p.offsets()) - ref.x0).square().mean()

    loss().backward()
    grad = p.shift.grad.clone()
    assert grad.abs().sum() > 0
    eps = 1e-6
    for i, k in [(0, 0), (1, 1), (2, 0)]:
        with torch.no_grad():
            p.shift[i, k] += eps
            up = float(loss())
            p.shift[i, k] -= 2 * eps
            down = float(loss())
            p.shift[i, k] += eps
        assert float(grad[i, k]) == pytest.approx((up - down) / (2 * eps), rel=1e-4, abs=1e-9)
    levels, how = grid_learn.learn_grids(gmm, aniso_schedule, "ipndm", [4], order=4, samples=16, val=8,
                                         teacher_steps=16, epochs=1, batch=8, start="logsnr", per_subspace=True)
    assert set(levels[4]) == {"levels", "offsets"} and len(levels[4]["offsets"]) == 4 and how[4]["per_subspace"]


def test_manifest_validates_per_subspace_offsets():
    entry = {"file": "m.safetensors", "sha256": "0" * 64}
    lv = [80.0, 2.0, 0.1]
    good = {"levels": lv, "offsets": [[0.0, 0.0], [0.1, -0.1], [0.2, -0.2]]}
    assert entry_problem({**entry, "grids": {"optimized": {}, "learned": {"ipndm-4": {"3": good}}}}) is None
    for bad in ({**good, "offsets": [[0.1, -0.1], [0.1, -0.1], [0.2, -0.2]]},  # the start noise's row moved
                {**good, "offsets": good["offsets"][:2]}, {**good, "offsets": [[0.0], [0.1, -0.1], [0.2, -0.2]]},
                {**good, "offsets": [[0.0, 0.0], [99.0, 0.0], [0.0, 0.0]]}, {"levels": lv}, {**good, "more": 1}):
        problem = entry_problem({**entry, "grids": {"optimized": {}, "learned": {"ipndm-4": {"3": bad}}}})
        assert problem is not None and "offsets" in problem, bad


def test_learn_grid_per_subspace_cli_stores_offsets_that_sample_uses(tiny_checkpoint, assets, tmp_path, capsys):
    assert models.main(["export", str(tiny_checkpoint), "--name", "tiny"]) == 0
    assert evaluate_main(["learn-grid", "--model", "tiny", "--solver", "heun", "--secondary", "mid", "--nfe", "5",
                          "--samples", "4", "--val", "2", "--teacher-steps", "8", "--epochs", "1", "--batch", "2",
                          "--start", "uniform_t", "--per-subspace", "--no-progress"]) == 0
    assert "(per-subspace offsets)" in capsys.readouterr().out
    entry = store.fitted_grids("tiny").learned["heun-mid"][3]
    assert set(entry) == {"levels", "offsets"} and len(entry["offsets"]) == 3
    out = tmp_path / "out"
    assert sample_main(["--model", "tiny", "--grid", "learned", "--solver", "heun", "--secondary", "mid", "--nfe", "5",
                        "--count", "2", "--outdir", str(out), "--no-progress"]) == 0
    assert any(out.iterdir())


def test_learn_grid_refuses_per_class_on_a_global_schedule_and_a_missing_classifier(tiny_checkpoint, assets, capsys,
                                                                                      monkeypatch, tmp_path):
    """`--per-class` on a model whose schedule is global, and `--loss classifier` without the shipped classifier:
    one line naming the option, exit 2, the manifest unchanged."""
    from aniso_fast import evaluate

    assert models.main(["export", str(tiny_checkpoint), "--name", "tiny"]) == 0
    capsys.readouterr()
    doc = json.loads((assets / "manifest.json").read_text())
    doc["models"]["tiny"]["class_schedules"] = False  # as a global-schedule model's entry reads
    (assets / "manifest.json").write_text(json.dumps(doc))
    before = (assets / "manifest.json").read_text()
    argv = ["learn-grid", "--model", "tiny", "--solver", "ipndm", "--nfe", "4", "--no-progress"]
    assert evaluate_main([*argv, "--per-class"]) == 2
    one_line_error(capsys, "--per-class", "class-conditional")
    monkeypatch.setattr(evaluate, "CLASSIFIER_ASSET", tmp_path / "missing.safetensors")
    assert evaluate_main([*argv, "--loss", "classifier"]) == 2
    one_line_error(capsys, "--loss", "classifier")
    assert (assets / "manifest.json").read_text() == before
