"""Writing stored models: `export_model` slims a training checkpoint to a shipped model and registers it (one
`manifest.update`), `build_gmm_asset` refits the embedded Fashion-MNIST mixture."""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import save as save_safetensors_bytes
from safetensors.torch import save_file

from ..processes import registry
from ..utils.atomic import atomic_write
from .checkpoint import CheckpointError, load_checkpoint, strip_prefix
from .manifest import EMBEDDED, assets_dir, read_manifest, staged_name, update
from .stored import GMM_FORMAT, SHIPPED_FORMAT, check_finite

__all__ = ["ShippedModelExists", "export_model", "build_gmm_asset", "check_rank_split"]

_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


class ShippedModelExists(ValueError):
    """export_model refused to replace a shipped model (force=True replaces it)."""


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME.match(name) or name in EMBEDDED or name.endswith(".safetensors"):
        raise ValueError(f"name: expected a lower-case name like 'fmnist-dct' (letters, digits, '.', '_', '-'; "
                         f"not an embedded model's name), got {name!r}")


def _refuse_existing(name: str, models: dict, assets: Path) -> None:
    if name in models:
        raise ShippedModelExists(f"name: {name!r} is already a shipped model ({assets / models[name]['file']}); "
                                 f"pass force=True to replace it")


def export_model(checkpoint: str | os.PathLike, name: str, description: str = "", *,
                 assets: str | os.PathLike | None = None, net_dtype: str = "float16",
                 default: bool = False, force: bool = False) -> Path:
    """Slim a training checkpoint to a shipped model NAME in `assets` and register it in the manifest, as one
    atomic update (the file is staged under a new, content-hashed name; `manifest.update`). Returns its file.

    Kept: the EMA network (stored in `net_dtype`, loaded back as float32), the basis tensors (PCA bases in
    float32) and the schedule parameters; configurations and provenance go in the safetensors metadata.
    An existing shipped model of that name is replaced only with `force` (its fitted grids, and the per-NFE
    defaults that name it, are dropped: their grids and FDs belong to its network).
    """
    _check_name(name)
    if net_dtype not in ("float16", "float32"):
        raise ValueError(f"net_dtype: expected 'float16' or 'float32', got {net_dtype!r}")
    assets = Path(assets if assets is not None else assets_dir())
    if not force:  # a corrupt manifest, or a name taken, fails before the checkpoint is read
        _refuse_existing(name, dict(read_manifest(assets).models), assets)
    else:
        read_manifest(assets)
    checkpoint = Path(checkpoint)
    tensors, meta = load_checkpoint(checkpoint)
    missing = [key for key in ("net_config", "basis_config", "schedule_config") if key not in meta]
    if missing:
        raise CheckpointError(f"{checkpoint}: not a training checkpoint of aniso_fast.train (no {missing[0]})")
    dtype = getattr(torch, net_dtype)
    out = {f"net.{k}": (v.to(dtype) if v.is_floating_point() else v)
           for k, v in strip_prefix("ema", tensors).items()}
    out.update({f"basis.{k}": (v.float() if v.is_floating_point() else v)
                for k, v in strip_prefix("basis", tensors).items()})
    out.update({f"schedule.{k}": v for k, v in strip_prefix("schedule", tensors).items()})
    out = {k: v.contiguous() for k, v in out.items()}
    check_finite(out, str(checkpoint))  # a diverged network is not shipped
    info = {"name": name, "description": description, "family": registry.family_of(meta).name,
            "stage": meta.get("stage"), "step": meta.get("step"),
            "kimg": meta.get("kimg"), "source": checkpoint.name, "source_sha256": meta.get("tensor_sha256"),
            "args": meta.get("args"), "data": meta.get("data"), "net_dtype": net_dtype,
            "versions": meta.get("versions")}
    header = {"format": SHIPPED_FORMAT, "family": info["family"], "net_config": json.dumps(meta["net_config"]),
              "precond_config": json.dumps(meta.get("precond_config") or {}),
              "basis_config": json.dumps(meta["basis_config"]),
              "schedule_config": json.dumps(meta["schedule_config"]), "info": json.dumps(info, sort_keys=True)}
    blob = save_safetensors_bytes(out, metadata=header)
    sha = hashlib.sha256(blob).hexdigest()
    file = staged_name(name, sha)

    def change(doc: dict) -> None:
        if not force:
            _refuse_existing(name, doc["models"], assets)
        previous = doc["models"].get(name, {})
        if previous and "defaults" in doc:  # the defaults measured on the network it replaces
            doc["defaults"] = {nfe: c for nfe, c in doc.get("defaults", {}).items() if c.get("model") != name}
        if default:
            for entry in doc["models"].values():
                entry["default"] = False
        doc["models"][name] = {
            "file": file, "description": description, "family": info["family"], "stage": info["stage"],
            "step": info["step"], "kimg": info["kimg"], "source": info["source"],
            "source_sha256": info["source_sha256"], "basis": meta["basis_config"].get("type"),
            "class_schedules": meta["schedule_config"].get("num_classes") is not None, "net_dtype": net_dtype,
            "bytes": len(blob), "sha256": sha, "default": bool(default or previous.get("default", False)),
        }

    update(assets, change, {file: blob})
    return assets / file


def check_rank_split(rank: int, split: int) -> None:
    if not 1 <= split < rank < 28 * 28:  # the complement subspace needs at least one of the 784 directions
        raise ValueError(f"rank, split: expected 1 <= split < rank < 784, got rank {rank}, split {split}")


def build_gmm_asset(path: str | os.PathLike, rank: int = 64, split: int = 16) -> Path:
    """Fit the default mixture to the Fashion-MNIST training set and write it atomically to `path`."""
    from ..networks.gmm import GaussianMixture
    from ..utils.data import load_fashion_mnist

    check_rank_split(rank, split)
    images, labels = load_fashion_mnist("train")
    gm = GaussianMixture.fit_pca(images, labels, rank=rank, split=split)
    tensors = {"V": gm.fine.V64.float(), "means": gm.means.float(), "variances": gm.variances.float()}
    meta = {"format": GMM_FORMAT, "rank": str(rank), "split": str(split), "image_shape": "1,28,28",
            "source": "Fashion-MNIST train (60000 images), Debian package dataset-fashion-mnist"}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
