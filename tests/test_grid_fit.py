"""Fitted time grids (`aniso_fast.sampling.grid_fit`, `--grid optimized`): the dynamic programme against brute force, the
step costs against dense projectors in float64, the fitted grids against the log-SNR grid on the exact mixture,
sampling on a fitted grid, storage with a shipped model, and bad input."""
import itertools
import json

import numpy as np
import pytest
import torch
from helpers import one_line_error

from aniso_fast import models, sampling, store
from aniso_fast.evaluate import main as evaluate_main
from aniso_fast.geometry.bases import DCTBasis
from aniso_fast.sample import main as sample_main
from aniso_fast.sampling import grid_fit, spec
from aniso_fast.sampling import grids as G

F64 = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("seed", range(4))
def test_best_steps_is_the_least_cost_path(seed):
    rng = np.random.default_rng(seed)
    M = 7
    cost = np.triu(rng.random((M + 1, M + 1)) + 0.1, 1)
    cost[np.tril_indices(M + 1)] = np.inf
    for steps in range(1, M + 1):
        brute = min(((0, *inner, M) for inner in itertools.combinations(range(1, M), steps - 1)),
                    key=lambda p: sum(cost[a, b] for a, b in zip(p, p[1:])))
        assert tuple(grid_fit.best_steps(cost, steps)) == brute


def test_best_steps_refuses_more_steps_than_the_fine_grid():
    cost = np.full((5, 5), np.inf)
    for bad in (0, 5, 2.0, True):
        with pytest.raises(ValueError, match="steps"):
            grid_fit.best_steps(cost, bad)


def test_step_costs_match_dense_projectors_in_float64():
    basis = DCTBasis(4, 4, bands=(2,))  # K = 2
    eye = torch.eye(16, dtype=F64).reshape(16, 1, 4, 4)
    P = torch.stack([basis.scale(eye, torch.eye(2, dtype=F64)[k].expand(16, 2)).reshape(16, 16) for k in range(2)])
    gen = torch.Generator().manual_seed(0)
    M, B = 5, 3
    xs, Ds = torch.randn(M + 1, B, 1, 4, 4, generator=gen, dtype=F64), torch.randn(M, B, 1, 4, 4, generator=gen,
                                                                                  dtype=F64)
    g = torch.rand(B, M + 1, 2, generator=gen, dtype=F64).add(0.1).cumprod(1).flip(1)  # descending per subspace
    cost = grid_fit.step_costs(basis, g, xs.float(), Ds.float())
    for i in range(M):
        for j in range(i + 1, M + 1):
            r = (g[:, j] / g[:, i]).sqrt()  # [B, K]
            A = torch.einsum("bk,kij->bij", r, P)
            step = torch.einsum("bij,bj->bi", A, xs[i].flatten(1)) + Ds[i].flatten(1) \
                - torch.einsum("bij,bj->bi", A, Ds[i].flatten(1))
            want = float((step - xs[j].flatten(1)).norm(dim=1).mean()) / 4
            assert cost[i, j] == pytest.approx(want, rel=1e-5)
    assert np.isinf(cost[np.tril_indices(M + 1)]).all()


@pytest.fixture(scope="module")
def fitted_mixture(gmm, aniso_schedule):
    return grid_fit.fit_levels(gmm, aniso_schedule, [3, 4, 5, 6, 7, 9], samples=128, teacher_steps=64)


def test_fitted_grids_beat_the_logsnr_grid_on_the_exact_mixture(gmm, aniso_schedule, fitted_mixture):
    """DPM-Solver++(2M)'s endpoint error against the teacher on held-out seeds: below the log-SNR grid's from 4
    steps on (at 3 steps the first-order cost does not pick the best 2M grid; docs/SOLVERS.md)."""
    errs = grid_fit.endpoint_errors(gmm, aniso_schedule, fitted_mixture, [4, 5, 6, 7, 9], samples=64,
                                    teacher_steps=64)
    for n, e in errs.items():
        assert e["optimized"] < e["logsnr"], (n, e)
    assert sum(e["optimized"] for e in errs.values()) < 0.75 * sum(e["logsnr"] for e in errs.values()), errs


def test_fitted_levels_are_descending_fine_levels(gmm, aniso_schedule, fitted_mixture):
    lo, hi = G.geometric_sigma_span(aniso_schedule)
    fine = np.exp(np.linspace(np.log(hi), np.log(lo), 64))
    for n, levels in fitted_mixture.items():
        assert len(levels) == n and levels[0] == pytest.approx(hi) and all(np.diff(levels) < 0)
        assert all(np.isclose(fine, v, rtol=1e-12).any() for v in levels)


def test_sampling_on_a_fitted_grid_places_its_levels(gmm, aniso_schedule, fitted_mixture):
    t = G.optimized_t(aniso_schedule, fitted_mixture, 5)
    assert t.shape == (6,) and t[-1] == 0
    sig = aniso_schedule.geometric_mean(t[:-1]).sqrt()
    assert torch.allclose(sig, torch.tensor(fitted_mixture[5], dtype=F64), rtol=1e-9)
    x, _, info = sampling.sample(gmm, aniso_schedule, nfe=5, solver="ipndm", grid="optimized", seeds=range(3),
                          fitted=fitted_mixture)
    assert info["grid"] == "optimized" and info["nfe"] == 5 and torch.isfinite(x).all()
    other = sampling.sample(gmm, aniso_schedule, nfe=5, solver="ipndm", grid="logsnr", seeds=range(3))[0]
    assert not torch.allclose(x, other)


