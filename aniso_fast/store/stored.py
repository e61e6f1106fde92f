"""`StoredModel`: one model as stored (the embedded mixture, a shipped model by name or by its file, or a training
checkpoint), opened from its header and the manifest, and handing out its network, forward path, fitted grids
and metadata.

Opening reads the file's header and the manifest once per process (`StoredModel.open` caches by name, file
version and manifest entry); the tensors are read once, on first use, and validated then: the file's SHA-256
against the manifest (shipped by name) or the checkpoint's digest, every tensor the model is built from finite,
the network's tensors with the names, shapes and (shipped) dtype its stored configuration gives, and a learned
schedule's knots increasing. A problem is one `StoredFileError` naming the file and the tensor.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load as load_safetensors_bytes
from torch import Tensor, nn

from ..geometry.schedules import MatrixSchedule
from ..processes import registry
from .checkpoint import checkpoint_meta, checkpoint_tensors, strip_prefix
from .header import StoredFileError, parse_json, read_header
from .manifest import ASSET_DIR, EMBEDDED, read_manifest
from .names import MODELS, SCHEDULES

__all__ = ["StoredModel", "build_model", "check_finite", "SHIPPED_FORMAT", "GMM_FORMAT", "GMM_ASSET"]

SHIPPED_FORMAT = "aniso_fast.shipped/1"
GMM_FORMAT = "aniso_fast.gmm/1"
GMM_ASSET = ASSET_DIR / "gmm_fmnist.safetensors"
_SHIPPED_JSON = ("net_config", "basis_config", "schedule_config", "info")
_CACHE: dict[tuple, "StoredModel"] = {}


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [""])[0][:300]


def check_finite(tensors: Mapping[str, Tensor], name: str) -> None:
    """StoredFileError naming the first tensor with a NaN or an infinite value."""
    for key, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            nan, inf = int(t.isnan().sum()), int(t.isinf().sum())
            raise StoredFileError(f"{name}: tensor {key!r} is not finite ({nan} NaN, {inf} inf values)")


def _load_state(module: nn.Module, state: Mapping[str, Tensor], prefix: str, name: str) -> None:
    """module.load_state_dict with the names and shapes checked first, so a mismatch is one line naming it."""
    expected = module.state_dict()
    for key in expected:
        if key not in state:
            raise StoredFileError(f"{name}: no tensor {prefix}.{key} (its stored configuration needs it)")
        if tuple(state[key].shape) != tuple(expected[key].shape):
            raise StoredFileError(f"{name}: tensor {prefix}.{key} has shape {list(state[key].shape)}, its stored "
                                  f"configuration gives {list(expected[key].shape)}")
    extra = sorted(set(state) - set(expected))
    if extra:
        raise StoredFileError(f"{name}: tensor {prefix}.{extra[0]} is not part of the model its configuration "
                              f"describes")
    module.load_state_dict(state)


def _check_schedule(process: nn.Module, name: str) -> None:
    """A learned schedule's knot values finite and increasing (the variance grows with t)."""
    if isinstance(process, MatrixSchedule):
        ell = process.knot_log_values()
        if not bool(torch.isfinite(ell).all()) or not bool((ell.diff(dim=-1) > 0).all()):
            raise StoredFileError(f"{name}: tensor schedule.psi does not give finite, increasing knot values")


