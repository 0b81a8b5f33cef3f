"""torchvision's pretrained weights: where they live, fetching them, what they expect.

The weights come through torchvision's weights API (``get_model_weights(arch).DEFAULT``):
its URL, its file name in the torch hub cache (``$TORCH_HOME/hub/checkpoints``), its
evaluation transform (crop and resize sizes, interpolation, mean and std) and its class
names. Like the datasets, nothing is downloaded unless asked (``model.download=true``); an
offline machine gets an error naming the file, the folder to put it in and the URL.
Files are read with ``weights_only=True``: a weights file is data, never code.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import torchvision
from torchvision.models import WeightsEnum

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preprocessing:
    """The evaluation transform the weights were measured with.

    Attributes:
        crop_size: side of the centre crop fed to the network (299 for Inception-v3).
        resize_size: the short side is resized to this before cropping.
        interpolation: torchvision ``InterpolationMode`` name of the resize (``bilinear``).
        mean, std: per-channel normalisation, applied inside the model.
    """

    crop_size: int
    resize_size: int
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]


def default_weights(arch: str) -> WeightsEnum:
    """torchvision's recommended weights for ``arch`` (``DEFAULT``)."""
    return torchvision.models.get_model_weights(arch).DEFAULT


def preprocessing(weights: WeightsEnum) -> Preprocessing:
    """Read the crop, resize, interpolation and normalisation of ``weights.transforms()``."""
    transform = weights.transforms()
    return Preprocessing(
        crop_size=int(transform.crop_size[0]),
        resize_size=int(transform.resize_size[0]),
        interpolation=transform.interpolation.value,
        mean=tuple(float(m) for m in transform.mean),
        std=tuple(float(s) for s in transform.std),
    )


def cached_file(weights: WeightsEnum) -> Path:
    """Where torch hub keeps (or would keep) the weights file: ``<hub>/checkpoints/<name>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name


def load_pretrained_state(
    arch: str, weights: WeightsEnum, *, download: bool
) -> dict[str, torch.Tensor]:
    """The weights' state dict from the hub cache, downloading it first only if asked.

    Raises:
        FileNotFoundError: the file is not cached and ``download`` is false.
        RuntimeError: the download failed (offline machine, firewall).
    """
    path = cached_file(weights)
    if not path.is_file() and not download:
        raise FileNotFoundError(
            f"model.pretrained=true: model.arch={arch} needs {path.name} in the torch hub "
            f"cache {path.parent}; run with model.download=true on a machine that is online, "
            f"or fetch {weights.url} and copy it there"
        )
    if not path.is_file():
        log.info("downloading %s into %s", weights.url, path.parent)
        path.parent.mkdir(parents=True, exist_ok=True)
        digest = torch.hub.HASH_REGEX.search(path.name)  # torchvision names files <arch>-<sha>
        try:
            torch.hub.download_url_to_file(
                weights.url, str(path), digest.group(1) if digest else None, progress=False
            )
        except (OSError, RuntimeError) as err:
            raise RuntimeError(
                f"model.download=true could not fetch {weights.url} into {path.parent} "
                f"({type(err).__name__}: {err}); this machine may be offline: fetch the file "
                "elsewhere and copy it there"
            ) from err
    return torch.load(path, map_location="cpu", weights_only=True)


def builder_kwargs(arch: str, weights: WeightsEnum) -> dict[str, Any]:
    """Constructor arguments torchvision's builder sets when it is given ``weights``.

    Building with these and loading the state dict ourselves gives torchvision's own
    pretrained model while the file is read with ``weights_only=True`` (torchvision's
    builders load with ``weights_only=False``).
    """
    kwargs: dict[str, Any] = {"num_classes": len(weights.meta["categories"])}
    if arch in ("inception_v3", "googlenet"):
        kwargs.update(transform_input=True, aux_logits=True, init_weights=False)
    elif arch.startswith("vit_"):
        kwargs["image_size"] = weights.meta["min_size"][0]
    elif arch.startswith("maxvit"):
        kwargs["input_size"] = weights.meta["min_size"]
    return kwargs


def drop_aux_heads(net: torch.nn.Module) -> None:
    """Remove Inception/GoogLeNet auxiliary classifiers after loading, as torchvision does
    for ``aux_logits=False``: training steps then get plain logits."""
    if hasattr(net, "AuxLogits"):
        net.aux_logits, net.AuxLogits = False, None
    if hasattr(net, "aux1"):
        net.aux_logits, net.aux1, net.aux2 = False, None, None


@cache
def imagenet_wnids() -> tuple[str, ...]:
    """The 1,000 ImageNet-1k WordNet ids in the standard (sorted) class order."""
    text = resources.files("pse_lightning.models").joinpath("imagenet_wnids.txt").read_text()
    return tuple(text.split())


def same_classes(class_names: list[str] | None, num_classes: int, weights: WeightsEnum) -> bool:
    """Whether a dataset's classes are the weights' classes, in the same order.

    ImageNet folders are named by WordNet id (``n01440764``), the weights' metadata by
    name (``tench``): either list matches. Without class names only the count is checked.
    """
    categories = list(weights.meta["categories"])
    if num_classes != len(categories):
        return False
    if class_names is None:
        return True
    if len(categories) == len(imagenet_wnids()) and list(class_names) == list(imagenet_wnids()):
        return True
    return list(class_names) == categories
