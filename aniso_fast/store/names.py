"""Model names and the choices recorded with them: which names exist, the default model, fitted grids, and the
per-NFE (model, solver, grid) defaults; and the updates of those records (each one `manifest.update`).

A name is an embedded model (`gmm-fmnist`) or a shipped model of the manifest; a path ending in .safetensors is a
model file (a training checkpoint or a shipped model's file). `StoredModel` opens either.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from ..processes import registry as family_registry
from ..sampling.grids import FittedGrids
from .manifest import EMBEDDED, assets_dir, choice_problem, entry_problem, read_manifest, score_problem, update

__all__ = ["MODELS", "SCHEDULES", "DEFAULT_SCHEDULE", "shipped_models", "default_model", "is_model_file",
           "model_family", "fitted_grids", "sampler_defaults", "set_sampler_defaults", "set_fitted_grids",
           "set_default", "set_scores", "set_learned_grids"]

SCHEDULES = {
    "edm": "the EDM/Karras initialisation (isotropic, g = h; METHOD §2.2)",
    "learned": "the schedule learned with the model (a shipped model or a training checkpoint, --model)",
}
DEFAULT_SCHEDULE = "edm"
_CHOICE_KEYS = ("model", "solver", "grid", "secondary", "order")


def shipped_models(assets: str | os.PathLike | None = None) -> Mapping[str, dict]:
    """name -> manifest entry of every shipped trained model."""
    return read_manifest(assets).models


def default_model(assets: str | os.PathLike | None = None) -> str:
    """The shipped model marked `default: true`, else the embedded `gmm-fmnist`."""
    return read_manifest(assets).default_model


class _ModelRegistry(Mapping):
    """name -> description of every model a name can select: embedded ones, then those in the manifest (an export
    is visible without a restart; the manifest is parsed again only when it changed)."""

    def _all(self) -> dict[str, str]:
        return dict(EMBEDDED) | {name: entry.get("description", "") for name, entry in shipped_models().items()}

    def __getitem__(self, name):
        return self._all()[name]

    def __iter__(self):
        return iter(self._all())

    def __len__(self):
        return len(self._all())

    def __repr__(self):
        return repr(self._all())


MODELS = _ModelRegistry()


def is_model_file(name: str) -> bool:
    """A path to a model file (a training checkpoint or a shipped model's file) rather than a model name."""
    return name not in MODELS and Path(name).suffix == ".safetensors"


def model_family(name: str, assets: str | os.PathLike | None = None) -> str:
    """The process family of a model name, from its manifest entry (no file is read; a model file's family:
    `StoredModel.open(path).family`). The embedded models are core."""
    if name in EMBEDDED:
        return "core"
    models = shipped_models(assets)
    if name not in models:
        raise ValueError(f"model: unknown model {name!r}; available: {', '.join(MODELS)}")
    return family_registry.family_of(models[name]).name


def fitted_grids(name: str, assets: str | os.PathLike | None = None) -> FittedGrids:
    """Step count -> the geometric-mean sigma levels of a shipped model's fitted grids (`--grid optimized`,
    `grid_fit`), with its learned grids per solver in `.learned` (`--grid learned`, `grid_learn`); empty for a
    model without any (never fitted, embedded, or a training checkpoint)."""
    return read_manifest(assets).fitted_grids(name)


def sampler_defaults(assets: str | os.PathLike | None = None) -> dict[int, dict]:
    """NFE -> the recorded best (model, solver, grid, secondary, order) and its FD, in increasing NFE."""
    return read_manifest(assets).defaults


def _existing(assets: str | os.PathLike | None) -> Path:
    assets = Path(assets if assets is not None else assets_dir())
    if not (assets / "manifest.json").is_file():
        raise ValueError(f"assets: {assets} holds no manifest.json (no shipped models to choose from)")
    return assets


def set_sampler_defaults(choices: dict[int, dict], assets: str | os.PathLike | None = None) -> None:
    """Record, per NFE, the (model, solver, grid, secondary, order) to sample with (replacing earlier records), with
    its FD, SE and, for a line that ran at its own NFEs only, those `nfes`; each model must be shipped (or embedded)
    and each sampler able to spend its NFE (`manifest.choice_problem`). ValueError otherwise."""
    def change(doc: dict) -> None:
        doc["defaults"] = {str(nfe): {k: choice.get(k) for k in _CHOICE_KEYS}
                           | {k: choice[k] for k in ("fd", "se", "nfes") if choice.get(k) is not None}
                           for nfe, choice in sorted(choices.items())}
        for nfe, choice in doc["defaults"].items():
            problem = choice_problem(nfe, choice, doc["models"])
            if problem:
                raise ValueError(f"choices: NFE {nfe}: {problem}")

    update(_existing(assets), change)


def set_fitted_grids(name: str, levels: dict[int, list[float]], fit: dict,
                     assets: str | os.PathLike | None = None) -> None:
    """Store a shipped model's fitted grids (replacing earlier ones) with `fit`, how they were fitted; re-exporting
    the model drops them (they belong to its network)."""
    def change(doc: dict) -> None:
        if name not in doc["models"]:
            raise ValueError(f"name: {name!r} is not a shipped model ({', '.join(doc['models']) or 'none'}); grids "
                             f"are stored with shipped models")
        grids = dict(doc["models"][name].get("grids", {}), fit=fit,  # learned grids are kept
                     optimized={str(k): [float(v) for v in levels[k]] for k in sorted(levels)})
        entry = dict(doc["models"][name], grids=grids)
        problem = entry_problem(entry)
        if problem:
            raise ValueError(f"levels: {problem}")
        doc["models"][name] = entry

    update(Path(assets if assets is not None else assets_dir()), change)


def _floats(levels) -> list | dict:
    """Levels as JSON floats: a list, one list per class, or {levels, offsets} (per-subspace offsets too)."""
    if isinstance(levels, Mapping):
        return {k: _floats(v) for k, v in levels.items()}
    return [_floats(v) if isinstance(v, (list, tuple)) else float(v) for v in levels]


def set_learned_grids(name: str, key: str, levels: Mapping[int, list[float]], fit: Mapping[int, dict],
                      assets: str | os.PathLike | None = None) -> None:
    """Store grids learned for one solver (`key`: `sampling.spec.learned_key`, e.g. 'ipndm-4') with a shipped
    model, as grids.learned[key][steps] (the descending geometric-mean sigma levels, or one list of them per class),
    with `fit[steps]`, how each
    was learned, under grids.learned_fit[key][steps]. A step count learned before is replaced; the model's other
    grids are kept. Re-exporting the model drops them (they belong to its network). ValueError otherwise."""
    def change(doc: dict) -> None:
        if name not in doc["models"]:
            raise ValueError(f"name: {name!r} is not a shipped model ({', '.join(doc['models']) or 'none'}); grids "
                             f"are stored with shipped models")
        grids = dict(doc["models"][name].get("grids", {}))
        grids.setdefault("optimized", {})
        learned, how = dict(grids.get("learned", {})), dict(grids.get("learned_fit", {}))
        learned[key] = dict(learned.get(key, {})) | {str(k): _floats(levels[k]) for k in sorted(levels)}
        how[key] = dict(how.get(key, {})) | {str(k): dict(fit.get(k, {})) for k in sorted(levels)}
        entry = dict(doc["models"][name], grids=dict(grids, learned=learned, learned_fit=how))
        problem = entry_problem(entry)
        if problem:
            raise ValueError(f"levels: {problem}")
        doc["models"][name] = entry

    update(Path(assets if assets is not None else assets_dir()), change)


def set_scores(scores: Mapping[str, dict], assets: str | os.PathLike | None = None) -> None:
    """Record, per shipped model, its best measured Frechet distance at one NFE (`nfe`, `fd`, `se` and the sampler:
    `solver`, `grid`, `secondary`, `order`), as `models list` shows it; written by `evaluate table
    --record-scores` (and `--set-default`). Re-exporting a model drops its score (it belongs to that network)."""
    def change(doc: dict) -> None:
        for name, score in scores.items():
            if name not in doc["models"]:
                raise ValueError(f"scores: {name!r} is not a shipped model ({', '.join(doc['models']) or 'none'})")
            score = {k: score.get(k) for k in ("nfe", "fd", "se", *_CHOICE_KEYS[1:])}
            problem = score_problem(score)
            if problem:
                raise ValueError(f"scores: {name!r}: {problem}")
            doc["models"][name] = dict(doc["models"][name], score=score)

    update(_existing(assets), change)


def set_default(name: str, assets: str | os.PathLike | None = None) -> None:
    """Mark one shipped model as the default (or 'gmm-fmnist': none marked) in an existing manifest."""
    def change(doc: dict) -> None:
        if name not in doc["models"] and name not in EMBEDDED:
            raise ValueError(f"name: {name!r} is not a shipped model ({', '.join(doc['models']) or 'none'})")
        for key, entry in doc["models"].items():
            entry["default"] = key == name

    update(_existing(assets), change)
