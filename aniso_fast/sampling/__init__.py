"""Sampling: grids (`grids`), per-seed noise and labels (`noise`), the solver table (`spec`), the solvers (`ode`,
`multistep`), the sampling entry (`sampler`) and grids fitted to a model (`grid_fit`)."""
from .grids import GRIDS, Grid, GridSpec, check_grid, fitted_levels
from .noise import MAX_SEED, SeedStreams, check_labels, check_seeds, seeded_labels, seeded_noise
from .sampler import sample
from .spec import MAX_NFE, SOLVERS, Sampler, SolverSpec, choose_for_nfe, resolve_sampler

__all__ = ["GRIDS", "Grid", "GridSpec", "check_grid", "fitted_levels", "MAX_SEED", "SeedStreams", "check_labels",
           "check_seeds", "seeded_labels", "seeded_noise", "sample", "MAX_NFE", "SOLVERS", "Sampler", "SolverSpec",
           "choose_for_nfe", "resolve_sampler"]
