"""The shipped-model registry: `manifest.json` in the assets folder, read once, validated as a whole, and updated
as one transaction.

Reading: the manifest is parsed once per process and version (cached by its path and bytes: rereading a few kB
costs nothing, and unlike a timestamp it cannot miss a change), and validated as a whole: every model entry names
a file in the folder with its SHA-256 and size, at most one entry is marked default (none: the embedded
`gmm-fmnist` is the default model), fitted and learned grids are positive, descending and finite (learned ones
under a deterministic solver's key), and every per-NFE choice
(`defaults`) names a known model, solver and grid that runs at its NFE. A problem is one error naming the
manifest entry, e.g. `defaults[7]: solver: ...`.

Updating (`update`): under a lock on the folder, the new model files are staged under new, content-hashed names
(created exclusively), the manifest is switched in one rename, and then the files no manifest names are removed:
those the update retired (listed in the new manifest's `retired`, so that an update killed before removing them
is finished by the next one, which drops the names that are gone) and staged files of an interrupted update. A
kill at any moment leaves the old manifest or the new one, each naming only complete, verified files.
"""
from __future__ import annotations

import copy
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from ..processes import registry as family_registry
from ..sampling.grids import SECONDARIES, FittedGrids
from ..sampling.spec import LEARNED_KEYS, learned_key
from ..utils.atomic import atomic_write_bytes, folder_lock, remove_file
from .header import StoredFileError, parse_json

__all__ = ["ASSET_DIR", "ASSETS_ENV", "MANIFEST_FORMAT", "EMBEDDED", "ManifestError", "Manifest", "assets_dir",
           "check_assets", "read_manifest", "validate", "update", "staged_name", "entry_problem", "choice_problem"]

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets"
ASSETS_ENV = "ANISO_FAST_ASSETS"
MANIFEST_FORMAT = "aniso_fast.manifest/1"
EMBEDDED = {
    "gmm-fmnist": "exact Gaussian mixture fitted to Fashion-MNIST (per-class PCA, rank 64; 28x28x1, 10 classes)",
}
MAX_MANIFEST_BYTES = 10_000_000
_STAGED = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}\.[0-9a-f]{16}\.safetensors$")
_STAGED_TEMP = re.compile(r"^\.(manifest\.json|[a-z0-9][a-z0-9._-]{0,63}\.[0-9a-f]{16}\.safetensors)"
                          r"\.[0-9a-f]{8}\.tmp$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_COUNT = re.compile(r"^[1-9][0-9]{0,6}$")  # an NFE or a step count, as a JSON key (ASCII digits, no huge numbers)
_MODEL_FILE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,80}\.safetensors$")
_CACHE: dict[Path, tuple[bytes, "Manifest"]] = {}


class ManifestError(StoredFileError):
    """manifest.json is unreadable, corrupt, or records a choice that cannot run."""


@dataclass(frozen=True)
class Manifest:
    """A validated manifest (read-only: `update` changes a copy)."""
    path: Path
    doc: Mapping[str, Any]

    @property
    def models(self) -> Mapping[str, dict]:
        return self.doc["models"]

    @property
    def defaults(self) -> dict[int, dict]:
        """NFE -> the recorded (model, solver, grid, secondary, order) and its FD, in increasing NFE."""
        return {int(k): v for k, v in sorted(self.doc.get("defaults", {}).items(), key=lambda kv: int(kv[0]))}

    @property
    def default_model(self) -> str:
        """The entry marked `default: true`, else the embedded `gmm-fmnist`."""
        return next((name for name, entry in self.models.items() if entry.get("default")), "gmm-fmnist")

    def fitted_grids(self, name: str) -> FittedGrids:
        """Step count -> the geometric-mean sigma levels of a shipped model's fitted grids ({} for none), with the
        grids learned per solver in `.learned` (solver key -> {steps: levels})."""
        grids = (self.models.get(name) or {}).get("grids", {})
        return FittedGrids({int(k): list(v) for k, v in grids.get("optimized", {}).items()},
                           {key: {int(k): dict(v) if isinstance(v, dict) else list(v) for k, v in by_steps.items()}
                            for key, by_steps in grids.get("learned", {}).items()})


