"""Run the benchmark suite and write bench/RESULTS.md from its results: one command, no number typed by hand.

    python bench/report.py                       # full run -> bench/results/<device>.json -> bench/RESULTS.md
    python bench/report.py --no-run              # rewrite RESULTS.md from the existing JSON
    python bench/report.py -- -k "32x32x3"       # pass arguments on to pytest (a partial run)
    python bench/report.py --e2e                 # throughput (issue 24): bench/test_bench_e2e.py, _forward.py,
                                                 # _peers.py -> bench/results/<device>-e2e.json -> its section
                                                 # of bench/RESULTS.md (the rest of the file is kept)

<device> is `cuda` on a machine with a GPU (the run then holds the CPU and the GPU cases), else `cpu`. The default
run leaves out the throughput files (E2E_FILES); a full rewrite of RESULTS.md keeps the throughput section of the
existing <device>-e2e.json.
Every ratio below compares medians taken in the same run; the implementations of one case run back to back.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
FUSED = ("cpp", "cuda", "triton")
OP_IMPLS = ("authors", "reference", "grouped", "pair", "cpp", "cuda", "triton")
OPS = ("scale", "heun", "dot", "block")
OP_TITLES = {"scale": "scale: `y = sum_k s_k P_k x` (combine(u, a))",
             "heun": "Heun update: `combine(u, a, v, c, base)`",
             "dot": "dot: `<P_k u, v>` [B, K]",
             "block": "block_combine: `[x'; v'] = sum_k P_k (B_k [x; v])` (VSMD's phase-space op; `reference`, "
                      "`grouped`: two plain-PyTorch combine calls; `pair`: two fused combine calls)"}
BASIS_ORDER = ("dct2", "dct4", "pca", "pca_class")
SIZE_ORDER = ("28x28x1", "32x32x3", "64x64x3")
HEADLINE = {"size": "32x32x3", "batch": 256}  # the CPU targets are stated at this size
FEW_ROUNDS = 3  # medians of fewer rounds are marked
LOADED_SHARE = 0.10  # other processes using this share of the cores or more: the run is flagged as under load
PLAIN_ALL = ("reference", "grouped", "authors")  # every plain-PyTorch composition measured
NORM_PLAIN = ("torch-channels_last", "torch-via-contiguous")  # plain GroupNorm of a channels_last tensor (test_bench_norm.py)
E2E_FILES = ("bench/test_bench_e2e.py", "bench/test_bench_forward.py", "bench/test_bench_peers.py")
E2E_BEGIN, E2E_END = "<!-- throughput: begin (python bench/report.py --e2e) -->", "<!-- throughput: end -->"


def _has_gpu() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


# ---------------------------------------------------------------- running

def run_suite(json_path: Path, skips_path: Path, pytest_args: list[str],
              e2e: bool = False) -> tuple[int, bool]:
    """pytest over the throughput files (e2e) or over bench/ without them. The results go to temporary files moved
    into place when pytest ends (pytest-benchmark empties its JSON file at the start: a run that is killed must not
    take the previous results with it)."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    partial_json, partial_skips = json_path.with_name(json_path.name + ".partial"), \
        skips_path.with_name(skips_path.name + ".partial")
    # the throughput cases take seconds each: at least 3 timed rounds for their medians (overridable after `--`)
    files = [*E2E_FILES, "--aniso-min-rounds=3"] if e2e else ["bench/", *(f"--ignore={f}" for f in E2E_FILES)]
    cmd = [sys.executable, "-m", "pytest", *files, "-q", "-p", "no:cacheprovider",
           f"--benchmark-json={partial_json}", f"--aniso-skips={partial_skips}", "--benchmark-columns=median,rounds",
           *pytest_args]
    print("+", " ".join(cmd), flush=True)
    start = time.perf_counter()
    rc = subprocess.call(cmd, cwd=ROOT)
    print(f"pytest exited with {rc} after {time.perf_counter() - start:.0f} s", flush=True)
    if not (partial_json.exists() and partial_json.stat().st_size > 0):
        return rc, False
    os.replace(partial_json, json_path)
    if partial_skips.exists():
        os.replace(partial_skips, skips_path)
    return rc, True


# ---------------------------------------------------------------- formatting helpers

