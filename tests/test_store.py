"""Stored models and outputs that cannot be corrupted (issue 23), and the store's one-read-per-process rule
(issue 22): loading validates what it loads, bounded headers, exclusive outputs, atomic multi-file updates of the
assets folder, a manifest validated as a whole, the --device rule, and a fuzz test over headers and manifests."""
from __future__ import annotations

import functools
import itertools
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import one_line_error
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from aniso_fast import models as models_cli
from aniso_fast import sample as sample_cli
from aniso_fast import store
from aniso_fast.processes import registry
from aniso_fast.store import checkpoint as ckpt
from aniso_fast.store import header as header_module
from aniso_fast.store import manifest as manifest_module
from aniso_fast.store.header import StoredFileError, read_header
from aniso_fast.utils import atomic
from aniso_fast.utils.devices import resolve_device

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parent.parent


def _sample(outdir, *argv):
    return sample_cli.main([*argv, "--count", "2", "--nfe", "3", "--format", "npz", "--outdir", str(outdir),
                            "--no-progress"])


@pytest.fixture
def real_assets(tmp_path, monkeypatch):
    """A copy of the package's assets (never the real folder), selected by ANISO_FAST_ASSETS."""
    folder = tmp_path / "assets"
    shutil.copytree(store.ASSET_DIR, folder)
    monkeypatch.setenv(store.ASSETS_ENV, str(folder))
    return folder


def _shipped_with(path: Path, out: Path, change) -> Path:
    """A copy of a shipped model's file with `change(tensors)` applied (the header metadata kept)."""
    blob = path.read_bytes()
    meta = read_header(blob)[0]["__metadata__"]
    tensors = st_load(blob)
    change(tensors)
    out.write_bytes(st_save(tensors, metadata=meta))
    return out


# ---- loading validates what it loads ----

@pytest.mark.parametrize("tensor,value", [("net.enc.8x8_conv.weight", float("nan")),
                                          ("net.enc.8x8_conv.weight", float("inf")),
                                          ("schedule.psi", float("nan"))])
def test_non_finite_shipped_file_is_refused(tiny_checkpoint, assets, tmp_path, capsys, tensor, value):
    """Issue 23: `sample --model bad.safetensors --format npz` exited 0 with NaN-derived images."""
    good = store.export_model(tiny_checkpoint, "tiny")
    name = next(k for k in st_load(good.read_bytes()) if k.startswith(tensor.rsplit(".", 1)[0]))

    def poison(tensors):
        tensors[name].view(-1)[0] = value

    bad = _shipped_with(good, tmp_path / "bad.safetensors", poison)
    assert _sample(tmp_path / "out", "--model", str(bad)) == 2
    one_line_error(capsys, "--model", "bad.safetensors", repr(name), "not finite")
    assert not (tmp_path / "out").exists()


def test_non_finite_checkpoint_is_refused(tiny_checkpoint, tmp_path, capsys):
    """A training checkpoint with a valid digest and a NaN in its EMA network: refused naming the tensor."""
    tensors, meta = ckpt.load_checkpoint(tiny_checkpoint)
    key = next(k for k in tensors if k.startswith("ema.") and tensors[k].is_floating_point())
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[-1] = float("nan")
    meta.pop("tensor_sha256")
    bad = ckpt.save_checkpoint(tmp_path / "checkpoint-00000009.safetensors", tensors, meta)
    assert _sample(tmp_path / "out", "--model", str(bad)) == 2
    one_line_error(capsys, repr(key), "not finite")
    with pytest.raises(StoredFileError, match="not finite"):
        store.export_model(bad, "nan")


