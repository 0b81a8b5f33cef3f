"""What attacks, analyses, defenses and training all need to know about a model's state."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn


@contextmanager
def frozen_eval(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode and restore each one's own flag afterwards.

    Restoring module by module (not ``model.train(was_training)``) keeps a deliberately
    frozen BatchNorm inside a training model frozen (torchattacks #21).
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, mode in modes:
            module.training = mode


def model_num_classes(model: nn.Module, x: Tensor, logits: Tensor | None = None) -> int:
    """The model's class count: its ``num_classes``, else the width of ``logits`` (or of a
    one-image forward pass when no logits are at hand)."""
    known = getattr(model, "num_classes", None)
    if isinstance(known, int):
        return known
    if logits is None:
        with torch.no_grad():
            logits = model(x[:1])
    return int(logits.shape[1])


def model_version(model: nn.Module) -> int:
    """Sum of the in-place version counters of the model's parameters and buffers: it
    changes when an optimizer step or a train-mode forward (BatchNorm statistics) does."""
    tensors = itertools.chain(model.parameters(), model.buffers())
    return sum(t._version for t in tensors if not t.is_inference())


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a stateless model)."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return torch.device("cpu")