def assets_dir() -> Path:
    """Folder of the shipped models and their manifest: $ANISO_FAST_ASSETS, else the package's assets/."""
    env = os.environ.get(ASSETS_ENV)
    if not env:
        return ASSET_DIR
    if Path(env).exists() and not Path(env).is_dir():
        raise ValueError(f"{ASSETS_ENV}: expected a folder of shipped models, got {env!r} (not a folder)")
    return Path(env)


def check_assets() -> Path:
    """assets_dir() for a command that reads the registry: a set ANISO_FAST_ASSETS must be a folder holding a
    readable manifest.json (a typo must not silently select other models)."""
    env = os.environ.get(ASSETS_ENV)
    path = assets_dir()
    if not env:
        read_manifest(path)
        return path
    if not (path / "manifest.json").is_file():
        why = "no manifest.json in it" if path.is_dir() else "no such folder"
        raise ValueError(f"{ASSETS_ENV}: expected a folder holding a manifest.json, got {env!r} ({why})")
    try:
        read_manifest(path)
    except ValueError as e:
        raise ValueError(f"{ASSETS_ENV}={env}: {e}") from None
    return path


def staged_name(name: str, sha256: str) -> str:
    """The file a model is staged as: new content, new name, so staging never replaces a file a manifest names."""
    return f"{name}.{sha256[:16]}.safetensors"


def _is_int(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def entry_problem(entry: Any) -> str | None:
    """What is wrong with a model entry, or None."""
    if not isinstance(entry, dict):
        return "not a JSON object"
    file = entry.get("file")
    if not isinstance(file, str) or Path(file).name != file or not file.endswith(".safetensors") \
            or file.startswith("."):
        return f"file {file!r} is not a .safetensors name in the folder"
    if not isinstance(entry.get("sha256"), str) or not _SHA256.match(entry["sha256"]):
        return "sha256 is not 64 hex digits"
    if "bytes" in entry and not _is_int(entry["bytes"], 0):
        return f"bytes {entry['bytes']!r} is not a size"
    if not isinstance(entry.get("default", False), bool):
        return f"default {entry['default']!r} is not true or false"
    try:
        family_registry.family_of(entry)
    except (ValueError, TypeError):
        return f"family {entry.get('family')!r} is not one of {', '.join(family_registry.FAMILIES)}"
    if "score" in entry:
        problem = score_problem(entry["score"])
        if problem:
            return f"score: {problem}"
    grids = entry.get("grids", {"optimized": {}})
    optimized = grids.get("optimized") if isinstance(grids, dict) else None
    if not isinstance(optimized, dict):
        return "grids is not an object with 'optimized'"
    for steps, levels in optimized.items():
        if not _levels_ok(steps, levels):
            return (f"grids.optimized[{steps[:24]!r}] is not that many positive, descending levels below 1e150 (their "
                    f"squares are variances)")
    learned = grids.get("learned", {})
    if not isinstance(learned, dict):
        return "grids.learned is not an object (solver key -> {steps: levels})"
    for key, by_steps in learned.items():
        if key not in LEARNED_KEYS:
            return (f"grids.learned[{key[:24]!r}] is not a deterministic solver's key ({', '.join(LEARNED_KEYS)}: "
                    f"the solver, with its order where the sampler's name has it)")
        if not isinstance(by_steps, dict):
            return f"grids.learned[{key!r}] is not an object (steps -> levels)"
        for steps, levels in by_steps.items():
            if isinstance(levels, dict):  # {"levels": ..., "offsets": [steps][K]}: per-subspace offsets too
                offsets = levels.get("offsets")
                if set(levels) != {"levels", "offsets"} or not _offsets_ok(steps, offsets):
                    return (f"grids.learned[{key!r}][{steps[:24]!r}] is not {{'levels', 'offsets'}} with that many "
                            f"rows of per-subspace offsets (finite, |offset| < 50, the first row 0)")
                levels = levels["levels"]
            per_class = isinstance(levels, list) and bool(levels) and all(isinstance(v, list) for v in levels)
            if per_class and not entry.get("class_schedules"):
                return (f"grids.learned[{key!r}][{steps[:24]!r}] has one grid per class, and the model's schedule is "
                        f"not class-conditional")
            if not all(_levels_ok(steps, one) for one in (levels if per_class else [levels])):
                return (f"grids.learned[{key!r}][{steps[:24]!r}] is not that many positive, descending levels below "
                        f"1e150 (their squares are variances), or one such list per class")
    return None


def _offsets_ok(steps: Any, offsets: Any) -> bool:
    """`steps` rows of K per-subspace log-variance offsets: finite, below 50 in size, the first row (the start
    noise) all 0."""
    if not (isinstance(steps, str) and _COUNT.match(steps) and isinstance(offsets, list)
            and len(offsets) == int(steps) and all(isinstance(r, list) and r for r in offsets)
            and len({len(r) for r in offsets}) == 1):
        return False
    values = [v for r in offsets for v in r]
    return (all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and abs(v) < 50
                for v in values) and all(v == 0 for v in offsets[0]))


