"""The core family: the engine's matrix schedule M(t) = sum_k g_k(t) P_k (`schedules.MatrixSchedule`), the network
inside `precond.AnisoPrecond`, trained in stages (METHOD §2.2: edm -> iso -> aniso) and sampled by every engine
solver on every grid (`sampling.sample`)."""
from __future__ import annotations

import argparse
import math
from typing import Any, Mapping, Sequence

import torch

from ..geometry.schedules import MatrixSchedule
from .. import sampling
from ..utils import figures
from . import losses
from .family import Family, LossFunction, Option

__all__ = ["CoreFamily", "STAGES", "STAGE_LOSSES"]

STAGES = ("edm", "iso", "aniso")
STAGE_LOSSES = {"edm": losses.edm_loss, "iso": losses.iso_loss, "aniso": losses.trajectory_loss}
_STAGE_DEFAULTS = {  # (loss c, loss reduction, schedule lr): METHOD §9 table
    "edm": (None, "mean", 0.0),
    "iso": (1.0, "mean", 1e-2),
    "aniso": (0.5, "sum", 1e-4),
}

# the trajectory loss's options, shared with VSDM's trajectory rule
LOSS_C = Option("loss_c", "constant c of the loss weight gdot^2/(g(g+c)) (default: 1 for iso, 0.5 for aniso and "
                          "VSDM's trajectory rule; METHOD 10.2)", float, example=("0.3",))
REDUCTION = Option("reduction", "loss reduction over a chunk (default: mean for edm/iso, sum for aniso and VSDM's "
                                "trajectory rule; METHOD 4.4)", choices=("mean", "sum"), example=("sum",))
NO_ESTIMATOR = Option("no_estimator", "trajectory loss: backpropagate through the network's conditioning instead "
                                      "of the schedule-gradient estimator of METHOD 5", switch=True)


def check_loss_c(cfg: argparse.Namespace) -> None:
    c = cfg.loss_c
    if c is not None and not (math.isfinite(c) and c > 0):
        raise ValueError(f"--loss-c: expected a finite number > 0, got {c}")


def copy_schedule(target: MatrixSchedule, source: MatrixSchedule) -> None:
    """psi of a previous stage into `target` (METHOD §2.2): one schedule -> every subspace, global -> every class."""
    for key in ("num_knots", "T", "g0"):
        if getattr(source, key) != getattr(target, key):
            raise ValueError(f"--init-from: the checkpoint's schedule has {key}={getattr(source, key)}, this run "
                             f"{getattr(target, key)}")
    (S0, P0, _), (S, P, _) = source.psi.shape, target.psi.shape
    if S0 not in (1, S):
        raise ValueError(f"--init-from: the checkpoint has {S0} class schedules, this run needs {S}"
                         + (" (a per-class schedule cannot become a global one)" if S == 1 else ""))
    if P0 not in (1, P):
        raise ValueError(f"--init-from: the checkpoint has {P0} subspace schedules, this run's basis has {P} "
                         f"subspaces (only a tied schedule can be copied to a different number of subspaces)")
    with torch.no_grad():
        target.psi.copy_(source.psi.detach().expand(S, P, -1))


class CoreFamily(Family):
    name = "core"
    help = "the engine's matrix schedule, trained in --stage"
    variant = "stage"
    matrix_schedule = True
    network_starts_others = True
    options = (
        Option("stage", "family core only, required there. edm: network only, with EDM's loss (log-normal sigma; "
                        "the schedule stays the frozen Karras initialisation); iso: learn a tied (isotropic) "
                        "schedule + network with iso_loss (METHOD 4.1); aniso: learn one schedule per subspace with "
                        "trajectory_loss + estimator (METHOD 4.2, 5)", choices=STAGES, example=("iso",)),
        Option("num_knots", "knots of each schedule, >= 2 (METHOD 2.1; default 32)", int, example=("7",)),
        LOSS_C, REDUCTION, NO_ESTIMATOR,
    )

    def resolve_variant(self, cfg):
        if cfg.stage is None:
            raise ValueError("--stage: required with --family core (edm, iso or aniso)")

    def option_defaults(self, cfg):
        c, reduction, glr = _STAGE_DEFAULTS[cfg.stage]
        out = {"num_knots": 32, "reduction": reduction, "glr": glr, "basis": "dct" if cfg.stage == "aniso" else "iso"}
        if cfg.stage != "edm":  # EDM's loss has no c
            out["loss_c"] = c
        if cfg.stage == "aniso":
            out["no_estimator"] = False
        return out

    def check_options(self, cfg):
        if cfg.num_knots < 2:
            raise ValueError(f"--num-knots: expected an integer >= 2, got {cfg.num_knots}")
        check_loss_c(cfg)
        if cfg.stage == "edm" and cfg.class_schedules:
            raise ValueError("--class-schedules: the edm stage has no learned schedule")
        if getattr(cfg, "precision", None) == "fp16" and cfg.stage == "aniso" and not cfg.no_estimator:
            # its Hessian-vector products run through the network inside the loss, out of the loss scaler's reach:
            # NaN in fp16 on a tiny run (tests/test_execution.py)
            raise ValueError("--precision: fp16 gives NaN in the aniso stage's schedule-gradient estimator; use "
                             "bf16 (or --no-estimator)")

    def new_process(self, cfg, num_subspaces, num_classes):
        """Tied except in the aniso stage (METHOD §2.2)."""
        return MatrixSchedule(num_subspaces=num_subspaces, num_classes=num_classes, tied=cfg.stage != "aniso",
                              num_knots=cfg.num_knots)

    def process_from_config(self, config):
        return MatrixSchedule.from_config(config)

    def start_process(self, cfg, process, source):
        if cfg.stage != "edm":
            copy_schedule(process, source)

    def learns_process(self, cfg):
        return cfg.stage != "edm"

    def loss(self, cfg, model, process) -> LossFunction:
        fn, kwargs = STAGE_LOSSES[cfg.stage], dict(reduction=cfg.reduction)
        if cfg.stage != "edm":
            kwargs["c"] = cfg.loss_c
        if cfg.stage == "aniso":
            kwargs["estimator"] = not cfg.no_estimator
        return lambda x0, labels, gen: fn(model, process, x0, labels, generator=gen, **kwargs)

    def plot_process(self, process, path, title, class_names=None):
        figures.plot_schedule(process, path, title, class_names=class_names)

    def owns(self, process):
        """Any forward path no other family claims (`registry.family_of_process` asks the core family last): a
        MatrixSchedule or an object with its contract for the engine's solvers, or None (the Karras grid)."""
        return True

    def check_grid(self, grid, process):
        sampling.check_grid(grid, process)

    def run_sampler(self, model, process, plan, seeds: Sequence[int], labels, *,
                    fitted: Mapping[int, Sequence[float]] | None, device, progress: bool,
                    callback=None) -> tuple[Any, Any, dict]:
        x, labels, info = sampling.sample(model, process, nfe=plan.nfe, solver=plan.solver, grid=plan.grid,
                                         secondary=plan.secondary, order=plan.order, seeds=seeds, labels=labels,
                                         fitted=fitted, device=device, progress=progress, callback=callback)
        return x, labels, info
