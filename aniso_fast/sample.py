"""Fast low-NFE generation: `python -m aniso_fast.sample`.

With no arguments: the embedded default model and schedule, 64 samples at NFE 9 with the paper's solver
(midpoint Heun on the uniform t grid), written as a PNG grid whose path is printed.
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import models
from .atomic import atomic_write
from .data import to_uint8
from .solvers import GRIDS, SOLVERS, sample, steps_for_nfe

__all__ = ["main", "parse_seeds", "save_grid"]


def parse_seeds(text: str) -> list[int]:
    """'0-63' or '1,5,9' or '0-3,10' -> list of ints."""
    seeds: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part[1:]:
                lo, hi = part.split("-", 1) if not part.startswith("-") else (part, "")
                seeds.extend(range(int(lo), int(hi) + 1))
            elif part:
                seeds.append(int(part))
    except ValueError:
        raise ValueError(f"--seeds: expected integers and ranges like '0-63' or '1,5,9', got {text!r}") from None
    if not seeds or any(s < 0 for s in seeds):
        raise ValueError(f"--seeds: expected non-negative seeds, got {text!r}")
    return seeds


def save_grid(images: np.ndarray, path: Path) -> None:
    """uint8 images [B, C, H, W] -> one PNG grid (about square), written atomically."""
    B, C, H, W = images.shape
    cols = math.ceil(math.sqrt(B))
    rows = math.ceil(B / cols)
    canvas = np.zeros((rows * H, cols * W, C), dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        canvas[r * H:(r + 1) * H, c * W:(c + 1) * W] = img.transpose(1, 2, 0)
    pil = Image.fromarray(canvas[..., 0] if C == 1 else canvas)
    atomic_write(path, lambda tmp: pil.save(tmp, format="PNG"))


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show a default only where there is one (None defaults are explained in the help text)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m aniso_fast.sample", description=__doc__,
                                formatter_class=_HelpFormatter)
    p.add_argument("--model", default=models.DEFAULT_MODEL,
                   help=f"embedded model name ({', '.join(models.MODELS)}) or a training checkpoint (*.safetensors)")
    p.add_argument("--schedule", default=None,
                   help=f"schedule name ({', '.join(models.SCHEDULES)}); default: 'learned' for a checkpoint, "
                        f"'{models.DEFAULT_SCHEDULE}' otherwise")
    p.add_argument("--solver", default="heun", choices=SOLVERS)
    p.add_argument("--grid", default="uniform_t", choices=GRIDS,
                   help="uniform_t: the paper's uniform t grid; edm_sigma: EDM's sigma grid on the geometric mean; "
                        "karras: the isotropic EDM baseline (ignores the schedule)")
    p.add_argument("--secondary", default=None, choices=("end", "mid"),
                   help="Heun's secondary point (default: mid on uniform_t, end otherwise)")
    p.add_argument("--nfe", type=int, default=9, help="network calls per sample")
    p.add_argument("--seeds", default=None, help="seeds, e.g. '0-63' or '1,5,9' (default: 0..count-1)")
    p.add_argument("--count", type=int, default=64, help="number of samples when --seeds is not given")
    p.add_argument("--classes", default=None,
                   help="class labels, e.g. '3' or '0,1,2' (cycled over the samples); default: drawn per seed")
    p.add_argument("--batch", type=int, default=256, help="samples per solver batch")
    p.add_argument("--outdir", default="samples", help="output directory")
    p.add_argument("--format", default="png", choices=("png", "npz"),
                   help="png: a grid (plus --individual images); npz: uint8 images and labels")
    p.add_argument("--individual", action="store_true", help="also write one PNG per sample")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def _validate(args) -> tuple[list[int], list[int] | None, Path]:
    """Every check that can fail runs before any sampling work."""
    checkpoint = models.has_learned_schedule(args.model)  # a shipped trained model or a training checkpoint
    if args.model not in models.MODELS and not checkpoint:
        raise ValueError(f"--model: unknown model {args.model!r}; available: {', '.join(models.MODELS)}, or a "
                         f"training checkpoint (*.safetensors)")
    if models.is_checkpoint(args.model) and not Path(args.model).is_file():
        raise ValueError(f"--model: checkpoint {args.model} does not exist")
    if args.schedule is None:
        args.schedule = "learned" if checkpoint else models.DEFAULT_SCHEDULE
    if args.schedule not in models.SCHEDULES:
        raise ValueError(f"--schedule: unknown schedule {args.schedule!r}; available: {', '.join(models.SCHEDULES)}")
    if args.schedule == "learned" and not checkpoint:
        raise ValueError("--schedule: 'learned' needs --model to be a training checkpoint (*.safetensors)")
    secondary = args.secondary or ("mid" if args.grid == "uniform_t" else "end")
    if args.grid == "karras" and secondary != "end":
        raise ValueError("--secondary: the karras grid is defined for end-point Heun only")
    try:
        steps_for_nfe(args.nfe, args.solver, secondary)
    except ValueError as e:
        raise ValueError(f"--{e}") from None
    if args.count < 1:
        raise ValueError(f"--count: expected at least 1, got {args.count}")
    if args.batch < 1:
        raise ValueError(f"--batch: expected at least 1, got {args.batch}")
    seeds = parse_seeds(args.seeds) if args.seeds else list(range(args.count))
    classes = None
    if args.classes is not None:
        try:
            classes = [int(c) for c in args.classes.split(",") if c.strip()]
        except ValueError:
            raise ValueError(f"--classes: expected integers like '0,3', got {args.classes!r}") from None
        if not classes:
            raise ValueError("--classes: expected at least one class")
    try:
        torch.empty(0, device=args.device)
    except (RuntimeError, AssertionError) as e:
        raise ValueError(f"--device: {args.device!r} is not usable here ({e})") from None
    outdir = Path(args.outdir)
    try:
        outdir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=outdir):
            pass
    except OSError as e:
        raise ValueError(f"--outdir: cannot write to {outdir} ({e.strerror})") from None
    return seeds, classes, outdir


def run(args) -> Path:
    seeds, classes, outdir = _validate(args)
    if models.has_learned_schedule(args.model):
        model, learned, _ = models.load_trained(args.model, args.device)
        schedule = learned if args.schedule == "learned" else models.load_schedule(args.schedule, model)
    else:
        model = models.load_model(args.model, args.device)
        schedule = models.load_schedule(args.schedule, model)
    schedule = schedule.to(args.device)
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
        x, lab, info = sample(model, schedule, nfe=args.nfe, solver=args.solver, grid=args.grid,
                              secondary=args.secondary, seeds=seeds[i:i + args.batch],
                              labels=None if labels is None else labels[i:i + args.batch],
                              device=args.device, progress=not args.no_progress)
        outs.append(to_uint8(x.cpu()))
        labs.append(lab.cpu() if lab is not None else None)
    seconds = time.perf_counter() - t0
    images = torch.cat(outs).numpy()
    stem = f"{Path(args.model).stem}_{args.schedule}_{args.solver}-{info['secondary'] or 'euler'}_{args.grid}_nfe{info['nfe']}"
    if args.format == "npz":
        path = outdir / f"{stem}.npz"
        arrays = {"images": images, "seeds": np.array(seeds)}
        if labs[0] is not None:
            arrays["labels"] = torch.cat(labs).numpy()
        atomic_write(path, lambda tmp: np.savez(open(tmp, "wb"), **arrays))
    else:
        path = outdir / f"{stem}.png"
        save_grid(images, path)
        if args.individual:
            for seed, img in zip(seeds, images):
                save_grid(img[None], outdir / f"{stem}_seed{seed:06d}.png")
    print(f"{len(seeds)} samples, NFE {info['nfe']} ({info['solver']}, {info['grid']} grid), "
          f"{seconds:.2f} s -> {path}", file=sys.stderr)
    print(path)
    return path


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