def ms(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    v = seconds * 1e3
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


def mib(n: float | None) -> str:
    """Bytes in the unit that reads best (B, KiB, MiB)."""
    if n is None:
        return "–"
    if abs(n) < 2 ** 10:
        return f"{n:.0f} B"
    if abs(n) < 2 ** 20:
        return f"{n / 2 ** 10:.1f} KiB"
    return f"{n / 2 ** 20:.2f} MiB" if abs(n) < 10 * 2 ** 20 else f"{n / 2 ** 20:.0f} MiB"


def pct(x: float | None) -> str:
    return "?" if x is None else f"{100 * x:.0f}%"


def ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den <= 0:
        return None
    return num / den


def fx(r: float | None) -> str:
    return "–" if r is None else f"{r:.2f}x"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return out


# ---------------------------------------------------------------- the results

class Results:
    def __init__(self, data: dict):
        self.data = data
        self.bench = data["benchmarks"]
        by_key = {}
        for b in self.bench:
            e = b["extra_info"]
            key = (e.get("suite"), e.get("op"), e.get("basis"), e.get("size"), e.get("batch"), e.get("device"),
                   e.get("impl") if e.get("suite") != "train" else (e.get("loss"), e.get("impl")))
            by_key[key] = b
        self.by_key = by_key

    def get(self, suite, op, basis, size, batch, device, impl):
        return self.by_key.get((suite, op, basis, size, batch, device, impl))

    def median(self, *key) -> float | None:
        b = self.get(*key)
        return None if b is None else b["stats"]["median"]

    def devices(self) -> list[str]:
        return sorted({b["extra_info"].get("device") for b in self.bench if b["extra_info"].get("device")},
                      key=lambda d: (d != "cpu", d))

    def cases(self, suite, op, device):
        keys = {(k[2], k[3], k[4]) for k in self.by_key if k[0] == suite and k[1] == op and k[5] == device}
        return sorted(keys, key=lambda k: (BASIS_ORDER.index(k[0]) if k[0] in BASIS_ORDER else 99,
                                           SIZE_ORDER.index(k[1]) if k[1] in SIZE_ORDER else 99, k[2]))

    def best(self, suite, op, basis, size, batch, device, impls) -> tuple[str | None, float | None]:
        found = [(self.median(suite, op, basis, size, batch, device, i), i) for i in impls]
        found = [(t, i) for t, i in found if t is not None]
        if not found:
            return None, None
        t, i = min(found)
        return i, t

    def cell(self, *key) -> str:
        b = self.get(*key)
        if b is None:
            return "–"
        mark = "*" if b["stats"]["rounds"] < FEW_ROUNDS else ""
        return ms(b["stats"]["median"]) + mark


def status(r: float | None, goal: float, higher: bool = True) -> str:
    if r is None:
        return "not measured"
    return "PASS" if (r >= goal if higher else r <= goal) else "MISSED"


# ---------------------------------------------------------------- sections

def section_machine(res: Results, source: str, heading: str = "## Machine",
                    command: str = "python bench/report.py") -> list[str]:
    info = res.data.get("machine_info", {}).get("aniso_fast", {})
    start, end = info.get("start") or {}, info.get("end") or {}
    commit = res.data.get("commit_info", {})
    backends = start.get("backends", {})
    cores = start.get("cpu_count")
    load = start.get("loadavg")
    before, during = info.get("others_cpu_before"), info.get("others_cpu_during")
    loaded = max(before or 0, during or 0) >= LOADED_SHARE
    rows = [
        ["machine (`machine_description()`)", start.get("description") or "not recorded"],
        ["CPU", f"{start.get('cpu_model')} ({cores} logical cores, {start.get('cpu_affinity')} usable, "
                f"torch threads {start.get('torch_threads')})"],
        ["GPU", start.get("gpu") or "none"],
        ["torch / triton / CUDA runtime", f"{start.get('torch')} / {start.get('triton')} / "
                                          f"{start.get('cuda_runtime') or 'none'}"],
        ["backends available", ", ".join(backends.get("available", [])) +
         f" (default: CPU `{backends.get('cpu')}`, CUDA `{backends.get('cuda')}`)"],
        ["instruction set of the C++ CPU kernels", backends.get("cpu_isa") or "not recorded"],
        ["CPU used by other processes", f"{pct(before)} of all cores in the second before the run, {pct(during)} "
                                        f"during it (/proc/stat minus this process's CPU time)"],
        ["load average (1, 5, 15 min)", f"{load} at the start, {end.get('loadavg')} at the end (the end includes "
                                        f"this run's own load)"],
        ["run", f"{res.data.get('datetime')}, commit {str(commit.get('id', '?'))[:10]}"
                f"{' (working tree dirty)' if commit.get('dirty') else ''}, {len(res.bench)} cases, from `{source}`"],
    ]
    out = [heading, ""] + table(["", ""], rows) + [""]
    if loaded:
        out += [f"**Measured under load:** other processes used {pct(before)} of the {cores} cores before the run "
                f"and {pct(during)} during it, so medians are noisy (implementations of one case run back to back, "
                f"so their ratios suffer less than the absolute times). Rerun `{command}` on a quiet "
                "machine for figures to quote.", ""]
    elif before is not None and during is not None:
        out += [f"The machine was quiet: other processes used {pct(before)} of the cores before the run and "
                f"{pct(during)} during it (below {pct(LOADED_SHARE)}).", ""]
    return out


def _gpu_limits(res: Results) -> dict:
    copy = res.get("device", "copy", None, None, None, "cuda", None)
    mm = res.get("device", "matmul_fp32", None, None, None, "cuda", None)
    out = {}
    if copy is not None:
        out["copy_bw"] = copy["extra_info"]["bytes"] / copy["stats"]["median"]
    if mm is not None:
        out["matmul_flops"] = mm["extra_info"]["flops"] / mm["stats"]["median"]
    if "copy_bw" in out and "matmul_flops" in out:
        out["ridge"] = out["matmul_flops"] / out["copy_bw"]
    return out


def section_targets(res: Results) -> list[str]:
    size, B = HEADLINE["size"], HEADLINE["batch"]
    rows = []

    def op_ratio(op, basis, baseline_impls):
        fused = res.median("ops", op, basis, size, B, "cpu", "cpp")
        impl, base = res.best("ops", op, basis, size, B, "cpu", baseline_impls)
        return ratio(base, fused), impl

    r, _ = op_ratio("scale", "dct2", ("authors",))
    rows.append([f"fused DCT 2-subspace scale, {size}, B={B}, CPU (cpp) vs the authors' formulation", "≥ 5x",
                 fx(r), status(r, 5)])
    r, which = op_ratio("scale", "dct2", PLAIN_ALL)
    rows.append([f"same case vs the best plain-PyTorch composition ({which or '–'})", "≥ 1.5x", fx(r),
                 status(r, 1.5)])
    r, _ = op_ratio("scale", "pca_class", ("authors",))
    spread = [ratio(res.median("ops", "scale", "pca_class", s, b, "cpu", "authors"),
                    res.median("ops", "scale", "pca_class", s, b, "cpu", "cpp"))
              for s in SIZE_ORDER for b in (64, 256)]
    spread = [x for x in spread if x is not None]
    extra = f" (all sizes: {min(spread):.2f}x to {max(spread):.2f}x)" if spread else ""
    rows.append([f"class-conditional PCA scale (10 classes, mixed batch), {size}, B={B}, CPU (cpp) vs the label "
                 f"loop", "≥ 5x", fx(r) + extra, status(r, 5)])

    # issue 24: no fused op below its best plain-PyTorch composition, on any benchmarked case of the CPU
    slow, n = [], 0
    for key in res.by_key:
        suite, op, basis, s, b, device, impl = key
        if device != "cpu" or (suite, impl) not in (("ops", "cpp"), ("norm", "fused")):
            continue
        plain = PLAIN_ALL if suite == "ops" else NORM_PLAIN
        _, pt = res.best(suite, op, basis, s, b, device, plain)
        r = ratio(pt, res.median(*key))
        if r is not None:
            n += 1
            if r < 1.0:
                slow.append((r, f"{suite} {op} {basis} {s} B={b}"))
    measured = "not measured" if n == 0 else (
        f"{n - len(slow)} of {n} cases at ≥ 1.0x" + (f"; below: {', '.join(f'{c} {r:.2f}x' for r, c in sorted(slow))}"
                                                     if slow else ""))
    rows.append(["every fused CPU op (subspace ops, GroupNorm) vs the best plain-PyTorch composition of its case "
                 "(issue 24)", "≥ 1.0x on every case", measured,
                 "not measured" if n == 0 else ("MISSED" if slow else "PASS")])

    # allocation: every fused op case on every device
    n, over_cases, casts, worst = 0, [], 0, None
    for b in res.bench:
        e = b["extra_info"]
        if e.get("suite") != "ops" or e.get("impl") not in FUSED:
            continue
        n += 1
        extra = e["peak_bytes"] - e["out_bytes"]  # bytes beyond the output live at the peak
        casts = max(casts, min(extra, e["scalar_bytes"]))
        if extra > e["scalar_bytes"]:
            over_cases.append((extra - e["scalar_bytes"], b["name"]))
    if n == 0:
        rows.append(["fused ops allocate nothing beyond their output", "0 B", "–", "not measured"])
    else:
        worst = max(over_cases) if over_cases else None
        measured = (f"{len(over_cases)} of {n} cases allocate more; largest {worst[0]} B more in `{worst[1]}`"
                    if worst else f"all {n} cases: nothing beyond the output but the fp32 casts of the [B, K] "
                                  f"scalars made by the dispatch layer (at most {casts} B)")
        rows.append(["fused ops allocate nothing beyond their output (peak bytes live during the call minus the "
                     "output; see Peak memory)", "no temporary beyond the [B, K] scalar casts", measured,
                     "MISSED" if worst else "PASS"])

    gpu = _gpu_limits(res)
    bw_cases = []
    cublas = []
    for key, bm in res.by_key.items():
        suite, op, basis, s, b, device, impl = key
        if suite != "ops" or device != "cuda" or impl not in FUSED:
            continue
        e, t = bm["extra_info"], bm["stats"]["median"]
        if "copy_bw" in gpu and e["flops"] / e["bytes"] < gpu.get("ridge", 0):
            bw_cases.append((e["bytes"] / t / gpu["copy_bw"], bm["name"]))
        ref = res.median(suite, op, basis, s, b, device, "reference")
        if ref is not None:
            cublas.append((ref / t, bm["name"]))
    if bw_cases:
        low = min(bw_cases)
        ok = sum(f >= 0.7 for f, _ in bw_cases)
        rows.append(["GPU, memory-bound cases: bytes moved / time vs the measured copy bandwidth", "≥ 70%",
                     f"{ok} of {len(bw_cases)} cases at ≥ 70%; lowest {100 * low[0]:.0f}% (`{low[1]}`)",
                     "PASS" if ok == len(bw_cases) else "MISSED"])
    else:
        rows.append(["GPU, memory-bound cases: within 70% of the measured copy bandwidth", "≥ 70%",
                     "not measured (no GPU)" if "copy_bw" not in gpu else "no memory-bound case", "not measured"])
    if cublas:
        slow = min(cublas)
        ok = sum(r > 1 for r, _ in cublas)
        rows.append(["GPU: fused faster than the cuBLAS composition (the reference backend on CUDA)", "> 1x",
                     f"{ok} of {len(cublas)} cases faster; slowest {slow[0]:.2f}x (`{slow[1]}`)",
                     "PASS" if ok == len(cublas) else "MISSED"])
    else:
        rows.append(["GPU: fused faster than the cuBLAS composition", "> 1x", "not measured (no GPU)",
                     "not measured"])

    for device in [d for d in res.devices() if d in ("cpu", "cuda")]:
        est = res.median("train", "train_step", "dct2", "28x28x1", 32, device, ("estimator", "fused"))
        plain = res.median("train", "train_step", "dct2", "28x28x1", 32, device, ("iso_frozen", "fused"))
        est_ref = res.median("train", "train_step", "dct2", "28x28x1", 32, device, ("estimator", "reference"))
        if est is None and plain is None:
            continue
        r = ratio(est, plain)
        rows.append([f"training step with the estimator vs a plain EDM step (iso loss, frozen tied schedule), "
                     f"{device}", "≤ 3.5x", fx(r), status(r, 3.5, higher=False)])
        r = ratio(est_ref, est)
        rows.append([f"training step with the estimator: fused ops vs the plain-PyTorch (reference) ops, {device}",
                     "≥ 1.2x", fx(r), status(r, 1.2)])
    return ["## The issue's targets", ""] + table(["target", "goal", "measured (ratio of medians)", "status"],
                                                 rows) + [""]


def section_ops(res: Results, device: str) -> list[str]:
    out = [f"## Subspace ops on {device.upper()} (median ms per call; ratios = baseline time / fused time)", ""]
    gpu = _gpu_limits(res) if device == "cuda" else {}
    for op in OPS:
        cases = res.cases("ops", op, device)
        if not cases:
            continue
        impls = [i for i in OP_IMPLS if any(res.get("ops", op, *c, device, i) for c in cases)]
        fused_impls = [i for i in impls if i in FUSED]
        header = ["basis", "size", "B"] + [f"`{i}`" for i in impls] + ["fused vs authors", "fused vs best plain"]
        if "pair" in impls:
            header.append("fused vs two fused combines")
        if gpu.get("copy_bw"):
            header.append("fused bandwidth / copy")
        rows = []
        for (basis, size, B) in cases:
            key = ("ops", op, basis, size, B, device)
            fi, ft = res.best(*key, fused_impls)
            _, at = res.best(*key, ("authors",))
            pi, pt = res.best(*key, PLAIN_ALL)
            row = [basis, size, str(B)] + [res.cell(*key, i) for i in impls]
            row += [fx(ratio(at, ft)), fx(ratio(pt, ft)) + (f" ({pi})" if pi and pt and ft else "")]
            if "pair" in impls:
                row.append(fx(ratio(res.median(*key, "pair"), ft)))
            if gpu.get("copy_bw"):
                e = res.get(*key, fi)["extra_info"] if fi else None
                row.append(f"{100 * e['bytes'] / ft / gpu['copy_bw']:.0f}%" if e else "–")
            rows.append(row)
        out += [f"### {OP_TITLES[op]}", ""] + table(header, rows) + [""]
    return out


def section_norm(res: Results) -> list[str]:
    """The network's GroupNorm (+ SiLU), bench/test_bench_norm.py."""
    keys = sorted({k[1:5] for k in res.by_key if k[0] == "norm"},
                  key=lambda k: (k[0], -int(k[2].split("x")[1]), int(k[2].split("x")[0]), k[1]))
    if not keys:
        return []
    rows = []
    for op, dtype, size, B in keys:
        key = ("norm", op, dtype, size, B, "cpu")
        ft = res.median(*key, "fused")
        pi, pt = res.best(*key, NORM_PLAIN)
        e = res.get(*key, "fused")
        bw = f"{e['extra_info']['bytes'] / ft / 1e9:.1f}" if e and ft else "–"
        rows.append([op.replace("_", " "), dtype, f"{B}x{size}"] +
                    [res.cell(*key, i) for i in (*NORM_PLAIN, "fused", "torch-contiguous")] +
                    [fx(ratio(pt, ft)) + (f" ({pi})" if pi and pt and ft else ""),
                     fx(ratio(res.median(*key, "torch-contiguous"), ft)), bw])
    return ["## The network's GroupNorm on CPU (median ms per call)", "",
            "`ops.norm.group_norm` of a channels_last tensor (`fused`: csrc/cpu/group_norm.cpp, SiLU in the "
            "normalising pass) against the plain PyTorch compositions of the same op: `F.group_norm` (+ `F.silu`) "
            "on the channels_last tensor, or through a contiguous copy and back; and, for scale, PyTorch's kernel on "
            "a tensor that is contiguous already (another layout, so not a composition of this op). The default "
            "U-Net's shapes at batch 64 (`bench/test_bench_norm.py`; no_grad). GB/s: one read and one write of the "
            "tensor over the fused time.", ""] + \
        table(["op", "dtype", "shape", "`torch-channels_last`", "`torch-via-contiguous`", "`fused`",
               "`torch-contiguous` (contiguous input)", "fused vs best plain", "fused vs contiguous input",
               "fused GB/s"], rows) + [""]


def section_step(res: Results, device: str) -> list[str]:
    cases = res.cases("step", "heun_step", device)
    if not cases:
        return []
    impls = [i for i in ("authors", "reference", "cpp", "cuda", "triton")
             if any(res.get("step", "heun_step", *c, device, i) for c in cases)]
    fused_impls = [i for i in impls if i in FUSED]
    header = ["basis", "size", "B"] + [f"`{i}`" for i in impls] + ["fused vs authors", "fused vs reference"]
    rows = []
    for (basis, size, B) in cases:
        key = ("step", "heun_step", basis, size, B, device)
        _, ft = res.best(*key, fused_impls)
        row = [basis, size, str(B)] + [res.cell(*key, i) for i in impls]
        row += [fx(ratio(res.median(*key, "authors"), ft)), fx(ratio(res.median(*key, "reference"), ft))]
        rows.append(row)
    return [f"## One anisotropic Heun step without the network on {device.upper()} (median ms)", "",
            "`aniso_fast.sampling.ode.heun` over a one-step grid (predictor and corrector: two `combine` calls); the "
            "stand-in model's flow returns precomputed tensors. Backend chosen with ANISO_FAST_BACKEND.", ""] + \
        table(header, rows) + [""]


def section_memory(res: Results, device: str) -> list[str]:
    info = res.data.get("machine_info", {}).get("aniso_fast", {})
    method = (info.get("memory_method") or {}).get(device, "?")
    out = [f"## Peak memory on {device.upper()} (bytes newly allocated and live at once during one call)", "",
           f"Method: {method}. The output is included (the fused ops' whole peak should be their output).", ""]
    for op in OPS:
        cases = res.cases("ops", op, device)
        if not cases:
            continue
        impls = [i for i in OP_IMPLS if any(res.get("ops", op, *c, device, i) for c in cases)]
        header = ["basis", "size", "B", "output"] + [f"`{i}`" for i in impls] + \
            ["fused: bytes beyond output", "of which [B, K] scalar casts"]
        rows = []
        for (basis, size, B) in cases:
            key = ("ops", op, basis, size, B, device)
            peaks = {i: res.get(*key, i) for i in impls}
            any_b = next(b for b in peaks.values() if b is not None)
            fused = [b["extra_info"] for i, b in peaks.items() if b is not None and i in FUSED]
            extras = [e["peak_bytes"] - e["out_bytes"] for e in fused]
            rows.append([basis, size, str(B), mib(any_b["extra_info"]["out_bytes"])] +
                        [mib(b["extra_info"]["peak_bytes"]) if b else "–" for b in peaks.values()] +
                        [", ".join(str(x) for x in extras) or "–",
                         ", ".join(str(e["scalar_bytes"]) for e in fused) or "–"])
        out += [f"### {op}", ""] + table(header, rows) + [""]
    return out


def section_train(res: Results) -> list[str]:
    rows = []
    for b in res.bench:
        e = b["extra_info"]
        if e.get("suite") != "train":
            continue
        device = e["device"]
        plain = res.median("train", "train_step", "dct2", "28x28x1", 32, device, ("iso_frozen", e["impl"]))
        fused = res.median("train", "train_step", "dct2", "28x28x1", 32, device, (e["loss"], "fused"))
        rows.append([device, e["loss"], f"`{e['backend']}`", f"{b['stats']['median']:.3f}",
                     str(b["stats"]["rounds"]), mib(e["peak_bytes"]), fx(ratio(b["stats"]["median"], plain)),
                     fx(ratio(b["stats"]["median"], fused)) if e["impl"] != "fused" else "–"])
    if not rows:
        return []
    e = next(b["extra_info"] for b in res.bench if b["extra_info"].get("suite") == "train")
    return ["## Training step (loss + backward)", "",
            f"`AnisoPrecond(fashion_mnist_unet(), DCTBasis(28, 28, 14))` ({e['params']} parameters), batch "
            f"{e['batch']} of {e['size']}. `estimator`: trajectory_loss(estimator=True); `no_estimator`: "
            "trajectory_loss(estimator=False); `iso_frozen`: iso_loss with a frozen tied schedule (the plain EDM "
            "step); `edm`: edm_loss. The backend is set for the whole step with ANISO_FAST_BACKEND. Peak memory: "
            "the same method as above, over the whole step.", ""] + \
        table(["device", "loss", "backend", "median s", "rounds", "peak memory", "vs iso_frozen (same backend)",
               "vs the fused backend"], rows) + [""]


def section_solvers(res: Results) -> list[str]:
    """Every solver at equal NFE on a shipped network (bench/test_bench_solvers.py): time per sample with the
    network, and the solver's own share (the same call with a stand-in flow)."""
    runs = {}
    for b in res.bench:
        e = b["extra_info"]
        if e.get("suite") == "solvers":
            runs[(e["model"], e["solver"], e["grid"], e["run"])] = b
    if not runs:
        return []
    rows = []
    for model, solver, grid in sorted({k[:3] for k in runs}, key=lambda k: (k[0], k[1])):
        net, alone = runs.get((model, solver, grid, "network")), runs.get((model, solver, grid, "solver"))
        e = (net or alone)["extra_info"]
        per = (lambda b: None if b is None else b["stats"]["median"] / e["batch"])
        share = ratio(per(alone), per(net))
        overhead = "–" if share is None else f"{100 * share:.2f}%"
        rows.append([f"`{model}`", solver, grid, ms(per(net)), ms(per(alone)), overhead,
                     status(share, 0.03, higher=False)])
    e = next(iter(runs.values()))["extra_info"]
    return ["## Solvers at equal NFE", "",
            f"`sampling.sample` at NFE {e['nfe']}, batch {e['batch']} of 28x28x1 (`bench/test_bench_solvers.py`). "
            "`with network`: the shipped model; `solver alone`: the same call with a stand-in whose flow returns a "
            "precomputed tensor (grid, start point and the solver's `combine` algebra). Overhead = solver alone / "
            "with network; target: at most 3%.", ""] + \
        table(["model", "solver", "grid", "ms per sample, with network", "ms per sample, solver alone",
               "overhead", "target <= 3%"], rows) + [""]


def section_gpu_limits(res: Results) -> list[str]:
    gpu = _gpu_limits(res)
    if not gpu:
        return ["## GPU", "", "No GPU on this machine: every GPU figure is not measured. On a GPU machine the same "
                "command also runs the CUDA cases (cuda and triton backends) and measures the copy bandwidth and the "
                "matmul throughput.", ""]
    rows = [["device-to-device copy bandwidth", f"{gpu['copy_bw'] / 1e9:.0f} GB/s"]]
    if "matmul_flops" in gpu:
        rows.append(["fp32 matmul throughput (8192^3)", f"{gpu['matmul_flops'] / 1e12:.1f} TFLOP/s"])
        rows.append(["ridge (memory-bound below)", f"{gpu['ridge']:.1f} flop/byte"])
    return ["## GPU limits measured in this run", ""] + table(["", ""], rows) + [""]


def section_skips(skips: list[dict], heading: str = "## Cases skipped in this run") -> list[str]:
    if not skips:
        return []
    counts = Counter(s["reason"] for s in skips)
    return [heading, ""] + table(["cases", "reason"],
                                                       [[str(n), r] for r, n in counts.most_common()]) + [""]


# ---------------------------------------------------------------- throughput (issue 24: `--e2e`)

def _e2e(res: Results, suite: str) -> list[dict]:
    return [b for b in res.bench if b["extra_info"].get("suite") == suite]


def _per_image(b: dict | None) -> float | None:
    return None if b is None else b["stats"]["median"] / b["extra_info"]["images"]


def _cpu_per_image(b: dict | None) -> float | None:
    """CPU seconds of the benchmark process per image (median over the timed calls), CPU cases only."""
    if b is None or b["extra_info"].get("device") != "cpu" or "cpu_s_median" not in b["extra_info"]:
        return None
    return b["extra_info"]["cpu_s_median"] / b["extra_info"]["images"]


def _mark(b: dict) -> str:
    return "*" if b["stats"]["rounds"] < FEW_ROUNDS else ""


E2E_RUN_ORDER = ("fp32", "bf16-channels_last", "fp32-channels_last", "bf16", "bf16-default-channels_last",
                 "bf16-reduce-overhead")
E2E_DEFAULT_JOB = (9, 64)  # (NFE, B) of `python -m aniso_fast.sample` with no options
E2E_TARGET = 2.5  # issue 24: the default job's images per second against fp32 eager's


def section_e2e_sample(res: Results) -> list[str]:
    runs = {}
    for b in _e2e(res, "e2e"):
        e = b["extra_info"]
        if e["op"] == "sample":
            runs[(e["device"], e["nfe"], e["batch"], e["impl"])] = b
    if not runs:
        return []
    order = {name: i for i, name in enumerate(E2E_RUN_ORDER)}
    rows = []
    for key in sorted(runs, key=lambda k: (k[0] != "cpu", k[1], k[2], order.get(k[3], len(order)))):
        device, nfe, B, impl = key
        b, fp32 = runs[key], runs.get((device, nfe, B, "fp32"))
        e, t, c = b["extra_info"], _per_image(b), _cpu_per_image(b)
        moved = f"{e['levels_moved_max']}, {pct(e['levels_moved_share'])}" if "levels_moved_max" in e else "–"
        rows.append([device, str(nfe), str(B), f"`{impl}`", f"{1 / t:.1f}{_mark(b)}", ms(t), ms(c),
                     fx(ratio(_per_image(fp32), t)) if impl != "fp32" else "1.00x", moved,
                     f"{e['warmup_s']:.1f}" if e.get("warmup_s") is not None else "–"])
    e = next(iter(runs.values()))["extra_info"]
    out = ["### The default sample job", "",
           f"`aniso_fast.load(device=..., precision=..., compile=..., memory_format=...).sample(B seeds, nfe=NFE, "
           f"batch=B, output='uint8')` with no model or sampler named: the per-NFE choice (here `{e['model']}`, "
           f"{e['solver']} on {e['grid']}), one batch per call (`bench/test_bench_e2e.py`, whose docstring names "
           "each run). Images per second = B / median; `vs fp32`: fp32 eager contiguous's time over the run's. CPU "
           "ms/image: the process's CPU time (all threads) per image, median of the same calls: barely moved by "
           "other processes' load, unlike wall time. Warm-up: the first call's seconds (for a compiled run, the "
           "compilation).", ""]
    out += table(["device", "NFE", "B", "run", "images/s", "ms/image", "CPU ms/image", "vs fp32",
                  "uint8 levels moved vs fp32 (max, share)", "warm-up s"], rows) + [""]
    for device in sorted({k[0] for k in runs}):
        plain = runs.get((device, *E2E_DEFAULT_JOB, "fp32"))
        auto = runs.get((device, *E2E_DEFAULT_JOB, "bf16-channels_last"))
        if plain and auto:
            r = ratio(_per_image(plain), _per_image(auto))
            status = "PASS" if r is not None and r >= E2E_TARGET else "MISSED"
            out += [f"**Target on {device}, steady state** (issue 24: the default job, NFE {E2E_DEFAULT_JOB[0]}, "
                    f"{E2E_DEFAULT_JOB[1]} images, at least {E2E_TARGET}x fp32 eager's images per second; here a "
                    f"warm process's batch, the same code in both runs): {fx(r)}, {status}. The job as a user runs "
                    "it, first call included, against the revision before: below.", ""]
    return out


def section_e2e_train(res: Results) -> list[str]:
    runs = [b for b in _e2e(res, "e2e") if b["extra_info"]["op"] == "train_step"]
    if not runs:
        return []
    rows = []
    for b in sorted(runs, key=lambda b: (b["extra_info"]["device"] != "cpu", b["extra_info"]["impl"] != "fp32")):
        e = b["extra_info"]
        fp32 = next((c for c in runs if c["extra_info"]["device"] == e["device"] and c["extra_info"]["impl"] == "fp32"),
                    None)
        cpu = e.get("cpu_s_median") if e["device"] == "cpu" else None
        rows.append([e["device"], f"`{e['impl']}`", f"{b['stats']['median']:.3f}{_mark(b)}",
                     "–" if cpu is None else f"{cpu:.3f}", str(b["stats"]["rounds"]),
                     mib(e.get("peak_bytes")), fx(ratio(fp32["stats"]["median"] if fp32 else None,
                                                        b["stats"]["median"]))])
    e = runs[0]["extra_info"]
    return ["### The default recipe's training step", "",
            f"One forward + backward of `{e['model']}`'s recipe row (aniso_fast/recipes/fmnist.json: family `{e['family']}`, "
            f"stage `{e['stage']}`, its loss options) at batch {e['batch']} on the shipped network "
            f"({e['params']} parameters); bf16: the network under autocast (`networks.execution`).", ""] + \
        table(["device", "precision", "median s", "CPU s (all threads)", "rounds", "peak memory", "vs fp32"],
              rows) + [""]


def section_e2e_forward(res: Results) -> list[str]:
    runs = {}
    for b in _e2e(res, "forward"):
        e = b["extra_info"]
        layout = f"{e.get('precision', 'fp32')} {e['layout']}"
        runs[(e["device"], e["threads"] if e["device"] == "cpu" else None, layout, e["batch"])] = b
    if not runs:
        return []
    configs = sorted({k[:3] for k in runs}, key=lambda k: (k[0] != "cpu", k[1] or 0, k[2]))
    batches = sorted({k[3] for k in runs})
    header = ["B"] + [f"{d}{'' if t is None else f', {t} thread' + ('s' if t > 1 else '')}, {layout}"
                      for d, t, layout in configs]
    rows = [[str(B)] + [(ms(_per_image(runs.get((*c, B)))) + _mark(runs[(*c, B)])) if (*c, B) in runs else "–"
                        for c in configs] for B in batches]
    out = ["### The network forward: precision, batch, memory format, threads (ms per image)", "",
           f"One call of `{next(iter(runs.values()))['extra_info']['model']}`'s flow under no_grad at sigma = 2 "
           "(`bench/test_bench_forward.py`); median / B. bf16: autocast; channels_last: the network's weights and "
           "input converted by `networks.execution`.", ""] + table(header, rows) + [""]
    cpu_configs = [c for c in configs if c[0] == "cpu"]
    cpu_rows = [[str(B)] + [ms(_cpu_per_image(runs.get((*c, B)))) for c in cpu_configs] for B in batches]
    if any(x != "–" for row in cpu_rows for x in row[1:]):
        out += ["CPU time of the process (all its threads) per image, median of the same calls: with one thread, "
                "the cost of the work itself, which other processes' load barely moves; with two, it also counts "
                "the threads' waiting for each other.", ""] + \
            table(["B"] + header[1:len(cpu_configs) + 1], cpu_rows) + [""]
    for device in sorted({c[0] for c in configs}):
        cases = [(_per_image(b), k) for k, b in runs.items() if k[0] == device]
        t, (d, threads, layout, B) = min(cases)
        best_per_B = {n: min(_per_image(b) for k, b in runs.items() if k[0] == device and k[3] == n)
                      for n in batches if any(k[0] == device and k[3] == n for k in runs)}
        threads_text = "" if threads is None else f", {threads} thread" + ("s" if threads > 1 else "")
        out += [f"Fastest on {device}: B = {B}, {layout}{threads_text} ({ms(t)} ms/image). Best per B: " +
                ", ".join(f"{n}: {ms(v)}" for n, v in best_per_B.items()) + " ms/image.", ""]
    return out


def section_e2e_peers(res: Results) -> list[str]:
    runs = {(b["extra_info"]["driver"], b["extra_info"]["run"]): b for b in _e2e(res, "peers")}
    if not runs:
        return []
    drivers = [d for d in ("engine", "adapter", "k-diffusion", "diffusers", "engine-scheduler")
               if any(k[0] == d for k in runs)]
    kd = runs.get(("k-diffusion", "stand-in"))
    rows = []
    for d in drivers:
        net, alone = runs.get((d, "network")), runs.get((d, "stand-in"))
        diff = net["extra_info"].get("max_abs_diff") if net else None
        rows.append([f"`{d}`", ms(_per_image(net)) + (_mark(net) if net else ""), ms(_cpu_per_image(net)),
                     ms(alone["stats"]["median"] if alone else None),
                     fx(ratio(alone["stats"]["median"] if alone else None, kd["stats"]["median"] if kd else None)),
                     f"{100 * _per_image(alone) / _per_image(net):.2f}%" if alone and net else "–",
                     "–" if diff is None else f"{diff:.2g}"])
    e = next(iter(runs.values()))["extra_info"]
    return ["### The sampling loop against k-diffusion and diffusers", "",
            f"`{e['model']}` (isotropic), DPM-Solver++(2M) at NFE {e['nfe']} on EDM's Karras sigmas, batch "
            f"{e['batch']}, one start noise (`bench/test_bench_peers.py`, whose docstring names each driver). "
            "`stand-in`: the U-Net swapped for a module returning a precomputed tensor (the loop, the "
            "preconditioning and the updates are left). max |x - x_k-diffusion|: images in [-1, 1].", ""] + \
        table(["driver", "ms per image, with network", "CPU ms per image, with network", "ms per batch, stand-in",
               "stand-in vs k-diffusion", "stand-in / with network", "max abs diff vs k-diffusion"], rows) + [""]


def section_profile(doc: dict | None, source: str = "bench/results/cpu-profile.json") -> list[str]:
    """Where the time goes (bench/profile_network.py's JSON): self CPU ms per image by kind of op, per run."""
    if not doc:
        return []
    kinds, rows = doc["kinds"], doc["rows"]
    header = ["workload", "run", "wall ms/image"] + [f"{k}" for k in kinds]
    body = []
    for r in rows:
        total = sum(r["self_cpu_s"].values()) or 1.0
        body.append([r["workload"], f"`{r['precision']} {r['memory_format']}`", ms(r["seconds"] / r["images"])] +
                    [f"{ms(r['self_cpu_s'][k] / r['images'])} ({100 * r['self_cpu_s'][k] / total:.0f}%)"
                     for k in kinds])
    out = ["### Where the time goes", "",
           f"`{doc['command']}` ({source}; {doc['machine']}, {doc['threads']} torch threads): one call of each "
           "workload under torch.profiler after a warm-up; self CPU ms per image of the ops of each kind (all "
           "threads; share of the profiled total in brackets). Wall ms/image is the profiled call's (the profiler "
           "adds a little).", ""] + table(header, body) + [""]
    by = {(r["workload"], r["precision"]): r for r in rows}
    for workload in dict.fromkeys(r["workload"] for r in rows):
        lo, hi = by.get((workload, "fp32")), by.get((workload, "bf16"))
        if lo and hi:
            parts = [f"{k} {fx(ratio(lo['self_cpu_s'][k], hi['self_cpu_s'][k]))}" for k in kinds
                     if lo["self_cpu_s"][k] > 0.02 * sum(lo["self_cpu_s"].values())]
            out += [f"{workload}, fp32 time over bf16 time per kind: " + ", ".join(parts) + ".", ""]
    isa = doc.get("bf16_isa")
    if isa == "avx512_bf16":
        out += ["This CPU has AVX-512 BF16 but no AMX: oneDNN's bf16 convolutions run on `vdpbf16ps`, which does "
                "twice the multiply-adds per instruction of an fp32 FMA, so bf16 can at most halve the "
                "convolutions' arithmetic; the kinds that move memory gain from the halved bytes alone. On a CPU with "
                "AMX the tile units take the convolutions instead (several times fp32's rate).", ""]
    elif isa == "amx":
        out += ["This CPU has AMX: oneDNN runs the bf16 convolutions on its tile units.", ""]
    return out


def section_cli(doc: dict | None, source: str = "bench/results/cpu-cli.json") -> list[str]:
    """The main job from the command line at two revisions (bench/compare_cli.py's JSON): medians per revision."""
    if not doc or not doc.get("runs"):
        return []
    import statistics

    rows, med = [], {}
    for name, rev in doc["revisions"].items():
        runs = [r for r in doc["runs"] if r["revision"] == name]
        if not runs:
            continue
        wall = statistics.median(r["wall_s"] for r in runs)
        sampling = statistics.median(r["sampling_s"] for r in runs)
        images = runs[0]["images"]
        med[name] = (wall, sampling)
        printed = re.sub(r", [\d.]+ s ->.*$", "", runs[0]["printed"])  # the sampler it ran, without one run's time
        rows.append([f"{name} (`{rev['commit']}`)", str(len(runs)), f"{wall:.2f}", f"{sampling:.2f}",
                     f"{images / sampling:.1f}", f"`{printed}`"])
    out = ["### The main job from the command line, against the revision before issue 24", "",
           f"`{doc['command']}` (its defaults: the default model, 64 images at NFE 9) run alternately from each "
           f"checkout in a fresh process (`python bench/compare_cli.py --baseline DIR`; {source}; {doc['machine']}). "
           "Wall: the whole process (start-up, model loading, first-call warm-up, writing the PNG); sampling: the "
           "time the command prints. Medians over the rounds.", ""] + \
        table(["revision", "runs", "wall s", "sampling s", "images/s (sampling)", "the command's line"], rows) + [""]
    if "baseline" in med and "this" in med:
        r = ratio(med["baseline"][1], med["this"][1])
        out += [f"This revision against the baseline: {fx(r)} the images per second of sampling, "
                f"{fx(ratio(med['baseline'][0], med['this'][0]))} on the whole process's wall time. "
                f"**Target** (issue 24: the default sample job at least {E2E_TARGET}x the images per second of the "
                f"revision before it, on the same CPU): {fx(r)}, {'PASS' if r and r >= E2E_TARGET else 'MISSED'}.",
                ""]
    return out


def render_e2e(data: dict, skips: list[dict], source: str, profile: dict | None = None,
               cli: dict | None = None) -> str:
    """The throughput section of RESULTS.md, between its markers."""
    res = Results(data)
    timers = sorted({b.get("options", {}).get("timer", "perf_counter") for b in res.bench})
    clock = "wall time" if timers == ["perf_counter"] else \
        f"**the clock is {', '.join(timers)}** (`--benchmark-timer`): CPU time of this process, not wall time"
    lines = [E2E_BEGIN, "## Throughput (issue 24)", "",
             "Generated by `python bench/report.py --e2e` (one command: the three files run in one pytest session, "
             f"results in `{source}`). Medians of {clock}; `*` marks a median of fewer than {FEW_ROUNDS} rounds.",
             ""]
    lines += section_machine(res, source, heading="### Machine of this run", command="python bench/report.py --e2e")
    lines += section_e2e_sample(res) + section_cli(cli) + section_e2e_train(res) + section_profile(profile)
    lines += section_e2e_forward(res)
    lines += section_e2e_peers(res)
    lines += section_skips(skips, heading="### Cases skipped in this run")
    return "\n".join(lines).rstrip() + "\n" + E2E_END + "\n"


def splice_e2e(text: str, section: str) -> str:
    """`text` with its throughput section replaced by `section` (appended where it has none)."""
    if E2E_BEGIN in text and E2E_END in text:
        head, rest = text.split(E2E_BEGIN, 1)
        return head + section.rstrip("\n") + rest.split(E2E_END, 1)[1]
    return text.rstrip("\n") + "\n\n" + section


def render(data: dict, skips: list[dict], source: str) -> str:
    res = Results(data)
    lines = ["# aniso_fast benchmark results", "",
             "Generated by `python bench/report.py` (pytest-benchmark: `python -m pytest bench/`); do not edit by hand. "
             "Medians of the timed rounds; `*` marks a median of fewer than "
             f"{FEW_ROUNDS} rounds (slow cases get one or two rounds in the default run; raise `--aniso-budget`). "
             "`fused` is the best fused backend of the device (cpp on CPU). `authors`: the authors' formulation "
             "(`aniso_fast.ops.reference.authors_scale`, `authors_scale_labelwise`, composed in `bench/baselines.py`; K = 2 "
             "bases only). `reference`: the plain-PyTorch reference backend; `grouped`: the reference applied per "
             "group of a class-conditional basis (`bench/baselines.py`); `best plain` is the fastest plain-PyTorch "
             "composition measured for the case (reference, grouped or the authors' formulation, named).",
             ""]
    lines += section_machine(res, source)
    lines += section_targets(res)
    for device in res.devices():
        if device in ("cpu", "cuda"):
            lines += section_ops(res, device)
            lines += section_step(res, device)
    lines += section_norm(res)
    lines += section_train(res)
    lines += section_solvers(res)
    for device in res.devices():
        if device in ("cpu", "cuda"):
            lines += section_memory(res, device)
    lines += section_gpu_limits(res)
    lines += ["## Cases", "", "Bases (per size C x H x W; batch B in {64, 256}; inputs float32, scalars float64 [B, K]):",
              ""]
    from bench.common import BASIS_INFO  # the suite's own description of its cases
    lines += [f"- `{k}`: {v}" for k, v in BASIS_INFO.items()] + [""]
    lines += section_skips(skips)
    return "\n".join(lines).rstrip() + "\n"


def _source(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def _read(json_path: Path) -> tuple[dict, list[dict]]:
    skips_path = json_path.with_name(json_path.stem + "-skips.json")
    return json.loads(json_path.read_text()), json.loads(skips_path.read_text()) if skips_path.exists() else []


def _extras(device: str) -> tuple[dict | None, dict | None]:
    """The results of bench/profile_network.py and bench/compare_cli.py for `device`, where they have been run."""
    paths = [BENCH / "results" / f"{device}-{name}.json" for name in ("profile", "cli")]
    return tuple(json.loads(path.read_text()) if path.exists() else None for path in paths)


def main(argv: list[str] | None = None) -> int:
    from aniso_fast.utils.atomic import atomic_write_text

    argv = sys.argv[1:] if argv is None else argv
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    device = "cuda" if _has_gpu() else "cpu"
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--e2e", action="store_true",
                   help=f"the throughput run ({', '.join(E2E_FILES)}): rewrites only its section of --out")
    p.add_argument("--json", type=Path, default=None,
                   help=f"pytest-benchmark JSON to write (and read); default bench/results/{device}.json, "
                        f"{device}-e2e.json with --e2e")
    p.add_argument("--out", type=Path, default=BENCH / "RESULTS.md", help="Markdown to write")
    p.add_argument("--no-run", action="store_true", help="only rewrite the Markdown from the existing JSON")
    p.add_argument("--also", type=Path, action="append", default=[],
                   help="more pytest-benchmark JSON files whose cases join the report (e.g. a separate run of "
                        "bench/test_bench_solvers.py); their sources are listed")
    args = p.parse_args(argv)
    e2e_json = BENCH / "results" / f"{device}-e2e.json"
    if args.json is None:
        args.json = e2e_json if args.e2e else BENCH / "results" / f"{device}.json"
    rc = 0
    if not args.no_run:
        rc, written = run_suite(args.json, args.json.with_name(args.json.stem + "-skips.json"), extra, e2e=args.e2e)
        if not written:
            print(f"no results written to {args.json} (the previous ones are kept)", file=sys.stderr)
            return rc or 1
    data, skips = _read(args.json)
    sources = [_source(path) for path in [args.json, *args.also]]
    for path in args.also:
        data["benchmarks"] += json.loads(path.read_text())["benchmarks"]
    if args.e2e:
        old = args.out.read_text() if args.out.exists() else "# aniso_fast benchmark results\n"
        text = splice_e2e(old, render_e2e(data, skips, " + ".join(sources), *_extras(device)))
    else:
        text = render(data, skips, " + ".join(sources))
        if e2e_json.exists():  # the throughput section of the last --e2e run is kept
            text = splice_e2e(text, render_e2e(*_read(e2e_json), _source(e2e_json), *_extras(device)))
    atomic_write_text(args.out, text)
    print(f"wrote {args.out}")
    if rc:
        print(f"warning: pytest exited with {rc} (failed cases are missing from the tables)", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
