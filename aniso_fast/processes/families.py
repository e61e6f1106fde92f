"""The process families and what a model of each is made of: the one place that maps a family onto its forward
path, its network wrapper, its training loss and its sampler (train.py, models.py and sample.py ask here).

- `core`: the engine's matrix schedule M(t) = sum_k g_k(t) P_k (`schedules.MatrixSchedule`), the network inside
  `precond.AnisoPrecond`, sampled by `solvers.sample`.
- `vsdm`: VSDM's multivariate OU process (`vsdm.VSDMProcess`). Same network wrapper (it denoises the VE view
  y = x / alpha); learned by VSDM's alternating rule (`vsdm.dsm_loss`, then `vsdm.forward_sb_loss` on backward
  paths) or by the trajectory loss on `process.ve_schedule()`; sampled by the PF-ODE through any engine solver
  (`vsdm.sample_ode`) or by Euler-Maruyama (`vsdm.sample_em`).
- `vsmd`: VSMD's phase-space process (`vsmd.VSMDProcess`) with one of two heads (`precond_config['head']`): the
  denoiser head, a C-channel network in `AnisoPrecond` inside `phase_space.VSMDDenoiser` (the velocity score exactly
  from a VE denoiser), or VSMD's velocity head (`vsmd.VelocityScoreNet`, 2C channels in, inside `vsmd.VSMDPrecond`;
  the default of stored models without a head); learned by the alternating rule (`vsmd.dsm_loss`, then
  `vsmd.forward_sb_loss`); sampled by `vsmd.sample_ode` (Heun / iPNDM on uniform t, the phase-space DPM-Solver++(2M)
  on uniform t, logsnr or edm_sigma) or `vsmd.sample_em`.

A stored model keeps its forward path under the `schedule.*` tensors and `schedule_config`, whatever the family,
and names the family in `family` (absent: core).

Samplers (`sample`, checked by `check_sampler`, the one rule of which (solver, grid) a family takes): core, every
engine solver on every grid (`solvers.resolve_sampler`); vsdm, `em` on uniform t steps (its own sampler in x
space) or the PF-ODE through any engine solver on the VE view (not the Karras grid, which ignores the process);
vsmd, `em`, Heun (end point, last step Euler) or iPNDM on the uniform t grid, and the phase-space DPM-Solver++(2M)
(`phase_space.dpmpp_2m`, denoiser head only) on uniform_t, logsnr or edm_sigma.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from torch import Tensor, nn

from .. import sampling
from ..sampling.spec import EM, Sampler

__all__ = ["FAMILIES", "VSDM_RULES", "VSMD_HEADS", "EM", "family_of", "process_from_config", "network_from_config",
           "wrap_network", "is_alternating", "family_of_process", "check_sampler", "default_sampler",
           "resolve_sampler", "sample"]

FAMILIES = ("core", "vsdm", "vsmd")
VSDM_RULES = ("alternate", "trajectory")
VSMD_HEADS = ("denoiser", "velocity")


def family_of(meta: Mapping[str, Any]) -> str:
    """The family of a stored model's meta (`family`, absent in core checkpoints)."""
    family = meta.get("family") or "core"
    if family not in FAMILIES:
        raise ValueError(f"family: expected one of {', '.join(FAMILIES)}, got {family!r}")
    return family


def process_from_config(family: str, cfg: Mapping[str, Any]) -> nn.Module:
    """The forward path of a family from its stored config."""
    if family == "core":
        from ..geometry.schedules import MatrixSchedule

        return MatrixSchedule.from_config(cfg)
    if family == "vsdm":
        from .vsdm import VSDMProcess

        return VSDMProcess.from_config(cfg)
    from .vsmd import VSMDProcess

    return VSMDProcess.from_config(cfg)


def network_from_config(family: str, cfg: Mapping[str, Any]) -> nn.Module:
    """A family's raw network from its stored config (VSMD's velocity head reads 2C input channels, its denoiser
    head C, as every other family's network)."""
    from ..networks.unet import SongUNet

    if family == "vsmd" and cfg["in_channels"] == 2 * cfg["out_channels"]:
        from .vsmd import VelocityScoreNet

        return VelocityScoreNet.from_config(cfg)
    return SongUNet.from_config(cfg)


def wrap_network(family: str, net: nn.Module, basis, process: nn.Module,
                 precond_config: Mapping[str, Any] | None = None) -> nn.Module:
    """The model the losses and samplers call: AnisoPrecond (core, vsdm); for vsmd, with the stored
    `precond_config`, `phase_space.VSMDDenoiser` around AnisoPrecond (`head: denoiser`) or `vsmd.VSMDPrecond`
    (VSMD's velocity head: its Gaussian skip `sigma_data`; absent: VSMD's own form)."""
    from ..networks.precond import AnisoPrecond

    config = dict(precond_config or {})
    if family == "vsmd" and config.pop("head", "velocity") == "denoiser":
        from .phase_space import VSMDDenoiser

        return VSMDDenoiser(AnisoPrecond(net, basis, **config), process)
    if family == "vsmd":
        from .vsmd import VSMDPrecond

        return VSMDPrecond(net, process, basis, **config)
    return AnisoPrecond(net, basis)


def is_alternating(family: str, vsdm_rule: str | None) -> bool:
    """The forward path is learned by its own update on backward paths, apart from the network's steps."""
    return family == "vsmd" or (family == "vsdm" and vsdm_rule == "alternate")


