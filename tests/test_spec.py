"""The solver table (sampling.spec) and the one rule of which sampler runs at an NFE, walked over NFE 1..250."""
import inspect

import pytest
import torch

from aniso_fast import sample as sample_cli
from aniso_fast.processes import registry
from aniso_fast.sampling import grids, spec
from aniso_fast.sampling.spec import SOLVERS, choose_for_nfe, resolve_sampler
from aniso_fast import store as models

f64 = torch.float64


def test_every_solver_is_one_table_entry():
    assert list(SOLVERS) == ["euler", "heun", "em", "dpmpp-2m", "dpmpp-3m", "unipc", "ipndm", "deis"]
    assert [s.name for s in SOLVERS.values() if s.stochastic] == ["em"]
    assert [s.name for s in SOLVERS.values() if s.secondaries] == ["heun"] == \
        [s.name for s in SOLVERS.values() if s.final_euler]
    for s in SOLVERS.values():
        assert s.name == next(k for k, v in SOLVERS.items() if v is s) and s.label and s.code
        assert (s.default_order in s.orders) if s.orders else s.default_order is None
        params = inspect.signature(s.run).parameters
        if s.orders:  # the table states the defaults its function runs with
            assert params["order"].default == s.default_order, s.name
            if "lower_order_final" in params:
                assert params["lower_order_final"].default == s.lower_order_final, s.name
            else:
                assert not s.lower_order_final
    assert len({s.code for s in SOLVERS.values()}) == len(SOLVERS)
    assert len({g.code for g in grids.GRIDS.values()}) == len(grids.GRIDS)


@pytest.mark.parametrize("name", [n for n, s in SOLVERS.items() if s.orders])
def test_a_multistep_function_takes_exactly_the_orders_of_its_entry(gmm, name):
    entry = SOLVERS[name]
    grid = grids.karras_grid(7, 2)
    x = gmm.basis.scale(torch.randn(1, *gmm.image_shape, dtype=f64), grid.g[:, 0].sqrt())
    for order in range(0, 6):
        if order in entry.orders:
            entry.run(gmm, x, grid, order=order)
        else:
            with pytest.raises(ValueError, match="^order"):
                entry.run(gmm, x, grid, order=order)


def test_min_nfe_and_steps_for_nfe():
    S = SOLVERS
    assert S["dpmpp-2m"].min_nfe() == 3 and S["dpmpp-3m"].min_nfe() == 5
    assert S["unipc"].min_nfe(2) == 3 and S["unipc"].min_nfe() == 5
    assert S["ipndm"].min_nfe() == 4 and S["ipndm"].min_nfe(1) == 1 and S["deis"].min_nfe() == 3
    assert S["heun"].min_nfe() == 3 and S["heun"].min_nfe(secondary="mid") == 2 and S["euler"].min_nfe() == 1
    with pytest.raises(ValueError, match="^order: unipc takes order 2 or 3"):
        S["unipc"].min_nfe(4)
    assert S["heun"].steps_for_nfe(9) == (5, True) and S["heun"].steps_for_nfe(8, "mid") == (4, False)
    assert S["heun"].steps_for_nfe(9, "mid") == (5, True) and S["em"].steps_for_nfe(7) == (7, False)
    for nfe, secondary in [(8, "end"), (1, "mid"), (True, "end")]:
        with pytest.raises(ValueError, match="^nfe"):
            S["heun"].steps_for_nfe(nfe, secondary)
    # the minimum is exactly the fewest calls resolve_sampler accepts
    for s in SOLVERS.values():
        for order in s.orders or (None,):
            for secondary in s.secondaries or (None,):
                need = s.min_nfe(order, secondary or "end")
                resolve_sampler(s.name, "uniform_t", secondary, need, order)
                with pytest.raises(ValueError, match="^nfe"):
                    resolve_sampler(s.name, "uniform_t", secondary, need - 1, order)


