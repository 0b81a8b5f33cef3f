"""torchvision ResNets and VGG16 behind the :class:`Classifier` contract.

Small inputs (CIFAR-sized, under 64 px) get the usual small-input stem: a 3x3 stride-1 first
convolution and no max-pool for ResNets, so 32 px images keep a 4x4 final feature map.
In-place ReLUs are turned off: they corrupt hooked activations (captum #156).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torchvision
from torch import nn

from pse_lightning.models.classifier import Classifier
from pse_lightning.validation import require_choice

ARCHS: tuple[str, ...] = ("resnet18", "resnet50", "vgg16")
SMALL_INPUT = 64


def _disable_inplace(net: nn.Module) -> None:
    for module in net.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False


def local_pretrained_state(arch: str) -> dict[str, torch.Tensor]:
    """Load torchvision's ImageNet weights for ``arch`` from the local torch hub cache.

    Nothing is downloaded: a run on an offline machine must fail at once and say which
    file to place where.

    Raises:
        FileNotFoundError: the weights file is not in the cache.
    """
    weights = torchvision.models.get_model_weights(arch).DEFAULT
    filename = Path(weights.url).name
    path = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if not path.is_file():
        raise FileNotFoundError(
            f"model.pretrained=true needs {filename} in the torch cache at {path}; download "
            f"it from {weights.url} on a machine that is online and copy it there, or set "
            "model.pretrained=false"
        )
    return torch.load(path, map_location="cpu", weights_only=True)


class TorchvisionClassifier(Classifier):
    """A torchvision architecture with a K-class head and [0, 1] inputs.

    Args:
        arch: 'resnet18', 'resnet50' or 'vgg16'.
        pretrained: start from ImageNet weights in the local torch cache (never downloads).
        num_classes, in_channels, mean, std, image_size: facts of the dataset.
    """

    def __init__(
        self,
        *,
        arch: str,
        num_classes: int,
        in_channels: int,
        mean: Sequence[float],
        std: Sequence[float],
        image_size: int,
        pretrained: bool = False,
    ) -> None:
        require_choice("model.arch", arch, ARCHS)
        net = torchvision.models.get_model(arch, weights=None)
        if pretrained:
            net.load_state_dict(local_pretrained_state(arch))
        small = image_size < SMALL_INPUT
        if arch.startswith("resnet"):
            if small or in_channels != 3:
                net.conv1 = nn.Conv2d(
                    in_channels,
                    64,
                    3 if small else 7,
                    stride=1 if small else 2,
                    padding=1 if small else 3,
                    bias=False,
                )
            if small:
                net.maxpool = nn.Identity()
            net.fc = nn.Linear(net.fc.in_features, num_classes)
            feature_layer, head = "net.layer4", "net.fc"
            dissection = ["net.layer3", "net.layer4"]
        else:
            if in_channels != 3:
                net.features[0] = nn.Conv2d(in_channels, 64, 3, padding=1)
            if small:
                # Four pools instead of five and a 1x1 adaptive pool keep 32 px images usable.
                net.features = net.features[:-1]
                net.avgpool = nn.AdaptiveAvgPool2d(1)
                net.classifier = nn.Sequential(
                    nn.Linear(512, 512), nn.ReLU(), nn.Dropout(0.5), nn.Linear(512, num_classes)
                )
            else:
                net.classifier[-1] = nn.Linear(net.classifier[-1].in_features, num_classes)
            last_conv = max(i for i, m in enumerate(net.features) if isinstance(m, nn.Conv2d))
            feature_layer, head = f"net.features.{last_conv + 1}", None  # after its ReLU
            convs = [i for i, m in enumerate(net.features) if isinstance(m, nn.Conv2d)]
            dissection = [f"net.features.{i + 1}" for i in convs[-2:]]
        _disable_inplace(net)
        super().__init__(
            net,
            mean=mean,
            std=std,
            num_classes=num_classes,
            feature_layer=feature_layer,
            head=head,
            dissection_layers=dissection,
        )
