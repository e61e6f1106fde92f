"""Training recipes (shipped in `aniso_fast/recipes/*.json`, or any recipe file): the rows of the results table, how each is trained, and the runner
behind `python -m aniso_fast.evaluate train-recipe`.

A row names its training arguments (`python -m aniso_fast.train <train> --out <out>`), the row it fine-tunes
from (`init_from`), the shipped model it becomes (`export`) and the samplers of its evaluation (`eval`, the
first one the row's own), each one its family takes (`Family.check_sampler`; the family is the training
arguments' `--family`). An `eval` entry runs at the table's NFEs, or at its own `nfes` (e.g. VSDM's
Euler-Maruyama at 50 and 200 steps).
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from ..processes import registry
from .. import store
from ..store.checkpoint import latest_checkpoint, read_meta
from ..training.config import config_from_argv
from ..sampling.spec import MAX_NFE, Sampler

__all__ = ["RECIPE_FORMAT", "RECIPE_DIR", "shipped_recipes", "resolve_recipe", "load_recipe", "sampler_key",
           "sampler_for", "select_rows", "resolve_row", "shipped_id", "train_recipe", "peer_rows"]

RECIPE_FORMAT = "aniso_fast.recipe/1"
RECIPE_DIR = Path(__file__).resolve().parents[1] / "recipes"  # shipped with the package, found from anywhere
_EVAL_KEYS = ("solver", "grid", "secondary", "order", "optional", "nfes", "ablation")


def sampler_for(cfg: dict, nfe: int | None = None, family: str = "core") -> Sampler:
    """The sampler of an `eval` entry or a results-table cell for a model of `family` at `nfe` (None: the entry's
    first own NFE, else one every sampler can spend, for checking the entry alone); an entry with its own `nfes`
    spends no other. ValueError naming the argument (solver, grid, secondary, order, nfe)."""
    own = cfg.get("nfes")
    if nfe is None:
        nfe = own[0] if own else MAX_NFE - 1
    elif own and nfe not in own:
        raise ValueError(f"nfe: this sampler runs at its own NFEs ({', '.join(map(str, own))}) only, got {nfe}")
    return registry.get(family).resolve_sampler(cfg["solver"], cfg["grid"], cfg.get("secondary"), nfe, cfg.get("order"))


def sampler_key(cfg: dict, family: str = "core") -> tuple:
    """(solver, grid, secondary, order) of an `eval` entry or a results-table cell: secondary None for Euler,
    Euler-Maruyama and the multistep solvers, order None except for the multistep solvers (their default order
    filled in)."""
    plan = sampler_for(cfg, family=family)
    return (plan.solver, plan.grid, plan.secondary, plan.order)


def _check_nfes(nfes) -> None:
    """An entry's own NFEs: a non-empty list of distinct ints (each then resolved by the entry's sampler)."""
    if not isinstance(nfes, list) or not nfes or len(set(nfes)) != len(nfes) \
            or not all(isinstance(n, int) and not isinstance(n, bool) for n in nfes):
        raise ValueError(f"nfes: expected a non-empty list of distinct integers, got {nfes!r}")


def _stage_argv(row: dict) -> list[str]:
    return [*row["train"], "--out", row["out"]]


def _check_row(row, path: Path, seen: set) -> None:
    if not isinstance(row, dict):
        raise ValueError(f"{path}: every row must be a JSON object, got {row!r}")
    if isinstance(row.get("train"), str):  # one command-line string per stage, as typed in a shell
        try:
            row["train"] = shlex.split(row["train"])
        except ValueError as e:
            raise ValueError(f"{path}: row {row.get('name', '?')!r}: train: {e}") from None
    for key in ("name", "label", "out", "train", "eval"):
        if key not in row:
            raise ValueError(f"{path}: row {row.get('name', '?')!r} lacks {key!r}")
    name = row["name"]
    for key in ("name", "label", "out"):
        if not isinstance(row[key], str) or not row[key]:
            raise ValueError(f"{path}: row {name!r}: {key!r} must be a non-empty string, got {row[key]!r}")
    for key in ("init_from", "export"):
        if row.get(key) is not None and not isinstance(row[key], str):
            raise ValueError(f"{path}: row {name!r}: {key!r} must be a string or null, got {row[key]!r}")
    if not isinstance(row["train"], list) or not all(isinstance(a, str) for a in row["train"]):
        raise ValueError(f"{path}: row {name!r}: 'train' must be a string or a list of strings")
    if name in seen:
        raise ValueError(f"{path}: row name {name!r} appears twice")
    parent = row.get("init_from")
    if parent is not None and parent not in seen:
        raise ValueError(f"{path}: row {name!r} starts from {parent!r}, which is not an earlier row")
    if any(a in ("--out", "--init-from", "--resume") for a in row["train"]):
        raise ValueError(f"{path}: row {name!r}: --out, --init-from and --resume are set by the runner")
    if not isinstance(row["eval"], list) or not row["eval"]:
        raise ValueError(f"{path}: row {name!r}: 'eval' must be a non-empty list of samplers")
    try:
        family = config_from_argv(_stage_argv(row)).family
    except ValueError as e:
        raise ValueError(f"{path}: row {name!r}: training arguments: {e}") from None
    keys = set()
    for cfg in row["eval"]:
        if not isinstance(cfg, dict) or not {"solver", "grid"} <= set(cfg) or set(cfg) - set(_EVAL_KEYS):
            raise ValueError(f"{path}: row {name!r}: unknown sampler {cfg} (expected solver, grid and optionally "
                             f"secondary, order, optional, nfes, ablation)")
        try:
            if "nfes" in cfg:
                _check_nfes(cfg["nfes"])
                for nfe in cfg["nfes"]:
                    sampler_for(cfg, nfe, family)
            key = sampler_key(cfg, family)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: row {name!r}: sampler {cfg}: {e}") from None
        if key in keys and "nfes" not in cfg:  # a repeat with its own nfes adds NFEs to that sampler's line
            raise ValueError(f"{path}: row {name!r}: sampler {cfg} appears twice")
        keys.add(key)
        for k, v in zip(("secondary", "order"), key[2:]):  # normalised: one spelling per sampler
            if v is None:
                cfg.pop(k, None)
            else:
                cfg[k] = v
    if row["eval"][0].get("optional") or "nfes" in row["eval"][0]:
        raise ValueError(f"{path}: row {name!r}: the first sampler is the row's own (its figure and Inception "
                         f"cells use it at the table's NFEs): it cannot be optional or have its own nfes")


def shipped_recipes() -> list[str]:
    """The names of the recipes shipped with the package (`aniso_fast/recipes/NAME.json`)."""
    return sorted(p.stem for p in RECIPE_DIR.glob("*.json"))


def resolve_recipe(spec: str | os.PathLike) -> Path:
    """A recipe file: `spec` itself when it is an existing file, else the shipped recipe of that name (`fmnist`);
    ValueError naming both choices otherwise."""
    path = Path(spec)
    if path.is_file():
        return path
    if path.suffix == "" and path.name == str(spec) and (RECIPE_DIR / f"{path.name}.json").is_file():
        return RECIPE_DIR / f"{path.name}.json"
    raise ValueError(f"{spec}: no such recipe file, and not a shipped recipe ({', '.join(shipped_recipes())})")


def load_recipe(spec: str | os.PathLike) -> dict:
    """Read and check a recipe (a file, or a shipped recipe's name: `resolve_recipe`): rows with a unique name,
    the training arguments, the parent row (init-from), the shipped name and the samplers of the evaluation.
    ValueError naming the file for anything else."""
    path = resolve_recipe(spec)
    try:
        recipe = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable JSON recipe ({e})") from None
    fmt = recipe.get("format") if isinstance(recipe, dict) else None
    if fmt != RECIPE_FORMAT:
        raise ValueError(f"{path}: not a recipe (format {fmt!r}, expected {RECIPE_FORMAT!r})")
    if not isinstance(recipe.get("rows"), list) or not recipe["rows"]:
        raise ValueError(f"{path}: 'rows' must be a non-empty list")
    seen = set()
    for row in recipe["rows"]:
        _check_row(row, path, seen)
        seen.add(row["name"])
    peers = recipe.get("peers")
    if peers is not None:
        names = [peers] if isinstance(peers, str) else peers
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise ValueError(f"{path}: 'peers' names the rows of the isotropic peers: a row name or a list of them, "
                             f"got {peers!r}")
        missing = [n for n in names if n not in seen]
        if missing:
            raise ValueError(f"{path}: 'peers' names the rows of the isotropic peers; no row "
                             f"{', '.join(map(repr, missing))}")
    targets = recipe.get("targets")
    if targets is not None:
        _check_targets(targets, path)
    return recipe


def peer_rows(recipe: dict) -> list[str]:
    """The rows of the isotropic peers (the recipe's `peers`: one row name or a list), [] for none."""
    peers = recipe.get("peers")
    return [] if peers is None else [peers] if isinstance(peers, str) else list(peers)


def _check_targets(targets, path) -> None:
    """`targets`: {"ratio": [NFE, ...], "below": [NFE, ...], "max_ratio": r, "converge": NFE} (all optional)."""
    known = {"ratio", "below", "max_ratio", "converge"}
    if not isinstance(targets, dict) or set(targets) - known:
        raise ValueError(f"{path}: 'targets' must be an object with keys among {', '.join(sorted(known))}")
    for key in ("ratio", "below"):
        v = targets.get(key, [])
        if not isinstance(v, list) or not all(isinstance(k, int) and not isinstance(k, bool) and k > 0 for k in v):
            raise ValueError(f"{path}: targets.{key} must be a list of NFEs (positive integers), got {v!r}")
    r = targets.get("max_ratio", 0.8)
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r:
        raise ValueError(f"{path}: targets.max_ratio must be a positive number, got {r!r}")
    c = targets.get("converge", 5)
    if isinstance(c, bool) or not isinstance(c, int) or c < 1:
        raise ValueError(f"{path}: targets.converge must be an NFE (a positive integer), got {c!r}")


def select_rows(recipe: dict, names: Sequence[str] | None) -> list[dict]:
    """The rows called `names`, in the recipe's order (all rows for None or empty); ValueError for a name the
    recipe lacks, listing its rows."""
    known = [row["name"] for row in recipe["rows"]]
    unknown = [name for name in names or () if name not in known]
    if unknown:
        raise ValueError(f"only: no row {', '.join(map(repr, unknown))} in the recipe; its rows: {', '.join(known)}")
    return [row for row in recipe["rows"] if not names or row["name"] in names]


def _stage_state(row: dict) -> dict:
    """Where a row's training stands: target steps (from its training configuration), latest checkpoint, done."""
    target = config_from_argv(_stage_argv(row)).steps
    latest = latest_checkpoint(row["out"])
    step = read_meta(latest)["step"] if latest is not None else 0
    return {"target_steps": target, "latest": latest, "step": step, "done": latest is not None and step >= target}


def shipped_id(name: str) -> str:
    """A shipped model's id in cache keys and results documents: its file's SHA-256."""
    return f"shipped:{store.shipped_models()[name]['sha256']}"


def resolve_row(row: dict, source: str = "auto") -> dict:
    """The model a table row evaluates: its shipped model (`row['export']` in the manifest) or the latest
    checkpoint in `row['out']` ('auto': shipped first). Returns status, where, an id for caching, a loader and the
    model's fitted grids (`store.fitted_grids`; none for a checkpoint)."""
    shipped = store.shipped_models()
    name = row.get("export")
    if source in ("auto", "shipped") and name in shipped:
        entry = shipped[name]
        trained = f"{entry['stage']} stage" if entry.get("stage") else f"{entry.get('family') or 'core'} family"
        return {"status": "ok", "where": f"shipped model `{name}` ({trained}, step {entry['step']}, "
                                         f"{entry['kimg']:g} kimg)", "id": shipped_id(name),
                "load": lambda device="cpu": store.StoredModel.open(name).load(device), "fitted": store.fitted_grids(name)}
    if source in ("auto", "checkpoint"):
        try:
            state = _stage_state(row)
        except (OSError, ValueError):  # an unreadable checkpoint counts as none
            state = {"latest": None}
        if state["latest"] is not None:
            meta = read_meta(state["latest"])
            done = "" if state["done"] else f", unfinished: {state['step']} of {state['target_steps']} steps"
            path = state["latest"]
            return {"status": "ok", "where": f"checkpoint `{path}` (not exported{done})",
                    "id": f"checkpoint:{meta['tensor_sha256']}", "load": lambda device="cpu": store.StoredModel.open(path).load(device),
                    "fitted": {}}
    where = {"auto": f"no shipped model `{name}` and no checkpoint in `{row['out']}`",
             "shipped": f"no shipped model `{name}`", "checkpoint": f"no checkpoint in `{row['out']}`"}[source]
    return {"status": "missing", "where": where, "id": None, "load": None, "fitted": {}}


def train_recipe(recipe: dict, *, only: Sequence[str] | None = None, dry_run: bool = False, export: bool = True,
                 python: str = sys.executable, quiet_seconds: float = 600.0, extra: Sequence[str] = (),
                 runner: Callable = subprocess.run) -> list[list[str]]:
    """Run every stage of a recipe in order: a finished stage is skipped, a started one continues with
    `--resume`, a new one starts `--init-from` its parent's final checkpoint; then export the shipped models.

    Before any stage runs, refuses (RuntimeError) a stage whose log was written in the last `quiet_seconds`
    (another process is training there) and one whose parent has not finished and is not run here; ValueError
    for a name in `only` that the recipe lacks.
    """
    selected = select_rows(recipe, only)
    rows = {row["name"]: row for row in recipe["rows"]}
    shipped = store.shipped_models()

    def from_shipped(row: dict, state: dict) -> bool:
        # a stage never run here whose model ships stands as done, unless named in `only` (then it retrains)
        return state["latest"] is None and row.get("export") in shipped and not (only and row["name"] in only)

    plan, ready = [], set()  # ready: rows finished, or run by this call before the rows after them
    for row in selected:
        state = _stage_state(row)
        plan.append((row, state))
        ready.add(row["name"])
        if from_shipped(row, state) or state["done"] or dry_run:
            continue
        log = Path(row["out"]) / "log.jsonl"
        if log.exists() and time.time() - log.stat().st_mtime < quiet_seconds:
            raise RuntimeError(f"{row['name']}: {log} was written {time.time() - log.stat().st_mtime:.0f} s ago; "
                               f"another process seems to be training in {row['out']} (wait for it to finish)")
        parent = row.get("init_from")
        if parent is not None and parent not in ready:
            pstate = _stage_state(rows[parent])
            if not (from_shipped(rows[parent], pstate) or pstate["done"]):
                raise RuntimeError(f"{row['name']}: its parent stage {parent!r} has not finished")

    commands = []
    for row, state in plan:
        if from_shipped(row, state):
            print(f"{row['name']}: no run in {row['out']}; the shipped model {row['export']!r} stands for it",
                  flush=True)
            continue
        if not state["done"]:
            cmd = [python, "-m", "aniso_fast.train", *row["train"], *extra, "--out", row["out"]]
            parent = row.get("init_from")
            if parent is not None:
                prow = rows[parent]
                pstate = _stage_state(prow)
                if from_shipped(prow, pstate):
                    source = str(store.StoredModel.open(prow["export"]).path)  # the EMA network, which fine-tuning starts from
                else:
                    source = str(pstate["latest"] or f"<final checkpoint of {prow['out']}>")
                cmd += ["--init-from", source]
            if state["latest"] is not None:
                cmd.append("--resume")
            commands.append(cmd)
            print(("would run: " if dry_run else "running: ") + shlex.join(cmd), flush=True)
            if not dry_run:
                runner(cmd, check=True)
        if export and row.get("export") and not dry_run:
            final = latest_checkpoint(row["out"])
            entry = store.shipped_models().get(row["export"])
            sha = read_meta(final)["tensor_sha256"]
            if entry is None or entry.get("source_sha256") != sha:
                print(f"exporting {final} as {row['export']}", flush=True)
                # replaces the row's own earlier export; a stray file of that name is refused
                store.export_model(final, row["export"], row["label"], force=entry is not None)
    return commands
