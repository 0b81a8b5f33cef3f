"""A small CAM-compatible CNN: conv blocks, global average pooling, one linear layer."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from pse_lightning.models.classifier import Classifier
from pse_lightning.validation import require_at_least


class SmallCNNNet(nn.Module):
    """Conv blocks (conv-BN-ReLU x2, max-pool between blocks), GAP, linear head."""

    def __init__(self, in_channels: int, num_classes: int, widths: Sequence[int]) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        prev = in_channels
        for i, width in enumerate(widths):
            layers: list[nn.Module] = [] if i == 0 else [nn.MaxPool2d(2)]
            layers += [
                nn.Conv2d(prev, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=False),
                nn.Conv2d(width, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=False),
            ]
            blocks.append(nn.Sequential(*layers))
            prev = width
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(prev, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


class SmallCNN(Classifier):
    """The embedded default model; trains to >90% on shapes in about a minute on 2 cores.

    Args:
        num_classes, in_channels, mean, std, class_names: facts of the dataset, passed
            at call time (``image_size`` too: the net takes any size).
        widths: channels of each conv block (each block after the first halves the size).
    """

    def __init__(
        self,
        *,
        num_classes: int,
        in_channels: int,
        mean: Sequence[float],
        std: Sequence[float],
        image_size: int | None = None,
        class_names: Sequence[str] | None = None,
        widths: Sequence[int] = (32, 64, 128),
    ) -> None:
        widths = [require_at_least("model.widths[]", int(w), 1) for w in widths]
        if not widths:
            raise ValueError("model.widths must list at least one block width")
        last = len(widths) - 1
        super().__init__(
            SmallCNNNet(in_channels, num_classes, widths),
            mean=mean,
            std=std,
            num_classes=num_classes,
            feature_layer=f"net.features.{last}",
            head="net.fc",
            dissection_layers=[f"net.features.{i}" for i in range(max(0, last - 1), last + 1)],
            class_names=class_names,
        )
