"""The Python API: `aniso_fast.load()` -> a `Pipeline` whose `.sample()` follows the `sample` CLI's rules.

    import aniso_fast
    pipe = aniso_fast.load()                 # the model follows the per-NFE choice, as `sample` with no --model
    out = pipe.sample(16, nfe=9)             # images [16, 1, 28, 28] in [-1, 1], labels, seeds, info
    out = pipe.sample(16, nfe=9, precision="fp32", compile=True)   # how the network runs (networks.execution)

The per-NFE defaults (`nfe_choice`: the recorded (model, solver, grid) per NFE, `sampling.spec.choose_for_nfe`),
the model's fitted grids and every check live here once; `aniso_fast.sample` (the CLI) parses, calls them and
writes files. Errors name the CLI option they check ('--nfe: ...'), whose word is the keyword argument's.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor

from . import store
from .processes import registry
from .sampling import spec
from .sampling.grids import fitted_levels, learned_levels
from .sampling.noise import check_seeds
from .networks.execution import DEFAULT_PRECISION, Execution, execute, network_of, resolve_execution
from .sampling.spec import Sampler
from .training.distributed import Dist
from .utils.data import to_uint8
from .utils.devices import resolve_device

__all__ = ["load", "Pipeline", "Plan", "Samples", "nfe_choice", "plan_sampling", "parse_seeds", "parse_classes",
           "MAX_SAMPLES", "DEFAULT_BATCH", "OUTPUTS"]

MAX_SAMPLES = 1_000_000  # samples (and samples per batch) of one run: a typo must not allocate hundreds of GB
DEFAULT_BATCH = 256  # samples per solver batch of `sample --batch` and `Pipeline.sample`/`run` (bench/RESULTS.md,
                     # "Throughput": the network forward per batch size)
OUTPUTS = ("float", "uint8")
_SEED_PART = re.compile(r"(\d+)(?:-(\d+))?")


def parse_seeds(text: str) -> list[int]:
    """'0-63' or '1,5,9' or '0-3,10' -> list of seeds (at most MAX_SAMPLES, each a valid generator seed)."""
    ranges = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        m = _SEED_PART.fullmatch(part)
        if not m:
            raise ValueError(f"--seeds: expected non-negative integers and ranges like '0-63' or '1,5,9', "
                             f"got {text!r}")
        lo, hi = int(m[1]), int(m[2] or m[1])
        if hi < lo:
            raise ValueError(f"--seeds: the range {part!r} is empty (expected low-high with low <= high)")
        ranges.append((lo, hi))
    if not ranges:
        raise ValueError(f"--seeds: expected at least one seed, got {text!r}")
    total = sum(hi - lo + 1 for lo, hi in ranges)
    if total > MAX_SAMPLES:
        raise ValueError(f"--seeds: expected at most {MAX_SAMPLES:,} samples, got {total:,}")
    return _checked_seeds([s for lo, hi in ranges for s in range(lo, hi + 1)])


def _checked_seeds(seeds: Sequence[int]) -> list[int]:
    try:
        return check_seeds(seeds)
    except ValueError as e:
        raise ValueError(f"--{e}") from None


def resolve_seeds(n_or_seeds: int | Sequence[int]) -> list[int]:
    """A count n -> seeds 0..n-1; a sequence of seeds -> itself, checked."""
    if isinstance(n_or_seeds, bool) or not isinstance(n_or_seeds, (int, Sequence, range)) \
            or isinstance(n_or_seeds, str):
        raise ValueError(f"--count: expected a number of samples or a sequence of seeds, got {n_or_seeds!r}")
    if isinstance(n_or_seeds, int):
        if not 1 <= n_or_seeds <= MAX_SAMPLES:
            raise ValueError(f"--count: expected 1..{MAX_SAMPLES:,}, got {n_or_seeds}")
        return list(range(n_or_seeds))
    if not 1 <= len(n_or_seeds) <= MAX_SAMPLES:
        raise ValueError(f"--seeds: expected 1..{MAX_SAMPLES:,} seeds, got {len(n_or_seeds):,}")
    return _checked_seeds(list(n_or_seeds))


def parse_classes(classes: str | int | Sequence[int] | None) -> list[int] | None:
    """'3' or '0,1,2' (or an int, or a sequence of ints) -> class labels cycled over the samples; None: per seed."""
    if classes is None:
        return None
    if isinstance(classes, str):
        try:
            classes = [int(c) for c in classes.split(",") if c.strip()]
        except ValueError:
            raise ValueError(f"--classes: expected integers like '0,3', got {classes!r}") from None
    elif isinstance(classes, int) and not isinstance(classes, bool):
        classes = [classes]
    elif not (isinstance(classes, Sequence) and all(isinstance(c, int) and not isinstance(c, bool) for c in classes)):
        raise ValueError(f"--classes: expected integers like [0, 3], got {classes!r}")
    if not classes:
        raise ValueError("--classes: expected at least one class")
    return list(classes)


def _admits(choice: dict, plan) -> bool:
    """A per-NFE candidate is a model that exists, with a sampler its family takes."""
    if choice["model"] not in store.MODELS:
        return False  # a recorded model that is no longer shipped
    try:
        registry.get(store.model_family(choice["model"])).check_sampler(plan)
    except ValueError:
        return False
    return True


def _fallbacks() -> list[dict]:
    """The default model with its family's default sampler, then with each of `spec.FALLBACK_SAMPLERS`."""
    default = store.default_model()
    solver, grid = registry.get(store.model_family(default)).default_sampler()
    return [{"model": default, "solver": s, "grid": g}
            for s, g in [(solver, grid), *((c["solver"], c["grid"]) for c in spec.FALLBACK_SAMPLERS)]]