def test_names_and_codes_come_from_the_table():
    assert resolve_sampler("heun", "uniform_t", None, 9).name == "midpoint Heun, uniform t grid (paper)"
    assert resolve_sampler("heun", "karras", None, 9).code == "K"
    assert resolve_sampler("ipndm", "optimized", None, 9, 4).name == "iPNDM order 4, fitted grid on the geometric mean"
    assert resolve_sampler("dpmpp-2m", "logsnr", None, 9).name == "DPM-Solver++(2M), log-SNR grid on the geometric mean"
    assert resolve_sampler("dpmpp-2m", "logsnr", None, 9).code == "2M2-λ"
    assert resolve_sampler("heun", "uniform_t", "end", 9).code == "ue"
    with pytest.raises(ValueError, match="^secondary: the Karras grid is defined for end-point Heun only"):
        resolve_sampler("heun", "karras", "mid", 9)


# ---- the per-NFE choice (sampling.spec.choose_for_nfe) ----

HEUN_MID = {"model": "a", "solver": "heun", "grid": "uniform_t", "secondary": "mid", "order": None}
IPNDM_FIT = {"model": "a", "solver": "ipndm", "grid": "optimized", "secondary": None, "order": 4}
EM_OWN = {"model": "b", "solver": "em", "grid": "uniform_t", "secondary": None, "order": None, "nfes": [50, 200]}
HEUN_OWN = {"model": "c", "solver": "heun", "grid": "uniform_t", "secondary": "end", "order": None, "nfes": [35, 199]}


def test_choose_for_nfe_rules():
    recorded = {5: HEUN_MID, 6: IPNDM_FIT, 199: HEUN_OWN, 200: EM_OWN}
    fitted = {"a": {6, 8}}.get

    def choose(nfe, **kw):
        return choose_for_nfe(recorded, nfe, fitted_steps=lambda m: fitted(m, ()), **kw)

    assert choose(5) is HEUN_MID and choose(200) is EM_OWN and choose(199) is HEUN_OWN  # recorded: as measured
    assert choose(7) is HEUN_MID  # odd: midpoint Heun ends on its Euler step as at 5
    assert choose(8) is IPNDM_FIT  # a fitted 8-step grid exists
    assert choose(10) is None and choose(4) is None  # no 10- or 4-step grid; midpoint Heun at an even NFE
    assert choose(201) is HEUN_MID and choose(189) is HEUN_MID  # own-NFE lines are never extended
    assert choose(190, fallbacks=[{"model": "d", "solver": "heun", "grid": "uniform_t"},
                                  {"model": "d", "solver": "em", "grid": "uniform_t"},
                                  {"model": "d", "solver": "dpmpp-2m", "grid": "logsnr"}])["solver"] == "dpmpp-2m"
    assert choose(7, admits=lambda c, plan: c["model"] != "a") is None  # the caller's facts about models
    assert choose_for_nfe({}, 9) is None


def _check_choice(nfe, choice, recorded, fitted_steps):
    """The table's rules for a choice at `nfe`."""
    plan = resolve_sampler(choice["solver"], choice["grid"], choice.get("secondary"), nfe, choice.get("order"))
    assert plan.nfe == nfe  # spends the NFE exactly
    if plan.grid == "optimized":
        assert plan.steps in fitted_steps(choice["model"])
    if nfe in recorded and choice == recorded[nfe]:
        return
    assert not plan.spec.stochastic and not choice.get("nfes")  # never em, never a line of its own NFEs elsewhere
    measured = [k for k, c in recorded.items() if c == choice]
    if measured:  # ends on a final Euler step exactly where it did when measured
        then = resolve_sampler(choice["solver"], choice["grid"], choice.get("secondary"), measured[0],
                               choice.get("order"))
        assert plan.final_euler == then.final_euler
    else:  # the default model with a sampler that runs as designed
        assert choice["model"] == models.default_model() and plan.final_euler == plan.spec.final_euler


