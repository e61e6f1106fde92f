"""The vsdm family: VSDM's multivariate OU process (`vsdm.VSDMProcess`) with the network inside `AnisoPrecond` (it
denoises the VE view y = x / alpha). Its rates are learned by VSDM's alternating rule (`vsdm.dsm_loss`, then
`vsdm.forward_sb_loss` on backward paths) or by the trajectory loss on `process.ve_schedule()`; it samples by the
PF-ODE through any engine solver (`vsdm.sample_ode`) or by Euler-Maruyama (`vsdm.sample_em`)."""
from __future__ import annotations

import math
from types import ModuleType

from .. import sampling
from ..sampling.spec import EM
from ..utils import figures
from . import losses, vsdm
from .core_family import LOSS_C, NO_ESTIMATOR, REDUCTION, check_loss_c
from .family import ALTERNATING_OPTIONS, Family, LossFunction, Option

__all__ = ["AlternatingFamily", "VSDMFamily", "BETA_MAX", "VSDM_RULES", "check_alternating_options", "check_beta_max"]

VSDM_RULES = ("alternate", "trajectory")
BETA_MAX = Option("beta_max", "vsdm: beta_max of VSDM's power schedule (default 20); vsmd: VSMD's constant beta "
                              "(default 10)", float, example=("5",))


def check_alternating_options(cfg) -> None:
    """The alternating rule's options in range; --forward-paths defaults to --batch."""
    if cfg.forward_paths is None:
        cfg.forward_paths = cfg.batch
    for option in ALTERNATING_OPTIONS[:4]:
        v = getattr(cfg, option.name)
        if not 1 <= v <= sampling.MAX_NFE:
            raise ValueError(f"{option.flag}: expected an integer in [1, {sampling.MAX_NFE}], got {v}")
    if not (math.isfinite(cfg.sb_zeta) and cfg.sb_zeta >= 0):
        raise ValueError(f"--sb-zeta: expected a finite number >= 0, got {cfg.sb_zeta}")


def check_beta_max(cfg) -> None:
    if not (math.isfinite(cfg.beta_max) and cfg.beta_max > 0):
        raise ValueError(f"--beta-max: expected a finite number > 0, got {cfg.beta_max}")


class AlternatingFamily(Family):
    """A family whose process class (`process_class`) is learned by the alternating rule on the backward
    Euler-Maruyama paths of its module (`rule`: `simulate_backward`, `forward_sb_loss`)."""

    process_class: type
    rule: ModuleType

    def process_from_config(self, config):
        return self.process_class.from_config(config)

    def backward_paths(self, process, model, seeds, steps, labels):
        return self.rule.simulate_backward(process, model, seeds, steps, labels)

    def forward_loss(self, process, basis, paths, zeta):
        return self.rule.forward_sb_loss(process, basis, paths, zeta)

    def owns(self, process):
        return isinstance(process, self.process_class)


class VSDMFamily(AlternatingFamily):
    name = "vsdm"
    help = "VSDM's multivariate OU process, rates learned by --vsdm-rule"
    variant = "vsdm_rule"
    process_class, rule = vsdm.VSDMProcess, vsdm
    options = (
        Option("vsdm_rule", "how VSDM learns its rates: alternate (VSDM's rule: network steps by denoising score "
                            "matching with the rates frozen, and every --forward-every steps a forward SB update of "
                            "the rates on backward Euler-Maruyama paths) or trajectory (the trajectory loss with the "
                            "schedule-gradient estimator on the VE view, network and rates together). Default: "
                            "alternate", choices=VSDM_RULES, example=("trajectory",)),
        BETA_MAX, *ALTERNATING_OPTIONS, LOSS_C, REDUCTION, NO_ESTIMATOR,
    )

    def resolve_variant(self, cfg):
        cfg.vsdm_rule = cfg.vsdm_rule or "alternate"

    def option_defaults(self, cfg):
        if cfg.vsdm_rule == "trajectory":  # the aniso stage's loss; the fine-tuning recipes' schedule lr
            return {"beta_max": 20.0, "loss_c": 0.5, "reduction": "sum", "no_estimator": False, "glr": 3e-3}
        return {"beta_max": 20.0, "forward_every": 50, "forward_paths": None, "forward_path_steps": 50,
                "forward_steps": 10, "sb_zeta": 0.75, "glr": 1e-3}  # the forward update's lr (VSDM's toy config)

    def check_options(self, cfg):
        check_beta_max(cfg)
        if cfg.vsdm_rule == "alternate":
            check_alternating_options(cfg)
        check_loss_c(cfg)

    def new_process(self, cfg, num_subspaces, num_classes):
        """The rates at 0 (VP)."""
        return vsdm.VSDMProcess(num_subspaces, num_classes, beta_max=cfg.beta_max)

    def alternating(self, cfg):
        return cfg.vsdm_rule == "alternate"

    def loss(self, cfg, model, process) -> LossFunction:
        if cfg.vsdm_rule == "trajectory":
            return lambda x0, labels, gen: losses.trajectory_loss(
                model, process.ve_schedule(), x0, labels, generator=gen, c=cfg.loss_c, reduction=cfg.reduction,
                estimator=not cfg.no_estimator)
        return lambda x0, labels, gen: (vsdm.dsm_loss(process, model, x0, labels, gen), {})

    def plot_process(self, process, path, title, class_names=None):
        figures.plot_subspace_values(process.rates.detach(), path, title, "lambda_k (VSDM rate)",
                                     class_names=class_names)

    def check_sampler(self, plan):
        vsdm.check_sampler(plan)

    def run_sampler(self, model, process, plan, seeds, labels, *, fitted, device, progress):
        if plan.solver == EM:  # vsdm.sample_em checks no labels (and runs on the process's device)
            seeds = sampling.check_seeds(seeds)
            labels = sampling.check_labels(labels, seeds, getattr(model, "num_classes", None), device)
            x, labels, info = vsdm.sample_em(process, model, seeds, plan.steps, labels, progress=progress)
        else:
            x, labels, info = vsdm.sample_ode(process, model, seeds, plan.nfe, solver=plan.solver, grid=plan.grid,
                                              secondary=plan.secondary, order=plan.order, labels=labels,
                                              device=device, progress=progress)
        return x, labels, {**info, "solver": plan.solver, "grid": plan.grid}