def nfe_choice(nfe: int) -> dict | None:
    """The (model, solver, grid, secondary, order) to sample with at `nfe` when no model or sampler option is given:
    the recorded choices, else the default model with its family's sampler, else `spec.FALLBACK_SAMPLERS`
    (`spec.choose_for_nfe` decides)."""
    return spec.choose_for_nfe(store.sampler_defaults(), nfe, fitted_steps=store.fitted_grids,
                               fallbacks=_fallbacks(), admits=_admits)


def _check_model(name: str) -> None:
    if name in store.MODELS:
        return
    if Path(name).is_dir():
        raise ValueError(f"--model: {name} is a directory; expected a model name ({', '.join(store.MODELS)}) or "
                         f"a .safetensors file (a training checkpoint or a shipped model's file)")
    if store.is_model_file(name):
        if not Path(name).is_file():
            raise ValueError(f"--model: no such file {name}")
        return
    raise ValueError(f"--model: unknown model {name!r}; expected a model name ({', '.join(store.MODELS)}) or a "
                     f".safetensors file (a training checkpoint or a shipped model's file)")


@dataclass(frozen=True)
class Plan:
    """What one sampling run uses: the model (name or file), its stored handle, the schedule name ('learned',
    a built-in one, or None for a family sampled on its own forward path) and the resolved sampler."""
    model: str
    stored: store.StoredModel
    schedule: str | None
    sampler: Sampler


def plan_sampling(model: str | None = None, *, nfe: int = 9, solver: str | None = None, grid: str | None = None,
                  secondary: str | None = None, order: int | None = None, schedule: str | None = None) -> Plan:
    """The per-NFE defaults filled where no model or sampler option is given (explicit options win; the model's
    family fills the rest), then every check that needs no tensor: model, schedule, sampler, fitted grid."""
    store.check_assets()
    sampler_given = any(v is not None for v in (solver, grid, secondary, order))
    choice = nfe_choice(nfe)
    if choice is None and model is None and not sampler_given and 1 <= nfe <= spec.MAX_NFE:
        raise ValueError(f"--nfe: no recorded or default sampler runs at NFE {nfe} as it was measured (the "
                         f"defaults need at least {min(spec.SOLVERS[c['solver']].min_nfe() for c in _fallbacks())} "
                         f"network calls); give --solver, e.g. euler (any NFE)")
    if choice is not None and model is None and not sampler_given:
        model, solver, grid = choice["model"], choice["solver"], choice["grid"]
        secondary, order = choice.get("secondary"), choice.get("order")
    model = model or (choice["model"] if choice is not None else store.default_model())
    _check_model(model)
    try:
        stored = store.StoredModel.open(model)  # its header and the manifest, read once
    except (ValueError, OSError) as e:  # StoredFileError is a ValueError
        raise ValueError(f"--model {model}: {e}") from None
    family, learned = registry.get(stored.family), stored.has_learned_schedule  # learned: shipped or a file
    if not family.matrix_schedule and schedule is not None:
        raise ValueError(f"--schedule: {model} is a {stored.family} model, sampled on its own forward path; "
                         f"drop --schedule")
    if schedule is None:
        schedule = "learned" if learned else store.DEFAULT_SCHEDULE
    if schedule not in store.SCHEDULES:
        raise ValueError(f"--schedule: unknown schedule {schedule!r}; available: {', '.join(store.SCHEDULES)}")
    if schedule == "learned" and not learned:
        raise ValueError("--schedule: 'learned' needs --model to be a shipped trained model or a .safetensors file")
    solver, grid = family.default_sampler(solver, grid)
    try:
        sampler = family.resolve_sampler(solver, grid, secondary, nfe, order)
        if sampler.grid == "optimized":
            fitted_levels(stored.fitted_grids, sampler.steps)
        if sampler.grid == "learned":
            key = spec.learned_key(sampler.solver, sampler.order, sampler.secondary)
            learned_levels(stored.fitted_grids, key, sampler.steps)
    except ValueError as e:
        raise ValueError(f"--{e}") from None
    return Plan(model, stored, schedule, sampler)


