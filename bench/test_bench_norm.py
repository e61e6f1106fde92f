"""The network's GroupNorm (+ SiLU) per shape, dtype and implementation, side by side in one run.

Shapes: the default U-Net's GroupNorm inputs at batch 64 (28x28x1 images, 32/64/64 channels at 28, 14 and 7
pixels; the decoder's concatenations give 96 and 128), EDM's group count min(32, C / 4).
impl:  `fused`: `ops.norm.group_norm` on a channels_last tensor (the C++ kernel, SiLU in its normalising pass);
       the plain compositions of the same op (a channels_last tensor in, a channels_last tensor out):
       `torch-channels_last`: `F.group_norm` (+ `F.silu`) on it (what the network ran before the kernel);
       `torch-via-contiguous`: converted to contiguous, `F.group_norm` (+ `F.silu`), converted back;
       and for scale, not the same op: `torch-contiguous`, `F.group_norm` (+ `F.silu`) on a tensor that is
       contiguous already (PyTorch's fast layout; what a contiguous network runs).
       Each is first checked against a float64 reference of the same input.
Inference only (no_grad): the kernel has no backward, and training runs contiguous (`networks.execution`).
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from aniso_fast.ops import norm
from bench import common

SHAPES = ((64, 32, 28, 28), (64, 96, 28, 28), (64, 64, 14, 14), (64, 128, 7, 7))
DTYPES = ("float32", "bfloat16")
IMPLS = ("torch-contiguous", "torch-channels_last", "torch-via-contiguous", "fused")
EPS = 1e-5


@dataclass(frozen=True)
class NormCase:
    shape: tuple
    dtype: str
    silu: bool
    impl: str

    @property
    def groups(self) -> int:
        return min(32, self.shape[1] // 4)

    @property
    def op(self) -> str:
        return "group_norm_silu" if self.silu else "group_norm"

    @property
    def size(self) -> str:
        _, C, H, W = self.shape
        return f"{C}x{H}x{W}"

    @property
    def group(self) -> str:
        return f"{self.op}-{self.size}-B{self.shape[0]}-{self.dtype}-cpu"

    @property
    def id(self) -> str:
        return f"{self.group}-{self.impl}"


CASES = [NormCase(s, d, silu, i) for silu in (True, False) for s in SHAPES for d in DTYPES for i in IMPLS]


def _inputs(case: NormCase):
    gen = torch.Generator().manual_seed(sum(case.shape))
    C = case.shape[1]
    x = (1.5 * torch.randn(case.shape, generator=gen) + 0.3).to(getattr(torch, case.dtype))
    weight, bias = 1 + 0.1 * torch.randn(C, generator=gen), 0.1 * torch.randn(C, generator=gen)
    return x, weight, bias


def _reference(case: NormCase, x, weight, bias):
    y = F.group_norm(x.double(), case.groups, weight.double(), bias.double(), EPS)
    return F.silu(y) if case.silu else y


def _call(case: NormCase, x, weight, bias):
    if case.impl == "fused":
        x = x.contiguous(memory_format=torch.channels_last)
        assert norm.group_norm_path(x, weight, bias) == "cpp", "the kernel does not run this case"
        return lambda: norm.group_norm(x, case.groups, weight, bias, EPS, silu=case.silu)
    w, b = weight.to(x.dtype), bias.to(x.dtype)

    def plain(x):
        y = F.group_norm(x, case.groups, w, b, EPS)
        return F.silu(y) if case.silu else y
    if case.impl == "torch-via-contiguous":
        x = x.contiguous(memory_format=torch.channels_last)
        return lambda: plain(x.contiguous()).contiguous(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last if case.impl == "torch-channels_last" else
                     torch.contiguous_format)
    return lambda: plain(x)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_group_norm(benchmark, case: NormCase, opts: common.Options):
    x, weight, bias = _inputs(case)
    expected = _reference(case, x, weight, bias)
    tol = 2e-2 if case.dtype == "bfloat16" else 1e-4
    fn = _call(case, x, weight, bias)

    def check(out):
        torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)

    benchmark.group = case.group
    benchmark.extra_info.update(suite="norm", op=case.op, basis=case.dtype, size=case.size, batch=case.shape[0],
                                impl=case.impl, groups=case.groups, bytes=2 * x.numel() * x.element_size())
    with torch.no_grad():
        common.measure(benchmark, fn, "cpu", opts, check=check)
