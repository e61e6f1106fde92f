"""Fast low-NFE generation: `python -m aniso_fast.sample`.

With no arguments: 64 samples at NFE 9 with the best measured (model, solver, grid) for that NFE, recorded from
the results table (`python -m aniso_fast.evaluate table --set-default`), written as a PNG grid whose path is
printed. For an NFE the table did not measure, the nearest recorded choice that runs there as it was measured
(never midpoint Heun at an even NFE, a fitted grid the model lacks, or Euler-Maruyama); where none does, the
default model (`python -m aniso_fast.models list`) with its family's sampler where that runs as designed (the
paper's midpoint Heun at an odd NFE), else with DPM-Solver++(2M) on the log-SNR grid (`sampling.spec.choose_for_nfe`);
below NFE 3 none does, and --solver must be given. When --model or a sampler option (--solver, --grid, --secondary, --order) is
given, the explicit options win: the recorded or default model, and its family's sampler, fill in the rest.
A model of a process family (vsdm, vsmd: named in its manifest entry or file header) samples on its own forward
path (no --schedule) with the samplers its family takes (`Family.check_sampler`; e.g. --solver em); a vsmd
model's default is the phase-space DPM-Solver++(2M) on the logsnr grid (`Family.default_sampler`).
Every option is checked before any work; an existing output file is replaced only with --force.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .processes import registry
from . import store
from .utils.atomic import atomic_write, check_writable_folder
from .utils.devices import resolve_device
from .utils.cli import Parser
from .utils.data import to_uint8
from .utils.figures import save_image_grid
from .sampling.grids import GRIDS, SECONDARIES, fitted_levels
from .sampling.noise import check_seeds
from .sampling import spec
from .sampling.spec import EM, SOLVERS

__all__ = ["main", "build_parser", "parse_seeds", "nfe_choice", "MAX_SAMPLES"]

MAX_SAMPLES = 1_000_000  # samples (and samples per batch) of one run: a typo must not allocate hundreds of GB
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
    try:
        return check_seeds([s for lo, hi in ranges for s in range(lo, hi + 1)])
    except ValueError as e:
        raise ValueError(f"--{e}") from None


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Show a default only where there is one (None defaults are explained in the help text); the description
    and the per-NFE defaults keep their line breaks."""

    def _get_help_string(self, action):
        return action.help if action.default in (None, False) else super()._get_help_string(action)


def _describe(choice: dict) -> str:
    order = f" order {choice['order']}" if choice.get("order") is not None else ""
    secondary = f" ({choice['secondary']} point)" if choice.get("secondary") else ""
    fd = f", FD {choice['fd']:.2f}" if isinstance(choice.get("fd"), (int, float)) else ""
    return f"{choice['model']}, {choice['solver']}{order}{secondary} on {choice['grid']}{fd}"


def _defaults_epilog() -> str:
    """The recorded choice per NFE, as --help shows it."""
    try:
        recorded = store.sampler_defaults()
    except ValueError as e:
        return f"Per-NFE defaults: unreadable ({e})."
    if not recorded:
        return (f"Per-NFE defaults: none recorded; the default model ({store.default_model()}) with its family's "
                f"sampler where it runs as designed (midpoint Heun at an odd NFE), else DPM-Solver++(2M) on the log-SNR "
                f"grid.")
    return ("Per-NFE defaults (from the results table; for another --nfe, the nearest recorded choice that runs there "
            "as it was measured, e.g. no midpoint Heun at an even NFE, else the default model with its family's "
            "sampler where it runs as designed, else DPM-Solver++(2M) on the log-SNR grid):\n"
            + "\n".join(f"  NFE {nfe}: {_describe(choice)}" for nfe, choice in recorded.items()))


def _admits(choice: dict, plan) -> bool:
    """A per-NFE candidate is a model that exists, with a sampler its family takes."""
    if choice["model"] not in store.MODELS:
        return False  # a recorded model that is no longer shipped
    try:
        registry.get(store.model_family(choice["model"])).check_sampler(plan)
    except ValueError:
        return False
    return True


