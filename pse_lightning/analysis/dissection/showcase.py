"""Top-activating probe images of the most interpretable units, for the report figure.

Built on rank zero after the probe passes (a bounded number of images), returned by
``compute`` so that ``report`` draws them from the result alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from pse_lightning.analysis.dissection.activations import layer_activations
from pse_lightning.analysis.dissection.masks import activation_masks
from pse_lightning.analysis.dissection.probe import EMPTY_INDEX, ProbeResult
from pse_lightning.core.model_state import model_device

log = logging.getLogger(__name__)


@dataclass
class Showcase:
    """Top-activating probe images of one unit, with its activation and concept masks."""

    layer: str
    unit: int
    concept: str
    category: str
    iou: float
    index: list[int]
    images: Tensor  # (k, C, H, W)
    activation_masks: Tensor  # (k, H, W) bool
    concept_masks: Tensor  # (k, H, W) bool


def showcase_units(probe: ProbeResult, top_units: int) -> list[tuple[str, int, list[int]]]:
    """(layer, unit, top image indices) of the ``top_units`` most interpretable units of
    each layer (ties: lower unit), units without a kept image left out."""
    picks = []
    for name, layer in probe.layers.items():
        order = sorted(range(layer.units), key=lambda u: (-float(layer.best_iou[u]), u))
        for unit in order[:top_units]:
            index = [int(i) for i in layer.top_index[unit] if int(i) != EMPTY_INDEX]
            if index:
                picks.append((name, unit, index))
    return picks


def build_showcase(
    model: nn.Module, loader: DataLoader, probe: ProbeResult, top_units: int
) -> list[Showcase]:
    """Images, activation masks and concept masks of :func:`showcase_units` (rank zero)."""
    picks = showcase_units(probe, top_units)
    wanted = sorted({i for _, _, index in picks for i in index})
    samples = fetch_samples(loader.dataset, wanted, loader.batch_size or 1)
    if samples is None:
        log.warning(
            "dissection: the probe dataset has no random access by dataset "
            "index; the top-image figure is skipped"
        )
        return []
    device = model_device(model)
    table = probe.table
    showcase = []
    for name, unit, index in picks:
        layer = probe.layers[name]
        x = torch.stack([samples[i][0] for i in index]).to(device).float()
        labels = torch.stack([samples[i][1] for i in index]).long()
        acts = layer_activations(model, x, [name], loader.batch_size)[name][:, unit : unit + 1]
        masks = activation_masks(
            acts,
            layer.thresholds[unit : unit + 1].to(device),
            layer.floors[unit : unit + 1].to(device),
            tuple(labels.shape[-2:]),
        )[:, 0].cpu()
        concept = int(layer.best_concept[unit])
        category = int(table.concept_category[concept])
        showcase.append(
            Showcase(
                layer=name,
                unit=unit,
                concept=table.name_of(concept),
                category=table.categories[category],
                iou=float(layer.best_iou[unit]),
                index=index,
                images=x.cpu(),
                activation_masks=masks,
                concept_masks=labels[:, category] == concept,
            )
        )
    return showcase


def fetch_samples(
    dataset: Any, wanted: list[int], batch_size: int
) -> dict[int, tuple[Tensor, Tensor]] | None:
    """(x, labels) of the probe samples with the given dataset indices.

    Direct access when ``dataset[i]`` is the sample with index i (checked), else one scan
    of the dataset in order; None when the dataset has no ``__getitem__``.
    """
    if not wanted:
        return {}
    if not hasattr(dataset, "__getitem__"):
        return None
    found: dict[int, tuple[Tensor, Tensor]] = {}
    try:
        for i in wanted:
            x, labels, index = dataset[i]
            if int(index) != i:
                break
            found[i] = (torch.as_tensor(x), torch.as_tensor(labels))
        else:
            return found
    except (IndexError, KeyError):
        pass
    found = {}
    targets = set(wanted)
    for x, labels, index in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        for j, i in enumerate(torch.as_tensor(index).tolist()):
            if i in targets:
                found[i] = (x[j], labels[j])
        if len(found) == len(targets):
            break
    return found
