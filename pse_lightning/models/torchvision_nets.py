"""Any torchvision classification architecture behind the :class:`Classifier` contract.

Weights come from one of three places:

- none (``model.pretrained=false``): a fresh network with the dataset's classes, trained
  by the run;
- torchvision's pretrained weights (``model.pretrained=true``, see
  :mod:`pse_lightning.models.pretrained`): when the dataset's classes are the weights'
  classes (ImageNet's 1,000 in the standard order) the head is kept and the model is ready
  to evaluate as it is; otherwise the head is replaced and the run fine-tunes it;
- a weights file (``model.weights=/path``, see :mod:`pse_lightning.models.foreign`):
  ready when its head has the dataset's classes, else its head is replaced.

Small inputs (CIFAR-sized, under 64 px) get the usual small-input stem on networks the
run trains: a 3x3 stride-1 first convolution and no max-pool for ResNets, four pools for
VGG, so 32 px images keep a 4x4 final feature map. In-place activations are turned off:
they corrupt hooked activations (captum #156). The analysed layers are found by
:mod:`pse_lightning.models.layers`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torchvision
from torch import nn

from pse_lightning.models.checkpoint import CheckpointError
from pse_lightning.models.classifier import Classifier
from pse_lightning.models.foreign import (
    guess_architecture,
    head_keys,
    head_name,
    read_foreign_weights,
    state_mismatch,
)
from pse_lightning.models.layers import disable_inplace, find_feature_layers
from pse_lightning.models.pretrained import (
    Preprocessing,
    builder_kwargs,
    default_weights,
    drop_aux_heads,
    load_pretrained_state,
    preprocessing,
    same_classes,
)
from pse_lightning.validation import require_choice

log = logging.getLogger(__name__)

SMALL_INPUT = 64


def architectures() -> list[str]:
    """Every torchvision classification architecture (``model.arch`` choices)."""
    return torchvision.models.list_models(module=torchvision.models)


def bare_net(arch: str, num_classes: int) -> nn.Module:
    """A randomly initialised ``arch`` with ``num_classes`` outputs and no auxiliary heads."""
    kwargs = {}
    if arch in ("inception_v3", "googlenet"):
        kwargs = {"aux_logits": False, "init_weights": True}
    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **kwargs)


def _set_submodule(net: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, leaf, module)


def replace_head(net: nn.Module, num_classes: int) -> str:
    """Give ``net`` a fresh ``num_classes``-way head (its last Linear, or SqueezeNet's last
    1x1 convolution); returns the head's name."""
    name = head_name(net)
    old = net.get_submodule(name)
    if isinstance(old, nn.Linear):
        new: nn.Module = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    else:
        new = nn.Conv2d(old.in_channels, num_classes, old.kernel_size, old.stride)
    _set_submodule(net, name, new)
    if hasattr(net, "num_classes"):
        net.num_classes = num_classes
    return name


def adapt_stem(net: nn.Module, arch: str, in_channels: int, image_size: int, k: int) -> None:
    """The small-input stem (ResNet, VGG) and an ``in_channels`` first convolution."""
    small = image_size < SMALL_INPUT
    if arch.startswith(("resnet", "wide_resnet", "resnext")):
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
    elif arch.startswith("vgg"):
        if in_channels != 3:
            net.features[0] = nn.Conv2d(in_channels, 64, 3, padding=1)
        if small:
            # Four pools instead of five and a 1x1 adaptive pool keep 32 px images usable.
            net.features = net.features[:-1]
            net.avgpool = nn.AdaptiveAvgPool2d(1)
            net.classifier = nn.Sequential(
                nn.Linear(512, 512), nn.ReLU(), nn.Dropout(0.5), nn.Linear(512, k)
            )
    elif in_channels != 3:
        raise ValueError(
            f"model.arch={arch} takes 3-channel images; the dataset has {in_channels}: "
            "use model=small_cnn, resnet18 or vgg16 for it"
        )


def check_input_size(arch: str, image_size: int) -> None:
    """Fail at once when torchvision says ``arch`` cannot take ``image_size`` inputs."""
    if arch.startswith(("resnet", "wide_resnet", "resnext", "vgg")):
        return  # adapt_stem makes small inputs work
    min_size = default_weights(arch).meta.get("min_size", (1, 1))[0]
    if image_size < min_size:
        raise ValueError(
            f"model.arch={arch} needs images of at least {min_size} px, but the dataset "
            f"serves {image_size} px: pick a dataset with larger images (dataset=imagenet) "
            "or another architecture (resnet18, vgg16)"
        )


