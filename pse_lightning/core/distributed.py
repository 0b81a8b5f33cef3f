"""The one set of process-group helpers every layer uses.

Each is the identity (or the trivial answer) without an initialised process group, so the
same code runs in one process, under DDP on GPUs and under gloo on CPUs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torchmetrics import Metric

_OPS = {"sum": "SUM", "min": "MIN", "max": "MAX"}


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the default process group, or (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_(tensor: Tensor, op: str = "sum") -> Tensor:
    """In-place all-reduce ('sum', 'min' or 'max') across processes; identity in one."""
    if rank_world()[1] > 1:
        dist.all_reduce(tensor, op=getattr(dist.ReduceOp, _OPS[op]))
    return tensor


def all_gather(tensor: Tensor) -> list[Tensor]:
    """Every process's ``tensor`` (same shape on all), in rank order."""
    world = rank_world()[1]
    if world == 1:
        return [tensor]
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor.contiguous())
    return parts


def all_gather_objects(obj: Any) -> list[Any]:
    """Every process's picklable ``obj`` (sizes may differ), in rank order."""
    world = rank_world()[1]
    if world == 1:
        return [obj]
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, obj)
    return gathered


def unshare_tensors(module: nn.Module) -> None:
    """Give this process private copies of every parameter, buffer and metric state.

    ``ddp_spawn`` sends the module to its workers through shared memory, so without this
    every in-place update (an optimizer step, a metric's ``total += n``) would be applied
    once per process to the same storage.
    """
    for param in module.parameters():
        param.data = param.data.clone()
    for sub in module.modules():
        for name, buffer in list(sub.named_buffers(recurse=False)):
            if buffer is not None:
                setattr(sub, name, buffer.clone())
        if isinstance(sub, Metric):
            sub.reset()
