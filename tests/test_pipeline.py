"""The Python API (`aniso_fast.load`): the `sample` CLI's rules and images, and the README's "Use it from Python"
snippets as written."""

import numpy as np
import pytest
import torch
from helpers import readme_python_blocks

import aniso_fast
from aniso_fast.sample import main
from aniso_fast.utils.devices import resolve_device

HEADING = "## Use it from Python"


def _snippets() -> list[str]:
    return readme_python_blocks(HEADING)


def test_readme_pipeline_snippet_runs():
    (first, _) = _snippets()
    assert "aniso_fast.load()" in first
    ns = {}
    exec(compile(first, "README.md Python snippet 0", "exec"), ns)
    out = ns["out"]
    assert out.images.shape == (4, 1, 28, 28) and out.images.dtype == torch.float32
    assert out.images.abs().max() <= 1 and out.seeds == [0, 1, 2, 3] and out.info["nfe"] == 9
    assert ns["pixels"].dtype == torch.uint8 and ns["pixels"].shape[0] == 2


def test_readme_lower_level_snippet_runs():
    ns = {}
    exec(compile(_snippets()[1], "README.md Python snippet 1", "exec"), ns)
    assert ns["x"].shape == (4, 1, 28, 28) and ns["x"].isfinite().all()


def test_pipeline_images_are_the_cli_images(tmp_path, capsys):
    """Same seeds, classes and sampler: byte-identical to `sample --format npz`."""
    assert main(["--model", "gmm-fmnist", "--seeds", "3,7,9", "--classes", "1,4", "--nfe", "5", "--format", "npz",
                 "--outdir", str(tmp_path), "--no-progress", "--device", "cpu"]) == 0
    cli = np.load(capsys.readouterr().out.strip())
    out = aniso_fast.load("gmm-fmnist", device="cpu").sample([3, 7, 9], nfe=5, classes=[1, 4], output="uint8",
                                                              batch=2)
    assert np.array_equal(out.images.numpy(), cli["images"]) and out.labels.tolist() == cli["labels"].tolist()
    assert out.info["model"] == "gmm-fmnist" and out.info["solver"] == "heun" and out.info["grid"] == "uniform_t"


def test_float_output_and_callback():
    steps = []
    out = aniso_fast.load("gmm-fmnist", device="cpu").sample(2, nfe=3, solver="euler",
                                                              callback=lambda d: steps.append(d["i"]))
    assert steps == [0, 1, 2] and out.images.dtype == torch.float32 and out.images.abs().max() <= 1


def test_no_name_follows_the_per_nfe_choice():
    pipe = aniso_fast.load(device="cpu")
    choice = aniso_fast.pipeline.nfe_choice(4)
    plan = pipe.plan(4)
    assert (plan.model, plan.sampler.solver, plan.sampler.grid) == (choice["model"], choice["solver"], choice["grid"])


@pytest.mark.parametrize("kwargs,words", [
    ({"n_or_seeds": 0}, "--count"),
    ({"n_or_seeds": [2 ** 32]}, "--seeds"),
    ({"nfe": 1, "solver": "heun"}, "--nfe"),
    ({"classes": [99]}, "--classes"),
    ({"classes": "x"}, "--classes"),
    ({"output": "png"}, "--output"),
    ({"batch": 0}, "--batch"),
])
def test_bad_arguments_name_themselves(kwargs, words):
    with pytest.raises(ValueError, match=words):
        aniso_fast.load("gmm-fmnist", device="cpu").sample(**{"nfe": 3, **kwargs})


def test_bad_model_and_device():
    with pytest.raises(ValueError, match="--model: unknown model"):
        aniso_fast.load("nope")
    with pytest.raises(ValueError, match="--device"):
        aniso_fast.load("gmm-fmnist", device="mps")


def test_auto_device_is_cuda_when_available():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert aniso_fast.load("gmm-fmnist").device == resolve_device("auto")


def test_progress_bar_counts_network_calls_and_stays(capsys):
    aniso_fast.load("gmm-fmnist", device="cpu").sample(1, nfe=5, solver="heun", progress=True)
    err = capsys.readouterr().err
    assert "5/5" in err and "call" in err and err.endswith("\n")  # midpoint Heun: 3 steps, 5 calls; left on screen


@pytest.mark.parametrize("model, solver, grid, nfe", [("fmnist-vsdm", "em", "uniform_t", 4),
                                                      ("fmnist-vsmd", "dpmpp-2m", "logsnr", 4),
                                                      ("fmnist-vsmd", "heun", "uniform_t", 5),
                                                      ("fmnist-vsmd", "ipndm", "uniform_t", 4),
                                                      ("fmnist-vsmd", "em", "uniform_t", 3)])
def test_family_samplers_count_network_calls(capsys, model, solver, grid, nfe):
    """The process families' own samplers show the same bar as the core solvers: network calls, left on screen."""
    aniso_fast.load(model, device="cpu").sample(1, nfe=nfe, solver=solver, grid=grid, progress=True)
    err = capsys.readouterr().err
    assert f"{nfe}/{nfe}" in err and "call" in err and err.endswith("\n")
