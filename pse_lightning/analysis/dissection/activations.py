"""Activations of the dissected layers, the forward pass stopped after the deepest one."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from pse_lightning.core.hooks import capture_activations


class _StopForward(Exception):
    """Raised by a hook once every requested layer is captured: skips the rest of the net."""


def layer_activations(
    model: nn.Module, x: Tensor, layers: Sequence[str], pad_to: int | None = None
) -> dict[str, Tensor]:
    """Detached outputs of ``layers`` for ``x``; the forward stops after the last of them.

    ``pad_to`` pads a short batch (repeating its first image) to that many images and drops
    the padding's outputs. Backends pick kernels by shape (oneDNN computes a batch of one
    differently from a batch of three, to the last bit), so padding every probe forward to
    the loader's batch size gives each image the same activations whatever its batch
    mates: the last batch of a shard, and shards of any number of processes, agree.
    """
    n = len(x)
    if pad_to is not None and 0 < n < pad_to:
        x = torch.cat([x, x[:1].expand(pad_to - n, *x.shape[1:])])
    with capture_activations(model, layers, detach=True) as captured:
        wanted = len(set(layers))

        def stop(_module: nn.Module, _inputs: tuple, _output: Tensor) -> None:
            if len(captured) >= wanted:
                raise _StopForward

        handles = [model.get_submodule(name).register_forward_hook(stop) for name in layers]
        try:
            model(x)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        missing = [name for name in layers if name not in captured]
        if missing:
            raise ValueError(
                f"analysis.dissection.layers {missing} did not run in the model's forward pass"
            )
        return {name: captured[name][:n].float() for name in layers}
