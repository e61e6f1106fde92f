"""The precision gate (`evaluate precision-gate`) and the results table under a lower precision: the paired bootstrap
SE, the gate's rule and documents, and cache cells kept apart by precision."""
import json

import numpy as np
import pytest
import torch

from aniso_fast import evaluate, store
from aniso_fast.evaluation import features, precision_gate, table
from aniso_fast.networks.execution import FP32, Execution, network_of

pytestmark = pytest.mark.usefixtures("one_thread")


def _pixels_scorer(size=28):
    gen = torch.Generator().manual_seed(0)
    images = (torch.rand(64, 1, size, size, generator=gen) * 255).to(torch.uint8)
    step = max(1, size * size // 8)
    return features.FrechetScorer(lambda u8: u8.flatten(1)[:, ::step].float().numpy() / 255, images, id="px8")


def test_paired_difference_se():
    rng = np.random.default_rng(0)
    a = rng.normal(0.3, 1.0, size=(200, 3))
    mu, sigma = np.zeros(3), np.eye(3)
    assert table.bootstrap_difference_se(a, a, mu, sigma, draws=50) == 0  # identical sets: no spread at all
    b = a + rng.normal(0, 0.01, size=a.shape)  # the same seeds, slightly perturbed (a precision change)
    paired = table.bootstrap_difference_se(b, a, mu, sigma, draws=100)
    assert 0 < paired < 0.2 * table.bootstrap_se([a], mu, sigma, draws=100)  # what the seeds share cancels
    # the same number as a slow loop over the metrics FD with the same resampled rows
    from aniso_fast.evaluation.metrics import frechet_distance

    rng2, slow = np.random.default_rng(0), []
    ref = rng.normal(size=(500, 3))
    mu, sigma = ref.mean(0), np.cov(ref, rowvar=False)
    for _ in range(20):
        idx = rng2.integers(0, 200, 200)
        slow.append(frechet_distance(b[idx], ref) - frechet_distance(a[idx], ref))
    fast = table.bootstrap_difference_se(b, a, mu, sigma, draws=20, seed=0)
    assert fast == pytest.approx(np.std(slow, ddof=1), rel=1e-3)
    with pytest.raises(ValueError, match="feats_b"):
        table.bootstrap_difference_se(a, a[:10], mu, sigma)


def test_gate_on_a_shipped_model(tmp_path, capsys):
    choices = {3: {"model": "fmnist-dct-class", "solver": "euler", "grid": "uniform_t", "secondary": None,
                   "order": None}}
    scorer = _pixels_scorer()
    kw = dict(n=20, bootstrap=20, batch=20, cache=tmp_path / "cache", progress=False)
    result = precision_gate.precision_gate(choices, scorer, Execution("bf16"), **kw)
    (row,) = result["rows"]
    assert row["nfe"] == 3 and row["model"] == "fmnist-dct-class" and result["protocol"]["candidate"] == "bf16"
    assert row["difference"] == pytest.approx(row["bf16"]["fd"] - row["fp32"]["fd"])
    assert row["difference"] != 0 and row["difference_se"] > 0
    assert row["holds"] == (abs(row["difference"]) <= row["fp32"]["se"]) and result["holds"] == row["holds"]
    # the fp32 cell sits under the results table's own key (a table run's cache serves the gate, and back)
    what = {"model": f"shipped:{store.shipped_models()['fmnist-dct-class']['sha256']}", "solver": "euler",
            "grid": "uniform_t", "secondary": None, "order": None, "nfe": 3, "n": 20, "seed_set": 0}
    cache = table._Cache(tmp_path / "cache")
    assert cache.path(what).is_file() and cache.path({**what, "precision": "bf16"}).is_file()
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2
    again = precision_gate.precision_gate(choices, scorer, Execution("bf16"), **kw)  # from the cache
    assert again["rows"][0]["bf16"]["fd"] == row["bf16"]["fd"]
    result["command"] = "python -m aniso_fast.evaluate precision-gate --n 20"
    md = precision_gate.gate_markdown(result)
    assert "| 3 | fmnist-dct-class, Euler" in md and result["command"] in md
    section = precision_gate.precision_section(result)
    assert section[0] == "## Precision" and result["command"] in "\n".join(section)
    doc = "# Results\n\nintro\n\n## Models\n\nrows\n"
    once = evaluate._replace_section(doc, "## Precision", section)
    assert once.startswith(doc.rstrip("\n")) and "## Precision" in once
    twice = evaluate._replace_section(once, "## Precision", section)
    assert twice == once  # replaced in place, not appended again
    middle = evaluate._replace_section("# R\n\n## Precision\n\nold\n\n## Models\n\nx\n", "## Precision",
                                       ["## Precision", "", "new", ""])
    assert middle == "# R\n\n## Precision\n\nnew\n\n## Models\n\nx\n"
    # the section ends where what is written by hand begins, and a new one goes before it
    hand = f"{table.BY_HAND}\n\n## Notes\n\nmine\n"
    kept = evaluate._replace_section(f"# R\n\n## Precision\n\nold\n\n{hand}", "## Precision",
                                     ["## Precision", "", "new", ""])
    assert kept == f"# R\n\n## Precision\n\nnew\n\n{hand}"
    added = evaluate._replace_section(f"# R\n\n{hand}", "## Precision", ["## Precision", "", "new", ""])
    assert added == f"# R\n\n## Precision\n\nnew\n\n{hand}"
    # a heading of that name in the hand-written part is not the generated section
    mine = f"{table.BY_HAND}\n\n## Precision\n\nmy own words\n"
    assert evaluate._replace_section(f"# R\n\n{mine}", "## Precision", ["## Precision", "", "new", ""]) == \
        f"# R\n\n## Precision\n\nnew\n\n{mine}"
    with pytest.raises(ValueError, match="candidate"):
        precision_gate.precision_gate(choices, scorer, FP32, **kw)


def test_table_cells_keep_their_precision(tiny_checkpoint, tmp_path, monkeypatch):
    model, schedule = store.StoredModel.open(str(tiny_checkpoint)).load()
    monkeypatch.setattr(table, "resolve_row", lambda row, source: {
        "status": "ok", "where": "tiny", "id": "test:tiny", "load": lambda device="cpu": (model, schedule), "fitted": {}})
    recipe = {"title": "tiny", "rows": [{"name": "t", "label": "tiny", "out": "-", "schedule_figure": False,
                                         "eval": [{"solver": "euler", "grid": "uniform_t"}]}]}
    scorer = _pixels_scorer(8)
    kw = dict(n=6, seeds=1, nfes=[3], batch=6, per_class=1, progress=False, bootstrap=10, cache=tmp_path / "c")
    r32, _ = table.results_table(recipe, scorer, **kw)
    r16, _ = table.results_table(recipe, scorer, previous=r32, execution=Execution("bf16"), **kw)
    assert network_of(model).__class__.__name__ == "SongUNet"
    (c32,), (c16,) = r32["rows"][0]["cells"], r16["rows"][0]["cells"]
    assert "precision" not in c32 and c16["precision"] == "bf16"  # not reused from the fp32 document
    assert r32["protocol"]["precision"] == "fp32" and r16["protocol"]["precision"] == "bf16"
    assert len(list((tmp_path / "c").glob("*.npz"))) == 2  # two cache cells
    back, _ = table.results_table(recipe, scorer, previous=r16, **kw)
    assert back["rows"][0]["cells"][0]["fd"] == c32["fd"]  # fp32 again: the fp32 cell, from the cache
    md = table.results_markdown(r16, recipe, "cmd", {}, precision_gate.precision_section(
        {"protocol": {"candidate": "bf16", "n": 6}, "rows": [], "holds": True}, "bf16"))
    assert "networks in bf16" in md and md.rstrip().endswith("Command: `python -m aniso_fast.evaluate precision-gate`.")


def test_gate_cli_writes_its_documents(tmp_path, monkeypatch, capsys):
    """The subcommand end to end with a stand-in for the scoring (the real protocol is docs/precision_gate.md)."""
    results = tmp_path / "RESULTS.md"
    results.write_text("# Results\n\n## Models\n\nx\n")
    monkeypatch.setattr(evaluate.FrechetScorer, "classifier", classmethod(lambda cls, path: _pixels_scorer()))
    argv = ["precision-gate", "--candidate", "bf16", "--nfe", "5", "--n", "10", "--bootstrap", "5", "--batch", "10",
            "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "gate"), "--results", str(results)]
    assert evaluate.main(argv) == 0
    doc = json.loads((tmp_path / "gate.json").read_text())
    assert doc["rows"][0]["nfe"] == 5 and doc["command"].endswith(" ".join(argv[-2:]))
    assert (tmp_path / "gate.md").read_text().startswith("# Precision gate: bf16 against fp32")
    text = results.read_text()
    assert text.startswith("# Results\n\n## Models\n\nx") and "## Precision" in text and "(gate.md)" in text


def test_cells_are_kept_apart_by_memory_format():
    """A channels_last run calls other kernels: its cells have keys of their own, and recorded cells are reused
    only for the same precision and memory format."""
    model, _ = store.StoredModel.open("fmnist-dct-class").load()
    mixture, _ = store.StoredModel.open("gmm-fmnist").load()
    runs = (FP32, Execution("fp32", memory_format="channels_last"), Execution("bf16"),
            Execution("bf16", memory_format="channels_last"))
    keys = [table._precision_key(model, e) for e in runs]
    assert keys == [{}, {"memory_format": "channels_last"}, {"precision": "bf16"},
                    {"precision": "bf16", "memory_format": "channels_last"}]
    assert table._precision_key(mixture, Execution("bf16", memory_format="channels_last")) == {}  # no network
    assert table._same_run({"fd": 1}, keys[0]) and not table._same_run({"fd": 1}, keys[1])
    assert table._same_run({"precision": "bf16", "memory_format": "channels_last"}, keys[3])
    assert not table._same_run({"precision": "bf16"}, keys[3])
