"""Capturing activations (and their gradients) of named layers, with guaranteed clean-up.

One context manager for CAM, dissection and the PSE-informed training: hooks are always
removed in ``finally`` (pytorch-grad-cam #132 leaks them when objects are re-created per
batch), and captured tensors are the layer outputs themselves, kept in the autograd graph
so a caller may differentiate through them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import Tensor, nn


@contextmanager
def capture_activations(
    model: nn.Module, layers: Sequence[str], *, detach: bool = False
) -> Iterator[dict[str, Tensor]]:
    """Record the output of each named layer during forward passes inside the block.

    Args:
        model: the model whose submodules are hooked (names via ``get_submodule``).
        layers: dotted submodule names, e.g. ``["net.features.2"]``.
        detach: store detached tensors (analyses that never differentiate save memory).

    Yields:
        A dict filled on every forward pass: layer name -> output of the last pass,
        shape (N, C, h, w) for conv layers.
    """
    captured: dict[str, Tensor] = {}
    handles = []
    try:
        for name in layers:
            module = model.get_submodule(name)

            def hook(_module: nn.Module, _inputs: tuple, output: Tensor, name: str = name) -> None:
                captured[name] = output.detach() if detach else output

            handles.append(module.register_forward_hook(hook))
        yield captured
    finally:
        for handle in handles:
            handle.remove()
