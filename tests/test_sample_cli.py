"""`python -m aniso_fast.sample`: the main job on the embedded default, its options and its errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import one_line_error
from PIL import Image

from aniso_fast import sample as sample_cli
from aniso_fast import store
from aniso_fast.processes import registry
from aniso_fast.sample import MAX_SAMPLES, build_parser, main, parse_seeds
from aniso_fast.sampling.sampler import sample

GMM_GRID = "gmm-fmnist_edm_heun-mid_uniform_t_nfe9_seeds0-63.png"  # the grid `--model gmm-fmnist` writes at the defaults


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
    assert len(list((tmp_path / "c").glob("*_seed[0-9]*.png"))) == 2


def test_samples_look_like_their_class():
    """The mixture's own Bayes classifier (class log-likelihood at small noise) recovers the requested class."""
    model, schedule = store.StoredModel.open("gmm-fmnist").load()
    x, labels, _ = sample(model, schedule, nfe=9, seeds=range(40),
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
    assert parse_seeds("4294967295") == [2 ** 32 - 1]
    for bad in ("-1", "5-2", "1.5", "", "4294967296", f"0-{MAX_SAMPLES}"):
        with pytest.raises(ValueError, match="--seeds"):
            parse_seeds(bad)


def test_sample_from_a_training_checkpoint(tmp_path, capsys):
    """The user's own checkpoint (train CLI on a tiny npz) samples with its learned schedule."""
    from aniso_fast.training import trainer as train

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


@pytest.fixture
def no_work(monkeypatch):
    """Loading a model or sampling fails the test: bad input must be refused before any work."""
    def work(*args, **kwargs):
        raise AssertionError("work started before the bad input was refused")

    monkeypatch.setattr(store.StoredModel, "load", work)
    monkeypatch.setattr(store.StoredModel, "state", work)
    monkeypatch.setattr(registry, "run_sampler", work)


def _assets(tmp_path, monkeypatch, manifest: str | None) -> None:
    folder = tmp_path / "assets"
    folder.mkdir()
    if manifest is not None:
        (folder / "manifest.json").write_text(manifest)
    monkeypatch.setenv(store.ASSETS_ENV, str(folder))


@pytest.mark.parametrize("argv,words", [
    (["--seeds", "4294967296,4294967297"], ["--seeds", "4294967295"]),  # issue 10, defect 4: 2**32 repeated seed 0
    (["--nfe", "100000000000"], ["--nfe", "at most"]),  # defect 8: a grid of 10^11 steps
    (["--count", str(MAX_SAMPLES + 1)], ["--count"]),  # defect 8
    (["--seeds", f"0-{MAX_SAMPLES}"], ["--seeds", "at most"]),  # defect 8
    (["--batch", str(10 ** 12)], ["--batch"]),  # defect 8
    (["--seeds", "5-2"], ["--seeds", "empty"]),  # defect 9: a reversed range
    (["--individual", "--format", "npz"], ["--individual", "npz"]),  # defect 9: ignored silently
    (["--seeds", "1", "--count", "3"], ["--count", "--seeds"]),  # --count was ignored silently
    (["--nfe", "abc"], ["--nfe"]),  # argparse's own errors: one line too
])
def test_bad_input_refused_before_work(tmp_path, capsys, no_work, argv, words):
    assert main(["--model", "gmm-fmnist", "--outdir", str(tmp_path / "out")] + argv) == 2
    one_line_error(capsys, *words)
    assert not (tmp_path / "out").exists()


def test_errors_found_with_the_model_leave_no_output_folder(tmp_path, capsys):
    """Issue 10, defect 8: the output folder was created before a check that needs the model (--classes) failed."""
    assert main(["--model", "gmm-fmnist", "--classes", "99", "--outdir", str(tmp_path / "out")]) == 2
    one_line_error(capsys, "--classes")
    assert not (tmp_path / "out").exists()


def test_output_collisions_refused(tmp_path, capsys, no_work):
    """Issue 10, defect 8: an output name that is a directory, and an existing output file, are refused."""
    (tmp_path / GMM_GRID).mkdir()
    assert main(["--model", "gmm-fmnist", "--outdir", str(tmp_path)]) == 2
    one_line_error(capsys, "--outdir", "directory")
    (tmp_path / GMM_GRID).rmdir()
    (tmp_path / GMM_GRID).write_bytes(b"old")
    assert main(["--model", "gmm-fmnist", "--outdir", str(tmp_path)]) == 2
    one_line_error(capsys, "--outdir", "exists", "--force")
    assert (tmp_path / GMM_GRID).read_bytes() == b"old"
    stem = GMM_GRID.replace("seeds0-63.png", "seeds7")
    (tmp_path / f"{stem}_seed000007.png").write_bytes(b"old")  # an individual image collides too
    assert main(["--model", "gmm-fmnist", "--outdir", str(tmp_path), "--individual", "--seeds", "7"]) == 2
    one_line_error(capsys, "seed000007", "--force")
    assert not (tmp_path / f"{stem}.png").exists()


def test_force_replaces_the_output_with_the_umask_mode(tmp_path, capsys):
    """--force replaces an existing output; outputs get 0666 & ~umask (issue 10, defect 9: mkstemp's 0600)."""
    (tmp_path / GMM_GRID).write_bytes(b"old")
    umask = os.umask(0o022)
    try:
        assert main(["--model", "gmm-fmnist", "--outdir", str(tmp_path), "--force", "--seeds", "0-63",
                     "--no-progress"]) == 0
        os.umask(0o027)
        assert main(["--model", "gmm-fmnist", "--outdir", str(tmp_path), "--format", "npz", "--seeds", "0",
                     "--nfe", "3", "--no-progress"]) == 0
    finally:
        os.umask(umask)
    png, npz = capsys.readouterr().out.split()
    assert png == str(tmp_path / GMM_GRID) and np.asarray(Image.open(png)).shape == (8 * 28, 8 * 28)
    assert os.stat(png).st_mode & 0o777 == 0o644 and os.stat(npz).st_mode & 0o777 == 0o640
    assert not list(tmp_path.glob(".*.tmp"))


def test_huge_seeds_are_refused_not_repeated(tmp_path, capsys):
    """Issue 10, defect 4: seed 2**32 gave seed 0's image; the largest allowed seed is a new image."""
    top = 2 ** 32 - 1
    assert main(["--model", "gmm-fmnist", "--seeds", f"0,{top}", "--nfe", "3", "--format", "npz",
                 "--outdir", str(tmp_path), "--no-progress"]) == 0
    data = np.load(capsys.readouterr().out.strip())
    assert data["seeds"].tolist() == [0, top] and not np.array_equal(data["images"][0], data["images"][1])
    assert main(["--model", "gmm-fmnist", "--seeds", str(top + 1), "--outdir", str(tmp_path / "b")]) == 2
    one_line_error(capsys, "--seeds")


@pytest.mark.parametrize("setup,words", [
    ("missing", [store.ASSETS_ENV, "no such folder"]),  # issue 10, defect 7: fell back to another model
    ("no-manifest", [store.ASSETS_ENV, "manifest.json"]),  # defect 7
    ("file", [store.ASSETS_ENV, "not a folder"]),  # defect 7
    ("corrupt", [store.ASSETS_ENV, "manifest.json", "corrupt"]),  # defect 8: a JSON traceback from --help's text
    ("no-file-key", ["manifest.json", "'ghost'"]),  # defect 8: a KeyError traceback
])
def test_bad_assets_folder(tmp_path, monkeypatch, capsys, no_work, setup, words):
    if setup == "missing":
        monkeypatch.setenv(store.ASSETS_ENV, str(tmp_path / "missing"))
    elif setup == "file":
        (tmp_path / "file").write_text("{}")
        monkeypatch.setenv(store.ASSETS_ENV, str(tmp_path / "file"))
    else:
        _assets(tmp_path, monkeypatch, {"no-manifest": None, "corrupt": "{",
                                        "no-file-key": json.dumps({"format": store.MANIFEST_FORMAT,
                                                                   "models": {"ghost": {"sha256": "0"}}})}[setup])
    assert main(["--outdir", str(tmp_path / "out")]) == 2
    one_line_error(capsys, *words)
    assert not (tmp_path / "out").exists()


def test_missing_shipped_model_file(tmp_path, monkeypatch, capsys):
    """Issue 10, defect 8: a model listed in the manifest whose file is gone gave a FileNotFoundError traceback."""
    _assets(tmp_path, monkeypatch, json.dumps({"format": store.MANIFEST_FORMAT, "models": {
        "ghost": {"file": "ghost.safetensors", "sha256": "0" * 64, "description": "gone", "default": True}}}))
    assert main(["--outdir", str(tmp_path / "out")]) == 2
    one_line_error(capsys, "--model ghost", "ghost.safetensors", "missing")
    assert not list((tmp_path / "out").glob("*.png"))


def test_model_given_as_a_shipped_file_or_a_directory(tmp_path, capsys):
    """Issue 10, defect 9: a shipped model's file is a model (it was refused as 'not a checkpoint'); a directory
    gets a message saying what --model expects."""
    shipped = store.ASSET_DIR / store.shipped_models(store.ASSET_DIR)["fmnist-dct"]["file"]
    assert main(["--model", str(shipped), "--seeds", "3", "--nfe", "3", "--format", "npz", "--outdir", str(tmp_path),
                 "--no-progress", "--precision", "fp32"]) == 0  # as `sample` below runs the network
    path = capsys.readouterr().out.strip()
    assert path.endswith("fmnist-dct_learned_heun-mid_uniform_t_nfe3_seeds3.npz")
    by_name, schedule = store.StoredModel.open("fmnist-dct").load()
    x, _, _ = sample(by_name, schedule, nfe=3, seeds=[3])
    from aniso_fast.utils.data import to_uint8

    assert np.array_equal(np.load(path)["images"], to_uint8(x).numpy())
    assert main(["--model", str(tmp_path), "--outdir", str(tmp_path / "out")]) == 2
    one_line_error(capsys, "--model", "is a directory", ".safetensors")


def test_schedule_help_states_the_default_the_code_uses(tmp_path):
    """Issue 10, defect 9: the help said 'learned' only for a checkpoint; shipped trained models default to it too."""
    parser = build_parser()
    help_text = " ".join(parser.format_help().split())
    assert "'learned' for a shipped model or a .safetensors file, 'edm' for an embedded model" in help_text
    for model, schedule in (("fmnist-dct", "learned"), ("gmm-fmnist", "edm")):
        args = parser.parse_args(["--model", model, "--outdir", str(tmp_path)])
        assert sample_cli._validate(args)[1].schedule == schedule
    assert f"at most {MAX_SAMPLES:,}" in help_text and "--force" in help_text


def test_table_set_default_round_trip(tmp_path, monkeypatch, capsys):  # issue 11, item 5
    """`table --set-default` records the best shipped (model, solver, grid, order) per NFE; `sample` without
    --model and sampler options uses the one of the nearest NFE, --help lists them, explicit options win."""
    import shutil

    from aniso_fast import evaluate

    entry = dict(store.read_manifest(store.ASSET_DIR).models["fmnist-iso"])
    _assets(tmp_path, monkeypatch, json.dumps({"format": store.MANIFEST_FORMAT, "models": {"fmnist-iso": entry}}))
    shutil.copy(store.ASSET_DIR / entry["file"], tmp_path / "assets")

    def cell(solver, grid, nfe, fd, secondary=None, order=None):
        return {"solver": solver, "grid": grid, "secondary": secondary, "order": order, "nfe": nfe, "mean": fd,
                "se": 0.1}

    recipe = {"rows": [{"name": "iso", "export": "fmnist-iso"}, {"name": "run", "export": "not-shipped"}]}
    result = {"rows": [
        {"name": "iso", "status": "ok", "model_id": f"shipped:{entry['sha256']}", "cells": [
            cell("dpmpp-2m", "logsnr", 3, 2.0, order=2), cell("heun", "uniform_t", 3, 3.0, "mid"),
            cell("heun", "uniform_t", 9, 1.0, "mid"), cell("ipndm", "uniform_t", 9, 1.5, order=4),
            {**cell("ipndm", "uniform_t", 3, 0, order=4), "skipped": "nfe: too few"}]},
        {"name": "run", "status": "ok", "model_id": "checkpoint:abc", "cells": [cell("euler", "uniform_t", 3, 0.1)]}]}
    evaluate.record_scores(result, recipe)  # what `table --set-default` (or --record-scores) runs after the table
    evaluate._set_defaults(result, recipe)
    score = store.shipped_models()["fmnist-iso"]["score"]  # the row's best at NFE 9; the unshipped row has none
    assert (score["fd"], score["solver"], score["secondary"], score["nfe"]) == (1.0, "heun", "mid", 9)
    recorded = store.sampler_defaults()
    assert {k: (v["model"], v["solver"], v["grid"], v["order"]) for k, v in recorded.items()} == {
        3: ("fmnist-iso", "dpmpp-2m", "logsnr", 2), 9: ("fmnist-iso", "heun", "uniform_t", None)}
    assert store.default_model() == "fmnist-iso"
    help_text = build_parser().format_help()
    assert "NFE 3: fmnist-iso, dpmpp-2m order 2 on logsnr, FD 2.00" in help_text
    assert "NFE 9: fmnist-iso, heun (mid point) on uniform_t, FD 1.00" in help_text

    def run(*argv):
        capsys.readouterr()
        assert main(["--count", "2", "--outdir", str(tmp_path / "out"), "--no-progress", "--force", *argv]) == 0
        return os.path.basename(capsys.readouterr().out.strip())

    assert run("--nfe", "4") == "fmnist-iso_learned_dpmpp-2m-2_logsnr_nfe4_seeds0-1.png"  # nearest recorded NFE: 3
    assert run("--nfe", "3", "--solver", "euler") == "fmnist-iso_learned_euler-euler_uniform_t_nfe3_seeds0-1.png"
    assert run("--nfe", "4", "--grid", "uniform_t") == "fmnist-iso_learned_heun-mid_uniform_t_nfe4_seeds0-1.png"
    assert run("--nfe", "3", "--model", "gmm-fmnist") == "gmm-fmnist_edm_heun-mid_uniform_t_nfe3_seeds0-1.png"


def test_grid_that_does_not_apply_to_the_model(tmp_path, monkeypatch, capsys):  # issue 11, item 5
    """A grid placed on the geometric mean needs the schedule's inverse: refused naming --grid, nothing written."""
    class NoInverse:
        def to(self, device):
            return self

    load = store.StoredModel.load
    monkeypatch.setattr(store.StoredModel, "load", lambda self, *a, **k: (load(self, *a, **k)[0], NoInverse()))
    assert main(["--model", "gmm-fmnist", "--grid", "logsnr", "--solver", "dpmpp-2m", "--outdir",
                 str(tmp_path / "out")]) == 2
    one_line_error(capsys, "--grid", "logsnr")
    assert not (tmp_path / "out").exists()


# ---- models of the process families (issues 12 and 13: `sample --model fmnist-vsdm` works) ----

def family_checkpoint(root, family: str):
    """A one-step class-conditional run of `train --family <family>` on 8x8 data (tests/test_train_families.py)."""
    from test_train import make_npz
    from test_train_families import fam_argv

    from aniso_fast.training import trainer as train

    npz = make_npz(root / "tiny.npz")
    assert train.main(fam_argv(npz, root / family, family, 1, "--forward-every", "5", "--class-schedules")) == 0
    return sorted((root / family).glob("checkpoint-*.safetensors"))[-1]


@pytest.fixture(scope="module")
def fam_ckpt(tmp_path_factory, one_thread):
    return {f: family_checkpoint(tmp_path_factory.mktemp(f), f) for f in ("vsdm", "vsmd")}


def _npz_run(capsys, *argv):
    capsys.readouterr()
    assert main([*argv, "--format", "npz", "--no-progress"]) == 0, capsys.readouterr().err
    path = capsys.readouterr().out.strip()
    return path, np.load(path)


@pytest.mark.parametrize("family,argv,stem,nfe", [
    ("vsdm", ["--solver", "em", "--nfe", "6"], "learned_em-sde_uniform_t_nfe6", 6),  # VSDM's own sampler
    ("vsdm", ["--nfe", "5"], "learned_heun-mid_uniform_t_nfe5", 5),  # the PF-ODE through the engine's Heun
    ("vsdm", ["--solver", "dpmpp-2m", "--grid", "logsnr", "--nfe", "4"], "learned_dpmpp-2m-2_logsnr_nfe4", 4),
    ("vsmd", ["--nfe", "5"], "learned_dpmpp-2m-2_logsnr_nfe5", 5),  # the phase-space 2M on logsnr by default
    ("vsmd", ["--solver", "heun", "--nfe", "5"], "learned_heun-end_uniform_t_nfe5", 5),  # VSMD's Heun: end point
    ("vsmd", ["--solver", "ipndm", "--order", "2", "--nfe", "4"], "learned_ipndm-2_uniform_t_nfe4", 4),
    ("vsmd", ["--solver", "em", "--nfe", "4"], "learned_em-sde_uniform_t_nfe4", 4),
    ("vsmd", ["--solver", "dpmpp-2m", "--grid", "logsnr", "--nfe", "4"], "learned_dpmpp-2m-2_logsnr_nfe4", 4),
])
def test_family_checkpoint_samples_with_its_own_sampler(tmp_path, capsys, fam_ckpt, family, argv, stem, nfe):
    """A VSDM / VSMD training checkpoint samples on its own process through registry.run_sampler: the CLI's images are
    that function's for the same seeds and classes, and a seed's image does not depend on the batch."""
    from aniso_fast.utils.data import to_uint8

    ckpt = str(fam_ckpt[family])
    path, data = _npz_run(capsys, "--model", ckpt, "--seeds", "0,5", "--classes", "2", *argv, "--outdir",
                          str(tmp_path / "a"))
    assert path.endswith(f"checkpoint-00000001_{stem}_seeds0+5_classes2.npz") and data["labels"].tolist() == [2, 2]
    model, process = store.StoredModel.open(ckpt).load()
    assert registry.family_of_process(process).name == family
    args = sample_cli.build_parser().parse_args(["--model", ckpt, *argv, "--outdir", str(tmp_path / "c")])
    plan = sample_cli._validate(args)[1].sampler
    assert plan.nfe == nfe
    x, _, info = registry.run_sampler(model, process, plan, [0, 5], torch.tensor([2, 2]))
    assert info["nfe"] == nfe and np.array_equal(data["images"], to_uint8(x).numpy())
    _, other = _npz_run(capsys, "--model", ckpt, "--seeds", "5", "--classes", "2", *argv, "--outdir",
                        str(tmp_path / "b"))
    assert np.array_equal(other["images"][0], data["images"][1])


def test_shipped_vsdm_model_samples_by_name_and_by_file(tmp_path, monkeypatch, capsys, fam_ckpt):
    """`--model fmnist-vsdm` in miniature: a VSDM checkpoint exported to an assets folder samples by its name and by
    its file, with em and with the PF-ODE; its family comes from the manifest entry / the file's header."""
    _assets(tmp_path, monkeypatch, json.dumps({"format": store.MANIFEST_FORMAT, "models": {}}))
    shipped = store.export_model(fam_ckpt["vsdm"], "tiny-vsdm")
    family = lambda name: store.StoredModel.open(name).family  # noqa: E731
    assert family("tiny-vsdm") == family(str(shipped)) == "vsdm"
    assert family(str(fam_ckpt["vsmd"])) == "vsmd" and family("gmm-fmnist") == "core"
    for model in ("tiny-vsdm", str(shipped)):
        for argv in (["--solver", "em", "--nfe", "3"], ["--nfe", "3"]):
            _, data = _npz_run(capsys, "--model", model, "--count", "2", *argv, "--outdir", str(tmp_path / "o"),
                               "--force")
            assert data["images"].shape == (2, 1, 8, 8)
    assert main(["--model", "tiny-vsdm", "--schedule", "learned", "--outdir", str(tmp_path / "x")]) == 2
    one_line_error(capsys, "--schedule", "vsdm model")


@pytest.mark.parametrize("family,argv,words", [
    ("vsdm", ["--schedule", "edm"], ["--schedule", "is a vsdm model", "own forward path"]),
    ("vsmd", ["--schedule", "learned"], ["--schedule", "is a vsmd model"]),
    ("vsdm", ["--grid", "karras"], ["--grid", "'karras' ignores the process"]),
    ("vsdm", ["--solver", "em", "--grid", "logsnr"], ["--grid", "Euler-Maruyama runs on the uniform t grid"]),
    ("vsmd", ["--solver", "unipc"], ["--solver", "em, heun, ipndm, dpmpp-2m"]),
    ("vsmd", ["--solver", "euler"], ["--solver", "em, heun, ipndm, dpmpp-2m"]),
    ("vsmd", ["--solver", "dpmpp-2m", "--grid", "karras"], ["--grid", "uniform_t, logsnr, edm_sigma"]),
    ("vsmd", ["--solver", "heun", "--grid", "edm_sigma"], ["--grid", "uniform t grid"]),
    ("vsmd", ["--solver", "heun", "--secondary", "mid"], ["--secondary", "end point"]),
    ("vsmd", ["--secondary", "mid"], ["--secondary", "dpmpp-2m uses no secondary point"]),
    ("vsmd", ["--solver", "heun", "--nfe", "4"], ["--nfe", "odd number"]),  # VSMD's Heun spends 2N - 1 calls
    ("vsdm", ["--solver", "em", "--secondary", "mid"], ["--secondary", "em uses no secondary point"]),
    ("vsdm", ["--solver", "em", "--order", "2"], ["--order", "only the multistep solvers"]),
])
def test_family_sampler_choice_refused_before_loading(tmp_path, capsys, no_work, fam_ckpt, family, argv, words):
    """The family (from the checkpoint header) decides the samplers; a wrong one is refused before the network is
    loaded, and nothing is written."""
    assert main(["--model", str(fam_ckpt[family]), *argv, "--outdir", str(tmp_path / "out")]) == 2
    one_line_error(capsys, *words)
    assert not (tmp_path / "out").exists()


def test_core_models_take_em_on_every_grid(tmp_path, capsys):
    """`--solver em` on the engine's family: the embedded mixture, NFE = steps, per-seed images."""
    _, data = _npz_run(capsys, "--model", "gmm-fmnist", "--solver", "em", "--grid", "karras", "--nfe", "4",
                       "--seeds", "1,2", "--outdir", str(tmp_path / "a"))
    _, alone = _npz_run(capsys, "--model", "gmm-fmnist", "--solver", "em", "--grid", "karras", "--nfe", "4",
                        "--seeds", "2", "--outdir", str(tmp_path / "b"))
    assert np.array_equal(alone["images"][0], data["images"][1])
    assert not np.array_equal(data["images"][0], data["images"][1])


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc")
def test_outdir_that_cannot_be_made_names_the_option(capsys, monkeypatch):
    """Refused before any sampling (root passes os.access everywhere, so the check probes the folder)."""
    from aniso_fast.processes import registry

    def no_work(*args, **kwargs):
        raise AssertionError("sampled before the output folder was checked")

    monkeypatch.setattr(registry, "run_sampler", no_work)
    assert main(["--model", "gmm-fmnist", "--nfe", "3", "--count", "1", "--outdir", "/proc/x", "--no-progress"]) == 2
    one_line_error(capsys, "--outdir", "/proc/x")


def test_out_file_and_nhwc_layout(tmp_path, capsys):
    target = tmp_path / "mine.npz"
    assert main(["--model", "gmm-fmnist", "--nfe", "3", "--count", "2", "--format", "npz", "--layout", "nhwc",
                 "--out", str(target), "--no-progress"]) == 0
    assert capsys.readouterr().out.strip() == str(target) and np.load(target)["images"].shape == (2, 28, 28, 1)
    assert main(["--model", "gmm-fmnist", "--out", str(tmp_path / "x.npz"), "--no-progress"]) == 2
    one_line_error(capsys, "--out", ".png")
