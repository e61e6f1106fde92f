"""One training step (loss + backward) on the small Fashion-MNIST U-Net, per loss and per op backend.

model: `AnisoPrecond(fashion_mnist_unet(), DCTBasis(28, 28, 14))`, batch 32 of 28x28x1, fixed inputs and seeds.
loss:  `estimator`     trajectory_loss(estimator=True): the anisotropic step with the schedule-gradient estimator;
       `no_estimator`  trajectory_loss(estimator=False): plain back-propagation through the conditioning;
       `iso_frozen`    iso_loss with a frozen tied schedule: the plain EDM step the estimator is compared with;
       `edm`           edm_loss (EDM's own loss; the schedule is unused), for reference.
impl:  the op backend the whole step uses (ANISO_FAST_BACKEND): the device's default fused backend, `reference`.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import pytest
import torch

from aniso_fast import ops
from aniso_fast.geometry.bases import DCTBasis
from aniso_fast.processes.losses import edm_loss, iso_loss, trajectory_loss
from aniso_fast.networks.unet import fashion_mnist_unet
from aniso_fast.networks.precond import AnisoPrecond
from aniso_fast.geometry.schedules import MatrixSchedule
from bench import common

BATCH = 32
LOSSES = ("estimator", "no_estimator", "iso_frozen", "edm")
# the reference path is measured for the two steps the targets compare (estimator) and the plain EDM step
IMPLS = {"estimator": ("fused", "reference"), "no_estimator": ("fused",), "iso_frozen": ("fused", "reference"),
         "edm": ("fused",)}


@dataclass(frozen=True)
class TrainCase:
    loss: str
    device: str
    impl: str  # "fused" (the device's default backend) or "reference"

    @property
    def group(self) -> str:
        return f"train-fmnist-B{BATCH}-{self.device}"

    @property
    def id(self) -> str:
        return f"{self.group}-{self.loss}-{self.impl}"


CASES = [TrainCase(loss, device, impl) for device in common.DEVICES for loss in LOSSES for impl in IMPLS[loss]]


@functools.cache
def _setup(device: str):
    torch.manual_seed(0)
    basis = DCTBasis(28, 28, bands=14)
    model = AnisoPrecond(fashion_mnist_unet(), basis).to(device).train()
    aniso = MatrixSchedule(num_subspaces=2).to(device)
    tied = MatrixSchedule(num_subspaces=2, tied=True).to(device).requires_grad_(False)
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn((BATCH, 1, 28, 28), generator=gen).clamp(-1, 1).to(device)
    labels = (torch.arange(BATCH) % 10).to(device)
    return model, aniso, tied, x0, labels


def _step_fn(case: TrainCase):
    model, aniso, tied, x0, labels = _setup(case.device)

    def loss():
        gen = torch.Generator(device=case.device).manual_seed(0)
        if case.loss == "estimator":
            return trajectory_loss(model, aniso, x0, labels, estimator=True, generator=gen)
        if case.loss == "no_estimator":
            return trajectory_loss(model, aniso, x0, labels, estimator=False, generator=gen)
        if case.loss == "iso_frozen":
            return iso_loss(model, tied, x0, labels, generator=gen)
        return edm_loss(model, tied, x0, labels, generator=gen)

    def step():
        model.zero_grad(set_to_none=True)
        aniso.zero_grad(set_to_none=True)
        value, _ = loss()
        value.backward()
        return value.detach()
    return step


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_train_step(benchmark, case: TrainCase, opts: common.Options, monkeypatch, request):
    why = common.why_unavailable("reference", case.device)
    if why is not None:
        pytest.skip(why)
    backend = ops.backends()[case.device] if case.impl == "fused" else "reference"
    monkeypatch.setenv(ops.ENV_VAR, backend)
    benchmark.group = case.group
    benchmark.extra_info.update(suite="train", op="train_step", loss=case.loss, impl=case.impl, backend=backend,
                                batch=BATCH, size="28x28x1", basis="dct2",
                                params=sum(p.numel() for p in _setup(case.device)[0].parameters()))

    def check(value):
        assert torch.isfinite(value), f"{case.id}: the loss is {value}"

    common.measure(benchmark, _step_fn(case), case.device, opts, check=check,
                   min_rounds=request.config.getoption("aniso_train_rounds"))