def nfe_choice(nfe: int) -> dict | None:
    """The (model, solver, grid, secondary, order) to sample with at `nfe` when no model or sampler option is given:
    the recorded choices, else the default model with its family's sampler, else `spec.FALLBACK_SAMPLERS`
    (`spec.choose_for_nfe` decides)."""
    return spec.choose_for_nfe(store.sampler_defaults(), nfe, fitted_steps=store.fitted_grids,
                               fallbacks=_fallbacks(), admits=_admits)


def _fallbacks() -> list[dict]:
    """The default model with its family's default sampler, then with each of `spec.FALLBACK_SAMPLERS`."""
    default = store.default_model()
    solver, grid = registry.get(store.model_family(default)).default_sampler()
    return [{"model": default, "solver": s, "grid": g}
            for s, g in [(solver, grid), *((c["solver"], c["grid"]) for c in spec.FALLBACK_SAMPLERS)]]


def _apply_defaults(args) -> None:
    """Fill --model, --solver, --grid (and secondary, order) from the choice for --nfe (`nfe_choice`) where the user
    gave none of them; explicit options always win."""
    sampler_given = any(getattr(args, k) is not None for k in ("solver", "grid", "secondary", "order"))
    choice = nfe_choice(args.nfe)
    if choice is None and args.model is None and not sampler_given and 1 <= args.nfe <= spec.MAX_NFE:
        raise ValueError(f"--nfe: no recorded or default sampler runs at NFE {args.nfe} as it was measured (the "
                         f"defaults need at least {min(spec.SOLVERS[c['solver']].min_nfe() for c in _fallbacks())} "
                         f"network calls); give --solver, e.g. euler (any NFE)")
    if choice is not None and args.model is None and not sampler_given:
        args.model, args.solver, args.grid = choice["model"], choice["solver"], choice["grid"]
        args.secondary, args.order = choice.get("secondary"), choice.get("order")
        return
    args.model = args.model or (choice["model"] if choice is not None else store.default_model())
    # --solver / --grid left unset are the model family's defaults (`Family.default_sampler`, in _validate)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m aniso_fast.sample", description=__doc__, epilog=_defaults_epilog(),
                formatter_class=_HelpFormatter)
    p.add_argument("--model", default=None,
                   help="an embedded or shipped model name (`python -m aniso_fast.models list`; default: the "
                        "recorded model for the NFE, else the manifest's default model), or a .safetensors file: a "
                        "training checkpoint or a shipped model's file")
    p.add_argument("--schedule", default=None,
                   help=f"schedule name ({', '.join(store.SCHEDULES)}); default: 'learned' for a shipped model "
                        f"or a .safetensors file, '{store.DEFAULT_SCHEDULE}' for an embedded model; not for a "
                        f"vsdm or vsmd model (its forward path is its own)")
    p.add_argument("--solver", default=None, choices=SOLVERS,
                   help="default: the recorded solver for the NFE (see below), else heun (dpmpp-2m for a vsmd model). "
                        "em: Euler-Maruyama on the reverse SDE (NFE = steps). A vsdm model takes em on uniform_t or "
                        "any ODE solver off the karras grid; a vsmd model em, heun (end point) or ipndm on "
                        "uniform_t, or dpmpp-2m (the phase-space exponential integrator, denoiser head) on "
                        "uniform_t, logsnr or edm_sigma")
    p.add_argument("--grid", default=None, choices=GRIDS,
                   help="default: the recorded grid for the NFE, else uniform_t (logsnr for a vsmd model's "
                        "dpmpp-2m). uniform_t: the paper's uniform t grid; edm_sigma: EDM's sigma grid on the "
                        "geometric mean; "
                        "karras: the isotropic EDM baseline (ignores the schedule); logsnr: the geometric-mean "
                        "sigma uniform in log sigma (DPM-Solver's grid); optimized: the grid fitted to a shipped "
                        "core model's own trajectories for the step count (python -m aniso_fast.evaluate fit-grid)")
    p.add_argument("--secondary", default=None, choices=SECONDARIES,
                   help="Heun's secondary point (default: mid on uniform_t, end otherwise)")
    p.add_argument("--nfe", type=int, default=9, help="network calls per sample")
    p.add_argument("--order", type=int, default=None,
                   help="order of a multistep solver (default: " + ", ".join(
                       f"{s.default_order} for {s.name}" for s in SOLVERS.values() if s.orders) + ")")
    p.add_argument("--seeds", default=None,
                   help=f"seeds, e.g. '0-63' or '1,5,9', each below 2**32, at most {MAX_SAMPLES:,} "
                        f"(default: 0..count-1)")
    p.add_argument("--count", type=int, default=None,
                   help=f"number of samples when --seeds is not given (default: 64; at most {MAX_SAMPLES:,})")
    p.add_argument("--classes", default=None,
                   help="class labels, e.g. '3' or '0,1,2' (cycled over the samples); default: drawn per seed")
    p.add_argument("--batch", type=int, default=256, help=f"samples per solver batch (at most {MAX_SAMPLES:,})")
    p.add_argument("--outdir", default="samples", help="output directory")
    p.add_argument("--format", default="png", choices=("png", "npz"),
                   help="png: a grid (plus --individual images); npz: uint8 images and labels")
    p.add_argument("--individual", action="store_true", help="also write one PNG per sample (png format only)")
    p.add_argument("--force", action="store_true", help="replace existing output files (default: refuse)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


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


def _output_paths(args, outdir: Path, stem: str, seeds: list[int]) -> list[Path]:
    """Every file the run writes, the main one first; refused if one is a directory, or exists without --force."""
    if args.format == "npz":
        paths = [outdir / f"{stem}.npz"]
    else:
        paths = [outdir / f"{stem}.png"]
        if args.individual:
            paths += [outdir / f"{stem}_seed{seed:06d}.png" for seed in seeds]
    for path in paths:
        if path.is_dir():
            raise ValueError(f"--outdir: the output {path} is a directory")
        if path.exists() and not args.force:
            raise ValueError(f"--outdir: the output {path} exists; add --force to replace it")
    return paths


def _validate(args):
    """Every check that can fail without the model runs before any sampling work (and before loading it)."""
    store.check_assets()
    _apply_defaults(args)
    _check_model(args.model)
    try:
        stored = store.StoredModel.open(args.model)  # its header and the manifest, read once
    except (ValueError, OSError) as e:  # StoredFileError is a ValueError
        raise ValueError(f"--model {args.model}: {e}") from None
    family, learned = stored.family, stored.has_learned_schedule  # learned: a shipped model or a .safetensors file
    if not registry.get(family).matrix_schedule and args.schedule is not None:
        raise ValueError(f"--schedule: {args.model} is a {family} model, sampled on its own forward path; "
                         f"drop --schedule")
    if args.schedule is None:
        args.schedule = "learned" if learned else store.DEFAULT_SCHEDULE
    if args.schedule not in store.SCHEDULES:
        raise ValueError(f"--schedule: unknown schedule {args.schedule!r}; available: {', '.join(store.SCHEDULES)}")
    if args.schedule == "learned" and not learned:
        raise ValueError("--schedule: 'learned' needs --model to be a shipped trained model or a .safetensors file")
    args.solver, args.grid = registry.get(family).default_sampler(args.solver, args.grid)
    fitted = stored.fitted_grids  # {} for a model without fitted grids (embedded, a file)
    try:
        plan = registry.get(family).resolve_sampler(args.solver, args.grid, args.secondary, args.nfe, args.order)
        if plan.grid == "optimized":
            fitted_levels(fitted, plan.steps)
    except ValueError as e:
        raise ValueError(f"--{e}") from None
    if args.seeds is not None and args.count is not None:
        raise ValueError("--count: give --seeds or --count, not both")
    count = 64 if args.count is None else args.count
    if not 1 <= count <= MAX_SAMPLES:
        raise ValueError(f"--count: expected 1..{MAX_SAMPLES:,}, got {count}")
    if not 1 <= args.batch <= MAX_SAMPLES:
        raise ValueError(f"--batch: expected 1..{MAX_SAMPLES:,}, got {args.batch}")
    if args.individual and args.format != "png":
        raise ValueError(f"--individual: writes PNG files, not with --format {args.format}")
    seeds = parse_seeds(args.seeds) if args.seeds is not None else list(range(count))
    classes = None
    if args.classes is not None:
        try:
            classes = [int(c) for c in args.classes.split(",") if c.strip()]
        except ValueError:
            raise ValueError(f"--classes: expected integers like '0,3', got {args.classes!r}") from None
        if not classes:
            raise ValueError("--classes: expected at least one class")
    args.device = resolve_device(args.device, "--device")
    name = args.model if args.model in store.MODELS else Path(args.model).stem
    variant = plan.secondary or plan.order or ("sde" if plan.solver == EM else "euler")
    stem = f"{name}_{args.schedule}_{plan.solver}-{variant}_{plan.grid}_nfe{plan.nfe}"
    outdir = Path(args.outdir)
    try:
        check_writable_folder(outdir)
    except ValueError as e:
        raise ValueError(f"--outdir: {e}") from None
    return plan, stored, seeds, classes, _output_paths(args, outdir, stem, seeds)


def _load(args, stored: store.StoredModel):
    """(model, forward path) on the device: a MatrixSchedule for the core family, the model's own process for the
    others; a missing or corrupt model file (NaN weights included) is an error naming --model."""
    try:
        model, schedule = stored.load(args.device, args.schedule)
    except (ValueError, OSError) as e:  # StoredFileError is a ValueError
        raise ValueError(f"--model {args.model}: {e}") from None
    try:
        registry.family_of_process(schedule).check_grid(args.grid, schedule)
    except ValueError as e:
        raise ValueError(f"--{e}") from None
    return model, schedule.to(args.device)


def run(args) -> Path:
    plan, stored, seeds, classes, paths = _validate(args)
    fitted = stored.fitted_grids
    model, schedule = _load(args, stored)
    num_classes = model.num_classes
    labels = None
    if classes is not None:
        if not num_classes:
            raise ValueError(f"--classes: model {args.model!r} is unconditional")
        bad = [c for c in classes if not 0 <= c < num_classes]
        if bad:
            raise ValueError(f"--classes: {bad} outside the model's classes 0..{num_classes - 1}")
        labels = torch.tensor([classes[i % len(classes)] for i in range(len(seeds))])
    t0 = time.perf_counter()
    outs, labs = [], []
    for i in range(0, len(seeds), args.batch):
        x, lab, _ = registry.run_sampler(model, schedule, plan, seeds[i:i + args.batch],
                                    None if labels is None else labels[i:i + args.batch], fitted=fitted,
                                    device=args.device, progress=not args.no_progress)
        outs.append(to_uint8(x.cpu()))
        labs.append(lab.cpu() if lab is not None else None)
    seconds = time.perf_counter() - t0
    images = torch.cat(outs).numpy()
    path = paths[0]
    arrays = {"images": images, "seeds": np.array(seeds)}
    if labs[0] is not None:
        arrays["labels"] = torch.cat(labs).numpy()

    def write_npz(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append '.npz' to the temporary name
            np.savez(f, **arrays)

    try:  # without --force, created exclusively: a file another run wrote meanwhile is never replaced
        if args.format == "npz":
            atomic_write(path, write_npz, replace=args.force)
        else:
            save_image_grid(images, path, replace=args.force)
            for img, individual in zip(images, paths[1:]):
                save_image_grid(img[None], individual, replace=args.force)
    except FileExistsError as e:
        raise ValueError(f"--outdir: {e}; add --force to replace it") from None
    print(f"{len(seeds)} samples, NFE {plan.nfe} ({plan.solver}, {plan.grid} grid), "
          f"{seconds:.2f} s -> {path}", file=sys.stderr)
    print(path)
    return path


def main(argv=None) -> int:
    try:
        run(build_parser().parse_args(argv))
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
