"""The main job as a user runs it (`python -m aniso_fast.sample`, its defaults: 64 images at NFE 9), at another
revision and at this one, side by side: `python bench/compare_cli.py --baseline DIR`.

DIR is a checkout of the other revision with its extension built in place (for the revision before issue 24:
`git worktree add /tmp/old 3ebb800 && (cd /tmp/old && python setup.py build_ext --inplace)`). Each round runs
the command once per revision, alternately, each in a fresh process with PYTHONPATH set to its checkout and
writing into a temporary folder. Recorded per run: the process's wall time (start-up, model loading and warm-up
included) and the sampling time the command prints. Results: bench/results/<device>-cli.json, which
`python bench/report.py --e2e` renders in bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRINTED = re.compile(r"(\d+) samples, NFE (\d+) \(.*\), ([\d.]+) s -> ")


def _commit(root: Path) -> str:
    out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=10", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def run_once(root: Path, outdir: Path, extra: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(root)}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "aniso_fast.sample", "--outdir", str(outdir), "--no-progress",
                           *extra], env=env, cwd=outdir.parent, capture_output=True, text=True)
    wall = time.perf_counter() - start
    found = PRINTED.search(done.stderr)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"{root}: the sample command failed (exit {done.returncode}): {done.stderr.strip()[-500:]}")
    return {"wall_s": wall, "sampling_s": float(found.group(3)), "images": int(found.group(1)),
            "nfe": int(found.group(2)), "printed": found.group(0).strip()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", type=Path, required=True, help="checkout of the other revision (extension built)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "cpu-cli.json")
    args = p.parse_args(argv)
    if not (args.baseline / "aniso_fast" / "__init__.py").is_file():
        p.error(f"--baseline: expected a checkout of aniso_fast, got {args.baseline}")
    if args.rounds < 1:
        p.error(f"--rounds: expected at least 1, got {args.rounds}")
    sys.path.insert(0, str(ROOT))
    from aniso_fast.utils.atomic import atomic_write_text
    from aniso_fast.utils.machine import machine_description

    revisions = {"baseline": args.baseline.resolve(), "this": ROOT}
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, root in revisions.items():
                outdir = Path(tmp) / f"{name}-{r}"
                runs.append({"revision": name, "round": r, **run_once(root, outdir, [])})
                print(runs[-1], flush=True)
    doc = {"machine": machine_description(), "command": "python -m aniso_fast.sample",
           "revisions": {name: {"path": str(root), "commit": _commit(root)} for name, root in revisions.items()},
           "runs": runs}
    atomic_write_text(args.out, json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
