"""`python -m aniso_fast.sample`: the main job on the embedded default, its options and its errors."""
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from aniso_fast import models
from aniso_fast.sample import main, parse_seeds
from aniso_fast.solvers import sample


def test_default_run_writes_png(tmp_path):
    """The README's main command, in a subprocess (64 samples, NFE 9)."""
    out = subprocess.run([sys.executable, "-m", "aniso_fast.sample", "--outdir", str(tmp_path), "--no-progress"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    path = out.stdout.strip().splitlines()[-1]
    img = np.asarray(Image.open(path))
    assert img.shape == (8 * 28, 8 * 28) and img.dtype == np.uint8
    assert 20 < img.mean() < 200  # not blank, not saturated
    assert "NFE 9" in out.stderr


def test_npz_individual_classes_and_seeds(tmp_path, capsys):
    assert main(["--seeds", "3,7", "--classes", "4", "--format", "npz", "--outdir", str(tmp_path), "--no-progress",
                 "--nfe", "5"]) == 0
    data = np.load(capsys.readouterr().out.strip())
    assert data["images"].shape == (2, 1, 28, 28) and data["labels"].tolist() == [4, 4]
    assert data["seeds"].tolist() == [3, 7]
    # the same seed gives the same image in another batch
    assert main(["--seeds", "1-3,7", "--classes", "0,4", "--format", "npz", "--outdir", str(tmp_path / "b"),
                 "--no-progress", "--nfe", "5"]) == 0
    other = np.load(capsys.readouterr().out.strip())
    assert np.array_equal(other["images"][3], data["images"][1])
    assert main(["--count", "2", "--individual", "--outdir", str(tmp_path / "c"), "--no-progress", "--nfe", "3",
                 "--solver", "euler"]) == 0
    assert len(list((tmp_path / "c").glob("*_seed*.png"))) == 2


def test_samples_look_like_their_class():
    """The mixture's own Bayes classifier (class log-likelihood at small noise) recovers the requested class."""
    model = models.load_model("gmm-fmnist")
    x, labels, _ = sample(model, models.load_schedule("edm", model), nfe=9, seeds=range(40),
                          labels=torch.arange(10).repeat(4))
    g = torch.full((40, 2), 1e-3, dtype=torch.float64)
    loglik = torch.stack([model.log_prob(x.double(), g, torch.full((40,), y)) for y in range(10)], dim=1)
    assert (loglik.argmax(1) == labels).float().mean() >= 0.9


@pytest.mark.parametrize("argv,message", [
    (["--model", "nope"], "--model"),
    (["--schedule", "nope"], "--schedule"),
    (["--nfe", "1"], "--nfe"),
    (["--nfe", "8", "--secondary", "end"], "--nfe"),
    (["--classes", "10"], "--classes"),
    (["--classes", "x"], "--classes"),
    (["--seeds", "a-b"], "--seeds"),
    (["--count", "0"], "--count"),
    (["--grid", "karras", "--secondary", "mid"], "--secondary"),
    (["--device", "nonsense"], "--device"),
])
def test_bad_input_clear_error_before_work(tmp_path, capsys, argv, message):
    assert main(argv + ["--outdir", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.glob("*.png"))


def test_unwritable_outdir(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["--outdir", str(blocker / "sub")]) == 2
    assert "--outdir" in capsys.readouterr().err


def test_parse_seeds():
    assert parse_seeds("0-3,10") == [0, 1, 2, 3, 10]
    assert parse_seeds("5") == [5]


def test_sample_from_a_training_checkpoint(tmp_path, capsys):
    """The user's own checkpoint (train CLI on a tiny npz) samples with its learned schedule."""
    from aniso_fast import train

    gen = torch.Generator().manual_seed(0)
    images = (torch.rand(64, 1, 8, 8, generator=gen) * 255).to(torch.uint8).numpy()
    np.savez(tmp_path / "tiny.npz", images=images, labels=np.arange(64) % 2)
    out = tmp_path / "run"
    assert train.main(["--stage", "aniso", "--data", str(tmp_path / "tiny.npz"), "--out", str(out), "--steps", "2",
                       "--batch", "8", "--model-channels", "8", "--channel-mult", "1,1", "--basis", "dct",
                       "--dct-bands", "3", "--class-schedules", "--no-progress", "--sample-every", "0",
                       "--plot-every", "0"]) == 0
    ckpt = sorted(out.glob("checkpoint-*.safetensors"))[-1]
    capsys.readouterr()
    assert main(["--model", str(ckpt), "--count", "4", "--classes", "1", "--nfe", "5", "--format", "npz",
                 "--outdir", str(tmp_path / "s"), "--no-progress"]) == 0
    data = np.load(capsys.readouterr().out.strip().splitlines()[-1])
    assert data["images"].shape == (4, 1, 8, 8) and data["labels"].tolist() == [1, 1, 1, 1]
    assert main(["--model", str(tmp_path / "missing.safetensors")]) == 2
    assert main(["--model", "gmm-fmnist", "--schedule", "learned"]) == 2
