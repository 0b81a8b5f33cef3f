"""Classifiers that take [0, 1] images: normalisation lives inside the model.

Every model of the registry is a :class:`Classifier`: it wraps a network, normalises its
input with the dataset's mean and std (or those its weights were trained with), and names
the layers the analyses hook: the last convolutional feature layer (CAM, dissection) and,
for GAP + linear nets, the linear head (exact CAM and exact unit-level PSE). It also says
whether it is ready to evaluate as it is (complete weights whose head has the dataset's
classes) and, then, where those weights came from.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from pse_lightning.models.pretrained import Preprocessing


class Classifier(nn.Module):
    """``logits = net((x - mean) / std)`` for x in [0, 1], shape (N, C, H, W).

    Args:
        net: the network on normalised inputs, returning logits (N, K).
        mean, std: per-channel normalisation constants of the dataset.
        num_classes: K.
        feature_layer: dotted name (relative to this module) of the last conv feature map;
            None for a network without one (``layer_note`` says why).
        head: dotted name of the linear head applied after global average pooling of
            ``feature_layer``; None when the net has no such head (Grad-CAM is used then).
        dissection_layers: dotted names dissected by default (the last two conv blocks).
        class_names: names of the head's outputs (the dataset's classes, or the classes
            of pretrained weights whose head is kept); None when unknown.

    Attributes:
        ready: the weights are complete for the dataset's classes: the run evaluates the
            model as it is, never training it first.
        source: where ready weights came from (for the log and the report), else None.
        preprocessing: the evaluation transform the weights expect (pretrained weights),
            which an ImageNet-style datamodule adopts; None to keep the dataset's.
        layer_note: why ``feature_layer`` is None (for CAM/dissection errors).
    """

    ready: bool = False
    source: str | None = None
    preprocessing: Preprocessing | None = None
    layer_note: str | None = None

    def __init__(
        self,
        net: nn.Module,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        num_classes: int,
        feature_layer: str | None,
        head: str | None,
        dissection_layers: Sequence[str],
        class_names: Sequence[str] | None = None,
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
        self.class_names = None if class_names is None else tuple(str(c) for c in class_names)
        for name in (feature_layer, head, *self.dissection_layers):
            if name is not None:
                self.get_submodule(name)  # fail now, not in the middle of an analysis

    def forward(self, x: Tensor) -> Tensor:
        return self.net((x - self.mean) / self.std)