def _levels_ok(steps: Any, levels: Any) -> bool:
    """A step count (a JSON key) and that many positive, strictly descending levels below 1e150."""
    return (isinstance(steps, str) and bool(_COUNT.match(steps)) and isinstance(levels, list)
            and len(levels) == int(steps)
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1e150 for v in levels)
            and all(b < a for a, b in zip(levels, levels[1:])))


def _measure(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def score_problem(score: Any) -> str | None:
    """What is wrong with a model's recorded score (its best measured FD at one NFE: `names.set_scores`), or None."""
    if not isinstance(score, dict) or not _is_int(score.get("nfe"), 1):
        return "expected an object with a positive integer nfe"
    if not (_measure(score.get("fd")) and _measure(score.get("se"))):
        return "fd and se must be finite, non-negative numbers"
    if not all(isinstance(score.get(k), str) for k in ("solver", "grid")):
        return "solver and grid must be names"
    if score.get("secondary") not in (None, *SECONDARIES) or not (score.get("order") is None
                                                                   or _is_int(score["order"], 1)):
        return "secondary or order is not a secondary point / a positive integer or null"
    return None


def choice_problem(nfe: Any, choice: Any, models: Mapping[str, Any]) -> str | None:
    """What is wrong with the per-NFE choice recorded for `nfe` (a string key), given the model entries, or None:
    it must run at its NFE as the solver table says (`sampling.spec.resolve_sampler`, through the family's
    `Family.resolve_sampler`), on a fitted grid the model has where it takes one."""
    if not (isinstance(nfe, str) and _COUNT.match(nfe)):
        return "the NFE is not a positive integer"
    if not isinstance(choice, dict) or not all(isinstance(choice.get(k), str) for k in ("model", "solver", "grid")):
        return "expected an object with model, solver and grid"
    if choice.get("secondary") not in (None, *SECONDARIES):
        return f"secondary {choice.get('secondary')!r} is not {', '.join(map(repr, SECONDARIES))} or null"
    order = choice.get("order")
    if order is not None and not _is_int(order, 1):
        return f"order {order!r} is not a positive integer or null"
    nfes = choice.get("nfes")  # a line measured at its own NFEs only (`sampling.spec.choose_for_nfe`)
    if nfes is not None and not (isinstance(nfes, list) and nfes and all(_is_int(n, 1) for n in nfes)):
        return f"nfes {nfes!r} is not a list of positive integers or absent"
    model = choice["model"]
    if model not in models and model not in EMBEDDED:
        return f"model {model!r} is not a shipped model ({', '.join(models) or 'none'}) or an embedded one"
    family = family_registry.family_of(models[model] if model in models else {})
    try:
        plan = family.resolve_sampler(choice["solver"], choice["grid"], choice.get("secondary"), int(nfe),
                                        order)
    except ValueError as e:
        return str(e)
    grids = (models.get(model) or {}).get("grids", {})
    if plan.grid == "optimized" and str(plan.steps) not in grids.get("optimized", {}):
        return f"grid: {model!r} has no optimized grid fitted for {plan.steps} steps"
    key = learned_key(plan.solver, plan.order, plan.secondary)
    if plan.grid == "learned" and str(plan.steps) not in grids.get("learned", {}).get(key, {}):
        return f"grid: {model!r} has no grid learned for {key} at {plan.steps} steps"
    return None


def _first_problem(doc: Any) -> tuple[str, str] | None:
    """(the entry, what is wrong with it) for the first wrong entry of a manifest document, or None."""
    for name, entry in doc["models"].items():
        problem = entry_problem(entry)
        if problem:
            return f"models[{name[:80]!r}]", problem
    marked = [name for name, entry in doc["models"].items() if entry.get("default")]
    if len(marked) > 1:
        return "models", f"{', '.join(map(repr, marked))} are all marked default (expected one at most)"
    retired = doc.get("retired", [])
    if not (isinstance(retired, list) and all(isinstance(f, str) and _MODEL_FILE.match(f) for f in retired)):
        return "retired", "not a list of .safetensors names in the folder"
    defaults = doc.get("defaults", {})
    if not isinstance(defaults, dict):
        return "defaults", "not an object"
    for nfe, choice in defaults.items():
        problem = choice_problem(nfe, choice, doc["models"])
        if problem:
            return f"defaults[{nfe[:24]}]", problem
    return None


def validate(doc: Any, path: Path, *, updating: bool = False) -> None:
    """ManifestError naming the first entry that is wrong (see the module docstring for the rules); `updating`:
    `doc` is what an update would write, and the message says that the update is refused."""
    if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT or not isinstance(doc.get("models"), dict):
        found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise ManifestError(f"{path}: not a shipped-model manifest (format {found!r}, expected {MANIFEST_FORMAT!r})")
    problem = _first_problem(doc)
    if problem:
        what = "not updated, the update would break" if updating else "corrupt manifest:"
        raise ManifestError(f"{path}: {what} {problem[0]}: {problem[1]}")


def _parse(path: Path, data: bytes) -> Manifest:
    try:
        doc = parse_json(data, str(path))
    except StoredFileError as e:
        raise ManifestError(f"{e} (corrupt manifest)") from None
    validate(doc, path)
    return Manifest(path, doc)


def read_manifest(assets: str | os.PathLike | None = None) -> Manifest:
    """The validated registry of `assets` (default: assets_dir()); a folder without manifest.json is an empty one.
    Parsed once per version of the file."""
    path = Path(assets if assets is not None else assets_dir()).absolute() / "manifest.json"
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        return Manifest(path, {"format": MANIFEST_FORMAT, "models": {}})
    except OSError as e:
        raise ManifestError(f"{path}: unreadable manifest ({e.strerror})") from None
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"{path}: corrupt manifest (more than {MAX_MANIFEST_BYTES} bytes)")
    cached = _CACHE.get(path)
    if cached is None or cached[0] != data:
        cached = (data, _parse(path, data))
        _CACHE[path] = cached
    return cached[1]


