"""Every option of every CLI fed a bad value (issue 10): exit code 2, one line `error: ...` that names the option,
no traceback, and nothing written — the check runs before any work starts.

`BAD` lists, per (CLI, subcommand), the argv fragments that must be refused, keyed by the option they exercise.
`test_every_option_has_a_bad_value` walks the argparse parsers, so a new option without a bad value here fails CI.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from aniso_fast import evaluate, sample
from aniso_fast import store
from aniso_fast import models
from aniso_fast.training import config as train_config
from aniso_fast.training import trainer as train

REPO = Path(__file__).resolve().parent.parent
RECIPE = str(REPO / "aniso_fast" / "recipes" / "fmnist.json")
UNDER_A_FILE = "a_file/sub"  # a path whose parent is a regular file: never creatable
MISSING = "/nonexistent/x"

pytestmark = pytest.mark.usefixtures("one_thread")

# options with no bad value: flags (given or not) and free text
NO_BAD_VALUE = {"--no-progress", "--progress", "--force", "--cond", "--no-cond", "--xflip",
         "--no-estimator", "--no-optional", "--fresh", "--set-default", "--dry-run", "--no-export", "--default",
         "--description", "--inception", "--record-scores", "--per-class", "--per-subspace"}

BAD: dict[str, dict[str, list[list[str]]]] = {
    "sample": {
        "--model": [["--model", "no-such-model"], ["--model", MISSING + ".safetensors"]],
        "--schedule": [["--schedule", "bogus"],
                       ["--model", "VSDM_CKPT", "--schedule", "edm"]],  # a family samples on its own process
        "--solver": [["--solver", "bogus"],
                     ["--model", "VSMD_CKPT", "--solver", "euler"]],  # not a phase-space solver
        "--grid": [["--grid", "bogus"],
                   ["--model", "VSDM_CKPT", "--grid", "karras"],  # EDM's grid ignores VSDM's process
                   ["--model", "VSDM_CKPT", "--solver", "em", "--grid", "logsnr"],  # VSDM's EM: uniform t steps
                   ["--model", "VSMD_CKPT", "--solver", "heun", "--grid", "logsnr"],  # VSMD's Heun: uniform t
                   ["--model", "VSMD_CKPT", "--solver", "dpmpp-2m", "--grid", "karras"],
                   ["--solver", "dpmpp-2m", "--grid", "optimized"],  # no grid fitted to the model
                   ["--model", "VSDM_CKPT", "--solver", "dpmpp-2m", "--grid", "optimized"]],  # core models only
        "--secondary": [["--secondary", "bogus"], ["--grid", "karras", "--secondary", "mid"],
                        ["--solver", "em", "--secondary", "mid"],  # Euler-Maruyama has no secondary point
                        ["--model", "VSMD_CKPT", "--secondary", "mid"]],  # VSMD's Heun: the end point
        "--nfe": [["--nfe", "100000000000"], ["--nfe", "abc"], ["--nfe", "0"],
                  ["--solver", "dpmpp-3m", "--nfe", "4"],  # an NFE below the solver's minimum
                  ["--solver", "ipndm", "--order", "4", "--nfe", "3"]],  # an order higher than the steps allow
        "--order": [["--solver", "unipc", "--order", "5"], ["--solver", "ipndm", "--order", "abc"],
                    ["--solver", "heun", "--order", "2"], ["--solver", "em", "--order", "2"]],
        "--seeds": [["--seeds", "5-2"], ["--seeds", "abc"], ["--seeds", "-1"], ["--seeds", "0-100000000000"]],
        "--count": [["--count", "0"], ["--count", "100000000000"]],
        "--classes": [["--classes", "99"], ["--classes", "abc"], ["--classes", "-1"]],
        "--batch": [["--batch", "0"]],
        "--outdir": [["--outdir", UNDER_A_FILE]],
        "--out": [["--out", "x.npz"],  # the suffix does not match --format png
                  ["--out", "x.png", "--outdir", "elsewhere"]],  # one of the two
        "--layout": [["--layout", "bogus"], ["--layout", "nhwc"]],  # nhwc is an npz layout
        "--format": [["--format", "bogus"]],
        "--individual": [["--individual", "--format", "npz"]],
        "--device": [["--device", "bogus"]],
        "--precision": [["--precision", "bogus"], ["--precision", "fp16"]],  # fp16: CUDA only
        "--compile": [["--compile", "bogus"], ["--compile", "reduce-overhead"]],  # CUDA graphs: CUDA only
        "--memory-format": [["--memory-format", "bogus"]],
    },
    "train": {
        "--stage": [["--stage", "bogus"]],
        "--data": [["--data", MISSING + ".npz"]],
        "--out": [["--out", "a_file"], ["--out", UNDER_A_FILE]],
        "--resume": [["--resume", MISSING + ".safetensors"], ["--resume"]],
        "--init-from": [["--init-from", MISSING + ".safetensors"]],
        "--init-weights": [["--init-weights", "bogus"]],
        "--edm-pickle": [["--edm-pickle", MISSING + ".pkl"]],
        "--seed": [["--seed", "abc"], ["--seed", "-1"]],
        "--device": [["--device", "bogus"], ["--device", "cuda:99"]],
        "--precision": [["--precision", "bogus"], ["--precision", "fp16"],
                        ["--stage", "aniso", "--precision", "fp16"]],  # NaN in the estimator, on any device
        "--model-channels": [["--model-channels", "0"]],
        "--channel-mult": [["--channel-mult", "a,b"], ["--channel-mult", "0"]],
        "--num-blocks": [["--num-blocks", "0"]],
        "--attn-resolutions": [["--attn-resolutions", "x"]],
        "--dropout": [["--dropout", "2"], ["--dropout", "nan"]],
        "--basis": [["--basis", "bogus"]],
        "--dct-bands": [["--basis", "dct", "--dct-bands", "99"]],
        "--pca-rank": [["--basis", "pca", "--pca-rank", "0"]],
        "--pca-per": [["--pca-per", "bogus"]],
        "--pca-clusters": [["--basis", "pca", "--pca-rank", "4", "--pca-per", "cluster", "--pca-clusters", "0"]],
        "--pca-max-per-group": [["--basis", "pca", "--pca-rank", "4", "--pca-max-per-group", "0"]],
        "--class-schedules": [["--class-schedules"]],  # the edm stage has no learned schedule
        "--num-knots": [["--num-knots", "1"]],
        "--loss-c": [["--loss-c", "-1"]],
        "--reduction": [["--reduction", "bogus"]],
        "--batch": [["--batch", "0"], ["--batch", "3", "--grad-accum", "2"]],
        "--grad-accum": [["--grad-accum", "0"]],
        "--kimg": [["--kimg", "-1"], ["--kimg", "inf"]],
        "--steps": [["--steps", "0"]],
        "--lr": [["--lr", "nan"], ["--lr", "-1"]],
        "--glr": [["--glr", "-1"]],
        "--rampup-kimg": [["--rampup-kimg", "-1"]],
        "--decay-start-kimg": [["--decay-start-kimg", "nan"]],
        "--decay-halflife-kimg": [["--decay-halflife-kimg", "0"]],
        "--ema-halflife-kimg": [["--ema-halflife-kimg", "0"]],
        "--ema-rampup-ratio": [["--ema-rampup-ratio", "-1"]],
        "--snapshot-every": [["--snapshot-every", "-1"]],
        "--keep": [["--keep", "-1"]],
        "--sample-every": [["--sample-every", "-1"]],
        "--sample-n": [["--sample-n", "0"]],
        "--sample-nfe": [["--sample-nfe", "0"]],
        "--plot-every": [["--plot-every", "-1"]],
        # the process families' options (the base command is --family core; their ranges: test_train_families.py)
        "--family": [["--family", "bogus"]],
        "--vsdm-rule": [["--vsdm-rule", "bogus"], ["--vsdm-rule", "trajectory"]],
        "--beta-max": [["--beta-max", "10"]],
        "--zeta": [["--zeta", "abc"], ["--zeta", "0.5"]],
        "--forward-every": [["--forward-every", "5"]],
        "--forward-paths": [["--forward-paths", "5"]],
        "--forward-path-steps": [["--forward-path-steps", "5"]],
        "--forward-steps": [["--forward-steps", "5"]],
        "--sb-zeta": [["--sb-zeta", "1"]],
        "--sigma-data": [["--sigma-data", "0.5"], ["--sigma-data", "abc"]],
        "--vsmd-head": [["--vsmd-head", "bogus"], ["--vsmd-head", "denoiser"]],
    },
    "evaluate solvers": {
        "--model": [["--model", "bogus"]],
        "--schedule": [["--schedule", "bogus"]],
        "--schedule-from": [["--schedule", "learned"], ["--schedule", "learned", "--schedule-from", "nosuch"],
                            ["--schedule-from", "fmnist-dct"]],
        "--nfe": [["--nfe", "abc"], ["--nfe", "0"], ["--nfe", "100000000000"]],
        "--n": [["--n", "0"]],
        "--reference-nfe": [["--reference-nfe", "1"], ["--reference-nfe", "3"]],  # not above every --nfe
        "--seed": [["--seed", "-1"]],
        "--out": [["--out", UNDER_A_FILE]],
    },
    "evaluate classifier": {
        "--out": [["--out", UNDER_A_FILE + ".safetensors"]],
        "--doc": [["--doc", UNDER_A_FILE + ".md"]],
        "--epochs": [["--epochs", "-1"]],
        "--batch": [["--batch", "0"]],
        "--lr": [["--lr", "-1"]],
        "--width": [["--width", "0"]],
        "--feature-dim": [["--feature-dim", "0"]],
        "--seed": [["--seed", "-1"]],
        "--min-accuracy": [["--min-accuracy", "2"]],
        "--threads": [["--threads", "0"]],
    },
    "evaluate table": {
        "--recipe": [["--recipe", MISSING + ".json"], ["--recipe", "a_file"]],
        "--only": [["--only", "nosuchrow"]],
        "--n": [["--n", "0"]],
        "--seeds": [["--seeds", "0"]],
        "--nfe": [["--nfe", "abc"], ["--nfe", "100000000000"],
                  ["--nfe", "1"]],  # issue 11: no sampler of the recipe can spend it
        "--bootstrap": [["--bootstrap", "1"], ["--bootstrap", "abc"]],
        "--cache": [["--cache", UNDER_A_FILE]],
        "--source": [["--source", "bogus"]],
        "--classifier": [["--classifier", MISSING + ".safetensors"]],
        "--inception-n": [["--inception-n", "0"]],
        "--inception-nfe": [["--inception-nfe", "abc"]],
        "--inception-ref-n": [["--inception-ref-n", "0"]],
        "--inception-sampler": [["--inception-sampler", "bogus"]],
        "--batch": [["--batch", "0"]],
        "--out": [["--out", UNDER_A_FILE + ".md"]],
        "--json": [["--json", UNDER_A_FILE + ".json"]],
        "--threads": [["--threads", "0"]],
        "--device": [["--device", "mps"], ["--device", "cuda:x"]],
        "--precision": [["--precision", "bogus"], ["--precision", "fp16"]],  # fp16: CUDA only
        "--compile": [["--compile", "bogus"], ["--compile", "reduce-overhead"]],  # CUDA graphs: CUDA only
        "--memory-format": [["--memory-format", "bogus"]],
    },
    "evaluate train-recipe": {
        "--recipe": [["--recipe", MISSING + ".json"]],
        "--only": [["--only", "nosuchrow"]],
        "--quiet-seconds": [["--quiet-seconds", "-1"]],
    },
    "evaluate fd": {
        "--samples": [["--samples", MISSING + ".npz"], ["--samples", "a_file"]],
        "--ref": [["--ref", MISSING], ["--ref", "fashion-mnist:nosplit"]],
        "--features": [["--features", "bogus"]],
        "--bootstrap": [["--bootstrap", "1"]],
        "--json": [["--json", UNDER_A_FILE + ".json"]],
        "--threads": [["--threads", "0"]],
    },
    "models list": {
        "--json": [],  # a flag: no bad value
    },
    "evaluate fit-grid": {
        "--model": [["--model", "gmm-fmnist"], ["--model", "no-such-model"]],  # embedded, not shipped
        "--steps": [["--steps", "abc"], ["--steps", "0"], ["--steps", "3,3"]],
        "--samples": [["--samples", "0"]],
        "--teacher-steps": [["--teacher-steps", "1"]],
        "--check": [["--check", "-1"]],
        "--threads": [["--threads", "0"]],
        "--precision": [["--precision", "bogus"], ["--precision", "fp16"]],  # fp16: CUDA only
        "--compile": [["--compile", "bogus"], ["--compile", "reduce-overhead"]],  # CUDA graphs: CUDA only
        "--memory-format": [["--memory-format", "bogus"]],
    },
    "evaluate precision-gate": {
        "--candidate": [["--candidate", "fp32"], ["--candidate", "fp16"]],  # fp32: nothing to gate; fp16: CUDA only
        "--nfe": [["--nfe", "abc"], ["--nfe", "0"]],
        "--n": [["--n", "1"]],
        "--bootstrap": [["--bootstrap", "1"]],
        "--batch": [["--batch", "0"]],
        "--cache": [["--cache", UNDER_A_FILE]],
        "--classifier": [["--classifier", MISSING + ".safetensors"]],
        "--out": [["--out", UNDER_A_FILE]],
        "--results": [["--results", MISSING + ".md"], ["--results", "a_file/sub.md"]],
        "--threads": [["--threads", "0"]],
        "--device": [["--device", "mps"]],
    },
    "evaluate learn-grid": {
        "--model": [["--model", "gmm-fmnist"], ["--model", "no-such-model"]],  # embedded, not shipped
        "--solver": [["--solver", "em"], ["--solver", "bogus"]],
        "--order": [["--order", "0"]],
        "--nfe": [["--nfe", "abc"], ["--nfe", "0"], ["--nfe", "4,4"]],
        "--samples": [["--samples", "0"]],
        "--val": [["--val", "0"]],
        "--teacher-steps": [["--teacher-steps", "1"]],
        "--epochs": [["--epochs", "0"]],
        "--batch": [["--batch", "0"]],
        "--lr": [["--lr", "0"], ["--lr", "nan"]],
        "--start": [["--start", "bogus"]],
        "--loss": [["--loss", "lpips"]],
        "--secondary": [["--secondary", "bogus"]],
        "--cache": [["--cache", "teacher.npz"], ["--cache", UNDER_A_FILE + ".pt"]],
        "--threads": [["--threads", "0"]],
    },
    "models build-gmm": {
        "--out": [["--out", UNDER_A_FILE + ".safetensors"]],
        "--rank": [["--rank", "0"], ["--rank", "784"]],
        "--split": [["--split", "0"], ["--split", "64"]],
    },
    "models export": {
        "CKPT": [["MISSING_CKPT"]],
        "--name": [["--name", "Bad Name"], ["--name", "gmm-fmnist"]],
        "--net-dtype": [["--net-dtype", "bogus"]],
        "--assets": [["--assets", UNDER_A_FILE]],
    },
    "models set-default": {
        "NAME": [["no-such-model"]],
        "--assets": [["--assets", UNDER_A_FILE]],
    },
}


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint, tmp_path_factory):
    """The valid parts of the command lines: a tiny npz data set and a training checkpoint (tests/conftest.py),
    and one-step VSDM and VSMD checkpoints (VSDM_CKPT, VSMD_CKPT in a fragment)."""
    from test_sample_cli import family_checkpoint

    return {"npz": str(tiny_checkpoint.parents[1] / "tiny.npz"), "ckpt": str(tiny_checkpoint),
            **{f"{f.upper()}_CKPT": str(family_checkpoint(tmp_path_factory.mktemp(f), f)) for f in ("vsdm", "vsmd")}}


def _command(cli: str, fragment: list[str], tiny: dict) -> tuple:
    """(main, argv): a valid base command line with the bad fragment last (argparse keeps the last value)."""
    if cli == "sample":
        return sample.main, ["--model", "gmm-fmnist", "--count", "2", "--nfe", "3", "--outdir", "out",
                             "--no-progress", *[tiny[a] if a.endswith("_CKPT") else a for a in fragment]]
    if cli == "train":
        return train.main, ["--stage", "edm", "--data", tiny["npz"], "--out", "run", "--steps", "1", "--batch", "8",
                            "--model-channels", "8", "--channel-mult", "1,1", "--no-progress", *fragment]
    tool, sub = cli.split()
    if tool == "evaluate":
        base = {"solvers": ["--n", "4", "--nfe", "3", "--reference-nfe", "9", "--out", "acc/solver"],
                "classifier": ["--out", "clf/c.safetensors", "--doc", "clf/c.md"],
                "table": ["--recipe", RECIPE, "--n", "4", "--seeds", "1", "--out", "t/R.md", "--json", "t/r.json"],
                "train-recipe": ["--recipe", RECIPE, "--dry-run"],
                "fit-grid": ["--model", "gmm-fmnist", "--no-progress"],
                "learn-grid": ["--model", "gmm-fmnist", "--solver", "ipndm", "--no-progress"],
                "fd": ["--samples", "fashion-mnist:test", "--ref", "fashion-mnist:test"],
                "precision-gate": ["--candidate", "bf16", "--out", "g/gate", "--results", "none"]}[sub]
        return evaluate.main, [sub, *base, *fragment]
    if sub == "export":
        ckpt = MISSING + ".safetensors" if fragment == ["MISSING_CKPT"] else tiny["ckpt"]
        rest = [] if fragment == ["MISSING_CKPT"] else fragment
        return models.main, ["export", ckpt, "--name", "tiny", "--assets", "assets", *rest]
    if sub == "set-default":
        name = fragment if fragment == ["no-such-model"] else ["gmm-fmnist"]
        rest = [] if fragment == ["no-such-model"] else fragment
        return models.main, ["set-default", *name, "--assets", "assets", *rest]
    return models.main, [sub, "--out", "gmm.safetensors", *fragment]


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


CASES = [(cli, option, fragment) for cli, table in BAD.items() for option, fragments in table.items()
         for fragment in fragments]


@pytest.mark.parametrize("cli,option,fragment", CASES, ids=[f"{c}:{' '.join(f)}" for c, _, f in CASES])
def test_bad_value_is_one_line_error_and_exit_2(cli, option, fragment, tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(store.ASSETS_ENV, str(tmp_path / "assets"))
    (tmp_path / "a_file").write_text("a regular file where a folder is needed\n")
    (tmp_path / "assets").mkdir()
    (tmp_path / "assets" / "manifest.json").write_text('{"format": "aniso_fast.manifest/1", "models": {}}\n')
    main, argv = _command(cli, fragment, tiny)
    before = _files(tmp_path)
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own usage errors
        code = e.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, f"exit code {code}; stderr: {err}"
    assert "Traceback" not in err
    last = lines[-1]
    assert re.match(r"^(error: |.*: error: )", last), last
    named = option if option.startswith("--") else option.lower()
    assert named in last.lower() or (option == "CKPT" and "checkpoint" in last.lower()) \
        or (option == "NAME" and "name" in last.lower()), f"{option} not named in: {last}"
    assert _files(tmp_path) == before, f"files written: {sorted(map(str, _files(tmp_path) - before))}"


def _options(parser) -> dict[str, set[str]]:
    """(CLI, subcommand) -> every option string (and positional metavar) of that parser."""
    out = {}
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            for name, sub in action.choices.items():
                out[name] = {s for a in sub._actions if a.dest != "help"
                             for s in (a.option_strings or [a.metavar or a.dest])}
    return out


def test_every_option_has_a_bad_value():
    parsers = {"sample": {"": sample.build_parser()}, "train": {"": train_config.build_parser()},
               "evaluate": _options(evaluate.build_parser()), "models": _options(models.build_parser())}
    missing = []
    for tool, subs in parsers.items():
        for sub, opts in subs.items():
            if not isinstance(opts, set):
                opts = {s for a in opts._actions if a.dest != "help" for s in a.option_strings}
            key = tool if not sub else f"{tool} {sub}"
            covered = set(BAD.get(key, {})) | NO_BAD_VALUE
            missing += [f"{key} {o}" for o in sorted(opts - covered)]
    assert not missing, f"options without a bad-value case: {missing}"


@pytest.mark.parametrize("sub", [["classifier", "--out", "c/c.safetensors", "--doc", "c/c.md"],
                                 ["table", "--recipe", RECIPE, "--out", "t/R.md", "--json", "t/r.json"]])
def test_missing_fashion_mnist_is_a_one_line_error(sub, tmp_path, monkeypatch, capsys):
    """The data sets these subcommands read are checked before any work (it was a FileNotFoundError traceback)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ANISO_FAST_FMNIST_DIR", str(tmp_path / "empty"))
    assert evaluate.main(sub) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: Fashion-MNIST is needed and missing")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
