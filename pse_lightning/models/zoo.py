"""Robust (and standard) models of the RobustBench zoo, evaluated as they are.

``model=robustbench model.name=Carmon2019Unlabeled model.dataset=cifar10
model.threat_model=Linf``: robustbench's registry builds the architecture, with the entry's
input normalisation inside it (:mod:`pse_lightning.models.zoo_registry`); the weights are
read from RobustBench's file layout, ``<model_dir>/<dataset>/<threat_model>/<name>.pt``
(:mod:`pse_lightning.core.zoo_files`), with ``weights_only=True``. Nothing is downloaded
unless ``model.download=true``, and then through robustbench's own download function.

Zoo files come as their authors saved them; the wrappers recognised are those RobustBench's
loader undoes: a ``state_dict`` or ``last`` entry, ``module.`` (DataParallel) and ``model.``
prefixes, a missing ``model.`` prefix for ImageNet models wrapped with their normaliser, and
the madrylab robustness library's layout (attacker copy and normaliser dropped). Of the
architecture's keys, only its normalisation constants (it keeps its own, as RobustBench
does) and batch-norm step counters may be absent from a file; anything else missing,
unexpected or mis-shaped is an error listing the keys.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from torch import Tensor, nn

from pse_lightning.core.zoo_files import missing_zoo_weights, zoo_weights_file
from pse_lightning.models.checkpoint import CheckpointError
from pse_lightning.models.classifier import Classifier
from pse_lightning.models.foreign import (
    load_weights_only,
    state_mismatch,
    to_torchvision_layout,
    unwrap_state,
)
from pse_lightning.models.layers import disable_inplace, find_feature_layers
from pse_lightning.models.pretrained import imagenet_wnids
from pse_lightning.models.zoo_registry import ZooEntry, fetch_weights, zoo_entry

log = logging.getLogger(__name__)

#: Checkpoint entries that hold the weights (``last``: the final of last/best snapshots).
_WRAPPERS = ("state_dict", "model_state_dict", "model", "last")
#: Buffers a file may lack: normalisation constants the architecture defines itself, and
#: batch-norm step counters (files from before PyTorch 0.4.1; unused in evaluation).
_OPTIONAL = ("mean", "std", "mu", "sigma", "num_batches_tracked")


def _strip(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k.removeprefix(prefix): v for k, v in state.items()}


def align_keys(state: dict[str, Tensor], own: set[str]) -> dict[str, Tensor]:
    """Rename a zoo file's keys to the architecture's (see the module docstring).

    The candidates are the file's keys without ``module.``, then also without ``model.``
    or with ``model.`` added; the one sharing most keys with the architecture is taken.
    """
    foreign = to_torchvision_layout(state)
    base = foreign.state if foreign.layout == "robustness" else _strip(state, "module.")
    bare = _strip(base, "model.")
    candidates = [base, bare, {f"model.{k}": v for k, v in bare.items()}]
    return max(candidates, key=lambda c: len(own & set(c)))


def read_zoo_state(path: Path, net: nn.Module) -> dict[str, Tensor]:
    """The file's weights under ``net``'s key names (weights only).

    Raises:
        CheckpointError: unreadable as weights, or keys/shapes that do not fit ``net``.
    """
    what = f"model=robustbench: {path}"
    payload = load_weights_only(path, what)
    own = net.state_dict()
    state = align_keys(unwrap_state(payload, what, _WRAPPERS), set(own))
    absent = {k for k in set(own) - set(state) if k.rsplit(".", 1)[-1] in _OPTIONAL}
    problem = state_mismatch({k: v for k, v in own.items() if k not in absent}, state)
    if problem:
        raise CheckpointError(
            f"model=robustbench: {path} does not fit the zoo's architecture for this "
            f"model.name: {problem}; was it saved for another zoo model?"
        )
    if absent:
        log.info("%s has no %s: the architecture's own constants are kept", path, sorted(absent))
    return state


def check_dataset(entry: ZooEntry, num_classes: int, image_size: int, names: list | None) -> None:
    """The dataset must serve the zoo model's classes (and CIFAR models their 32 px)."""
    wnids = list(imagenet_wnids())
    other_order = entry.dataset == "imagenet" and names is not None and names != wnids
    if num_classes != entry.num_classes or other_order:
        raise ValueError(
            f"model.name={entry.name} is a {entry.dataset} model with {entry.num_classes} "
            f"classes in {entry.dataset}'s standard order, but the dataset has {num_classes} "
            f"classes{' in another order' if other_order else ''}: zoo models are evaluated as "
            f"they are, so use dataset={entry.dataset} (or set model.dataset)"
        )
    if entry.dataset != "imagenet" and image_size != 32:
        raise ValueError(
            f"model.name={entry.name} takes 32 px {entry.dataset} images, but the dataset "
            f"serves {image_size} px: use dataset={entry.dataset}"
        )


