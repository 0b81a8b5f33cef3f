"""Timing helpers for benchmarks: every figure is a ratio measured in one run.

Absolute seconds depend on the machine; ratios to the model's own forward+backward pass
(the floor any gradient-based method pays per iteration) travel between machines.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(
    fn: Callable[[], object],
    *,
    repeats: int = 5,
    warmup: int = 1,
    device: torch.device | None = None,
) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` runs after ``warmup``."""
    device = device or torch.device("cpu")
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def forward_backward_floor(model: nn.Module, x: Tensor, y: Tensor, **kwargs) -> float:
    """Seconds for one forward and one input-gradient backward pass of ``model`` on ``x``.

    This is the cost of one gradient evaluation of an input-space attack: the reference
    every attack iteration and attribution method is divided by.
    """
    was_training = model.training
    model.eval()

    def step() -> None:
        x_var = x.detach().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(model(x_var), y, reduction="sum")
        torch.autograd.grad(loss, x_var)

    try:
        return time_call(step, device=x.device, **kwargs)
    finally:
        model.train(was_training)


def format_table(headers: list[str], rows: list[list[object]]) -> str:
    """A plain markdown table, numbers to 3 significant digits."""

    def cell(v: object) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