def test_every_nfe_from_1_to_250_gets_a_choice_the_table_allows():
    recorded = models.sampler_defaults()
    assert recorded, "the shipped manifest records per-NFE defaults"
    seen = {}
    assert sample_cli.nfe_choice(1) is None and sample_cli.nfe_choice(2) is None  # nothing runs there as designed
    for nfe in range(3, 251):
        choice = sample_cli.nfe_choice(nfe)
        assert choice is not None, nfe
        _check_choice(nfe, choice, recorded, models.fitted_grids)
        registry.get(models.model_family(choice["model"])).check_sampler(resolve_sampler(
            choice["solver"], choice["grid"], choice.get("secondary"), nfe, choice.get("order")))
        seen[nfe] = (choice["model"], choice["solver"], choice.get("secondary"))
    for nfe in recorded:
        assert sample_cli.nfe_choice(nfe) == recorded[nfe]
    # the cases: no midpoint Heun at an even NFE; the VSMD Heun cell stays at its own NFEs
    assert all(not (s == "heun" and sec == "mid" and n % 2 == 0) for n, (_, s, sec) in seen.items())
    assert {seen[n][0] for n in (189, 190, 201)} == {models.default_model()}
    assert seen[199][0] == "fmnist-vsmd"  # VSDM's EM defaults at 50 and 200 went with the network they measured:
    assert seen[50][:2] == seen[200][:2] == (models.default_model(), "dpmpp-2m")  # the nearest choice that runs
    assert seen[8][1] == seen[190][1] == "dpmpp-2m" and seen[189][1] == seen[201][1] == "heun"


def _dry(argv, tmp_path):
    """The CLI's choice and checks without sampling: its own parser and `_validate` (nothing loaded or written)."""
    args = sample_cli.build_parser().parse_args([*argv, "--outdir", str(tmp_path)])
    plan = sample_cli._validate(args)[1]  # the pipeline's Plan: the model chosen and the resolved sampler
    return plan, plan.sampler


@pytest.mark.parametrize("nfe", [1, 2])
def test_below_nfe_3_the_cli_asks_for_a_solver(nfe, tmp_path, capsys):
    assert sample_cli.main(["--nfe", str(nfe), "--outdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --nfe: no recorded or default sampler runs at NFE {nfe}") and "\n" not in err
    assert "at least 3" in err and not list(tmp_path.iterdir())
    args, plan = _dry(["--nfe", str(nfe), "--solver", "euler"], tmp_path)
    assert (args.model, plan.steps) == (models.default_model(), nfe)


@pytest.mark.parametrize("nfe", [3, 8, 10, 189, 190, 199, 201, 250])
def test_the_cli_runs_the_choice(nfe, tmp_path):
    args, plan = _dry(["--nfe", str(nfe)], tmp_path)
    choice = sample_cli.nfe_choice(nfe)
    assert (args.model, plan.solver, plan.grid, plan.nfe) == (choice["model"], choice["solver"], choice["grid"], nfe)
    assert not (plan.solver == "heun" and plan.secondary == "mid" and nfe % 2 == 0)


def test_explicit_options_always_win(tmp_path):
    args, plan = _dry(["--nfe", "8", "--solver", "heun", "--secondary", "mid"], tmp_path)
    assert (args.model, plan.solver, plan.secondary, plan.steps) == (models.default_model(), "heun", "mid", 4)
    args, plan = _dry(["--nfe", "9", "--model", "fmnist-edm", "--grid", "karras"], tmp_path)
    assert (args.model, plan.solver, plan.grid) == ("fmnist-edm", "heun", "karras")
    args, plan = _dry(["--nfe", "201", "--solver", "em"], tmp_path)
    assert (plan.solver, plan.grid, plan.nfe) == ("em", "uniform_t", 201)
    args, plan = _dry(["--nfe", "190", "--model", "fmnist-vsmd"], tmp_path)
    assert (args.model, plan.solver, plan.grid) == ("fmnist-vsmd", "dpmpp-2m", "logsnr")


def test_fallback_samplers_spend_every_nfe_as_designed():
    for nfe in range(3, 251):
        plans = [spec._plan(c, nfe) for c in spec.FALLBACK_SAMPLERS]
        assert any(p is not None and p.final_euler == p.spec.final_euler for p in plans), nfe


def test_sample_nfe_8_runs_the_fallback_through_the_cli(tmp_path, capsys):
    """The issue's case end to end: `sample --nfe 8` writes DPM-Solver++(2M) on log-SNR, not midpoint Heun."""
    assert sample_cli.main(["--nfe", "8", "--seeds", "0", "--format", "npz", "--no-progress",
                            "--outdir", str(tmp_path)]) == 0
    written = [p.name for p in tmp_path.iterdir()]
    assert written == [f"{models.default_model()}_learned_dpmpp-2m-2_logsnr_nfe8_seeds0.npz"]
