"""The process families and what a model of each is made of: the one place that maps a family onto its forward
path, its network wrapper, its training loss and its sampler (train.py, models.py and sample.py ask here).

- `core`: the engine's matrix schedule M(t) = sum_k g_k(t) P_k (`schedules.MatrixSchedule`), the network inside
  `precond.AnisoPrecond`, sampled by `solvers.sample`.
- `vsdm`: VSDM's multivariate OU process (`vsdm.VSDMProcess`). Same network wrapper (it denoises the VE view
  y = x / alpha); learned by VSDM's alternating rule (`vsdm.dsm_loss`, then `vsdm.forward_sb_loss` on backward
  paths) or by the trajectory loss on `process.ve_schedule()`; sampled by the PF-ODE through any engine solver
  (`vsdm.sample_ode`) or by Euler-Maruyama (`vsdm.sample_em`).
- `vsmd`: VSMD's phase-space process (`vsmd.VSMDProcess`), a velocity-score network (`vsmd.VelocityScoreNet`,
  2C channels in) inside `vsmd.VSMDPrecond`; learned by the alternating rule (`vsmd.dsm_loss`, then
  `vsmd.forward_sb_loss`); sampled by `vsmd.sample_ode` (Heun / iPNDM on uniform t) or `vsmd.sample_em`.

A stored model keeps its forward path under the `schedule.*` tensors and `schedule_config`, whatever the family,
and names the family in `family` (absent: core).
"""
from __future__ import annotations

from typing import Any, Mapping

from torch import nn

__all__ = ["FAMILIES", "VSDM_RULES", "EM", "family_of", "process_from_config", "network_from_config", "wrap_network", "is_alternating"]

FAMILIES = ("core", "vsdm", "vsmd")
VSDM_RULES = ("alternate", "trajectory")
EM = "em"  # the families' reverse-SDE sampler (Euler-Maruyama, one network call per step)


def family_of(meta: Mapping[str, Any]) -> str:
    """The family of a stored model's meta (`family`, absent in core checkpoints)."""
    family = meta.get("family") or "core"
    if family not in FAMILIES:
        raise ValueError(f"family: expected one of {', '.join(FAMILIES)}, got {family!r}")
    return family


def process_from_config(family: str, cfg: Mapping[str, Any]) -> nn.Module:
    """The forward path of a family from its stored config."""
    if family == "core":
        from .schedules import MatrixSchedule

        return MatrixSchedule.from_config(cfg)
    if family == "vsdm":
        from .vsdm import VSDMProcess

        return VSDMProcess.from_config(cfg)
    from .vsmd import VSMDProcess

    return VSMDProcess.from_config(cfg)


def network_from_config(family: str, cfg: Mapping[str, Any]) -> nn.Module:
    """A family's raw network from its stored config (the velocity net of VSMD has 2C input channels)."""
    from .networks import SongUNet

    if family == "vsmd":
        from .vsmd import VelocityScoreNet

        return VelocityScoreNet.from_config(cfg)
    return SongUNet.from_config(cfg)


def wrap_network(family: str, net: nn.Module, basis, process: nn.Module) -> nn.Module:
    """The model the losses and samplers call: AnisoPrecond (core, vsdm) or VSMDPrecond (vsmd)."""
    if family == "vsmd":
        from .vsmd import VSMDPrecond

        return VSMDPrecond(net, process, basis)
    from .precond import AnisoPrecond

    return AnisoPrecond(net, basis)


def is_alternating(family: str, vsdm_rule: str | None) -> bool:
    """The forward path is learned by its own update on backward paths, apart from the network's steps."""
    return family == "vsmd" or (family == "vsdm" and vsdm_rule == "alternate")
