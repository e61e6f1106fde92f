"""The precision gate (`python -m aniso_fast.evaluate precision-gate`): whether running the network in a lower
precision (`networks.execution`, e.g. bf16) changes the results table's Frechet distance.

For each NFE, the sampler `sample` uses there by default (the per-NFE choice: model, solver, grid) draws the
results table's N class-balanced samples (seeds 0..N-1, sample seed i of class i mod 10) once with the network in
fp32 and once in the candidate precision, same seeds; both are scored as a table cell (the shipped classifier's
features, FD to the test set, bootstrap SE), and the paired difference gets its own bootstrap SE (the same rows
resampled for both). The gate holds at an NFE when |FD_candidate - FD_fp32| is within the fp32 cell's bootstrap
SE, and holds when it holds at every NFE. Samples and features go to the table's cache under the table's keys
(the fp32 cells are the table's own).
"""
from __future__ import annotations

import time
from typing import Mapping, Sequence

import numpy as np

from .. import store
from ..networks.execution import FP32, Execution, execute
from ..utils.machine import machine_description
from .metrics import feature_statistics, frechet_distance_from_statistics
from .recipes import sampler_for, sampler_key, shipped_id
from .table import _Cache, _cell_key, _generate, _precision_key, _seed_list, bootstrap_difference_se, bootstrap_se

__all__ = ["precision_gate", "gate_markdown", "precision_section"]


def _cell(feats: np.ndarray, scorer, draws: int) -> dict:
    fd = frechet_distance_from_statistics(*feature_statistics(feats), scorer.mu, scorer.sigma)
    return {"fd": fd, "se": bootstrap_se([feats], scorer.mu, scorer.sigma, draws)}


def precision_gate(choices: Mapping[int, dict], scorer, candidate: Execution, *, device="cpu", n: int = 1000,
                   bootstrap: int = 200, batch: int = 250, cache=None, fresh: bool = False,
                   progress: bool = True) -> dict:
    """The gate's result document. `choices`: per NFE the sampler to test, {model (a shipped name), solver, grid,
    secondary, order} (`pipeline.nfe_choice`); `candidate`: the policy compared with fp32."""
    if candidate.precision == "fp32":
        raise ValueError("candidate: expected a lower precision than fp32 (bf16 or fp16), got fp32")
    folder = _Cache(cache, fresh)
    rows = []
    for nfe, choice in sorted(choices.items()):
        name = choice["model"]
        stored = store.StoredModel.open(name)
        model, schedule = stored.load(device)
        cfg = {k: choice.get(k) for k in ("solver", "grid", "secondary", "order")}
        plan = sampler_for(cfg, nfe, stored.family)
        seeds = _seed_list(0, n)
        row = {"nfe": nfe, "model": name, "sampler": plan.name, **_cell_key(cfg)}
        feats = {}
        for execution in (FP32, candidate):
            t0 = time.perf_counter()
            execute(model, execution)
            what = {"model": shipped_id(name), **_cell_key(cfg), "nfe": nfe, "n": n, "seed_set": 0,
                    **_precision_key(model, execution)}
            feats[execution.precision] = folder.features(what, scorer, lambda: _generate(
                model, schedule, cfg, nfe, seeds, batch, stored.fitted_grids, device=device))
            row[execution.precision] = {**_cell(feats[execution.precision], scorer, bootstrap),
                                        "seconds": round(time.perf_counter() - t0, 1)}
        execute(model, FP32)
        low, base = row[candidate.precision], row["fp32"]
        row["difference"] = low["fd"] - base["fd"]
        row["difference_se"] = bootstrap_difference_se(feats[candidate.precision], feats["fp32"], scorer.mu,
                                                       scorer.sigma, bootstrap)
        row["holds"] = abs(row["difference"]) <= base["se"]
        rows.append(row)
        if progress:
            print(f"NFE {nfe:3d} {name} {plan.name}: FD fp32 {base['fd']:.3f} ± {base['se']:.3f}, "
                  f"{candidate.precision} {low['fd']:.3f} ± {low['se']:.3f}, difference {row['difference']:+.3f} "
                  f"± {row['difference_se']:.3f} ({'holds' if row['holds'] else 'fails'})", flush=True)
    return {"protocol": {"n": n, "seeds": f"0..{n - 1}", "classes": "seed mod 10", "bootstrap": bootstrap,
                         "scorer": scorer.id, "num_reference": getattr(scorer, "num_reference", None),
                         "baseline": "fp32", "candidate": candidate.precision,
                         "candidate_memory_format": candidate.memory_format,
                         "rule": "|FD_candidate - FD_fp32| <= the fp32 cell's bootstrap SE at every NFE"},
            "machine": machine_description(), "rows": rows, "holds": all(r["holds"] for r in rows)}


