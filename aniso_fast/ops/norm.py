"""The networks' normalisation: `group_norm(x, groups, weight, bias, eps, silu=False)`, GroupNorm optionally
followed by SiLU, as the U-Net's blocks call it (`networks.unet.GroupNorm`).

Two ways to run it, one result (the tests hold them to a float64 reference):
- `cpp`: a C++ kernel (csrc/cpu/group_norm.cpp) for channels_last CPU tensors in inference (no autograd), with
  SiLU fused into the normalising pass. PyTorch's own GroupNorm is slow on channels_last, in bf16 most of all
  (bench/RESULTS.md, "The network's GroupNorm"), and channels_last with bf16 is the layout in which oneDNN runs the
  convolutions on AMX (networks.execution).
- `reference`: `torch.nn.functional.group_norm` then `silu`: everything else (contiguous tensors, CUDA, autograd,
  ANISO_FAST_BACKEND=reference, no extension). The fp32 contiguous path is therefore the same computation as before
  the kernel existed, bit for bit.

`aniso_fast::group_norm_nhwc` is a `torch.library` custom op with a fake implementation, so `torch.compile` traces
through it; an eager call runs the kernel directly (`registration.is_plain_eager`). It has no autograd formula: a
call that needs gradients takes the reference path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .dispatch import _C, resolve
from .registration import is_plain_eager

__all__ = ["group_norm", "group_norm_path", "is_nhwc"]


@torch.library.custom_op("aniso_fast::group_norm_nhwc", mutates_args=(),
                         schema="(Tensor x, Tensor weight, Tensor bias, int groups, float eps, bool silu) "
                                "-> (Tensor, Tensor, Tensor)")
def _group_norm_nhwc(x, weight, bias, groups, eps, silu):
    return _C.group_norm_nhwc_cpu(x, weight, bias, groups, eps, silu)


@_group_norm_nhwc.register_fake
def _(x, weight, bias, groups, eps, silu):
    stats = weight.new_empty((x.shape[0], groups))
    return torch.empty_like(x, memory_format=torch.channels_last), stats, stats.clone()


def is_nhwc(x: Tensor) -> bool:
    """A 4-D tensor laid out NHWC: channels_last and not also contiguous (as one channel or one pixel would be)."""
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _kernel_fits(x: Tensor, weight: Tensor, bias: Tensor) -> bool:
    """The kernel's case: an NHWC CPU tensor of a float dtype, no autograd, and an extension that has the kernel."""
    return (x.device.type == "cpu" and x.is_floating_point() and is_nhwc(x)
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias.requires_grad))
            and hasattr(_C, "group_norm_nhwc_cpu"))


def group_norm_path(x: Tensor, weight: Tensor, bias: Tensor, backend: str | None = None) -> str:
    """'cpp' where the kernel runs this call, else 'reference' (see the module docstring)."""
    if resolve(backend, x.device) == "cpp" and _kernel_fits(x, weight, bias):
        return "cpp"
    return "reference"


def group_norm(x: Tensor, groups: int, weight: Tensor, bias: Tensor, eps: float, silu: bool = False,
               backend: str | None = None) -> Tensor:
    """`silu(group_norm(x))` (or plain `group_norm(x)`) over `groups` groups of x's channels, with per-channel
    `weight` and `bias` [C]; returns x's dtype and memory format."""
    if x.dim() < 2 or x.shape[1] % groups:
        raise ValueError(f"x: expected [N, C, ...] with C divisible by groups={groups}, got {tuple(x.shape)}")
    if group_norm_path(x, weight, bias, backend) == "reference":
        y = F.group_norm(x, groups, weight.to(x.dtype), bias.to(x.dtype), eps)
        return F.silu(y) if silu else y
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    args = (x, weight.detach().to(compute).contiguous(), bias.detach().to(compute).contiguous(), groups, float(eps),
            bool(silu))
    # eager: the kernel itself (as the subspace ops, registration.is_plain_eager); traced: the custom op
    if not is_plain_eager(x):
        return _group_norm_nhwc(*args)[0]
    if torch.autograd.profiler._is_profiler_enabled:  # the profiler sees it under the custom op's name
        with torch.profiler.record_function("aniso_fast::group_norm_nhwc"):
            return _C.group_norm_nhwc_cpu(*args)[0]
    return _C.group_norm_nhwc_cpu(*args)[0]