@dataclass(frozen=True)
class Samples:
    """images [N, C, H, W] on the CPU (float32 in [-1, 1], or uint8), labels [N] or None, the seeds, and info
    (nfe, solver, grid, secondary, order, model, schedule, precision, compile, memory_format, seconds; the three
    execution entries are None for a model without a network, the exact mixture)."""
    images: Tensor
    labels: Tensor | None
    seeds: list[int]
    info: dict


class Pipeline:
    """A model (or, with none named, the per-NFE choice) on a device, sampled with the CLI's rules. Models are
    loaded once and kept. precision ('auto', 'fp32', 'bf16', 'fp16'), compile (False, True or a torch.compile
    mode) and memory_format ('auto', 'contiguous', 'channels_last'): how the network runs, unless a `sample` call
    says otherwise (the rules: `networks.execution`)."""

    def __init__(self, name_or_path: str | Path | None = None, device: str | torch.device = "auto", *,
                 precision: str = DEFAULT_PRECISION, compile: bool | str = False, memory_format: str = "auto"):
        store.check_assets()
        self.model = None if name_or_path is None else str(name_or_path)
        if self.model is not None:
            _check_model(self.model)
        self.device = resolve_device(str(device), "--device")
        self.execution = resolve_execution(self.device, precision, compile, memory_format)
        self._loaded: dict[tuple[str, str | None], tuple] = {}

    def __repr__(self) -> str:
        return (f"Pipeline(model={self.model or 'per-NFE choice'!s}, device={self.device}, "
                f"precision={self.execution.precision})")

    def execution_for(self, precision: str | None = None, compile: bool | str | None = None,
                      memory_format: str | None = None) -> Execution:
        """The pipeline's execution policy with the given options replaced (None: the pipeline's)."""
        ex = self.execution
        if precision is None and compile is None and memory_format is None:
            return ex
        return resolve_execution(self.device, ex.precision if precision is None else precision,
                                 (ex.compile or False) if compile is None else compile,
                                 ex.memory_format if memory_format is None else memory_format)

    def plan(self, nfe: int = 9, **sampler) -> Plan:
        """The run `sample(nfe=..., **sampler)` would make (solver, grid, secondary, order, schedule)."""
        return plan_sampling(self.model, nfe=nfe, **sampler)

    def load(self, plan: Plan):
        """(network, forward path) for a plan, on the device; a corrupt file is an error naming --model."""
        key = (plan.model, plan.schedule)
        if key not in self._loaded:
            try:
                model, process = plan.stored.load(self.device, plan.schedule)
            except (ValueError, OSError) as e:  # StoredFileError is a ValueError
                raise ValueError(f"--model {plan.model}: {e}") from None
            try:
                registry.family_of_process(process).check_grid(plan.sampler.grid, process)
            except ValueError as e:
                raise ValueError(f"--{e}") from None
            self._loaded[key] = (model, process.to(self.device))
        return self._loaded[key]

    def sample(self, n_or_seeds: int | Sequence[int] = 64, *, nfe: int = 9, classes=None, solver: str | None = None,
               grid: str | None = None, secondary: str | None = None, order: int | None = None,
               schedule: str | None = None, batch: int = DEFAULT_BATCH, callback: Callable[[dict], None] | None = None,
               progress: bool = False, output: str = "float", precision: str | None = None,
               compile: bool | str | None = None, memory_format: str | None = None) -> Samples:
        """One sample per seed (n: seeds 0..n-1), per-seed deterministic (the same images as the CLI for the same
        seeds and precision). classes: a label or labels cycled over the samples (default: drawn per seed).
        callback: called after every solver step with a dict (i, x, ...). output: 'float' ([-1, 1], float32) or
        'uint8'. precision, compile, memory_format: as the pipeline's (None: the pipeline's own)."""
        if output not in OUTPUTS:
            raise ValueError(f"--output: expected one of {', '.join(OUTPUTS)}, got {output!r}")
        execution = self.execution_for(precision, compile, memory_format)
        plan = self.plan(nfe, solver=solver, grid=grid, secondary=secondary, order=order, schedule=schedule)
        return self.run(plan, resolve_seeds(n_or_seeds), parse_classes(classes), batch=batch, callback=callback,
                        progress=progress, output=output, execution=execution)

    def run(self, plan: Plan, seeds: list[int], classes: list[int] | None, *, batch: int = DEFAULT_BATCH,
            callback: Callable[[dict], None] | None = None, progress: bool = False, output: str = "float",
            dist: Dist | None = None, execution: Execution | None = None) -> Samples | None:
        """Sample a checked plan in batches of `batch` seeds, the network run under `execution` (default: the
        pipeline's policy). `dist` (`training.distributed.init()` under torchrun): this rank samples its whole
        batches of the single-process run (`Dist.batch_slices`) and rank 0 returns all the samples, byte-identical
        to one process with the same batch (and device type, thread count and policy); the other ranks return
        None."""
        if isinstance(batch, bool) or not isinstance(batch, int) or not 1 <= batch <= MAX_SAMPLES:
            raise ValueError(f"--batch: expected 1..{MAX_SAMPLES:,}, got {batch!r}")
        execution = self.execution if execution is None else execution
        model, process = self.load(plan)
        execute(model, execution)
        labels = None
        if classes is not None:
            if not model.num_classes:
                raise ValueError(f"--classes: model {plan.model!r} is unconditional")
            bad = [c for c in classes if not 0 <= c < model.num_classes]
            if bad:
                raise ValueError(f"--classes: {bad} outside the model's classes 0..{model.num_classes - 1}")
            labels = torch.tensor([classes[i % len(classes)] for i in range(len(seeds))])
        t0 = time.perf_counter()
        dist = dist or Dist()
        outs = []
        for part in dist.batch_slices(len(seeds), batch):
            x, lab, _ = registry.run_sampler(model, process, plan.sampler, seeds[part],
                                             None if labels is None else labels[part],
                                             fitted=plan.stored.fitted_grids, device=self.device, progress=progress,
                                             callback=callback)
            x = x.cpu()
            outs.append((to_uint8(x) if output == "uint8" else x.float().clamp(-1, 1),
                         lab.cpu() if lab is not None else None))
        outs = dist.gather_batches(outs)
        if outs is None:
            return None
        outs, labs = zip(*outs)
        s = plan.sampler
        ran = execution.info() if network_of(model) is not None else dict.fromkeys(execution.info())
        info = {"nfe": s.nfe, "solver": s.solver, "grid": s.grid, "secondary": s.secondary, "order": s.order,
                "model": plan.model, "schedule": plan.schedule, **ran, "seconds": time.perf_counter() - t0}
        return Samples(torch.cat(outs), torch.cat(labs) if labs[0] is not None else None, list(seeds), info)


def load(name_or_path: str | Path | None = None, device: str | torch.device = "auto", *,
         precision: str = DEFAULT_PRECISION, compile: bool | str = False, memory_format: str = "auto") -> Pipeline:
    """A pipeline over a shipped model's name, a .safetensors file, or (None) the per-NFE choice of the `sample`
    CLI. device: 'auto' (CUDA when available, else CPU), 'cpu', 'cuda' or 'cuda:N'. precision, compile,
    memory_format: how the network runs (`Pipeline`; the rules: `networks.execution`)."""
    return Pipeline(name_or_path, device, precision=precision, compile=compile, memory_format=memory_format)
