"""Every solver at equal NFE on a shipped Fashion-MNIST network (28x28x1, B = 64): wall time per sample, and the
solver's own cost beyond the network calls.

Two runs per solver, back to back on the same grid and start point:
- `network`: `solvers.sample` with the shipped model (the U-Net and its preconditioner, NFE calls);
- `solver`: the same call with a stand-in whose flow returns a precomputed tensor, so what is left is the grid,
  the start point and the solver's `basis.combine` algebra.
The overhead share reported by bench/report.py is `solver / network` (the stand-in run does all the solver's work
and none of the network's). `fmnist-vsmd`: the phase-space DPM-Solver++(2M) on log-SNR
(`phase_space.sample_ode`), its stand-in a denoiser that returns a precomputed tensor (the grids, the per-class step
coefficients and the `block_combine` algebra are left).
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from aniso_fast import store
from aniso_fast.sampling.sampler import sample
from aniso_fast.sampling.spec import SOLVERS
from bench import common

NFE = 9
BATCH = 64
MODELS = ("fmnist-edm", "fmnist-dct-class")  # isotropic basis; DCT basis with class-conditional schedules
GRID = {"heun": "uniform_t"}  # the paper's midpoint Heun; every other solver on the log-SNR grid
RUNS = ("network", "solver")


@dataclass(frozen=True)
class SolverCase:
    model: str
    solver: str
    run: str

    @property
    def grid(self) -> str:
        return GRID.get(self.solver, "uniform_t" if self.solver == "euler" else "logsnr")

    @property
    def group(self) -> str:
        return f"solver-{self.model}-{self.solver}-nfe{NFE}-B{BATCH}"

    @property
    def id(self) -> str:
        return f"{self.group}-{self.run}"


CASES = [SolverCase(m, s, r) for m in MODELS for s in SOLVERS for r in RUNS]


class StandIn:
    """The model's `.basis`, `.num_classes`, `.image_shape`; `.flow` returns one precomputed tensor."""

    def __init__(self, model, F):
        self.basis, self.num_classes, self.image_shape, self.F = model.basis, model.num_classes, model.image_shape, F

    def flow(self, x, g, labels=None):
        return self.F


_LOADED: dict = {}


def _load(name: str):
    if name not in _LOADED:
        model, schedule = store.StoredModel.open(name).load()
        _LOADED[name] = (model, schedule)
    return _LOADED[name]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_solver(benchmark, case: SolverCase, opts: common.Options):
    if case.model not in store.shipped_models():
        pytest.skip(f"{case.model} is not shipped here")
    model, schedule = _load(case.model)
    if case.run == "solver":
        model = StandIn(model, 0.01 * torch.randn(BATCH, *model.image_shape,
                                                   generator=torch.Generator().manual_seed(0)))
    seeds = list(range(BATCH))
    labels = torch.arange(BATCH) % model.num_classes if model.num_classes else None

    def run():
        return sample(model, schedule, nfe=NFE, solver=case.solver, grid=case.grid, seeds=seeds, labels=labels)[0]

    benchmark.group = case.group
    benchmark.extra_info.update(suite="solvers", model=case.model, solver=case.solver, grid=case.grid, nfe=NFE,
                                batch=BATCH, run=case.run, impl=case.run)
    common.measure(benchmark, run, "cpu", opts)


@pytest.mark.parametrize("run", RUNS)
def test_phase_space_solver(benchmark, run: str, opts: common.Options):
    from aniso_fast.processes import phase_space

    name = "fmnist-vsmd"
    if name not in store.shipped_models():
        pytest.skip(f"{name} is not shipped here")
    model, process = store.StoredModel.open(name).load()  # its own instance: the stand-in patches its denoiser
    if run == "solver":
        D = 0.01 * torch.randn(BATCH, *model.image_shape, generator=torch.Generator().manual_seed(0))
        model.denoiser.denoise = lambda y, g, labels=None: D
    seeds = list(range(BATCH))
    labels = torch.arange(BATCH) % model.num_classes

    def go():
        return phase_space.sample_ode(process, model, seeds, NFE, solver="dpmpp-2m", grid="logsnr",
                                      labels=labels)[0]

    benchmark.group = f"solver-{name}-dpmpp-2m-nfe{NFE}-B{BATCH}"
    benchmark.extra_info.update(suite="solvers", model=name, solver="dpmpp-2m", grid="logsnr", nfe=NFE,
                                batch=BATCH, run=run, impl=run)
    common.measure(benchmark, go, "cpu", opts)
