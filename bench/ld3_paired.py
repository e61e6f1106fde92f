"""The paired FD difference (same seeds) between two results-table cells, with its bootstrap SE (issue 25).

    python bench/ld3_paired.py --json A.json --row ROW --solver S --grid G [--order K] --nfe N \
        --vs-json B.json --vs-row ROW2 --vs-solver ... --cache runs/ld3/cache

Each cell's samples and features are read from the cache folder (`evaluate table --cache`); a cell reused by the
table from an earlier results.json without its samples is generated again there (`--model`/`--vs-model`: its shipped
model). The reference statistics are the classifier scorer's (`FrechetScorer.classifier`), as the table's.
"""
import argparse
import json

from aniso_fast import store
from aniso_fast.evaluation.classifier import CLASSIFIER_ASSET
from aniso_fast.evaluation.features import FrechetScorer
from aniso_fast.evaluation.table import cell_features, paired_difference


def find(doc: dict, row: str, solver: str, grid: str, order, nfe: int) -> tuple[str, dict]:
    entry = next(r for r in doc["rows"] if r["name"] == row)
    cell = next(c for c in entry["cells"] if c["solver"] == solver and c["grid"] == grid and c["nfe"] == nfe
                and (order is None or c.get("order") == order) and "skipped" not in c)
    return entry["model_id"], cell


def main() -> None:
    p = argparse.ArgumentParser()
    for side in ("", "vs-"):
        p.add_argument(f"--{side}json", required=True)
        p.add_argument(f"--{side}row", required=True)
        p.add_argument(f"--{side}solver", required=True)
        p.add_argument(f"--{side}grid", required=True)
        p.add_argument(f"--{side}order", type=int, default=None)
        p.add_argument(f"--{side}model", default=None, help="the shipped model, to generate an uncached cell")
    p.add_argument("--nfe", type=int, required=True)
    p.add_argument("--cache", required=True)
    p.add_argument("--bootstrap", type=int, default=200)
    a = p.parse_args()
    scorer = FrechetScorer.classifier(str(CLASSIFIER_ASSET))
    feats, fds = [], []
    for side in ("", "vs_"):
        doc = json.load(open(getattr(a, f"{side}json")))
        model_id, cell = find(doc, getattr(a, f"{side}row"), getattr(a, f"{side}solver"), getattr(a, f"{side}grid"),
                              getattr(a, f"{side}order"), a.nfe)
        name = getattr(a, f"{side}model")
        row_model = None if name is None else (*store.StoredModel.open(name).load(), store.fitted_grids(name))
        assert doc["protocol"]["scorer"] == scorer.id, "the cell was scored in another feature space"
        feats.append(cell_features(a.cache, model_id, cell, scorer, row_model=row_model))
        fds.append(cell["mean"])
    diff, se = paired_difference(feats[0], feats[1], scorer.mu, scorer.sigma, a.bootstrap)
    print(f"FD {fds[0]:.3f} - {fds[1]:.3f}: paired difference {diff:.3f} ± {se:.3f} (bootstrap SE over {a.bootstrap} "
          f"joint resamplings of the {len(feats[0])} seeds)")


if __name__ == "__main__":
    main()
