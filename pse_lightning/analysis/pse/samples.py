"""The bounded per-image samples the PSE report shows: one table row per image, example maps.

The metric keeps them in ``cat`` states, one named state per column (see ``ROW_STATES`` and
``EXAMPLE_STATES``), bounded by the *dataset index* so one process and N processes keep the
same images. Every entry is stored flat in the metric's floating dtype: torchmetrics
substitutes an empty 1-D tensor of that dtype for a rank that kept nothing, and a gather
meets the same dtype and rank on every process. Ids are exact in that dtype below 2**24,
which bounds ``max_rows`` and the dataset indices. This module turns the gathered columns
back into typed tensors, sorted by dataset index with duplicates dropped (a padded
distributed sampler can deal an image twice).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import Tensor

from pse_lightning.analysis.pse.statistics import PSE_TYPES

# Ids stored in a float32 cat state are exact below this.
EXACT_ID_LIMIT = 2**24

# column -> metric state; the column order is the table's.
ROW_STATES: dict[str, str] = {
    "index": "row_index",
    "label": "row_label",
    "target": "row_target",
    "type": "row_type",
    "delta_true": "row_delta_true",
    "delta_target": "row_delta_target",
    "promotion": "row_promotion",
    "suppression": "row_suppression",
    "r": "row_r",
    "residual": "row_residual",
    "steps": "row_steps",
    "success": "row_success",
}
EXAMPLE_STATES: dict[str, str] = {
    "index": "example_index",
    "label": "example_label",
    "target": "example_target",
    "type": "example_type",
    "r": "example_r",
    "x": "example_x",
    "delta": "example_delta",
    "promotion": "example_promotion",
    "suppression": "example_suppression",
    "net": "example_net",
}
# The analysed images, six numbers (24 bytes) an image: what the class-pair statistics and
# the list of incomplete attributions need (no fixed-size sufficient statistic exists for
# them without the class count, which the constructor does not know). Bounded by
# ``max_images``: above it a seeded uniform sample of that many images (:func:`sample_images`).
IMAGE_STATES: dict[str, str] = {
    "index": "image_index",
    "label": "image_label",
    "target": "image_target",
    "r": "image_r",
    "residual": "image_residual",
    "steps": "image_steps",
}
_ID_COLUMNS = ("index", "label", "target", "type", "steps")
# The seed of the images' sampling keys (:func:`sample_keys`).
SAMPLE_SEED = 20190101
_MASK64 = (1 << 64) - 1


class _Sample:
    """Named columns whose first axis is the kept image; ``len`` counts the images."""

    index: Tensor  # every subclass declares it as its first field

    def __len__(self) -> int:
        return len(self.index)


# Not frozen: torchmetrics maps over what ``compute`` returns and refuses frozen dataclasses.
@dataclass
class ImageRows(_Sample):
    """One row per kept image (dataset index < ``max_rows``), sorted by dataset index.

    Attributes:
        index, label, target, type, steps: (M,) long; ``type`` indexes ``PSE_TYPES``.
        delta_true, delta_target: (M,) measured logit changes Delta_{t0}, Delta_t.
        promotion, suppression: (M,) gross attributions P = sum [a^t]+, S = sum [-a^t0]+.
        r: (M,) PSE ratio, NaN for type none.
        residual: (M,) relative completeness residual.
        success: (M,) bool attack success.
    """

    index: Tensor
    label: Tensor
    target: Tensor
    type: Tensor
    delta_true: Tensor
    delta_target: Tensor
    promotion: Tensor
    suppression: Tensor
    r: Tensor
    residual: Tensor
    steps: Tensor
    success: Tensor

    def table(self) -> tuple[list[str], list[list[object]]]:
        """(columns, rows) for W&B: type names instead of ids, NaN as a missing value."""
        columns = [f.name for f in fields(self)]
        values = [getattr(self, name).tolist() for name in columns]
        rows = []
        for row in zip(*values, strict=True):
            cells = dict(zip(columns, row, strict=True))
            cells["type"] = PSE_TYPES[cells["type"]]
            rows.append([_missing_nan(v) for v in cells.values()])
        return columns, rows


@dataclass
class ExampleMaps(_Sample):
    """Images and pixel maps of the examples (dataset index < ``max_figures``), sorted.

    Attributes:
        index, label, target, type: (E,) long.
        r: (E,) PSE ratio.
        x, delta: (E, C, H, W) clean image and perturbation x_adv - x.
        promotion, suppression: (E, H, W) channel sums of [a^t]+ and [-a^t0]+.
        net: (E, H, W) channel sum of a^t - a^t0, the pixel's share of the change of the
            margin Z_t - Z_t0 (signed).
    """

    index: Tensor
    label: Tensor
    target: Tensor
    type: Tensor
    r: Tensor
    x: Tensor
    delta: Tensor
    promotion: Tensor
    suppression: Tensor
    net: Tensor


@dataclass
class ImageSummary(_Sample):
    """Every analysed image (clean-correct, successful if so configured), sorted by index.

    Attributes:
        index, label, target, steps: (N,) long.
        r: (N,) PSE ratio, NaN for type none.
        residual: (N,) relative completeness residual after refinement.
    """

    index: Tensor
    label: Tensor
    target: Tensor
    r: Tensor
    residual: Tensor
    steps: Tensor


def image_summary(columns: Mapping[str, Tensor]) -> ImageSummary:
    """Typed, sorted, de-duplicated images from the gathered columns of ``IMAGE_STATES``."""
    order = unique_by_index(columns["index"])
    return ImageSummary(**{name: _typed(name, v)[order].cpu() for name, v in columns.items()})


def image_rows(columns: Mapping[str, Tensor]) -> ImageRows:
    """Typed, sorted, de-duplicated rows from the gathered flat columns of ``ROW_STATES``."""
    order = unique_by_index(columns["index"])
    typed = {name: _typed(name, values)[order].cpu() for name, values in columns.items()}
    return ImageRows(**typed)


def example_maps(columns: Mapping[str, Tensor], shape: Tensor) -> ExampleMaps:
    """Typed, sorted, de-duplicated examples from the flat columns of ``EXAMPLE_STATES``.

    Args:
        columns: gathered flat columns; images and maps hold E x C x H x W and E x H x W
            values.
        shape: (3,) the image shape (C, H, W) shared by every example.
    """
    c, h, w = (int(v) for v in shape.tolist())
    # No example kept (every image misclassified or every attack failed): 0 rows, not -1,
    # which an empty tensor cannot resolve.
    e = -1 if c * h * w else 0
    views = {"x": (e, c, h, w), "delta": (e, c, h, w), "promotion": (e, h, w),
             "suppression": (e, h, w), "net": (e, h, w)}  # fmt: skip
    typed = {
        name: _typed(name, values).view(views[name]) if name in views else _typed(name, values)
        for name, values in columns.items()
    }
    order = unique_by_index(typed["index"])
    return ExampleMaps(**{name: values[order].cpu() for name, values in typed.items()})


def sample_keys(index: Tensor, seed: int = SAMPLE_SEED) -> Tensor:
    """(N,) float64 keys in [0, 1), a seeded hash (splitmix64) of each dataset index.

    A function of the index alone: the images with the smallest keys are a uniform random
    sample without replacement that is the same for any sharding, batch order or number of
    processes, and one that does not follow the dataset's order (an image folder sorted by
    class is sampled across its classes).
    """
    with np.errstate(over="ignore"):
        z = index.round().long().cpu().numpy().astype(np.uint64)
        z = z + np.uint64((seed * 0x9E3779B97F4A7C15 + 0x9E3779B97F4A7C15) & _MASK64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return torch.from_numpy((z >> np.uint64(11)).astype(np.float64) / 2.0**53)


def sample_images(columns: Mapping[str, Tensor], limit: int) -> dict[str, Tensor]:
    """At most ``limit`` distinct images of flat columns with an ``index`` column: all of
    them, unchanged, when they fit; else those with the ``limit`` smallest
    :func:`sample_keys` (duplicates of a dataset index dropped first).

    Applied to each process's columns while they grow and to the gathered ones, it keeps the
    same images as applied once to all of them: the smallest keys of the union are among
    each part's smallest.
    """
    order = unique_by_index(columns["index"])
    if len(order) <= limit:
        return dict(columns)
    keys = sample_keys(columns["index"][order])
    keep = order[torch.argsort(keys, stable=True)[:limit].to(order.device)]
    return {name: values[keep] for name, values in columns.items()}


def unique_by_index(index: Tensor) -> Tensor:
    """Positions that sort rows by dataset index, keeping the first of duplicates."""
    order = torch.argsort(index, stable=True)
    sorted_index = index[order]
    first = torch.ones_like(sorted_index, dtype=torch.bool)
    first[1:] = sorted_index[1:] != sorted_index[:-1]
    return order[first]


def _typed(name: str, values: Tensor) -> Tensor:
    if name in _ID_COLUMNS:
        return values.round().long()
    if name == "success":
        return values != 0
    return values


def _missing_nan(value: object) -> object:
    return None if isinstance(value, float) and math.isnan(value) else value
