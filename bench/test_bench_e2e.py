"""End-to-end throughput: the default sample job (images per second) and the default recipe's training step, per
precision, side by side in one run.

sample: `aniso_fast.load(device=..., precision=..., compile=...).sample(seeds, nfe=NFE, batch=B, output="uint8")`
        with no model or sampler named, so the per-NFE choice runs (the manifest's recorded model and sampler, as
        `python -m aniso_fast.sample --nfe NFE`); one batch of B seeds per call, at NFE 5 and 9, B in BATCHES.
        Per (NFE, B), back to back: `fp32` (eager, contiguous: the plain network, the job before issue 24) and
        `bf16-channels_last` (what `--precision auto --memory-format auto` runs on a CPU with AMX or AVX-512 bf16:
        the default job); at B = 64 also `fp32-channels_last` and `bf16` (contiguous), each change alone, and at
        B = 64, NFE 9 `bf16-default-channels_last` (torch.compile: its first call, the warm-up, includes the
        compilation, recorded as warmup_s); on CUDA `bf16-reduce-overhead` (CUDA graphs). A non-fp32 run's images
        are compared with the fp32 run's (uint8 levels): `levels_moved_max` / `levels_moved_share`.
train:  one forward + backward of the default model's training recipe (aniso_fast/recipes/fmnist.json, its `export` row:
        the family's loss with the recipe's options) at batch TRAIN_BATCH on the shipped network, fp32 vs bf16.

Run alone: `python bench/report.py --e2e` (this file, bench/test_bench_forward.py and bench/test_bench_peers.py).
"""
from __future__ import annotations

import functools
import json
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import aniso_fast
from aniso_fast import store
from aniso_fast.pipeline import nfe_choice
from aniso_fast.evaluation.recipes import resolve_recipe
from aniso_fast.processes import registry
from aniso_fast.training.config import config_from_argv
from bench import common
from bench.common import Run

NFES = (5, 9)
BATCHES = (16, 64, 256)
DEFAULT_JOB = {"nfe": 9, "batch": 64}  # `python -m aniso_fast.sample`'s defaults (--count 64, --nfe 9)
PLAIN, AUTO = Run("fp32"), Run("bf16", memory_format="channels_last")
EACH_CHANGE = (Run("fp32", memory_format="channels_last"), Run("bf16"))  # at B = 64
COMPILED = Run("bf16", "default", "channels_last")  # at the default job only: a compile takes about a minute
CUDA_GRAPHS = Run("bf16", "reduce-overhead")
TRAIN_BATCH = 64
TRAIN_RUNS = (Run("fp32"), Run("bf16"))
RECIPE = resolve_recipe("fmnist")  # the shipped recipe (aniso_fast/recipes/fmnist.json)


@dataclass(frozen=True)
class SampleCase:
    nfe: int
    batch: int
    run: Run
    device: str

    @property
    def group(self) -> str:
        return f"e2e-sample-nfe{self.nfe}-B{self.batch}-{self.device}"

    @property
    def id(self) -> str:
        return f"{self.group}-{self.run.name}"


def _runs(nfe: int, batch: int) -> list[Run]:
    runs = [PLAIN, AUTO, CUDA_GRAPHS]
    if batch == DEFAULT_JOB["batch"]:
        runs += EACH_CHANGE
    if (nfe, batch) == (DEFAULT_JOB["nfe"], DEFAULT_JOB["batch"]):
        runs.append(COMPILED)
    return runs


SAMPLE_CASES = [SampleCase(nfe, B, run, device) for device in common.DEVICES for nfe in NFES for B in BATCHES
                for run in _runs(nfe, B)]
_FP32_IMAGES: dict = {}  # (device, nfe, batch) -> the fp32 run's images, for the other runs' comparison


@functools.cache
def _pipeline(device: str, run: Run, batch: int | None):
    """One pipeline per run (a compiled one per batch too: its graph is made for one batch size)."""
    return aniso_fast.load(None, device, **run.pipeline_options())


def _skip_unless_runnable(run: Run, device: str) -> None:
    why = common.why_not_runnable(run, device)
    if why is not None:
        pytest.skip(why)