def test_shapes_and_dtypes_as_the_metadata_says(tiny_checkpoint, assets, tmp_path, capsys):
    good = store.export_model(tiny_checkpoint, "tiny")
    name = next(k for k, t in st_load(good.read_bytes()).items() if k.startswith("net.") and t.ndim == 4)

    def reshape(tensors):
        tensors[name] = tensors[name].reshape(-1)

    def widen(tensors):
        tensors[name] = tensors[name].float()

    for change, words in ((reshape, ["shape"]), (widen, ["torch.float32", "float16"])):
        bad = _shipped_with(good, tmp_path / "bad.safetensors", change)
        assert _sample(tmp_path / "out", "--model", str(bad)) == 2
        one_line_error(capsys, name.partition(".")[2], *words)
    assert not (tmp_path / "out").exists()


def test_schedule_must_give_increasing_knots(tiny_checkpoint, assets, tmp_path):
    good = store.export_model(tiny_checkpoint, "tiny")

    def huge(tensors):
        tensors["schedule.psi"].fill_(1e308)  # finite, but the knot increments overflow

    bad = _shipped_with(good, tmp_path / "bad.safetensors", huge)
    with pytest.raises(StoredFileError, match="schedule.psi .*increasing"):
        store.StoredModel.open(bad).load()


# ---- header bombs ----

def _bomb(path: Path, depth: int = 300_000) -> Path:
    body = b"[" * depth + b"]" * depth
    path.write_bytes(len(body).to_bytes(8, "little") + body)
    return path


def test_header_bomb_is_a_one_line_error(tmp_path, assets, capsys):
    """Issue 23: a deeply nested header ended in a RecursionError traceback in `sample` and `models export`."""
    bomb = _bomb(tmp_path / "bomb.safetensors")
    assert _sample(tmp_path / "out", "--model", str(bomb)) == 2
    one_line_error(capsys, "bomb.safetensors", "nested deeper")
    assert models_cli.main(["export", str(bomb), "--name", "x1"]) == 2
    one_line_error(capsys, "bomb.safetensors", "nested deeper")
    assert not (tmp_path / "out").exists() and "x1" not in store.shipped_models()


def test_header_length_bounded_before_reading(tmp_path):
    path = tmp_path / "long.safetensors"
    with open(path, "wb") as f:
        f.write((10**9).to_bytes(8, "little"))
        f.truncate(10**9 + 8)  # sparse: the length fits the file, but is over the bound
    with pytest.raises(StoredFileError, match="header of 1000000000 bytes"):
        read_header(path)


# ---- outputs created exclusively ----

def test_output_written_meanwhile_is_never_replaced(tmp_path, monkeypatch, capsys):
    """Issue 23: two `sample` runs with one --outdir both passed the 'exists' check; the second os.replace
    discarded the first run's samples. Here the other run's file appears while this one samples."""
    outdir = tmp_path / "out"
    target = outdir / "gmm-fmnist_edm_heun-mid_uniform_t_nfe3_seeds0-1.npz"
    real = registry.run_sampler

    def other_run_writes_first(*args, **kwargs):
        outdir.mkdir(exist_ok=True)
        target.write_bytes(b"the other run's samples")
        return real(*args, **kwargs)

    monkeypatch.setattr(registry, "run_sampler", other_run_writes_first)
    assert _sample(outdir, "--model", "gmm-fmnist") == 2
    one_line_error(capsys, "--outdir", str(target), "--force")
    assert target.read_bytes() == b"the other run's samples"
    assert [p.name for p in outdir.iterdir()] == [target.name]  # no temporary file left
    assert _sample(outdir, "--model", "gmm-fmnist", "--force") == 0  # --force: the last complete file wins
    assert np.load(target)["images"].shape == (2, 1, 28, 28)


def test_exclusive_write_races(tmp_path):
    """Of many writers of one name without replace, exactly one wins, and its file is complete."""
    import threading

    path, results = tmp_path / "f.bin", []

    def write(i):
        try:
            atomic.atomic_write_bytes(path, bytes([i]) * 100_000, replace=False)
            results.append(i)
        except FileExistsError:
            pass

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 1 and path.read_bytes() == bytes([results[0]]) * 100_000
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


# ---- multi-file updates of the asset folder: a kill at every write ----