def family_of_process(process) -> str:
    """The family of a forward path: vsdm for a VSDMProcess, vsmd for a VSMDProcess, else core (a MatrixSchedule,
    or None on the Karras grid)."""
    from .vsdm import VSDMProcess
    from .vsmd import VSMDProcess

    return "vsdm" if isinstance(process, VSDMProcess) else "vsmd" if isinstance(process, VSMDProcess) else "core"


def check_sampler(family: str, plan: Sampler) -> None:
    """ValueError naming `solver`, `grid` or `secondary` when the family does not take the resolved sampler."""
    if family not in FAMILIES:
        raise ValueError(f"family: expected one of {', '.join(FAMILIES)}, got {family!r}")
    if not isinstance(plan, Sampler):
        raise ValueError(f"plan: expected a sampling.Sampler (sampling.resolve_sampler), got {type(plan).__name__}")
    if family == "core":
        return
    if plan.grid == "optimized":
        raise ValueError(f"grid: 'optimized' grids are fitted for core models (grid_fit); a {family} model takes "
                         f"its family's grids")
    from .vsmd import ODE_SOLVERS

    if family == "vsmd" and plan.solver not in (EM, *ODE_SOLVERS):
        raise ValueError(f"solver: a vsmd model samples with {EM}, {', '.join(ODE_SOLVERS)} (the other solvers "
                         f"integrate the VE form, not the phase space), got {plan.solver!r}")
    if family == "vsmd" and plan.solver == "dpmpp-2m":
        from .phase_space import GRIDS

        if plan.grid not in GRIDS:
            raise ValueError(f"grid: a vsmd model's dpmpp-2m runs on {', '.join(GRIDS)}, got {plan.grid!r}")
    elif (plan.solver == EM or family == "vsmd") and plan.grid != "uniform_t":
        what = "Euler-Maruyama" if plan.solver == EM else f"{plan.solver} on the phase space"
        raise ValueError(f"grid: a {family} model's {what} runs on the uniform t grid ('uniform_t'), "
                         f"got {plan.grid!r}")
    if family == "vsmd" and plan.secondary == "mid":
        raise ValueError("secondary: a vsmd model's Heun steps to the end point (VSMD's sampler), got 'mid'")
    if family == "vsdm" and plan.grid == "karras":
        raise ValueError("grid: 'karras' ignores the process (EDM's isotropic grid); a vsdm model takes "
                         "'uniform_t', 'edm_sigma' or 'logsnr'")


def default_sampler(family: str, solver: str | None = None, grid: str | None = None) -> tuple[str, str]:
    """(solver, grid) with the unset ones filled: Heun on the uniform t grid, except a vsmd model's
    phase-space DPM-Solver++(2M) on the logsnr grid (docs/families/RESULTS.md: FD 2.32 at NFE 9, Heun on uniform t
    needs NFE 35 for 7.17)."""
    if family == "vsmd" and solver in (None, "dpmpp-2m") and grid in (None, "logsnr", "edm_sigma"):
        return "dpmpp-2m", grid or "logsnr"
    return solver or "heun", grid or "uniform_t"


def resolve_sampler(family: str, solver: str = "heun", grid: str = "uniform_t", secondary: str | None = None,
                    nfe: int = 9, order: int | None = None) -> Sampler:
    """`solvers.resolve_sampler` with the family's default secondary point (VSMD's Heun: the end point), then
    `check_sampler`; ValueError naming the argument."""
    if family == "vsmd" and solver == "heun" and secondary is None:
        secondary = "end"
    plan = sampling.resolve_sampler(solver, grid, secondary, nfe, order)
    check_sampler(family, plan)
    return plan


def sample(model, process, plan: Sampler, seeds: Sequence[int], labels: Tensor | None = None, *,
           fitted: Mapping[int, Sequence[float]] | None = None, device="cpu",
           progress: bool = False) -> tuple[Tensor, Tensor | None, dict]:
    """One sample per seed from a model of any family with its forward path (`models.load_trained`'s pair) and a
    resolved sampler: core, `solvers.sample`; vsdm, `vsdm.sample_em` for 'em' else `vsdm.sample_ode`; vsmd,
    `vsmd.sample_em` or `vsmd.sample_ode`. `fitted`: the model's fitted grids for grid 'optimized'
    (`models.fitted_grids`). Per-seed deterministic. Returns (x, labels, info with the NFE spent, solver and
    grid)."""
    family = family_of_process(process)
    check_sampler(family, plan)
    if family == "core":
        return sampling.sample(model, process, nfe=plan.nfe, solver=plan.solver, grid=plan.grid,
                              secondary=plan.secondary, order=plan.order, seeds=seeds, labels=labels,
                              fitted=fitted, device=device, progress=progress)
    if family == "vsdm":
        from . import vsdm

        if plan.solver == EM:  # vsdm.sample_em checks no labels (and runs on the process's device)
            seeds = sampling.check_seeds(seeds)
            labels = sampling.check_labels(labels, seeds, getattr(model, "num_classes", None), device)
            x, labels, info = vsdm.sample_em(process, model, seeds, plan.steps, labels, progress=progress)
        else:
            x, labels, info = vsdm.sample_ode(process, model, seeds, plan.nfe, solver=plan.solver, grid=plan.grid,
                                              secondary=plan.secondary, order=plan.order, labels=labels,
                                              device=device, progress=progress)
    else:
        from . import vsmd

        if plan.solver == EM:
            x, labels, info = vsmd.sample_em(process, model, seeds, plan.steps, labels, progress=progress)
        else:
            x, labels, info = vsmd.sample_ode(process, model, seeds, plan.nfe, solver=plan.solver, grid=plan.grid,
                                              order=plan.order, labels=labels, device=device, progress=progress)
    return x, labels, {**info, "solver": plan.solver, "grid": plan.grid}
