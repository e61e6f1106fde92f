"""The network forward per precision, batch size, memory format and thread count: what decides the sampling
defaults (the batch of `sample --batch` / `Pipeline.sample`, the memory format of `networks.execution`'s 'auto').

One call of the default model's flow `model.flow(x, g, labels)` (the preconditioned U-Net and one `combine`: what
each solver step calls) under no_grad, at one mid noise level, for B in BATCHES; fp32 and bf16 (autocast; on the
CPU only where it has AMX or AVX-512 bf16), `contiguous` and `channels_last` (the network's weights and input
converted by `networks.execution`, each on a model of its own), with torch.set_num_threads(t) for t in THREADS (1,
2 and the default count, at most the cores). bench/report.py divides the median by B: ms per image.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import pytest
import torch

from aniso_fast import store
from aniso_fast.networks import execution
from bench import common
from bench.common import Run

BATCHES = (16, 32, 64, 128, 256)
LAYOUTS = ("contiguous", "channels_last")
THREADS = tuple(sorted({t for t in (1, 2, torch.get_num_threads()) if t <= (os.cpu_count() or 1)}))


PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class ForwardCase:
    batch: int
    precision: str
    layout: str
    threads: int | None  # None on CUDA
    device: str

    @property
    def run(self) -> Run:
        return Run(self.precision, memory_format=self.layout)

    @property
    def group(self) -> str:
        threads = "" if self.threads is None else f"-t{self.threads}"
        return f"forward-B{self.batch}{threads}-{self.device}"

    @property
    def id(self) -> str:
        return f"{self.group}-{self.precision}-{self.layout}"


CASES = [ForwardCase(B, p, layout, t, "cpu") for t in THREADS for B in BATCHES for p in PRECISIONS
         for layout in LAYOUTS] + \
    [ForwardCase(B, p, layout, None, "cuda") for B in BATCHES for p in PRECISIONS for layout in LAYOUTS]


@functools.cache
def _model(device: str, run: Run):
    """The default model on `device`, its network run as `run` says (a model per run: channels_last converts the
    network's weights in place)."""
    model, _ = store.StoredModel.open(store.default_model()).load(device)
    return common.execute(model, run, device)


@functools.lru_cache(maxsize=2)
def _inputs(batch: int, device: str, K: int, num_classes: int | None, shape: tuple):
    gen = torch.Generator().manual_seed(batch)
    x = (2.0 * torch.randn((batch, *shape), generator=gen)).to(device)
    g = torch.full((batch, K), 4.0, dtype=torch.float64, device=device)  # sigma = 2 in every subspace
    labels = (torch.arange(batch) % num_classes).to(device) if num_classes else None
    return x, g, labels


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_forward(benchmark, case: ForwardCase, opts: common.Options):
    why = common.why_not_runnable(case.run, case.device)
    if why is None and case.precision == "bf16" and execution.resolve_precision("auto", case.device) != "bf16":
        why = f"bf16 is not the automatic precision on this {case.device} (no AMX or AVX-512 bf16)"
    if why is not None:
        pytest.skip(why)
    model = _model(case.device, case.run)
    x, g, labels = _inputs(case.batch, case.device, model.basis.num_subspaces, model.num_classes, model.image_shape)

    def forward():
        with torch.no_grad():
            return model.flow(x, g, labels)

    def check(out):
        assert out.shape == x.shape and bool(torch.isfinite(out).all())

    benchmark.group = case.group
    benchmark.extra_info.update(suite="forward", op="flow", batch=case.batch, impl=f"{case.precision}-{case.layout}",
                                precision=case.precision, layout=case.layout, model=store.default_model(),
                                images=case.batch)
    threads = torch.get_num_threads()
    if case.threads is not None:
        torch.set_num_threads(case.threads)
    try:
        common.measure(benchmark, forward, case.device, opts, check=check, cpu_time=True)
    finally:
        torch.set_num_threads(threads)