def _verdict(result: dict) -> str:
    low = result["protocol"]["candidate"]
    return (f"the gate **holds**: {low} changes no FD by more than its fp32 cell's bootstrap SE" if result["holds"]
            else f"the gate **fails**: {low} moves an FD by more than its fp32 cell's bootstrap SE")


def _table(result: dict) -> list[str]:
    low = result["protocol"]["candidate"]
    lines = [f"| NFE | model, sampler | FD fp32 | FD {low} | {low} − fp32 | paired SE | within one SE |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['nfe']} | {r['model']}, {r['sampler']} | {r['fp32']['fd']:.3f} ± {r['fp32']['se']:.3f} "
                     f"| {r[low]['fd']:.3f} ± {r[low]['se']:.3f} | {r['difference']:+.3f} | "
                     f"{r['difference_se']:.3f} | {'yes' if r['holds'] else 'no'} |")
    return lines


def gate_markdown(result: dict) -> str:
    """docs/precision_gate.md (the command that made it: `result['command']`)."""
    p = result["protocol"]
    return "\n".join([
        f"# Precision gate: {p['candidate']} against fp32", "",
        f"Regenerate: `{result.get('command', 'python -m aniso_fast.evaluate precision-gate')}`", "",
        f"Per NFE, the sampler `python -m aniso_fast.sample` uses there by default, N = {p['n']} samples (seeds "
        f"{p['seeds']}, class {p['classes']}) with the network in fp32 (contiguous) and in {p['candidate']} "
        f"({p.get('candidate_memory_format', 'contiguous')}, as sampling runs it by default; torch.autocast around "
        f"the network only; the solver, schedule and subspace ops unchanged), the same seeds. Each is scored as a "
        f"results-table cell: FD to the {p['num_reference'] or ''} test images in the shipped classifier's features "
        f"(`{p['scorer']}`), ± its bootstrap SE ({p['bootstrap']} draws). Paired SE: the bootstrap SE of the "
        f"difference, both sets resampled with the same rows. Rule: {p['rule']}.", "",
        *_table(result), "",
        f"Verdict: {_verdict(result)}.", "",
        f"Machine: {result['machine']}.", ""])


def precision_section(result: dict, table_precision: str = "fp32", link: str = "precision_gate.md") -> list[str]:
    """The short "Precision" section of docs/RESULTS.md (`write_table` adds it when the gate's JSON lies beside)."""
    p = result["protocol"]
    return ["## Precision", "",
            f"The networks of the table above ran in {table_precision}. Running them in {p['candidate']} "
            f"({p.get('candidate_memory_format', 'contiguous')}; autocast around the network only; `--precision` of "
            f"`sample`, `evaluate` and the Python API) moves the FD of "
            f"the default sampler by:", "", *_table(result), "",
            f"N = {p['n']}, the table's protocol; {_verdict(result)} ([details]({link})). Command: "
            f"`{result.get('command', 'python -m aniso_fast.evaluate precision-gate')}`.", ""]
