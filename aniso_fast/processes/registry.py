"""The registry of process families `{name: Family}` (`family.Family`): the one place that knows which families
exist. A new family is one module and one line here (or one `register` call: the tests register a toy family).

A stored model names its family in `family` (absent: core) and keeps its forward path under the `schedule.*`
tensors and `schedule_config`, whatever the family.
"""
from __future__ import annotations

import inspect
from typing import Any, Mapping, Sequence

from torch import Tensor

from ..sampling.spec import Sampler
from .core_family import CoreFamily
from .family import Family, Option
from .vsdm_family import VSDMFamily
from .vsmd_family import VSMDFamily

__all__ = ["FAMILIES", "register", "unregister", "get", "family_of", "family_of_process", "options",
           "where_option_applies", "run_sampler"]

FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Add a family under its name (ValueError if the name is taken)."""
    if not family.name or family.name in FAMILIES:
        raise ValueError(f"family: expected a new family name, got {family.name!r}")
    FAMILIES[family.name] = family
    return family


def unregister(name: str) -> None:
    FAMILIES.pop(name, None)


for _family in (CoreFamily(), VSDMFamily(), VSMDFamily()):
    register(_family)


def get(name: str) -> Family:
    """The family of that name; ValueError naming `family` otherwise."""
    family = FAMILIES.get(name)
    if family is None:
        raise ValueError(f"family: expected one of {', '.join(FAMILIES)}, got {name!r}")
    return family


def family_of(meta: Mapping[str, Any]) -> Family:
    """The family of a stored model's meta or header (`family`, absent in core checkpoints)."""
    return get(meta.get("family") or "core")


def family_of_process(process) -> Family:
    """The family whose forward path `process` is, asking the newest family first and the core family (whose
    solvers take any schedule, and None for the Karras grid) last."""
    return next(family for family in reversed(FAMILIES.values()) if family.owns(process))


def options() -> dict[str, tuple[Option, Family]]:
    """Every family option by name, with the first family that declares it (the command line's group)."""
    out: dict[str, tuple[Option, Family]] = {}
    for family in FAMILIES.values():
        for option in family.options:
            out.setdefault(option.name, (option, family))
    return out


def where_option_applies(name: str, make_config) -> list[str]:
    """The families (and variants) that take option `name`, in the command line's words: `vsmd` when every
    variant does, `core --stage iso/aniso` when some do. `make_config(family, variant)` gives a config of that
    family with its variant option set (`training.config` passes its parser's defaults)."""
    out = []
    for family in FAMILIES.values():
        if name == family.variant:
            out.append(family.name)
            continue
        takes = [v for v in family.variants() if name in family.option_defaults(make_config(family, v))]
        if takes and len(takes) == len(family.variants()):
            out.append(family.name)
        elif takes:
            out.append(f"{family.name} --{family.variant.replace('_', '-')} {'/'.join(takes)}")
    return out


def run_sampler(model, process, plan: Sampler, seeds: Sequence[int], labels: Tensor | None = None, *,
                fitted: Mapping[int, Sequence[float]] | None = None, device="cpu",
                progress: bool = False, callback=None) -> tuple[Tensor, Tensor | None, dict]:
    """One sample per seed from a model of any family with its forward path (`models.load_trained`'s pair) and a
    resolved sampler, checked against the family's samplers. `fitted`: the model's fitted grids for grid
    'optimized' (`models.fitted_grids`). `callback`: called after each solver step with a dict, for a family whose
    `run_sampler` takes one. Per-seed deterministic. Returns (x, labels, info with the NFE spent)."""
    if not isinstance(plan, Sampler):
        raise ValueError(f"plan: expected a sampling.Sampler (sampling.resolve_sampler), got {type(plan).__name__}")
    family = family_of_process(process)
    family.check_sampler(plan)
    extra = {}
    if callback is not None:
        if "callback" not in inspect.signature(family.run_sampler).parameters:
            raise ValueError(f"callback: the {family.name} family's samplers report no steps; pass callback=None")
        extra["callback"] = callback
    return family.run_sampler(model, process, plan, seeds, labels, fitted=fitted, device=device, progress=progress,
                              **extra)
