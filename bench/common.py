"""What the benchmark suites share: the case grid, cached bases and inputs, availability, timing and memory.

Timing: a warm-up call profiled for memory (its output is checked; its time sizes the run), then
`benchmark.pedantic` with `rounds = clamp(budget / warm-up time, min_rounds, max_rounds)` rounds of one call each; CUDA calls end with a
synchronize inside the timed function. Memory: `peak_bytes` (see its docstring for the method on each device).
"""
from __future__ import annotations

import functools
import math
import os
import statistics
import time
from dataclasses import dataclass

import torch
from torch.profiler import ProfilerActivity, profile

from aniso_fast import ops
from aniso_fast.networks import execution
from aniso_fast.utils.machine import cpu_model, machine_description
from aniso_fast.geometry.bases import DCTBasis, PCABasis, dct_matrix

BACKENDS = ops.BACKENDS  # reference, cpp, cuda, triton
DEVICES = ("cpu", "cuda")
SIZES = ((1, 28, 28), (3, 32, 32), (3, 64, 64))  # (C, H, W)
BATCHES = (64, 256)
BASES = ("dct2", "dct4", "pca", "pca_class")
NUM_CLASSES = 10
BASIS_INFO = {
    "dct2": "DCT, 2 subspaces: the low-frequency (H/2)x(W/2) block and its complement (the paper's basis)",
    "dct4": "DCT, K=4 frequency bands with edges H/8, H/4, H/2",
    "pca": "PCA, one global spatial basis of rank r = H*W/4, per channel, and its complement",
    "pca_class": f"PCA, one rank-r spatial basis per class ({NUM_CLASSES} classes), mixed batch (ids = arange(B) % 10, "
                 "shuffled)",
}
# the reference backend gathers V[ids] into [B, r, d]: above this many bytes it is skipped unless --aniso-full
REFERENCE_GATHER_LIMIT = 512 * 2 ** 20


def size_name(size) -> str:
    C, H, W = size
    return f"{H}x{W}x{C}"


# ---------------------------------------------------------------- availability

def why_unavailable(impl: str, device: str) -> str | None:
    """None if `impl` can run on `device`, else the reason (for pytest.skip)."""
    if device == "cuda" and not torch.cuda.is_available():
        return "no CUDA device on this machine"
    if impl not in BACKENDS:
        return None
    reasons = ops.backends()["unavailable"].get(impl, {})
    if device in reasons:
        return f"backend {impl!r} unavailable for {device} tensors: {reasons[device]}"
    if impl == "triton" and device == "cpu":
        return "triton on CPU runs under TRITON_INTERPRET=1 only: not a performance measurement"
    return None


def gpu_name() -> str | None:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------- bases and inputs (cached: built once per session)