class RobustBenchClassifier(Classifier):
    """A RobustBench zoo model behind the :class:`Classifier` contract (module docstring).

    The zoo architecture normalises its own input, so this wrapper's mean is 0 and its std
    1. CAM uses Grad-CAM on the last convolutional block unless the architecture ends in
    global average pooling and a linear head; dissection takes the last two blocks
    (:mod:`pse_lightning.models.layers`).

    Args:
        name: the zoo name (``Standard``, ``Carmon2019Unlabeled``, ``Salman2020Do_R50``...).
        dataset: the zoo's dataset, ``cifar10``, ``cifar100`` or ``imagenet``.
        threat_model: ``Linf``, ``L2`` or ``corruptions``.
        model_dir: RobustBench's model folder (null: ``<torch hub dir>/robustbench``).
        download: fetch a missing file with robustbench (never without being asked).
        num_classes, in_channels, mean, std, image_size, class_names: facts of the dataset;
            the zoo model's classes must be the dataset's.

    Raises:
        ValueError: robustbench missing, unknown name (close names listed), another dataset.
        FileNotFoundError: the file is missing and ``download`` is false.
        CheckpointError: the file does not fit the architecture.
    """

    def __init__(
        self,
        *,
        name: str,
        num_classes: int,
        in_channels: int,
        mean: Sequence[float],
        std: Sequence[float],
        image_size: int,
        dataset: str = "cifar10",
        threat_model: str = "Linf",
        model_dir: str | None = None,
        download: bool = False,
        class_names: Sequence[str] | None = None,
    ) -> None:
        del mean, std  # the zoo architecture normalises with its own statistics
        entry = zoo_entry(name, dataset, threat_model)
        names = None if class_names is None else list(class_names)
        check_dataset(entry, num_classes, image_size, names)
        path = zoo_weights_file(model_dir, dataset, threat_model, name)
        if not path.is_file() and not download:
            raise FileNotFoundError(missing_zoo_weights(path, name, " from Google Drive"))
        if not path.is_file():
            log.info("downloading model.name=%s into %s", name, path.parent)
            fetch_weights(entry, path)
        net = entry.build()
        net.load_state_dict(read_zoo_state(path, net), strict=False)
        disable_inplace(net)
        layers = find_feature_layers(net, f"robustbench {name}")
        super().__init__(
            net,
            mean=(0.0,) * in_channels,
            std=(1.0,) * in_channels,
            num_classes=num_classes,
            feature_layer=None if layers.feature_layer is None else f"net.{layers.feature_layer}",
            head=None if layers.head is None else f"net.{layers.head}",
            dissection_layers=[f"net.{layer}" for layer in layers.dissection_layers],
            class_names=names,
        )
        self.ready, self.source = True, f"RobustBench {dataset}/{threat_model}/{name} ({path})"
        self.preprocessing, self.layer_note = entry.preprocessing(), layers.missing
        self.arch = name
        log.info("loaded %s", self.source)
