"""pytest options and hooks of the benchmark suite (run: `python -m pytest bench/ --benchmark-json=...`).

Nothing here sets TRITON_INTERPRET: interpreted Triton is a correctness tool, not something to time.
"""
from __future__ import annotations

import json
import time

import pytest

from bench import common


def pytest_addoption(parser):
    group = parser.getgroup("aniso_fast benchmarks")
    group.addoption("--aniso-budget", type=float, default=0.5,
                    help="seconds of timed rounds per case, after one warm-up call (default 0.5)")
    group.addoption("--aniso-min-rounds", type=int, default=1, help="fewest timed rounds per case (default 1)")
    group.addoption("--aniso-max-rounds", type=int, default=15, help="most timed rounds per case (default 15)")
    group.addoption("--aniso-train-rounds", type=int, default=5,
                    help="fewest timed rounds per training step (default 5: a step takes about a second on a CPU)")
    group.addoption("--aniso-full", action="store_true",
                    help="also run the cases skipped for their cost (the reference backend's [B, r, d] gather of "
                         "a class-conditional basis above 512 MiB)")
    group.addoption("--aniso-skips", default=None, metavar="PATH",
                    help="write the skipped cases and their reasons to this JSON file")


@pytest.fixture
def opts(request) -> common.Options:
    return common.options(request.config)


_SKIPS: list[dict] = []  # skipped cases of this session, for --aniso-skips


def pytest_sessionstart(session):
    config = session.config
    config._aniso_env_start = common.environment()
    idle = common.cpu_counters()
    time.sleep(1.0)  # this process is idle: whatever the CPU does now is other processes' load
    config._aniso_cpu_start = common.cpu_counters()
    config._aniso_others_before = common.others_cpu_share(idle, config._aniso_cpu_start)
    common.warm_up_profiler()


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["aniso_fast"] = {
        "start": getattr(config, "_aniso_env_start", None), "end": common.environment(),
        "memory_method": common.MEMORY_METHOD,
        # share of all cores used by other processes: in the second before the run, and during the run
        "others_cpu_before": getattr(config, "_aniso_others_before", None),
        "others_cpu_during": common.others_cpu_share(getattr(config, "_aniso_cpu_start", None),
                                                     common.cpu_counters()),
    }


def pytest_runtest_logreport(report):
    if report.skipped and report.when in ("setup", "call"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _SKIPS.append({"test": report.nodeid, "reason": reason.removeprefix("Skipped: ")})


def pytest_sessionfinish(session):
    path = session.config.getoption("aniso_skips")
    if path:
        with open(path, "w") as f:
            json.dump(_SKIPS, f, indent=1)
