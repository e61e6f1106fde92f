"""Shipped trained models: export a training checkpoint, the manifest, loading by name, the default model."""
import json

import numpy as np
import pytest
import torch

from aniso_fast import models, train
from aniso_fast.sample import main as sample_main


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors on a shared 2-core machine: OpenMP threads only contend (10x slower with 2 threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A 2-step class-conditional run on 8x8 data with a per-class PCA basis (float64 V in the checkpoint)."""
    root = tmp_path_factory.mktemp("tiny")
    gen = torch.Generator().manual_seed(0)
    images = (torch.rand(64, 1, 8, 8, generator=gen) * 255).to(torch.uint8).numpy()
    np.savez(root / "tiny.npz", images=images, labels=np.arange(64) % 2)
    assert train.main(["--stage", "iso", "--data", str(root / "tiny.npz"), "--out", str(root / "run"), "--steps", "2",
                       "--batch", "8", "--model-channels", "8", "--channel-mult", "1,1", "--basis", "pca",
                       "--pca-rank", "16", "--pca-per", "class", "--class-schedules", "--no-progress",
                       "--sample-every", "0", "--plot-every", "0"]) == 0
    return sorted((root / "run").glob("checkpoint-*.safetensors"))[-1]


@pytest.fixture
def assets(tmp_path, monkeypatch):
    monkeypatch.setenv(models.ASSETS_ENV, str(tmp_path / "assets"))
    return tmp_path / "assets"


def test_export_load_and_default(tiny_checkpoint, assets, capsys):
    assert models.DEFAULT_MODEL == "gmm-fmnist" and list(models.MODELS) == ["gmm-fmnist"]
    assert models.main(["export", str(tiny_checkpoint), "--name", "tiny-pca", "--description", "a tiny test"]) == 0
    path = assets / "tiny-pca.safetensors"
    assert capsys.readouterr().out.strip() == str(path)
    entry = json.loads((assets / "manifest.json").read_text())["models"]["tiny-pca"]
    assert entry["bytes"] == path.stat().st_size < tiny_checkpoint.stat().st_size / 2  # no raw net, optimizer
    assert entry["stage"] == "iso" and entry["basis"] == "pca" and entry["class_schedules"] and not entry["default"]
    assert "tiny-pca" in models.MODELS and models.DEFAULT_MODEL == "gmm-fmnist"  # nothing marked default yet

    shipped, schedule = models.load_model("tiny-pca"), models.load_schedule("learned", None, "tiny-pca")
    ref_model, ref_schedule, _ = models.load_trained(tiny_checkpoint)
    assert torch.equal(schedule.psi, ref_schedule.psi)
    assert shipped.basis.config() == ref_model.basis.config() and shipped.num_classes == 2
    assert (shipped.basis.V64 - ref_model.basis.V64).abs().max() < 1e-6  # the basis is stored in float32
    x, g, labels = torch.randn(4, 1, 8, 8), torch.full((4, 2), 0.7, dtype=torch.float64), torch.tensor([0, 1, 0, 1])
    with torch.no_grad():
        a, b = shipped.flow(x, g, labels), ref_model.flow(x, g, labels)
    assert (a - b).abs().max() < 1e-2 * b.abs().max()  # float16 network weights

    models.set_default("tiny-pca")
    assert models.DEFAULT_MODEL == "tiny-pca"
    assert sample_main(["--count", "3", "--nfe", "3", "--format", "npz", "--outdir", str(assets.parent / "s"),
                        "--no-progress"]) == 0  # the default model, with its learned schedule
    data = np.load(capsys.readouterr().out.strip().splitlines()[-1])
    assert data["images"].shape == (3, 1, 8, 8)
    assert models.main(["set-default", "gmm-fmnist"]) == 0 and models.DEFAULT_MODEL == "gmm-fmnist"
    assert sample_main(["--model", "tiny-pca", "--schedule", "edm", "--classes", "1", "--count", "2", "--nfe", "3",
                        "--outdir", str(assets.parent / "s"), "--no-progress"]) == 0


def test_export_float32_replaces_and_default_flag(tiny_checkpoint, assets):
    models.export_model(tiny_checkpoint, "tiny", net_dtype="float16")
    small = (assets / "tiny.safetensors").stat().st_size
    models.export_model(tiny_checkpoint, "tiny", net_dtype="float32", default=True)
    assert (assets / "tiny.safetensors").stat().st_size > small
    assert models.default_model() == "tiny" and list(models.shipped_models()) == ["tiny"]
    models.export_model(tiny_checkpoint, "tiny-2", default=True)
    assert models.default_model() == "tiny-2" and not models.shipped_models()["tiny"]["default"]
    assert not list(assets.glob("*.tmp")) and not list(assets.glob(".*.tmp"))


def test_bad_names_and_corrupt_files(tiny_checkpoint, assets, capsys):
    for bad in ("gmm-fmnist", "Upper", "x.safetensors", "", "a/b"):
        with pytest.raises(ValueError, match="name"):
            models.export_model(tiny_checkpoint, bad)
    assert models.main(["export", str(assets / "missing.safetensors"), "--name", "m"]) == 2
    assert models.main(["set-default", "nope"]) == 2
    path = models.export_model(tiny_checkpoint, "tiny")
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="SHA-256"):
        models.load_model("tiny")
    with pytest.raises(ValueError, match="unknown model"):
        models.load_model("nope")
    with pytest.raises(ValueError, match="learned"):
        models.load_schedule("learned", None, "gmm-fmnist")


def test_shipped_fashion_mnist_models_match_the_recipe_and_sample():
    """The package's own assets: every row of recipes/fmnist.json ships, files match the manifest's SHA-256, the
    default is one of them, and the default model samples finite class-conditional images with its schedule."""
    from aniso_fast import recipes
    from aniso_fast.solvers import sample

    recipe = recipes.load_recipe("recipes/fmnist.json")
    shipped = models.shipped_models(models.ASSET_DIR)
    assert {row["export"] for row in recipe["rows"]} == set(shipped)
    assert models.default_model(models.ASSET_DIR) in shipped
    total = sum((models.ASSET_DIR / entry["file"]).stat().st_size for entry in shipped.values())
    assert total < 25e6  # the issue asks for about 20 MB of shipped checkpoints
    for name in shipped:
        models.shipped_path(name, models.ASSET_DIR)  # raises on a missing file or a SHA mismatch
    model, schedule, info = models.load_shipped(models.default_model(models.ASSET_DIR), assets=models.ASSET_DIR)
    assert info["stage"] in ("iso", "aniso") and model.num_classes == 10
    x, labels, meta = sample(model, schedule, nfe=5, seeds=[0, 1], labels=torch.tensor([3, 7]))
    assert x.shape == (2, 1, 28, 28) and torch.isfinite(x).all() and meta["nfe"] == 5
