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
Under torchrun (`torchrun --nproc_per_node N -m aniso_fast.sample ...`) every process checks the options, takes
whole batches of the single-process run (batch i on rank i mod N) and rank 0 writes the one output: the same bytes
as one process with the same --batch, device type and thread count (torchrun sets OMP_NUM_THREADS=1).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

from . import store
from .networks import execution
from .pipeline import DEFAULT_BATCH, MAX_SAMPLES, Pipeline, nfe_choice, parse_classes, parse_seeds, plan_sampling
from .sampling.grids import GRIDS, SECONDARIES
from .sampling.spec import EM, SOLVERS
from .training import distributed
from .utils.atomic import atomic_folder, atomic_write, check_writable_file, check_writable_folder
from .utils.cli import Parser
from .utils.figures import save_image_grid

__all__ = ["main", "build_parser", "parse_seeds", "nfe_choice", "MAX_SAMPLES"]


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
                        "core model's own trajectories for the step count (python -m aniso_fast.evaluate fit-grid); "
                        "learned: the grid learned for the solver and NFE (python -m aniso_fast.evaluate learn-grid)")
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
    p.add_argument("--batch", type=int, default=DEFAULT_BATCH,
                   help=f"samples per solver batch (at most {MAX_SAMPLES:,})")
    p.add_argument("--outdir", default=None,
                   help="output directory (default: samples); the file name carries the model, sampler, NFE, seeds "
                        "and classes")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="the output file instead (.png or .npz, as --format; --individual images beside it), or "
                        "the folder with --format folder")
    p.add_argument("--format", default="png", choices=("png", "npz", "folder"),
                   help="png: a grid (plus --individual images); npz: uint8 images, seeds and labels; folder: one "
                        "PNG per sample (seedNNNNNN.png) and EDM's dataset.json of labels, the input of clean-fid, "
                        "torch-fidelity, EDM's fid.py and `evaluate fd`")
    p.add_argument("--layout", default="nchw", choices=("nchw", "nhwc"),
                   help="npz image layout: nchw (PyTorch) or nhwc (clean-fid, torch-fidelity, EDM's fid.py)")
    p.add_argument("--individual", action="store_true", help="also write one PNG per sample (png format only)")
    p.add_argument("--force", action="store_true", help="replace existing output files (default: refuse)")
    p.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda or cuda:N")
    execution.add_options(p)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def _ranges(values: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2+5' (runs of consecutive values)."""
    parts, lo = [], 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[i - 1] + 1:
            parts.append(f"{values[lo]}" if lo == i - 1 else f"{values[lo]}-{values[i - 1]}")
            lo = i
    return "+".join(parts)


def output_stem(plan, seeds: list[int], classes: list[int] | None) -> str:
    """The file name of a run without its suffix: model, schedule, sampler, grid, NFE, seeds (and classes), so runs
    with other counts, seeds or classes never share a name; a long seed list is named by its count and hash."""
    name = plan.model if plan.model in store.MODELS else Path(plan.model).stem
    s = plan.sampler
    variant = s.secondary or s.order or ("sde" if s.solver == EM else "euler")
    tag = f"seeds{_ranges(seeds)}"
    if len(tag) > 40:
        tag = f"seeds{len(seeds)}-{hashlib.sha1(repr(seeds).encode()).hexdigest()[:8]}"
    if classes is not None:
        tag += f"_classes{'+'.join(map(str, classes))}"[:40]
    return f"{name}_{plan.schedule}_{s.solver}-{variant}_{s.grid}_nfe{s.nfe}_{tag}"


def _output_paths(args, main_path: Path, seeds: list[int]) -> list[Path]:
    """Every file the run writes, the main one first; refused if one is a directory, or exists without --force."""
    option = "--out" if args.out is not None else "--outdir"
    paths = [main_path]
    if args.format == "folder":
        if main_path.exists() and not (main_path.is_dir() and args.force):
            raise ValueError(f"{option}: the output {main_path} exists" + ("; add --force to replace it"
                                                                           if main_path.is_dir() else ""))
        return paths
    if args.individual:
        paths += [main_path.with_name(f"{main_path.stem}_seed{seed:06d}.png") for seed in seeds]
    for path in paths:
        if path.is_dir():
            raise ValueError(f"{option}: the output {path} is a directory")
        if path.exists() and not args.force:
            raise ValueError(f"{option}: the output {path} exists; add --force to replace it")
    return paths


def _main_path(args, plan, seeds: list[int], classes: list[int] | None) -> Path:
    suffix = "" if args.format == "folder" else f".{args.format}"
    if args.out is None:
        outdir = Path("samples" if args.outdir is None else args.outdir)
        try:
            check_writable_folder(outdir)
        except ValueError as e:
            raise ValueError(f"--outdir: {e}") from None
        return outdir / f"{output_stem(plan, seeds, classes)}{suffix}"
    if args.outdir is not None:
        raise ValueError("--out: give --out or --outdir, not both")
    out = Path(args.out)
    if args.format == "folder":
        try:
            check_writable_folder(out.parent)
        except ValueError as e:
            raise ValueError(f"--out: {e}") from None
        return out
    if out.suffix != suffix:
        raise ValueError(f"--out: expected a {suffix} file with --format {args.format}, got {args.out}")
    try:
        check_writable_file(out)
    except ValueError as e:
        raise ValueError(f"--out: {e}") from None
    return out


def _validate(args):
    """Every check that can fail without the model runs before any sampling work (and before loading it)."""
    plan = plan_sampling(args.model, nfe=args.nfe, solver=args.solver, grid=args.grid, secondary=args.secondary,
                         order=args.order, schedule=args.schedule)
    if args.seeds is not None and args.count is not None:
        raise ValueError("--count: give --seeds or --count, not both")
    count = 64 if args.count is None else args.count
    if not 1 <= count <= MAX_SAMPLES:
        raise ValueError(f"--count: expected 1..{MAX_SAMPLES:,}, got {count}")
    if not 1 <= args.batch <= MAX_SAMPLES:
        raise ValueError(f"--batch: expected 1..{MAX_SAMPLES:,}, got {args.batch}")
    if args.individual and args.format != "png":
        raise ValueError(f"--individual: writes PNG files, not with --format {args.format}")
    if args.layout != "nchw" and args.format != "npz":
        raise ValueError(f"--layout: applies to --format npz, not --format {args.format}")
    seeds = parse_seeds(args.seeds) if args.seeds is not None else list(range(count))
    classes = parse_classes(args.classes)
    pipeline = Pipeline(plan.model, distributed.local_device(args.device, "--device"),  # cuda:LOCAL_RANK
                        precision=args.precision, compile=args.compile or False, memory_format=args.memory_format)
    return pipeline, plan, seeds, classes, _output_paths(args, _main_path(args, plan, seeds, classes), seeds)


def _write(args, paths: list[Path], out) -> None:
    images = out.images.numpy()
    arrays = {"images": images.transpose(0, 2, 3, 1) if args.layout == "nhwc" else images,
              "seeds": np.array(out.seeds)}
    if out.labels is not None:
        arrays["labels"] = out.labels.numpy()

    def write_npz(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append '.npz' to the temporary name
            np.savez(f, **arrays)

    option = "--out" if args.out is not None else "--outdir"
    try:  # without --force, created exclusively: a file another run wrote meanwhile is never replaced
        if args.format == "folder":
            atomic_folder(paths[0], lambda tmp: write_folder(tmp, out), replace=args.force)
        elif args.format == "npz":
            atomic_write(paths[0], write_npz, replace=args.force)
        else:
            save_image_grid(images, paths[0], replace=args.force)
            for img, individual in zip(images, paths[1:]):
                save_image_grid(img[None], individual, replace=args.force)
    except FileExistsError as e:
        raise ValueError(f"{option}: {e}; add --force to replace it") from None
    except OSError as e:
        raise ValueError(f"{option}: cannot write {paths[0]}: {e.strerror or e}") from None


def write_folder(folder: Path, out) -> None:
    """One PNG per sample, named by its seed, and (for labelled samples) EDM's dataset.json of labels."""
    names = [f"seed{seed:06d}.png" for seed in out.seeds]
    for name, img in zip(names, out.images):
        save_image_grid(img[None], folder / name)
    if out.labels is not None:
        labels = [[name, int(y)] for name, y in zip(names, out.labels)]
        (folder / "dataset.json").write_text(json.dumps({"labels": labels}))


def run(args) -> Path | None:
    """The run's output path (on rank 0; None on the other ranks under torchrun, which write nothing)."""
    pipeline, plan, seeds, classes, paths = _validate(args)  # on every rank, before the process group
    dist = distributed.init(args.device)
    try:
        out = pipeline.run(plan, seeds, classes, batch=args.batch, progress=not args.no_progress and dist.is_main,
                           output="uint8", dist=dist)
    finally:
        distributed.shutdown()
    if out is None:
        return None
    _write(args, paths, out)
    ran = f", {out.info['precision']}" if out.info["precision"] is not None else ""
    print(f"{len(seeds)} samples, NFE {plan.sampler.nfe} ({plan.sampler.solver}, {plan.sampler.grid} grid{ran}), "
          f"{out.info['seconds']:.2f} s -> {paths[0]}", file=sys.stderr)
    print(paths[0])
    return paths[0]


def main(argv=None) -> int:
    try:
        run(build_parser().parse_args(argv))
    except (ValueError, OSError) as e:
        if distributed.env_rank() == 0:  # under torchrun every rank finds the same error: rank 0 reports it
            print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
