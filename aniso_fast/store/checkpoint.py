"""Training checkpoints: one safetensors file per checkpoint, written atomically.

Format (`checkpoint-{step:08d}.safetensors`):
- tensors: every tensor of the run under a dotted prefix (`net.*`, `ema.*`, `schedule.*`, `basis.*`,
  `optim.<name>.state.<i>.<key>` for optimizer states, `rng.*` for RNG states);
- the safetensors header metadata holds two strings: `format` (`FORMAT`) and `meta`, a JSON document with
  everything that is not a tensor (configurations, step counters, sampler state, optimizer hyper-parameters,
  versions) plus `tensor_sha256`, a digest of all tensors.

One file is one checkpoint, so committing it is one `os.replace` of a fully written, fsynced temporary file in
the same directory: a crash at any moment leaves either the previous checkpoint or the new one, never half of
one. Loading reads and validates the whole file (header bounds, JSON, digest: `header.read_header`) and raises
`CheckpointError` naming the file and the problem; it never writes.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save
from torch import Tensor

from ..utils.atomic import atomic_write_bytes
from .header import StoredFileError, parse_json, read_header

__all__ = [
    "FORMAT", "CheckpointError", "save_checkpoint", "load_checkpoint", "list_checkpoints", "latest_checkpoint",
    "checkpoint_path", "flatten_optimizer_state", "unflatten_optimizer_state", "prefixed", "strip_prefix",
    "compare_configs", "read_meta", "checkpoint_meta", "checkpoint_tensors",
]

FORMAT = "aniso_fast.checkpoint/1"
_NAME = re.compile(r"^checkpoint-(\d{8,})\.safetensors$")


class CheckpointError(StoredFileError):
    """A training checkpoint is missing, truncated, corrupt, or does not match the run that loads it."""


# ---- file names ----

def checkpoint_path(folder: str | os.PathLike, step: int) -> Path:
    return Path(folder) / f"checkpoint-{int(step):08d}.safetensors"


def list_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """Committed checkpoints in `folder`, oldest first (temporary files of interrupted writes are ignored)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(folder: str | os.PathLike) -> Path | None:
    found = list_checkpoints(folder)
    return found[-1] if found else None


# ---- digest ----

def _tensor_digest(tensors: Mapping[str, Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ---- write ----

def save_checkpoint(path: str | os.PathLike, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> Path:
    """Write `tensors` and the JSON-able `meta` to `path` atomically (temp file + fsync + os.replace)."""
    path = Path(path)
    clean = {}
    for name, t in tensors.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"tensors[{name!r}]: expected a tensor, got {type(t).__name__}")
        clean[name] = t.detach().to("cpu").contiguous()
    doc = dict(meta)
    doc["tensor_sha256"] = _tensor_digest(clean)
    payload = _st_save(clean, metadata={"format": FORMAT, "meta": json.dumps(doc, sort_keys=True)})
    return atomic_write_bytes(path, payload)


# ---- read ----

def checkpoint_meta(header: dict, name: str) -> dict:
    """The JSON metadata of a training checkpoint from its header (`header.read_header`)."""
    info = header.get("__metadata__") or {}
    if info.get("format") != FORMAT:
        raise CheckpointError(f"{name}: not an aniso_fast checkpoint (format {info.get('format')!r}, "
                              f"expected {FORMAT!r})")
    if not isinstance(info.get("meta"), str):
        raise CheckpointError(f"{name}: corrupt metadata (no 'meta' document)")
    try:
        meta = parse_json(info["meta"], name, allow_nan=True)
    except StoredFileError as e:
        raise CheckpointError(str(e)) from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{name}: corrupt metadata (not a JSON object)")
    return meta


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON metadata of a training checkpoint from its header only (no tensor is read or verified)."""
    try:
        header, _ = read_header(path)
    except StoredFileError as e:
        raise CheckpointError(str(e)) from None
    return checkpoint_meta(header, str(path))


def checkpoint_tensors(data: bytes, meta: Mapping[str, Any], name: str) -> dict[str, Tensor]:
    """The tensors of a checkpoint's bytes whose header was read (`read_header`, `checkpoint_meta`), checked
    against the digest its metadata records."""
    try:
        tensors = _st_load(data)
    except Exception as e:  # safetensors raises its own error type
        raise CheckpointError(f"{name}: corrupt ({type(e).__name__}: {e})") from None
    if _tensor_digest(tensors) != meta.get("tensor_sha256"):
        raise CheckpointError(f"{name}: corrupt (tensor checksum mismatch)")
    return tensors


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read and validate a checkpoint: returns (tensors on CPU, meta). Raises CheckpointError, never writes."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    data = path.read_bytes()
    try:
        header, _ = read_header(data, str(path))
    except StoredFileError as e:
        raise CheckpointError(str(e)) from None
    meta = checkpoint_meta(header, str(path))
    return checkpoint_tensors(data, meta, str(path)), meta


# ---- helpers for structured state ----

def prefixed(prefix: str, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {f"{prefix}.{k}": v for k, v in state.items()}


def strip_prefix(prefix: str, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    p = prefix + "."
    return {k[len(p):]: v for k, v in tensors.items() if k.startswith(p)}


def flatten_optimizer_state(prefix: str, state_dict: Mapping[str, Any]) -> tuple[dict[str, Tensor], dict]:
    """torch optimizer state_dict -> (tensors `prefix.state.<i>.<key>`, JSON part: param_groups + scalar state)."""
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict] = {}
    for idx, st in state_dict["state"].items():
        for key, value in st.items():
            if isinstance(value, Tensor):
                tensors[f"{prefix}.state.{idx}.{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalar_state": scalars}


def unflatten_optimizer_state(prefix: str, tensors: Mapping[str, Tensor], info: Mapping[str, Any]) -> dict:
    state: dict[int, dict] = {}
    for name, value in strip_prefix(prefix + ".state", tensors).items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    for idx, st in info.get("scalar_state", {}).items():
        state.setdefault(int(idx), {}).update(st)
    # JSON turned tuples (Adam's betas) into lists; only "params" is a list in torch's param groups
    groups = [{k: (tuple(v) if isinstance(v, list) and k != "params" else v) for k, v in g.items()}
              for g in info["param_groups"]]
    return {"state": state, "param_groups": groups}


def compare_configs(what: str, expected: Mapping[str, Any], found: Mapping[str, Any],
                    keys: list[str] | None = None) -> None:
    """Raise CheckpointError listing every key whose value differs (None: all keys of both)."""
    keys = sorted(set(expected) | set(found)) if keys is None else keys
    diffs = [f"{k}: checkpoint has {found.get(k)!r}, this run has {expected.get(k)!r}"
             for k in keys if _norm(expected.get(k)) != _norm(found.get(k))]
    if diffs:
        raise CheckpointError(f"{what} does not match the checkpoint: " + "; ".join(diffs))


def _norm(v: Any) -> Any:
    # JSON round trips turn tuples into lists
    return json.loads(json.dumps(v, sort_keys=True, default=str))