@pytest.mark.parametrize("case", SAMPLE_CASES, ids=lambda c: c.id)
def test_sample(benchmark, case: SampleCase, opts: common.Options):
    _skip_unless_runnable(case.run, case.device)
    pipe = _pipeline(case.device, case.run, case.batch if case.run.compile else None)
    seeds = list(range(case.batch))

    def go():
        return pipe.sample(seeds, nfe=case.nfe, batch=case.batch, output="uint8").images

    def check(images):
        assert images.shape[0] == case.batch and images.dtype == torch.uint8
        key = (case.device, case.nfe, case.batch)
        if case.run.is_plain:
            _FP32_IMAGES[key] = images
        elif key in _FP32_IMAGES:
            moved = (images.to(torch.int16) - _FP32_IMAGES[key].to(torch.int16)).abs()
            benchmark.extra_info.update(levels_moved_max=int(moved.max()),
                                        levels_moved_share=float((moved > 0).float().mean()))

    choice = nfe_choice(case.nfe)
    benchmark.group = case.group
    benchmark.extra_info.update(suite="e2e", op="sample", nfe=case.nfe, batch=case.batch, impl=case.run.name,
                                precision=case.run.precision, compile=case.run.compile, images=case.batch,
                                model=choice["model"], solver=choice["solver"], grid=choice["grid"])
    common.measure(benchmark, go, case.device, opts, check=check, cpu_time=True)


# ---------------------------------------------------------------- the training step

@dataclass(frozen=True)
class TrainCase:
    run: Run
    device: str

    @property
    def group(self) -> str:
        return f"e2e-train-B{TRAIN_BATCH}-{self.device}"

    @property
    def id(self) -> str:
        return f"{self.group}-{self.run.name}"


TRAIN_CASES = [TrainCase(run, device) for device in common.DEVICES for run in TRAIN_RUNS]


def recipe_argv(model: str) -> list[str]:
    """The training arguments of the recipe row that exports `model` (aniso_fast/recipes/fmnist.json)."""
    rows = [r for r in json.loads(RECIPE.read_text())["rows"] if r.get("export") == model]
    if len(rows) != 1:
        raise ValueError(f"model: expected one recipe row exporting {model!r} in {RECIPE}, found {len(rows)}")
    return shlex.split(rows[0]["train"])


@functools.cache
def _train_setup(device: str):
    """The default model's recipe config at TRAIN_BATCH, its shipped network and forward path in training mode (the
    step's starting point: `--init-from` a trained model), the family's loss, one fixed batch."""
    name = store.default_model()
    cfg = config_from_argv([*recipe_argv(name), "--batch", str(TRAIN_BATCH), "--out", "unused"])
    model, process = store.StoredModel.open(name).load(device)
    model.train().requires_grad_(True)
    process.requires_grad_(True)
    loss = registry.get(cfg.family).loss(cfg, model, process)
    gen = torch.Generator().manual_seed(0)
    x0 = (torch.rand((TRAIN_BATCH, *model.image_shape), generator=gen) * 2 - 1).to(device)
    labels = (torch.arange(TRAIN_BATCH) % model.num_classes).to(device) if model.num_classes else None
    return name, cfg, model, process, loss, x0, labels


@pytest.mark.parametrize("case", TRAIN_CASES, ids=lambda c: c.id)
def test_train_step(benchmark, case: TrainCase, opts: common.Options, request):
    _skip_unless_runnable(case.run, case.device)
    name, cfg, model, process, loss_fn, x0, labels = _train_setup(case.device)
    common.execute(model, case.run, case.device)

    def step():
        model.zero_grad(set_to_none=True)
        process.zero_grad(set_to_none=True)
        loss, _ = loss_fn(x0, labels, torch.Generator(case.device).manual_seed(0))
        loss.backward()
        return loss.detach()

    def check(value):
        assert torch.isfinite(value), f"{case.id}: the loss is {value}"

    benchmark.group = case.group
    benchmark.extra_info.update(suite="e2e", op="train_step", batch=TRAIN_BATCH, impl=case.run.name,
                                precision=case.run.precision, model=name, family=cfg.family,
                                stage=getattr(cfg, "stage", None),
                                params=sum(p.numel() for p in model.parameters()))
    try:
        common.measure(benchmark, step, case.device, opts, check=check, cpu_time=True,
                       min_rounds=request.config.getoption("aniso_train_rounds"))
    finally:
        common.execute(model, Run(), case.device)  # the next case starts from the plain network