def test_sampling_refuses_a_missing_or_malformed_fitted_grid(gmm, aniso_schedule):
    cases = [(None, "has none"), ({4: [80.0, 1.0, 0.5, 0.1]}, "for 4 steps"),
             ({5: [80.0, 1.0, 0.5, 0.6, 0.1]}, "descending"), ({5: [80.0, 1.0]}, "5 positive")]
    for fitted, words in cases:
        with pytest.raises(ValueError, match=f"^grid: .*{words}"):
            sampling.sample(gmm, aniso_schedule, nfe=5, solver="dpmpp-2m", grid="optimized", seeds=[0], fitted=fitted)


def test_other_families_refuse_the_fitted_grid():
    from aniso_fast.processes import registry

    plan = spec.resolve_sampler("dpmpp-2m", "optimized", None, 5)
    for family in ("vsdm", "vsmd"):
        with pytest.raises(ValueError, match="^grid: 'optimized'"):
            registry.get(family).check_sampler(plan)


def test_fit_grid_cli_stores_grids_that_sample_uses(tiny_checkpoint, assets, tmp_path, capsys):
    assert models.main(["export", str(tiny_checkpoint), "--name", "tiny"]) == 0
    capsys.readouterr()
    out = tmp_path / "out"
    assert sample_main(["--model", "tiny", "--grid", "optimized", "--solver", "dpmpp-2m", "--nfe", "3",
                        "--outdir", str(out)]) == 2
    one_line_error(capsys, "--grid", "fit-grid")
    assert not out.exists()

    assert evaluate_main(["fit-grid", "--model", "tiny", "--steps", "3,4", "--samples", "4", "--teacher-steps", "12",
                          "--check", "2", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "3 steps: sigma" in printed and "endpoint RMS" in printed
    grids = store.fitted_grids("tiny")
    assert sorted(grids) == [3, 4] and all(len(v) == n for n, v in grids.items())
    entry = store.shipped_models()["tiny"]
    assert entry["grids"]["fit"]["teacher_steps"] == 12 and set(entry["grids"]["fit"]["check"]["endpoint_rms"]) \
        == {"3", "4"}

    assert sample_main(["--model", "tiny", "--grid", "optimized", "--solver", "dpmpp-2m", "--nfe", "3", "--count",
                        "2", "--outdir", str(out), "--no-progress"]) == 0
    assert (out / "tiny_learned_dpmpp-2m-2_optimized_nfe3_seeds0-1.png").is_file()
    capsys.readouterr()
    assert sample_main(["--model", "tiny", "--grid", "optimized", "--solver", "dpmpp-2m", "--nfe", "5",
                        "--outdir", str(out)]) == 2
    one_line_error(capsys, "--grid", "5 steps", "3, 4")

    assert models.main(["export", str(tiny_checkpoint), "--name", "tiny", "--force"]) == 0  # a new network
    assert store.fitted_grids("tiny") == {}


@pytest.mark.parametrize("argv,words", [
    (["--model", "nope"], ("--model", "shipped model")),
    (["--model", "tiny", "--steps", "3,40", "--teacher-steps", "16"], ("--steps", "at most")),
    (["--model", "tiny", "--steps", "0"], ("--steps",)),
    (["--model", "tiny", "--samples", "0"], ("--samples",)),
    (["--model", "tiny", "--samples", "1", "--steps", "3", "--teacher-steps", "4"], ("--samples", "per class")),
])
def test_fit_grid_bad_input(tiny_checkpoint, assets, capsys, argv, words):
    assert models.main(["export", str(tiny_checkpoint), "--name", "tiny"]) == 0
    capsys.readouterr()
    before = (assets / "manifest.json").read_text()
    assert evaluate_main(["fit-grid", *argv, "--no-progress"]) == 2
    one_line_error(capsys, *words)
    assert (assets / "manifest.json").read_text() == before


def test_manifest_refuses_a_malformed_fitted_grid(tiny_checkpoint, assets):
    assert models.main(["export", str(tiny_checkpoint), "--name", "tiny"]) == 0
    with pytest.raises(ValueError, match="levels: .*descending"):
        store.set_fitted_grids("tiny", {3: [1.0, 2.0, 0.5]}, {})
    with pytest.raises(ValueError, match="name: .*not a shipped model"):
        store.set_fitted_grids("nope", {3: [3.0, 2.0, 0.5]}, {})
    doc = json.loads((assets / "manifest.json").read_text())
    doc["models"]["tiny"]["grids"] = {"optimized": {"2": [1.0]}}
    (assets / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="corrupt manifest: .*2"):
        store.shipped_models()


def test_teacher_is_the_samplers_dpmpp_2m_on_the_logsnr_grid(gmm, aniso_schedule):
    """The teacher starts from the seeds' own noise: its endpoint is `sampling.sample`'s with the same seeds, and its
    fine levels are the log-SNR grid's geometric-mean sigmas."""
    seeds = [5, 6, 7]
    levels, g, xs, Ds = grid_fit.teacher_trajectory(gmm, aniso_schedule, seeds, None, steps=12)
    assert xs.shape[0] == 13 and Ds.shape[0] == 12 and g.shape[1] == 13 and levels[-1] == 0
    x = sampling.sample(gmm, aniso_schedule, nfe=12, solver="dpmpp-2m", grid="logsnr", seeds=seeds)[0]
    assert torch.equal(xs[-1], x)
    sig = g[0, :-1].log().mean(-1).exp().sqrt()
    assert torch.allclose(sig, levels[:-1], rtol=1e-9)