def build_model(tensors: Mapping[str, Tensor], meta: Mapping[str, Any], weights: str = "ema",
                name: str = "the stored state") -> tuple[nn.Module, nn.Module]:
    """(the model, its forward path) from tensors and meta in a training checkpoint's shape (`net_config`,
    `basis_config`, `schedule_config`, `family`; tensors `<weights>.*`, `basis.*`, `schedule.*`), validated (see
    the module docstring): for the core family (AnisoPrecond, MatrixSchedule), for VSDM (AnisoPrecond,
    VSDMProcess), for VSMD (VSMDPrecond or the phase-space denoiser, VSMDProcess) (`processes.registry`).

    The one builder of a model from stored state: stored models, training checkpoints and the trainer use it.
    """
    from ..geometry.bases import basis_from_config

    used = {k: v for k, v in tensors.items() if k.split(".", 1)[0] in (weights, "basis", "schedule")}
    check_finite(used, name)
    try:
        family = registry.family_of(meta)
        net = family.network_from_config(meta["net_config"])
        process = family.process_from_config(meta["schedule_config"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise StoredFileError(f"{name}: its stored configuration does not describe a model "
                              f"({type(e).__name__}: {_first_line(e)})") from None
    _load_state(net, strip_prefix(weights, tensors), weights, name)
    _load_state(process, strip_prefix("schedule", tensors), "schedule", name)
    _check_schedule(process, name)
    try:
        basis = basis_from_config(meta["basis_config"], strip_prefix("basis", tensors))
        model = family.wrap(net, basis, process, meta.get("precond_config"))
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        raise StoredFileError(f"{name}: its stored basis does not match its configuration "
                              f"({type(e).__name__}: {_first_line(e)})") from None
    return model, process


class StoredModel:
    """A stored model; `StoredModel.open(name_or_path)` (see the module docstring). Attributes: `name`, `kind`
    ('embedded', 'shipped' by name, 'shipped-file' by path, 'checkpoint'), `path`, `family`, `info` (the stored
    metadata), `num_classes`, `fitted_grids` (steps -> levels; {} unless a shipped model has some),
    `network_parameters` (the sampling network's stored values, parameters and fixed buffers, counted from the
    header; None for the mixture)."""

    def __init__(self, name: str, kind: str, path: Path, header: dict, entry: Mapping[str, Any] | None,
                 fitted: dict[int, list[float]]):
        self.name, self.kind, self.path, self.fitted_grids = name, kind, path, fitted
        self._entry = entry
        shipped = (header.get("__metadata__") or {}).get("format") == SHIPPED_FORMAT
        prefix = "net." if shipped else "ema."  # the network a sample uses: a checkpoint's EMA weights
        self.network_parameters = sum(math.prod(v.get("shape", ())) for k, v in header.items()
                                      if k.startswith(prefix) and isinstance(v, dict)) or None
        where = str(path)
        stored = header.get("__metadata__") or {}
        if kind == "embedded":
            if stored.get("format") != GMM_FORMAT or any(k not in header for k in ("V", "means", "variances")):
                raise StoredFileError(f"{where}: not the embedded mixture (format {stored.get('format')!r})")
            self.family, self.info = "core", dict(stored)
            self.num_classes = header["means"]["shape"][0] if header["means"]["shape"] else 0
            self._meta = {}
            return
        if stored.get("format") == SHIPPED_FORMAT:
            if kind == "checkpoint":
                self.kind = kind = "shipped-file"
            meta = {}
            for key in _SHIPPED_JSON:
                if not isinstance(stored.get(key), str):
                    raise StoredFileError(f"{where}: corrupt shipped model (no {key} in its header)")
                meta[key] = parse_json(stored[key], where)
            meta["precond_config"] = parse_json(stored.get("precond_config", "{}"), where)
            meta["family"] = stored.get("family")  # models shipped before the process families have none
            self.info = meta["info"]
        elif kind == "shipped":
            raise StoredFileError(f"{where}: not a shipped model (no '{SHIPPED_FORMAT}' header)")
        else:
            meta = checkpoint_meta(header, where)
            if any(key not in meta for key in ("net_config", "basis_config", "schedule_config")):
                raise StoredFileError(f"{where}: not a training checkpoint of aniso_fast.train (no net_config)")
            self.info = meta
        self._meta = meta
        try:
            self.family = registry.family_of(meta).name
            self.num_classes = int((meta["net_config"] or {}).get("label_dim", 0) or 0)
        except (TypeError, ValueError, AttributeError) as e:
            raise StoredFileError(f"{where}: corrupt metadata ({_first_line(e)})") from None

    @classmethod
    def open(cls, name: str | os.PathLike, assets: str | os.PathLike | None = None) -> "StoredModel":
        """An embedded or shipped model by name, or a model file (training checkpoint, shipped model's file);
        ValueError for an unknown name, StoredFileError for a missing or corrupt file."""
        name = str(name)
        manifest = read_manifest(assets)
        entry = manifest.models.get(name)
        if name in EMBEDDED:
            kind, path = "embedded", GMM_ASSET
        elif entry is not None:
            kind, path = "shipped", manifest.path.parent / entry["file"]
        elif Path(name).suffix == ".safetensors":
            kind, path = "checkpoint", Path(name)
        else:
            raise ValueError(f"model: unknown model {name!r}; available: {', '.join(MODELS)}, or a training "
                             f"checkpoint (*.safetensors)")
        if not path.is_file():
            if kind == "shipped":
                raise StoredFileError(f"shipped model {name!r}: its file {path} is missing (listed in the manifest)")
            raise StoredFileError(f"{path}: no such file")
        st = path.stat()
        key = (name, kind, str(path.absolute()), st.st_ino, st.st_mtime_ns, st.st_size,
               json.dumps(entry, sort_keys=True) if entry is not None else None)
        if key not in _CACHE:
            header, _ = read_header(path, f"shipped model {name!r} ({path})" if kind == "shipped" else str(path))
            _CACHE[key] = cls(name, kind, path, header, entry, manifest.fitted_grids(name) if entry else {})
        return _CACHE[key]

    @property
    def has_learned_schedule(self) -> bool:
        return self.kind != "embedded"

    def _read(self) -> bytes:
        try:
            blob = self.path.read_bytes()
        except OSError as e:
            raise StoredFileError(f"{self.path}: cannot read ({e.strerror})") from None
        if self.kind == "shipped" and hashlib.sha256(blob).hexdigest() != self._entry["sha256"]:
            raise StoredFileError(f"shipped model {self.name!r}: {self.path} does not match the SHA-256 recorded "
                                  f"in the manifest")
        return blob

    def state(self) -> tuple[dict[str, Tensor], dict]:
        """(tensors, meta) in a training checkpoint's shape (`ema.*` in float32, `basis.*`, `schedule.*`; meta with
        net_config, basis_config, schedule_config, precond_config, family), read and verified (at each call: the
        tensors are not kept)."""
        if self.kind == "embedded":
            raise ValueError(f"model: {self.name!r} is the embedded mixture, not a trained network")
        blob, where = self._read(), str(self.path)
        if self.kind == "checkpoint":
            return checkpoint_tensors(blob, self._meta, where), self._meta
        tensors = self._tensors(blob)
        check_finite(tensors, where)  # named as in the file (build_model checks the renamed ones again)
        dtype = self.info.get("net_dtype") if isinstance(self.info, dict) else None
        for key, t in tensors.items():
            if key.startswith("net.") and t.is_floating_point() and dtype and str(t.dtype) != f"torch.{dtype}":
                raise StoredFileError(f"{where}: tensor {key!r} is {t.dtype}, its metadata says {dtype}")
        out = {f"ema.{k[4:]}": (v.float() if v.is_floating_point() else v)
               for k, v in tensors.items() if k.startswith("net.")}
        out.update({k: v for k, v in tensors.items() if not k.startswith("net.")})
        return out, self._meta

    def _tensors(self, blob: bytes) -> dict[str, Tensor]:
        try:
            return load_safetensors_bytes(blob)
        except Exception as e:  # safetensors raises its own error type
            raise StoredFileError(f"{self.path}: corrupt ({type(e).__name__}: {_first_line(e)})") from None

    def _mixture(self):
        from ..geometry.bases import PCABasis
        from ..networks.gmm import GaussianMixture

        t = self._tensors(self._read())
        check_finite(t, str(self.path))
        try:
            rank, split = int(self.info["rank"]), int(self.info["split"])
            V = t["V"].double()  # stored in fp32: rows orthonormal to ~1e-7
            fine = PCABasis(V, (1, 28, 28), [1] * rank, torch.arange(V.shape[0]))
            parent = [0] * split + [1] * (rank - split + 1)
            return GaussianMixture(fine, parent, t["means"].double(), t["variances"].double(),
                                   classes=torch.arange(V.shape[0]))
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise StoredFileError(f"{self.path}: corrupt mixture ({type(e).__name__}: {_first_line(e)})") from None

    def load(self, device: str | torch.device = "cpu", schedule: str | None = None) -> tuple[nn.Module, nn.Module]:
        """(the model in eval mode, its forward path) on `device`. `schedule`: 'learned' (the default for a
        trained model: its own forward path) or 'edm' (the Karras initialisation, the embedded model's default)."""
        schedule = schedule or ("learned" if self.has_learned_schedule else "edm")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule: unknown schedule {schedule!r}; available: {', '.join(SCHEDULES)}")
        if schedule == "learned" and not self.has_learned_schedule:
            raise ValueError("schedule: 'learned' needs --model to be a shipped trained model or a training "
                             "checkpoint (*.safetensors)")
        if self.kind == "embedded":
            model = self._mixture()
        else:
            model, learned = build_model(*self.state(), name=str(self.path))
            model = model.eval()
            if schedule == "learned":
                return model.to(device), learned.to(device)
        return model.to(device), MatrixSchedule(model.basis.num_subspaces).to(device)
