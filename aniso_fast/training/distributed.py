"""Process-group setup and the few collectives that training, `sample` and `evaluate table` need (gloo on CPU,
NCCL on GPU).

`init()` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); without it the run
is a single process and every collective below is the identity. Network gradients are averaged by DDP itself
(the loss calls the DDP-wrapped module, unlike the reference, METHOD §10.11); the schedule is not inside DDP, so
its gradients go through `all_reduce_mean_`.

Sampling is sharded by whole batches (`batch_slices`, `gather_batches`): batch i of the single-process run goes to
rank i mod world, so every rank runs exactly the batches one process would (on the CPU the batch size can change
the last bits of the network's output, which uint8 rounding can turn into a different pixel), and rank 0
reassembles them in order: the same bytes as one process with the same --batch, device and thread count.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterable

import torch
import torch.distributed as dist
from torch import Tensor

from ..utils.devices import resolve_device

__all__ = ["Dist", "resolve_device", "local_device", "env_rank", "env_world_size", "init", "shutdown"]


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_mean_(self, tensors: Iterable[Tensor]) -> None:
        """In place: every tensor becomes its mean over ranks (one flattened all_reduce per dtype)."""
        if not self.enabled:
            return
        tensors = list(tensors)
        for dtype in {t.dtype for t in tensors}:
            group = [t for t in tensors if t.dtype == dtype]
            flat = torch.cat([t.reshape(-1) for t in group])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat /= self.world_size
            offset = 0
            for t in group:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()

    def any_over_ranks(self, mask: Tensor) -> Tensor:
        """Elementwise OR of a bool mask over ranks (all_gather of every rank's mask)."""
        if not self.enabled:
            return mask
        gathered = [torch.empty_like(mask, dtype=torch.uint8) for _ in range(self.world_size)]
        dist.all_gather(gathered, mask.to(torch.uint8))
        return torch.stack(gathered).amax(0).bool()

    def broadcast_(self, tensors: Iterable[Tensor], src: int = 0) -> None:
        if not self.enabled:
            return
        for t in tensors:
            dist.broadcast(t, src)

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def batch_slices(self, n: int, batch: int) -> list[slice]:
        """This rank's share of n items cut into batches of `batch`: the whole batches rank, rank + world, ... of
        the single-process run (the last one may be short; a rank may get none)."""
        return [slice(i, min(i + batch, n)) for i in range(self.rank * batch, n, self.world_size * batch)]

    def gather_batches(self, outs: list[Any]) -> list[Any] | None:
        """On rank 0: the results of every rank's `batch_slices` (`outs`, one per batch, CPU tensors) in batch
        order; None on the other ranks (one gather_object: each rank's share is pickled once)."""
        if not self.enabled:
            return list(outs)
        gathered: list[Any] | None = [None] * self.world_size if self.is_main else None
        dist.gather_object(list(outs), gathered, dst=0)
        if not self.is_main:
            return None
        count = sum(len(g) for g in gathered)
        return [gathered[i % self.world_size][i // self.world_size] for i in range(count)]

    def broadcast_object(self, obj: Any = None, src: int = 0) -> Any:
        """`obj` of rank `src`, on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]


def env_rank() -> int:
    """This process's rank as torchrun gives it (0 outside torchrun), known before the process group exists: only
    rank 0 reports errors found while checking the options, which every rank checks alike."""
    return int(os.environ.get("RANK", "0"))


def env_world_size() -> int:
    """The number of processes torchrun started (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_device(device: str | None, name: str = "device") -> torch.device:
    """This process's device: `resolve_device` (ValueError naming `name`), with a CUDA device given without an
    index ('auto' on a GPU machine, 'cuda') meaning cuda:LOCAL_RANK under torchrun."""
    dev = resolve_device(device, name)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", str(env_rank()))))
    return dev


def init(device: str | None = None, timeout: timedelta | None = None) -> Dist:
    """Join the process group torchrun describes (or stay single-process) and pick this rank's device. `timeout`:
    how long a collective waits for the other ranks (default: torch's, 30 minutes on gloo)."""
    world_size, rank = env_world_size(), env_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    dev = local_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, timeout=timeout,
                                device_id=dev if dev.type == "cuda" else None)
    return Dist(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
