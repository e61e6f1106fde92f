"""How the network runs: the one execution policy (precision, torch.compile, memory format) of every family's
network, for sampling (`sample`, `evaluate`, the Python API) and training (`train --precision`).

The U-Net is nearly all of the time of a sampling or training step, and only it runs differently: `execute(model,
policy)` puts an `ExecutedNetwork` between a model (`AnisoPrecond`, `VSMDPrecond`, the phase-space denoiser: each
calls its network through `.net` and swaps it with `set_network`) and its network. The wrapper runs the network
under `torch.autocast` in the policy's precision and hands back float32, so the preconditioning, the schedule
math, the solver state and the subspace ops keep their own dtypes (float32/float64). Training keeps float32
master weights: autocast casts them per call, the backward runs through the casts (fp16 adds a gradient scaler,
`training.trainer`).

The rules, each decided here once:
- precision: 'auto' is bf16 on a CPU with AMX or AVX-512 bf16 (`utils.machine.cpu_flags`) and on a CUDA GPU that
  supports bf16, fp32 elsewhere; fp16 runs on CUDA only (refused on the CPU).
- memory format: 'auto' is channels_last for sampling, on the CPU and on CUDA. On the CPU it was measured
  (bench/RESULTS.md, "The network forward"): oneDNN runs channels_last convolutions on AMX in bf16 and faster in
  fp32 too, and the U-Net's GroupNorm + SiLU then runs in this project's fused kernel (`ops.norm`); on CUDA it is
  PyTorch's guidance for convolutions on tensor cores (not measured here). Training runs contiguous (the fused
  GroupNorm kernel has no backward): `train` has no --memory-format and `from_args` gives it contiguous.
- compile: `torch.compile` of the network alone (never the solver), with inductor's FX graph cache kept under
  ~/.cache/aniso_fast/inductor (unless TORCHINDUCTOR_CACHE_DIR is set), so that a second process reuses the
  compiled kernels. The graph is compiled for one batch size (`dynamic=False`): a smaller batch (the last partial
  batch of a run) is padded to it with copies of its first row, and the padding dropped from the output, so a run
  compiles once. Mode 'reduce-overhead' (CUDA graphs) is CUDA only and returns a copy of the graph's output.
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..utils.machine import cpu_flags

__all__ = ["PRECISIONS", "MEMORY_FORMATS", "COMPILE_MODES", "BF16_CPU_FLAGS", "Execution", "resolve_precision",
           "resolve_memory_format", "resolve_compile", "resolve_execution", "ExecutedNetwork", "execute",
           "network_of", "compile_cache_dir", "FP32", "DEFAULT_PRECISION", "add_options", "from_args"]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
MEMORY_FORMATS = ("auto", "contiguous", "channels_last")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")  # either gives the CPU native bf16 matrix products
# the --precision default of sample, evaluate and the Python API (train's is fp32): 'auto', since the FD gate holds
# (`python -m aniso_fast.evaluate precision-gate`: bf16 moves the default sampler's FD at NFE 5 and 9 by 0.002 and
# 0.000, within the cells' bootstrap SE of 0.15 and 0.14; docs/precision_gate.md)
DEFAULT_PRECISION = "auto"
COMPILE_BACKEND = "inductor"  # torch.compile's backend (the tests swap in a faster one to check the wrapper)
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Execution:
    """A resolved policy: precision 'fp32', 'bf16' or 'fp16'; compile None (eager) or a torch.compile mode;
    memory_format 'contiguous' or 'channels_last'."""
    precision: str = "fp32"
    compile: str | None = None
    memory_format: str = "contiguous"

    def __post_init__(self):
        if self.precision not in _DTYPES:
            raise ValueError(f"--precision: expected one of {', '.join(_DTYPES)} once resolved, got "
                             f"{self.precision!r}")
        if self.compile is not None and self.compile not in COMPILE_MODES:
            raise ValueError(f"--compile: expected one of {', '.join(COMPILE_MODES)}, got {self.compile!r}")
        if self.memory_format not in MEMORY_FORMATS[1:]:
            raise ValueError(f"--memory-format: expected contiguous or channels_last once resolved, got "
                             f"{self.memory_format!r}")

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.precision]

    @property
    def is_plain(self) -> bool:
        """fp32, eager, contiguous: the network runs exactly as without a policy."""
        return self == FP32

    def info(self) -> dict:
        """What an output records of how its network ran."""
        return {"precision": self.precision, "compile": self.compile, "memory_format": self.memory_format}


FP32 = Execution()


def _device(device) -> torch.device:
    return device if isinstance(device, torch.device) else torch.device(device)


def resolve_precision(precision: str | None, device) -> str:
    """'auto' (or None) -> 'bf16' on a CPU with AMX or AVX-512 bf16 and on a CUDA GPU with bf16, else 'fp32';
    'fp32', 'bf16' as given; 'fp16' on CUDA only. ValueError naming --precision otherwise."""
    device = _device(device)
    precision = "auto" if precision is None else precision
    if precision not in PRECISIONS:
        raise ValueError(f"--precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        return "bf16" if any(f in cpu_flags() for f in BF16_CPU_FLAGS) else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError(f"--precision: fp16 runs on CUDA only, not on {device.type}; use bf16 or fp32 (or auto)")
    return precision


def resolve_memory_format(memory_format: str | None, device) -> str:
    """'auto' (or None) -> channels_last (see the module docstring); the others as given."""
    memory_format = "auto" if memory_format is None else memory_format
    if memory_format not in MEMORY_FORMATS:
        raise ValueError(f"--memory-format: expected one of {', '.join(MEMORY_FORMATS)}, got {memory_format!r}")
    if memory_format == "auto":
        _device(device)  # a bad device fails here as everywhere else
        return "channels_last"
    return memory_format


def resolve_compile(compile: bool | str | None, device) -> str | None:
    """False/None -> None (eager); True -> 'default'; a torch.compile mode as given ('reduce-overhead': CUDA only)."""
    if compile is None or compile is False:
        return None
    if compile is True:
        return "default"
    if not isinstance(compile, str) or compile not in COMPILE_MODES:
        raise ValueError(f"--compile: expected True/False or a mode ({', '.join(COMPILE_MODES)}), got {compile!r}")
    if compile == "reduce-overhead" and _device(device).type != "cuda":
        raise ValueError(f"--compile: reduce-overhead (CUDA graphs) runs on CUDA only, not on "
                         f"{_device(device).type}; use --compile default")
    return compile


def resolve_execution(device, precision: str | None = "auto", compile: bool | str | None = False,
                      memory_format: str | None = "auto") -> Execution:
    """The policy for a run on `device`; ValueError naming the option for a value it cannot take."""
    return Execution(resolve_precision(precision, device), resolve_compile(compile, device),
                     resolve_memory_format(memory_format, device))


def compile_cache_dir() -> Path:
    """Inductor's cache folder: TORCHINDUCTOR_CACHE_DIR as the user set it, else ~/.cache/aniso_fast/inductor
    (set then; inductor writes its /tmp default into the variable when first imported, so that value counts as
    unset)."""
    import sys

    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    given = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if given is None or os.path.abspath(given) == os.path.abspath(default_cache_dir()):
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(base / "aniso_fast" / "inductor")
        if "torch._inductor.utils" in sys.modules:  # paths inductor derived from the old folder
            sys.modules["torch._inductor.utils"].clear_caches()
    return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])


def _pad(arg, batch: int, pad: int):
    """A batch-first tensor of `batch` rows padded with `pad` copies of its first row (anything else as given)."""
    if isinstance(arg, Tensor) and arg.dim() >= 1 and arg.shape[0] == batch:
        return torch.cat([arg, arg[:1].expand(pad, *arg.shape[1:])])
    return arg


class ExecutedNetwork(nn.Module):
    """A network run under an `Execution` (see the module docstring): same call signature, float32 output.
    Attributes the wrapped network has (`config()`, `label_dim`, ...) are read through."""

    def __init__(self, net: nn.Module, execution: Execution):
        super().__init__()
        if isinstance(net, ExecutedNetwork):
            net = net.net
        if not isinstance(execution, Execution):
            raise ValueError(f"execution: expected an Execution (resolve_execution), got {type(execution).__name__}")
        self.net = net
        self.execution = execution
        self._batch = 0  # the batch size a compiled graph was made for
        if execution.memory_format == "channels_last":
            net.to(memory_format=torch.channels_last)
        self._call = self._run
        if execution.compile is not None:
            compile_cache_dir()
            import torch._inductor.config as inductor_config

            inductor_config.fx_graph_cache = True
            mode = None if execution.compile == "default" else execution.compile
            self._call = torch.compile(self._run, mode=mode, dynamic=False, backend=COMPILE_BACKEND)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or name in ("net", "execution"):
                raise
            return getattr(super().__getattr__("net"), name)

    def _run(self, x: Tensor, *args, **kwargs) -> Tensor:
        ex = self.execution
        if ex.memory_format == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        context = (torch.autocast(x.device.type, dtype=ex.dtype) if ex.precision != "fp32" else nullcontext())
        with context:
            out = self.net(x, *args, **kwargs)
        return out.to(torch.float32, memory_format=torch.contiguous_format)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if self.execution.compile is None:
            return self._run(x, *args, **kwargs)
        batch = x.shape[0]
        self._batch = max(self._batch, batch)
        pad = self._batch - batch
        if pad:
            x, args = _pad(x, batch, pad), tuple(_pad(a, batch, pad) for a in args)
            kwargs = {k: _pad(v, batch, pad) for k, v in kwargs.items()}
        if self.execution.compile == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
            out = self._call(x, *args, **kwargs).clone()  # the graph's output buffer is reused by its next replay
        else:
            out = self._call(x, *args, **kwargs)
        return out[:batch] if pad else out


def network_of(model: nn.Module) -> nn.Module | None:
    """The network a model calls (unwrapped), or None for a model without one (the exact Gaussian mixture)."""
    if not hasattr(model, "set_network"):
        return None
    net = model.net
    return net.net if isinstance(net, ExecutedNetwork) else net


def execute(model: nn.Module, execution: Execution, network: nn.Module | None = None) -> nn.Module:
    """`model` calling its network under `execution` (in place; returns `model`). `network`: the module to run in
    place of the model's own (the trainer's DistributedDataParallel wrapper); a previous policy is replaced, and
    the plain policy (fp32, eager, contiguous) calls the network directly. A model without a network it swaps
    through `set_network` (the exact mixture) is returned as it is, unless `network` is given (ValueError)."""
    if not hasattr(model, "set_network"):
        if network is not None and not (execution.is_plain and getattr(model, "net", None) is network):
            raise ValueError(f"--precision: a {type(model).__name__} calls its network itself (no set_network); "
                             f"it runs in fp32 only")
        return model
    net = network if network is not None else network_of(model)
    if execution.is_plain:
        target = net
    else:
        # one wrapper per (network, policy), kept with the model: a compiled graph is made once per process
        made = model.__dict__.setdefault("_executed_networks", {})
        key = (id(net), execution)
        if key not in made or made[key].net is not net:
            made[key] = ExecutedNetwork(net, execution)
        target = made[key]
    if model.net is not target:
        model.set_network(target)
    return model


def add_options(parser, precision: str = DEFAULT_PRECISION, sampling: bool = True) -> None:
    """--precision (and, for sampling, --compile and --memory-format) on a command line; `from_args` resolves them."""
    parser.add_argument("--precision", default=precision, choices=PRECISIONS,
                        help="the network's precision (autocast; the solver and schedule math stay float32/64): "
                             "auto = bf16 on a CPU with AMX or AVX-512 bf16 or a CUDA GPU with bf16, else fp32; "
                             "fp16 on CUDA only")
    if sampling:
        parser.add_argument("--compile", nargs="?", const="default", default=None, choices=COMPILE_MODES,
                            metavar="MODE", help="torch.compile the network (not the solver), compiled kernels "
                                                 "cached under ~/.cache/aniso_fast/inductor; MODE: "
                                                 f"{', '.join(COMPILE_MODES)} (reduce-overhead: CUDA graphs, CUDA "
                                                 "only; default: default)")
        parser.add_argument("--memory-format", default="auto", choices=MEMORY_FORMATS,
                            help="the network's memory format: auto = channels_last (measured faster on the CPU, "
                                 "in bf16 and fp32; PyTorch's advice on CUDA)")


def from_args(args, device) -> Execution:
    """The policy of a parsed command line (`add_options`) on `device`; ValueError naming the option. A command
    line without --memory-format (training's) runs contiguous."""
    return resolve_execution(device, args.precision, getattr(args, "compile", None),
                             getattr(args, "memory_format", "contiguous"))