_CHILD = textwrap.dedent("""
    import os, sys
    from aniso_fast.utils import atomic
    kill_at, calls = int(sys.argv[1]), []

    def hook(step, path):
        calls.append((step, path.name))
        if len(calls) == kill_at:
            os._exit(137)

    atomic.fault_hook = hook
    from aniso_fast.models import main
    code = main(sys.argv[2:])
    print(len(calls), file=sys.stderr)
    sys.exit(code)
""")


def _run_child(kill_at: int, argv: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", _CHILD, str(kill_at), *argv], env=env, capture_output=True,
                          text=True, timeout=300)


def _every_entry_verifies_and_samples(assets: Path, tmp_path: Path, capsys) -> None:
    doc = json.loads((assets / "manifest.json").read_text())
    for name in doc["models"]:
        store.StoredModel.open(name).state()  # the file is there and matches its SHA-256
        out = tmp_path / "samples"
        assert sample_cli.main(["--model", name, "--count", "1", "--nfe", "3", "--format", "npz", "--outdir",
                                str(out), "--no-progress", "--force"]) == 0, capsys.readouterr().err
    assert sample_cli.main(["--count", "1", "--format", "npz", "--outdir", str(tmp_path / "samples"),
                            "--no-progress", "--force"]) == 0, capsys.readouterr().err  # the per-NFE default


def test_a_kill_at_any_write_leaves_every_shipped_model_usable(tiny_checkpoint, real_assets, tmp_path, capsys):
    """Issue 23: `export --name fmnist-edm --force` replaced the model file before the manifest; a kill between the
    two left fmnist-edm failing its SHA-256 check. Here a child process is killed at each write of an export and of
    a set-default, each time on a fresh copy of the shipped assets; after each kill every entry verifies and every
    model samples, and the next update collects what the killed one left."""
    commands = [["export", str(tiny_checkpoint), "--name", "fmnist-edm", "--force"], ["set-default", "fmnist-edm"]]
    fixed = {"manifest.json", "gmm_fmnist.safetensors", "fmnist_classifier.safetensors", "fmnist_classifier.json"}
    for argv in commands:
        done = _run_child(0, argv)  # a dry run on the copy: how many writes the command makes
        assert done.returncode == 0, done.stderr
        writes = int(done.stderr.strip().splitlines()[-1])
        assert writes >= (5 if argv[0] == "export" else 2), writes
        for kill_at in range(1, writes + 1):
            shutil.rmtree(real_assets)
            shutil.copytree(store.ASSET_DIR, real_assets)
            killed = _run_child(kill_at, argv)
            assert killed.returncode == 137, killed.stderr
            _every_entry_verifies_and_samples(real_assets, tmp_path, capsys)
            if argv[0] == "export" and kill_at in (writes - 1, writes):  # killed after the switch, while collecting
                assert _run_child(0, commands[1]).returncode == 0
                doc = json.loads((real_assets / "manifest.json").read_text())
                left = {p.name for p in real_assets.iterdir()} - {e["file"] for e in doc["models"].values()}
                assert left == fixed, left


# ---- the manifest validated as a whole ----

def _manifest_with(assets: Path, change) -> dict:
    doc = json.loads((assets / "manifest.json").read_text())
    change(doc)
    (assets / "manifest.json").write_text(json.dumps(doc))
    return doc


def test_two_defaults_are_refused(real_assets, tmp_path, capsys):
    """Issue 23: a manifest with two entries marked default was accepted (which one won was undefined)."""
    _manifest_with(real_assets, lambda doc: doc["models"]["fmnist-edm"].update(default=True))
    assert _sample(tmp_path / "out") == 2
    one_line_error(capsys, "manifest.json", "'fmnist-dct-class', 'fmnist-edm'", "marked default")