def _dct_subset_rows(H: int, W: int, r: int, gen: torch.Generator) -> torch.Tensor:
    """r orthonormal rows of R^{H*W}: a random subset of the 2-D DCT basis images.

    Exactly orthonormal and cheap to build at 64x64 (a QR of [4096, 1024] per class is not); the kernels' cost
    does not depend on the values, only on the shapes.
    """
    pick = torch.randperm(H * W, generator=gen)[:r]
    CH, CW = dct_matrix(H), dct_matrix(W)
    return (CH[pick // W, :, None] * CW[pick % W, None, :]).reshape(r, H * W)


@functools.cache
def make_basis(kind: str, H: int, W: int, device: str):
    if kind == "dct2":
        return DCTBasis(H, W, bands=H // 2).to(device)
    if kind == "dct4":
        return DCTBasis(H, W, bands=(H // 8, H // 4, H // 2)).to(device)
    rank = H * W // 4  # the paper's k: 256 of 32x32, 1024 of 64x64 (METHOD §7.1)
    gen = torch.Generator().manual_seed(H * 1000 + W)
    if kind == "pca":
        return PCABasis(_dct_subset_rows(H, W, rank, gen), (1, H, W)).to(device)
    if kind == "pca_class":
        V = torch.stack([_dct_subset_rows(H, W, rank, gen) for _ in range(NUM_CLASSES)])
        return PCABasis(V, (1, H, W), class_to_group=torch.arange(NUM_CLASSES)).to(device)
    raise ValueError(f"kind: unknown basis {kind!r}")


@functools.lru_cache(maxsize=4)
def make_images(size: tuple, B: int, device: str) -> dict:
    """u, v, base [B, C, H, W] float32 and mixed-batch labels [B], from a fixed seed."""
    gen = torch.Generator().manual_seed(B * 7 + size[1])
    imgs = {name: torch.randn((B, *size), generator=gen).to(device) for name in ("u", "v", "base")}
    imgs["labels"] = (torch.arange(B) % NUM_CLASSES)[torch.randperm(B, generator=gen)].to(device)
    return imgs


def make_scalars(B: int, K: int, device: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """a, c [B, K] float64 (schedule math is float64; the ops cast them)."""
    gen = torch.Generator().manual_seed(seed)
    a, c = 0.1 + torch.rand((2, B, K), generator=gen, dtype=torch.float64)
    return a.to(device), c.to(device)


def reference_gather_bytes(basis, B: int) -> int:
    """Bytes of the [B, r, d] float32 copy of V[ids] the reference backend makes (0 without ids)."""
    if not isinstance(basis, PCABasis) or basis.num_groups == 1:
        return 0
    _, r, d = basis.V32.shape
    return B * r * d * 4


# ---------------------------------------------------------------- how the network runs (precision, compile, layout)

@dataclass(frozen=True)
class Run:
    """How a benchmark runs the network: precision fp32/bf16/fp16, compile None or a torch.compile mode, memory
    format contiguous/channels_last (the options of `aniso_fast.networks.execution`, resolved there)."""
    precision: str = "fp32"
    compile: str | None = None
    memory_format: str = "contiguous"

    @property
    def name(self) -> str:
        parts = [self.precision] + ([self.compile] if self.compile else []) + \
            (["channels_last"] if self.memory_format == "channels_last" else [])
        return "-".join(parts)

    @property
    def is_plain(self) -> bool:
        return self == Run()

    def execution(self, device: str) -> execution.Execution:
        """The resolved policy on `device`; ValueError naming the option where it cannot run there."""
        return execution.resolve_execution(device, self.precision, self.compile or False, self.memory_format)

    def pipeline_options(self) -> dict:
        """The keyword arguments of `aniso_fast.load` for this run."""
        return {"precision": self.precision, "compile": self.compile or False, "memory_format": self.memory_format}


def why_not_runnable(run: Run, device: str) -> str | None:
    """None if `run` can run on `device`, else the reason (for pytest.skip)."""
    if device == "cuda" and not torch.cuda.is_available():
        return "no CUDA device on this machine"
    try:
        run.execution(device)
    except ValueError as e:
        return str(e)
    return None


def execute(model, run: Run, device: str):
    """`model` calling its network as `run` says (in place; a channels_last run converts the network's weights, so
    give it a model of its own)."""
    return execution.execute(model, run.execution(device))


# ---------------------------------------------------------------- cost model (for bandwidth and roofline figures)

def op_cost(kind: str, size: tuple, B: int, op: str, basis) -> dict:
    """Minimal bytes moved (fp32 images read + written) and floating-point operations of one op call."""
    C, H, W = size
    n = B * C * H * W
    images_in = {"scale": 1, "heun": 2, "dot": 2}[op]
    reads = images_in + (1 if op == "heun" else 0)
    writes = 0 if op == "dot" else 1
    if kind.startswith("dct"):
        h, w = basis.band.shape
        per_image = 2 * H * W * w + 2 * h * H * w  # X @ CW^T, then CH @ (.)
    else:
        r = basis.V32.shape[1]
        per_image = 2 * r * H * W
    analyses = images_in
    syntheses = 0 if op == "dot" else 1
    return {"bytes": 4 * n * (reads + writes), "flops": B * C * per_image * (analyses + syntheses)}


# ---------------------------------------------------------------- timing and memory

MEMORY_METHOD = {
    "cpu": "torch.profiler (profile_memory=True): the running sum of the CPU allocator's [memory] events during "
           "one call, its maximum = peak bytes newly live at once; counts every allocation through the torch "
           "allocator (tensors made by PyTorch or by the C++ extension), not plain malloc/std::vector scratch",
    "cuda": "torch.cuda.max_memory_allocated() - memory_allocated() before the call, after reset_peak_memory_stats()",
}


def peak_bytes(fn, device: str):
    """(fn's result, peak bytes newly allocated and live at once during the call); method: MEMORY_METHOD."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        return out, torch.cuda.max_memory_allocated() - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return out, peak


def scalar_cast_bytes(op: str, B: int, K: int) -> int:
    """Bytes of the fp32 copies of the float64 [B, K] scalars (a; and c for the Heun update) that the dispatch
    layer makes (aniso_fast.ops casts scalars to the compute dtype): what a fused op may allocate besides its output."""
    return {"scale": 1, "heun": 2, "dot": 0}[op] * B * K * 4


def tensor_bytes(t) -> int:
    return t.numel() * t.element_size()


@dataclass
class Options:
    budget: float
    min_rounds: int
    max_rounds: int
    full: bool


def options(config) -> Options:
    return Options(budget=config.getoption("aniso_budget"), min_rounds=config.getoption("aniso_min_rounds"),
                   max_rounds=config.getoption("aniso_max_rounds"), full=config.getoption("aniso_full"))


def warm_up_profiler() -> None:
    """Start the profiler once, so that its first-use cost does not land in a case's warm-up call."""
    peak_bytes(lambda: torch.ones(8) * 2, "cpu")


def measure(benchmark, fn, device: str, opts: Options, check=None, min_rounds: int | None = None,
            cpu_time: bool = False):
    """A warm-up call profiled for memory (its output goes to `check`; its time sizes the run), then the timed
    rounds (at least `min_rounds`, default opts.min_rounds).

    Records peak_bytes, warmup_s, device and threads in benchmark.extra_info; with `cpu_time`, also cpu_s_median:
    the median CPU time of this process (all its threads, time.process_time) over the timed calls, which other
    processes' load barely moves (they take wall time, not this process's CPU time). Returns the peak bytes."""
    cpu_seconds = []

    def call():
        start = time.process_time() if cpu_time else 0.0
        out = fn()
        synchronize(device)
        if cpu_time:
            cpu_seconds.append(time.process_time() - start)
        return out

    start = time.perf_counter()
    out, peak = peak_bytes(call, device)
    warm = time.perf_counter() - start
    if check is not None:
        check(out)
    del out
    if device == "cuda":  # the first call may include a Triton compilation or cuBLAS set-up: time another
        start = time.perf_counter()
        call()
        warm = time.perf_counter() - start
    rounds = max(min_rounds or opts.min_rounds, min(opts.max_rounds, math.ceil(opts.budget / max(warm, 1e-6))))
    cpu_seconds.clear()  # the warm-up calls are not timed
    benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update(peak_bytes=int(peak), warmup_s=warm, device=device, threads=torch.get_num_threads())
    if cpu_time and cpu_seconds:
        benchmark.extra_info["cpu_s_median"] = statistics.median(cpu_seconds)
    return peak


def environment() -> dict:
    """Machine facts for the report (recorded in the benchmark JSON's machine_info)."""
    try:
        import triton
        triton_version = triton.__version__
    except Exception as exc:  # not installed or broken: recorded, not fatal
        triton_version = f"unavailable ({type(exc).__name__})"
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    return {"description": machine_description(), "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
            "cpu_affinity": affinity,
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "triton": triton_version,
            "cuda_runtime": torch.version.cuda, "gpu": gpu_name(), "backends": ops.backends(),
            "loadavg": _loadavg()}


def cpu_counters() -> dict | None:
    """CPU seconds spent by the whole machine (busy, from /proc/stat) and by this process, and the wall time:
    two readings give the share of the CPU that other processes used in between."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    t = os.times()
    return {"busy_s": (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK"), "self_s": t.user + t.system,
            "wall_s": time.time()}


def others_cpu_share(start: dict | None, end: dict | None) -> float | None:
    """Fraction of all cores' time used by other processes between two `cpu_counters` readings."""
    if not start or not end or end["wall_s"] <= start["wall_s"]:
        return None
    others = (end["busy_s"] - start["busy_s"]) - (end["self_s"] - start["self_s"])
    return max(0.0, others) / ((end["wall_s"] - start["wall_s"]) * (os.cpu_count() or 1))


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None
