"""What machine this is, for every report that quotes timings (the results table, the classifier, bench/) and for
choices that depend on the CPU: the one place that reads /proc/cpuinfo."""
from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

import torch

__all__ = ["cpu_flags", "cpu_model", "machine_description"]


@functools.cache
def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:  # not Linux: the model falls back to the architecture's name
        return []


def cpu_model() -> str:
    """The CPU's model name (`platform.machine()` where /proc/cpuinfo is missing)."""
    return next((line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("model name")),
                platform.machine())


def cpu_flags() -> frozenset[str]:
    """The first CPU's feature flags (e.g. avx512f, avx512_bf16, amx_bf16); empty where /proc/cpuinfo is missing."""
    line = next((line for line in _cpuinfo() if line.startswith("flags")), "")
    return frozenset(line.split(":", 1)[1].split()) if ":" in line else frozenset()


def machine_description() -> str:
    """CPU model, cores, torch threads and versions, for the reports that quote timings."""
    return (f"{cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
            f"torch {torch.__version__}, Python {platform.python_version()}")
