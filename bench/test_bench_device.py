"""The GPU's measured limits, taken in the same run as the ops: device-to-device copy bandwidth and fp32
matmul (cuBLAS) throughput. The report divides each GPU op's bytes by its time and by the copy bandwidth, and
calls a case memory-bound when its flops per byte are below the measured ridge (matmul flops / copy bandwidth).
"""
from __future__ import annotations

import pytest
import torch

from bench import common

COPY_BYTES = 512 * 2 ** 20
MATMUL_N = 8192


@pytest.fixture
def cuda():
    why = common.why_unavailable("reference", "cuda")
    if why is not None:
        pytest.skip(why)


def test_copy_bandwidth(benchmark, cuda, opts):
    src = torch.empty(COPY_BYTES // 4, device="cuda")
    dst = torch.empty_like(src)
    benchmark.group = "device-cuda"
    benchmark.extra_info.update(suite="device", op="copy", device="cuda", bytes=2 * COPY_BYTES)  # read + write
    common.measure(benchmark, lambda: dst.copy_(src), "cuda", opts, min_rounds=10)


def test_matmul_throughput(benchmark, cuda, opts):
    a = torch.randn(MATMUL_N, MATMUL_N, device="cuda")
    b = torch.randn(MATMUL_N, MATMUL_N, device="cuda")
    benchmark.group = "device-cuda"
    benchmark.extra_info.update(suite="device", op="matmul_fp32", device="cuda", flops=2 * MATMUL_N ** 3,
                                tf32=torch.backends.cuda.matmul.allow_tf32)
    common.measure(benchmark, lambda: a @ b, "cuda", opts, min_rounds=10)
