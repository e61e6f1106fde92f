"""The solver-accuracy protocol on the exact mixture (small sizes)."""
import json

from aniso_fast.evaluate import main, solver_accuracy, to_markdown
from aniso_fast.gmm import GaussianMixture
from aniso_fast.schedules import MatrixSchedule


def test_solver_accuracy_protocol():
    gm = GaussianMixture.toy(channels=1, height=6, width=6, bands=(2,), num_components=2, num_classes=2, seed=4)
    res = solver_accuracy(gm, MatrixSchedule(2), [3, 9, 33], n=64, reference_nfe=129, progress=False)
    mid = {r["nfe"]: r for r in res["rows"] if r["config"] == "Heun midpoint, uniform t"}
    assert mid[33]["endpoint_rmse_mean"] < mid[9]["endpoint_rmse_mean"] < mid[3]["endpoint_rmse_mean"]
    assert mid[33]["endpoint_rmse_mean"] < 0.05
    # Euler cannot spend an even NFE on end-point Heun: only valid combinations are measured
    assert all(r["nfe"] % 2 == 1 or r["secondary"] != "end" for r in res["rows"])
    md = to_markdown(res, "t", "cmd")
    assert "| Heun midpoint, uniform t |" in md and "floor" in md


def test_cli_writes_files(tmp_path):
    out = tmp_path / "acc"
    assert main(["solvers", "--n", "20", "--nfe", "5", "--reference-nfe", "17", "--out", str(out)]) == 0
    data = json.loads(out.with_suffix(".json").read_text())
    assert len(data["rows"]) == 5 and out.with_suffix(".md").exists()