@pytest.mark.parametrize("key,value,words", [
    ("solver", "rk4", ["defaults[7]: solver", "'rk4'"]),
    ("grid", "spiral", ["defaults[7]: grid", "'spiral'"]),
    ("model", "gone", ["defaults[7]: model 'gone'"]),
])
def test_a_stored_choice_is_reported_as_the_manifest_entry(real_assets, tmp_path, capsys, key, value, words):
    """Issue 23: a per-NFE default naming an unknown solver was reported as `error: --solver: ... got 'rk4'`
    although the user gave no --solver."""
    _manifest_with(real_assets, lambda doc: doc["defaults"]["7"].update({key: value}))
    assert _sample(tmp_path / "out", "--nfe", "7") == 2
    err = one_line_error(capsys, "manifest.json", *words)
    assert "--solver" not in err and "--grid" not in err and "--model" not in err


def test_stored_grid_levels_out_of_range(real_assets, tmp_path, capsys):
    """Issue 23: `--grid optimized` with a stored level of 1e300 reported `error: y: expected finite ...`."""
    def huge(doc):
        doc["models"]["fmnist-dct-class"]["grids"]["optimized"]["4"][0] = 1e300

    _manifest_with(real_assets, huge)
    assert _sample(tmp_path / "out", "--model", "fmnist-dct-class", "--grid", "optimized", "--solver", "ipndm",
                   "--nfe", "4") == 2
    err = one_line_error(capsys, "manifest.json", "models['fmnist-dct-class']", "grids.optimized['4']")
    assert "y:" not in err


# ---- one read per process ----

def test_one_sample_run_reads_the_manifest_and_each_header_once(real_assets, tmp_path, monkeypatch, capsys):
    """Issue 22: one `sample` run parsed manifest.json about 15 times and read safetensors headers repeatedly."""
    parses, headers = [], []
    parse, split = manifest_module._parse, header_module.split_header
    monkeypatch.setattr(manifest_module, "_parse", lambda path, data: parses.append(path) or parse(path, data))
    monkeypatch.setattr(header_module, "split_header", lambda *a: headers.append(a[2]) or split(*a))
    assert sample_cli.main(["--count", "2", "--format", "npz", "--outdir", str(tmp_path / "out"),
                            "--no-progress"]) == 0, capsys.readouterr().err
    assert len(parses) == 1 and len(headers) == 1, (parses, headers)
    assert sample_cli.main(["--model", "fmnist-vsdm", "--count", "1", "--nfe", "3", "--solver", "em", "--format",
                            "npz", "--outdir", str(tmp_path / "out"), "--no-progress"]) == 0
    assert len(parses) == 1 and len(headers) == 2, (parses, headers)  # the new model's header only


# ---- --device ----

@pytest.mark.parametrize("device,words", [("meta", ["'meta'"]), ("cuda:99", ["cuda:99"]), ("mps", ["'mps'"]),
                                          ("nonsense", ["'nonsense'"])])
def test_unusable_device_is_a_one_line_error(tmp_path, capsys, device, words):
    """Issue 23: `--device meta` ended in a traceback."""
    if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.device_count() > 99:
        pytest.skip("a machine with 100 GPUs")
    assert _sample(tmp_path / "out", "--model", "gmm-fmnist", "--device", device) == 2
    one_line_error(capsys, "--device", *words)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_missing_cuda_names_the_option():
    with pytest.raises(ValueError, match="--device: .*sees no CUDA GPU"):
        resolve_device("cuda", "--device")


# ---- fuzz: every stored document is a one-line error or a correct result ----

_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                     lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
                     max_leaves=20)


_COUNT = itertools.count()


def _one_line(e: Exception) -> bool:
    return "\n" not in str(e) and str(e) != ""


