"""Process-group setup and the few collectives training needs (gloo on CPU, NCCL on GPU).

`init()` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); without it the run
is a single process and every collective below is the identity. Network gradients are averaged by DDP itself
(the loss calls the DDP-wrapped module, unlike the reference, METHOD §10.11); the schedule is not inside DDP, so
its gradients go through `all_reduce_mean_`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.distributed as dist
from torch import Tensor

from ..utils.devices import resolve_device

__all__ = ["Dist", "resolve_device", "init", "shutdown"]


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


def init(device: str | None = None) -> Dist:
    """Join the process group torchrun describes (or stay single-process) and pick this rank's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    dev = resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                                device_id=dev if dev.type == "cuda" else None)
    return Dist(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
