"""A run's checkpoints in --out: which one --resume continues, whether it matches this run's options, the RNG state
and versions it records, and the lineage rule that keeps --keep and --resume (latest) on the run's own branch.

Lineage: resuming from a checkpoint older than the newest in --out starts a branch. The checkpoints past the
resumed step belong to the abandoned branch: they are moved aside (each by an atomic rename) into
`--out/abandoned-<step>/`, so that the newest checkpoint in --out is always this branch's, --keep counts only this
branch and a later plain --resume continues it. --keep never deletes the checkpoint the run just wrote.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..processes import registry
from ..store import checkpoint as ckpt
from ..utils.atomic import atomic_write_text
from . import optim
from .config import RESUME_FREE, inapplicable_options

__all__ = ["find_resume", "check_resume", "retire_later_checkpoints", "save", "truncate_log", "rng_state",
           "set_rng_state", "versions"]


def find_resume(args: argparse.Namespace, out: Path) -> tuple[Path, dict, dict] | None:
    """(path, tensors, meta) of the checkpoint --resume continues (None for a new run, which needs an --out
    without checkpoints)."""
    if args.resume is None:
        if ckpt.list_checkpoints(out):
            raise ValueError(f"--out {out} already holds checkpoints; pass --resume to continue that run "
                             f"or choose another folder")
        return None
    path = ckpt.latest_checkpoint(out) if args.resume == "latest" else Path(args.resume)
    if path is None:
        raise ValueError(f"--resume: no checkpoint-*.safetensors in {out}")
    try:
        return (path, *ckpt.load_checkpoint(path))
    except ckpt.CheckpointError as e:
        raise ckpt.CheckpointError(f"--resume: {e}") from None


def check_resume(args: argparse.Namespace, meta: dict, shape: list[int], num_classes: int) -> None:
    """The checkpoint's options and data match this run's, except the free ones (`config.RESUME_FREE`) and the
    family options this run's family does not take (older checkpoints stored their unused defaults)."""
    skip = RESUME_FREE | inapplicable_options(args)
    mine = {k: v for k, v in vars(args).items() if k not in skip}
    stored = registry.get(meta["args"].get("family") or "core").upgrade_args(meta["args"])
    theirs = {k: v for k, v in stored.items() if k not in skip}
    derived = optim.lr_decay(meta["args"]["kimg"], None, None)
    for key, value in zip(("decay_start_kimg", "decay_halflife_kimg"), derived):
        if mine[key] is None and theirs.get(key) == value:  # older checkpoints stored the derived value
            theirs[key] = None
    ckpt.compare_configs("the command line", mine, theirs)
    if meta["data"]["shape"] != shape or meta["data"]["num_classes"] != num_classes:
        raise ckpt.CheckpointError(f"--data: the checkpoint was trained on {meta['data']}, this data is "
                                   f"{{'shape': {shape}, 'num_classes': {num_classes}}}")


def _step_of(path: Path) -> int:
    return int(path.stem.removeprefix("checkpoint-"))


def retire_later_checkpoints(out: Path, step: int) -> Path | None:
    """Move the checkpoints of `out` past `step` (an abandoned branch) into a new `out/abandoned-<step>[-n]/`;
    returns that folder, or None when there were none."""
    later = [p for p in ckpt.list_checkpoints(out) if _step_of(p) > step]
    if not later:
        return None
    folder, n = out / f"abandoned-{step:08d}", 1
    while folder.exists():
        n += 1
        folder = out / f"abandoned-{step:08d}-{n}"
    folder.mkdir()
    for path in later:
        os.replace(path, folder / path.name)
    return folder


def save(out: Path, step: int, tensors: dict[str, Tensor], meta: dict, keep: int) -> Path:
    """Write the checkpoint of `step`, then delete all but the newest `keep` (0: all), never the one just written."""
    path = ckpt.save_checkpoint(ckpt.checkpoint_path(out, step), tensors, meta)
    if keep:
        for old in ckpt.list_checkpoints(out)[:-keep]:
            if old != path:
                old.unlink(missing_ok=True)
    return path


def truncate_log(log_path: Path, step: int) -> None:
    """Drop log records after `step`: a resumed run's lost tail, or a dead run that never reached a checkpoint
    (a new run starts at step 0)."""
    if not log_path.exists():
        return
    keep = []
    for line in log_path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:  # a line cut by the crash
            continue
    atomic_write_text(log_path, "".join(line + "\n" for line in keep))


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": None, "python": None}
    np_state = np.random.get_state()
    state["numpy"] = [np_state[0], np_state[1].tolist(), *np_state[2:]]
    py = random.getstate()
    state["python"] = [py[0], list(py[1]), py[2]]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict, torch_state: Tensor | None, cuda_state: Tensor | None) -> None:
    if torch_state is not None:
        torch.set_rng_state(torch_state)
    if cuda_state is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda_state)
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


def versions() -> dict:
    from importlib import metadata

    def ver(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "safetensors": ver("safetensors"), "aniso_fast": ver("aniso_fast")}