class TorchvisionClassifier(Classifier):
    """A torchvision architecture with [0, 1] inputs (see the module docstring).

    Args:
        arch: any torchvision classification architecture (``resnet50``, ``inception_v3``,
            ``densenet121``, ``efficientnet_b0``, ``vgg16``...).
        pretrained: start from torchvision's ImageNet weights (``DEFAULT``).
        download: fetch missing pretrained weights into the torch hub cache.
        weights: path of a weights file (torchvision, DataParallel, robustness library or
            RobustBench layout); excludes ``pretrained``.
        num_classes, in_channels, mean, std, image_size, class_names: facts of the dataset.

    Raises:
        ValueError: unknown architecture, both weight sources, inputs too small.
        FileNotFoundError: pretrained weights not cached and ``download`` is false.
        CheckpointError: a weights file that does not fit the architecture.
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
        class_names: Sequence[str] | None = None,
        pretrained: bool = False,
        download: bool = False,
        weights: str | None = None,
    ) -> None:
        require_choice("model.arch", arch, architectures())
        if pretrained and weights:
            raise ValueError(
                f"model.pretrained=true and model.weights={weights} both give weights; "
                "pass one (model.pretrained=false to load the file)"
            )
        check_input_size(arch, image_size)
        names = None if class_names is None else list(class_names)
        stats = (tuple(mean), tuple(std))
        ready, source, prep = False, None, None
        if pretrained:
            net, names, ready, source, prep = self._pretrained(
                arch, num_classes, in_channels, image_size, names, download
            )
            stats = (prep.mean, prep.std) if in_channels == 3 else stats
        elif weights:
            net, ready, file_stats = self._from_file(
                arch, num_classes, in_channels, image_size, Path(weights)
            )
            stats, source = file_stats or stats, str(Path(weights).expanduser())
        else:
            net = bare_net(arch, num_classes)
            adapt_stem(net, arch, in_channels, image_size, num_classes)
        disable_inplace(net)
        layers = find_feature_layers(net, arch)
        super().__init__(
            net,
            mean=stats[0],
            std=stats[1],
            num_classes=num_classes,
            feature_layer=None if layers.feature_layer is None else f"net.{layers.feature_layer}",
            head=None if layers.head is None else f"net.{layers.head}",
            dissection_layers=[f"net.{name}" for name in layers.dissection_layers],
            class_names=names,
        )
        self.arch, self.ready, self.source = arch, ready, source
        self.preprocessing, self.layer_note = prep, layers.missing

    @staticmethod
    def _pretrained(
        arch: str,
        num_classes: int,
        in_channels: int,
        image_size: int,
        class_names: list[str] | None,
        download: bool,
    ) -> tuple[nn.Module, list[str] | None, bool, str, Preprocessing]:
        """torchvision's weights; the head kept when the classes are the weights' own."""
        weights = default_weights(arch)
        state = load_pretrained_state(arch, weights, download=download)
        net = torchvision.models.get_model(arch, weights=None, **builder_kwargs(arch, weights))
        net.load_state_dict(state)
        drop_aux_heads(net)
        source = f"torchvision {type(weights).__name__}.{weights.name}"
        if same_classes(class_names, num_classes, weights):
            log.info("%s: the dataset has its classes; evaluating it as it is", source)
            return net, list(weights.meta["categories"]), True, source, preprocessing(weights)
        log.info(
            "%s has a %d-class ImageNet head, the dataset %d other classes: the head is "
            "replaced and the model will be fine-tuned",
            source,
            len(weights.meta["categories"]),
            num_classes,
        )
        replace_head(net, num_classes)
        adapt_stem(net, arch, in_channels, image_size, num_classes)
        return net, class_names, False, source, preprocessing(weights)

    @staticmethod
    def _from_file(
        arch: str, num_classes: int, in_channels: int, image_size: int, path: Path
    ) -> tuple[nn.Module, bool, tuple[tuple[float, ...], tuple[float, ...]] | None]:
        """A weights file; its head replaced (not ready) when its class count differs."""
        found = read_foreign_weights(path)
        net = bare_net(arch, num_classes)
        adapt_stem(net, arch, in_channels, image_size, num_classes)
        own = net.state_dict()
        head = head_keys(net)
        body_state = {k: v for k, v in found.state.items() if k not in head}
        body_own = {k: v for k, v in own.items() if k not in head}
        problem = state_mismatch(body_own, body_state)
        if problem is None and head <= set(found.state):
            ready = all(found.state[k].shape == own[k].shape for k in head)
            net.load_state_dict(found.state if ready else {**own, **body_state})
            log.info(
                "loaded %s (%s layout)%s",
                path,
                found.layout,
                ""
                if ready
                else "; its head has other classes: it is replaced and the "
                "model will be fine-tuned",
            )
            stats = (found.mean, found.std) if found.mean is not None else None
            return net, ready, stats
        other = guess_architecture(found.state, near=arch)
        hint = (
            f"it holds a {other}: pass model.arch={other}"
            if other and other != arch
            else "see docs/MODELS.md for the accepted layouts"
        )
        raise CheckpointError(
            f"model.weights={path} does not match model.arch={arch}: its keys or shapes are "
            f"another architecture's ({problem or 'head keys missing'}); {hint}"
        )
