"""RobustBench's model zoo as a registry: architectures, evaluation transforms, downloads.

Only robustbench's registry (``robustbench.model_zoo.model_dicts``) and its download
function are used: the registry builds each entry's architecture, with the entry's input
normalisation inside the model, and the weights are read by
:mod:`pse_lightning.models.zoo` (``weights_only``), not by robustbench's ``load_model``
(which unpickles with ``weights_only=False`` and downloads whenever a file is missing).

robustbench is an optional extra (``pip install 'pse_lightning[robust]'``). Version 1.1.1
from PyPI declares ``pyautoattack`` as its dependency but imports it as ``autoattack`` (the
name of the git install): when only ``pyautoattack`` is installed it is registered under
that name before robustbench is imported. It also imports ``pkg_resources``, which
setuptools 81 removed; the extra pins ``setuptools<81``.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import sys
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from torch import nn

from pse_lightning.models.pretrained import Preprocessing

DATASETS = ("cifar10", "cifar100", "imagenet")
THREAT_MODELS = ("Linf", "L2", "corruptions")
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "imagenet": 1000}
#: RobustBench's evaluation transforms (robustbench.data.PREPROCESSINGS) that the ImageNet
#: datamodule reproduces: (crop, resize of the short side, interpolation).
_TRANSFORMS = {
    "Res256Crop224": (224, 256, "bilinear"),
    "BicubicRes256Crop224": (224, 256, "bicubic"),
}
INSTALL = "pip install 'pse_lightning[robust]' (or pip install robustbench==1.1.1 'setuptools<81')"


@dataclass(frozen=True)
class ZooEntry:
    """One model of the zoo.

    Attributes:
        name, dataset, threat_model: where it sits in the registry.
        build: robustbench's constructor of the architecture (normalisation included).
        gdrive_id: the file robustbench downloads.
        transform: RobustBench's evaluation transform name for ImageNet entries, or None.
    """

    name: str
    dataset: str
    threat_model: str
    build: Callable[[], nn.Module]
    gdrive_id: str
    transform: str | None = None

    @property
    def num_classes(self) -> int:
        return NUM_CLASSES[self.dataset]

    def preprocessing(self) -> Preprocessing | None:
        """The ImageNet transform the entry was evaluated with (None: images as they are)."""
        if self.dataset != "imagenet":
            return None
        if self.transform not in _TRANSFORMS:
            raise ValueError(
                f"model.name={self.name} is evaluated by RobustBench with its "
                f"'{self.transform}' transform, which dataset=imagenet cannot serve (it serves "
                f"{sorted(_TRANSFORMS)}): pick another zoo model"
            )
        crop, resize, interpolation = _TRANSFORMS[self.transform]
        return Preprocessing(crop, resize, interpolation, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


def import_robustbench() -> Any:
    """Import robustbench (see the module docstring); a clear error when it cannot be."""
    if importlib.util.find_spec("robustbench") is None:
        raise ValueError(f"model=robustbench needs the robustbench package: {INSTALL}")
    if importlib.util.find_spec("autoattack") is None and importlib.util.find_spec("pyautoattack"):
        sys.modules["autoattack"] = importlib.import_module("pyautoattack")
    try:
        with warnings.catch_warnings():
            # Its imports warn about torch.jit and pkg_resources; nothing a user can act on.
            warnings.simplefilter("ignore", (FutureWarning, UserWarning, DeprecationWarning))
            return importlib.import_module("robustbench.utils")
    except ModuleNotFoundError as err:
        raise ValueError(
            f"model=robustbench: robustbench is installed but cannot be imported (no module "
            f"{err.name!r}): {INSTALL}"
        ) from err


@cache
def registry() -> dict[str, dict[str, Mapping[str, dict[str, Any]]]]:
    """``{dataset: {threat_model: {name: entry dict}}}`` of robustbench's model_dicts."""
    utils = import_robustbench()
    return {
        str(dataset.value): {str(threat.value): models for threat, models in by_threat.items()}
        for dataset, by_threat in utils.all_models.items()
    }


def unknown_name_error(name: str, dataset: str, threat_model: str) -> str:
    """Why ``name`` is not in the zoo: close names here, or where the name does exist."""
    zoo = registry()
    if not zoo.get(dataset, {}).get(threat_model):
        return (
            f"RobustBench has no {dataset}/{threat_model} models: set model.threat_model to "
            f"one of {sorted(zoo.get(dataset, {}))}"
        )
    names = list(zoo[dataset][threat_model])
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    elsewhere = [f"{d}/{t}" for d, by in zoo.items() for t, models in by.items() if name in models]
    where = (
        f"; it is a {' and '.join(elsewhere)} model: set model.dataset/model.threat_model"
        if elsewhere
        else ""
    )
    return (
        f"model.name={name} is not in RobustBench's {dataset}/{threat_model} zoo"
        f"{where}; close names: {close or 'none'} ({len(names)} models, e.g. {names[:3]})"
    )


def zoo_entry(name: str, dataset: str, threat_model: str) -> ZooEntry:
    """The registry's entry for ``name``.

    Raises:
        ValueError: unknown dataset, threat model or name (with close matches), or an entry
            whose weights are not a single RobustBench file (ensembles, models timm fetches
            from the Hugging Face hub, torchvision's own ``Standard_R50``).
    """
    if dataset not in DATASETS:
        raise ValueError(f"model.dataset must be one of {list(DATASETS)}, got {dataset!r}")
    if threat_model not in THREAT_MODELS:
        raise ValueError(
            f"model.threat_model must be one of {list(THREAT_MODELS)}, got {threat_model!r}"
        )
    models = registry().get(dataset, {}).get(threat_model, {})
    if name not in models:
        raise ValueError(unknown_name_error(name, dataset, threat_model))
    spec = models[name]
    gdrive_id = spec.get("gdrive_id")
    if not isinstance(gdrive_id, str) or not gdrive_id:
        kind = (
            "an ensemble of several files"
            if isinstance(gdrive_id, list)
            else "not a RobustBench file (timm or torchvision fetches its weights)"
        )
        hint = (
            " (torchvision's: use model=resnet50 model.pretrained=true)" if "R50" in name else ""
        )
        raise ValueError(
            f"model.name={name} ({dataset}/{threat_model}) is {kind}: model=robustbench loads "
            f"single-file zoo models{hint}"
        )
    return ZooEntry(
        name, dataset, threat_model, spec["model"], gdrive_id, spec.get("preprocessing")
    )


def fetch_weights(entry: ZooEntry, path: Path) -> None:
    """Fetch the entry's file to ``path`` with robustbench's own download function.

    Raises:
        RuntimeError: the download failed (offline machine, quota); nothing is left at ``path``.
    """
    utils = import_robustbench()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        utils.download_gdrive_new(entry.gdrive_id, path)
    except Exception as err:  # gdown and requests raise many types; all mean "not fetched"
        path.unlink(missing_ok=True)
        raise RuntimeError(
            f"model.download=true could not fetch model.name={entry.name} (Google Drive id "
            f"{entry.gdrive_id}) into {path.parent} ({type(err).__name__}: {err}); this "
            "machine may be offline: fetch the file elsewhere and copy it there"
        ) from err
    if not path.is_file():
        raise RuntimeError(
            f"model.download=true: robustbench's download left no {path.name} in {path.parent}"
        )
