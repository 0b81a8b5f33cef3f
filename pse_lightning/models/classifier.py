"""Classifiers that take [0, 1] images: normalisation lives inside the model.

Every model of the registry is a :class:`Classifier`: it wraps a network, normalises its
input with the dataset's mean and std, and names the layers the analyses hook: the last
convolutional feature layer (CAM, dissection) and, for GAP + linear nets, the linear head
(exact CAM and exact unit-level PSE).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


class Classifier(nn.Module):
    """``logits = net((x - mean) / std)`` for x in [0, 1], shape (N, C, H, W).

    Args:
        net: the network on normalised inputs, returning logits (N, K).
        mean, std: per-channel normalisation constants of the dataset.
        num_classes: K.
        feature_layer: dotted name (relative to this module) of the last conv feature map.
        head: dotted name of the linear head applied after global average pooling of
            ``feature_layer``; None when the net has no such head (Grad-CAM is used then).
        dissection_layers: dotted names dissected by default (the last two conv blocks).
    """

    def __init__(
        self,
        net: nn.Module,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        num_classes: int,
        feature_layer: str,
        head: str | None,
        dissection_layers: Sequence[str],
    ) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"mean and std must have one entry per channel, got {mean}, {std}")
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.num_classes = int(num_classes)
        self.feature_layer = feature_layer
        self.head = head
        self.dissection_layers = tuple(dissection_layers)
        for name in (feature_layer, *self.dissection_layers, *((head,) if head else ())):
            self.get_submodule(name)  # fail now, not in the middle of an analysis

    def forward(self, x: Tensor) -> Tensor:
        return self.net((x - self.mean) / self.std)