def _retire(assets: Path, old: Mapping[str, Any], new: dict) -> None:
    """new['retired']: the files the old manifest named (or had retired) that the new one does not name and
    that are still there."""
    named = {entry["file"] for entry in new["models"].values()}
    retired = {entry["file"] for entry in old["models"].values()} | set(old.get("retired", []))
    new["retired"] = sorted(f for f in retired - named if (assets / f).exists())
    if not new["retired"]:
        del new["retired"]


def _garbage(assets: Path, doc: Mapping[str, Any]) -> list[Path]:
    """The files `doc` retired, staged files of an interrupted update, and their temporary files (a killed write
    leaves one)."""
    named = {entry["file"] for entry in doc["models"].values()}
    orphans = {p.name for p in assets.iterdir() if (_STAGED.match(p.name) and p.name not in named)
               or _STAGED_TEMP.match(p.name)}
    return [assets / name for name in sorted((set(doc.get("retired", [])) - named) | orphans)]


def update(assets: str | os.PathLike, change: Callable[[dict], None], files: Mapping[str, bytes] | None = None
           ) -> Manifest:
    """One atomic update of the assets folder: `change(doc)` edits a copy of the manifest (it may raise: then
    nothing is written), `files` (name -> bytes, new staged names) are written exclusively, the manifest is
    switched in one rename, and files that no manifest names any more are removed."""
    assets = Path(assets).absolute()
    assets.mkdir(parents=True, exist_ok=True)
    with folder_lock(assets):
        old = read_manifest(assets)
        doc = copy.deepcopy(dict(old.doc))
        change(doc)
        _retire(assets, old.doc, doc)
        validate(doc, old.path, updating=True)
        for name, blob in (files or {}).items():
            target = assets / name
            if not (target.is_file() and target.read_bytes() == blob):  # the same content staged by a killed run
                remove_file(target)
                atomic_write_bytes(target, blob, replace=False)
        atomic_write_bytes(old.path, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode())
        for path in _garbage(assets, doc):
            remove_file(path)
    return read_manifest(assets)
