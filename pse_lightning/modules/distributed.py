"""Helpers for modules that run in spawned DDP processes."""

from __future__ import annotations

from torch import nn
from torchmetrics import Metric


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