@functools.cache
def _shipped_blob() -> bytes:
    return (store.ASSET_DIR / store.shipped_models(store.ASSET_DIR)["fmnist-iso"]["file"]).read_bytes()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_safetensors_headers(tmp_path, data):
    shipped_blob = _shipped_blob()
    n = int.from_bytes(shipped_blob[:8], "little")
    header = json.loads(shipped_blob[8:8 + n])
    how = data.draw(st.sampled_from(["truncate", "nest", "replace", "length", "bytes"]))
    if how == "truncate":
        blob = shipped_blob[:data.draw(st.integers(0, len(shipped_blob)))]
    elif how == "nest":
        depth = data.draw(st.integers(1, 5000))
        body = b"[" * depth + b"]" * data.draw(st.integers(0, depth))
        blob = len(body).to_bytes(8, "little") + body
    elif how == "replace":
        key = data.draw(st.sampled_from(sorted(header)))
        field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets", "whole"]))
        value = data.draw(_JSON | st.integers(-2**70, 2**70) | st.just(float("nan")))
        if field == "whole" or not isinstance(header[key], dict) or key == "__metadata__":
            header[key] = value
        else:
            header[key][field] = value
        body = json.dumps(header).encode()
        blob = len(body).to_bytes(8, "little") + body + shipped_blob[8 + n:]
    elif how == "length":
        blob = data.draw(st.integers(0, 2**64 - 1)).to_bytes(8, "little") + shipped_blob[8:]
    else:
        blob = data.draw(st.binary(max_size=64))
    path = tmp_path / f"fuzz{next(_COUNT)}.safetensors"  # a new file: no cached header of an earlier example
    path.write_bytes(blob)
    try:
        model = store.StoredModel.open(path)
        model.load()
    except ValueError as e:  # StoredFileError is one
        assert _one_line(e), str(e)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_manifest_documents(tmp_path, data):
    doc = json.loads((store.ASSET_DIR / "manifest.json").read_text())
    how = data.draw(st.sampled_from(["truncate", "nest", "model", "default", "grid", "text"]))
    if how == "model":
        name = data.draw(st.sampled_from(sorted(doc["models"])))
        key = data.draw(st.sampled_from(["file", "sha256", "bytes", "default", "family", "grids"]))
        doc["models"][name][key] = data.draw(_JSON | st.floats(allow_nan=True))
    elif how == "default":
        nfe = data.draw(st.sampled_from(sorted(doc["defaults"])))
        key = data.draw(st.sampled_from(["model", "solver", "grid", "secondary", "order", "nfe"]))
        if key == "nfe":
            doc["defaults"][data.draw(st.text(max_size=30) | st.sampled_from(["²", "1" * 5000, "0", "-3"]))] = \
                doc["defaults"].pop(nfe)
        else:
            doc["defaults"][nfe][key] = data.draw(_JSON | st.integers(-2**70, 2**70))
    elif how == "grid":
        grids = doc["models"]["fmnist-dct-class"]["grids"]["optimized"]
        grids["4"][data.draw(st.integers(0, 3))] = data.draw(st.floats(allow_nan=True, allow_infinity=True)
                                                             | st.integers(-2**1100, 2**1100))
        grids[data.draw(st.text(max_size=8) | st.just("²"))] = grids.pop("4")
    text = json.dumps(doc)
    if how == "truncate":
        text = text[:data.draw(st.integers(0, len(text)))]
    elif how == "nest":
        depth = data.draw(st.integers(1, 20000))
        text = "[" * depth + "]" * depth
    elif how == "text":
        text = data.draw(st.text(max_size=200))
    folder = tmp_path / f"fuzz{next(_COUNT)}"
    folder.mkdir()
    (folder / "manifest.json").write_text(text)
    try:
        manifest = store.read_manifest(folder)
    except ValueError as e:  # ManifestError is one
        assert _one_line(e), str(e)
        return
    assert manifest.default_model in (*manifest.models, "gmm-fmnist")
    for nfe, choice in manifest.defaults.items():  # what was accepted runs
        model = manifest.models.get(choice["model"], {})
        registry.family_of(model).resolve_sampler(choice["solver"], choice["grid"], choice.get("secondary"), nfe,
                                                  choice.get("order"))
