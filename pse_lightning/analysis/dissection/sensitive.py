"""The most attack-sensitive units seen on evaluation images: where each unit fires on the
clean image and on its adversarial image (its activation mask M_k = 1[S_k >= T_k], the
unit's segmentation of its concept, docs/METHODS.md §4.2).

A few evaluation images (dataset index < ``limit``) are kept with every dissected layer's
activations on x and x' while the sensitivity is accumulated, as ``cat`` states (bounded by
``limit``), so 1 and N processes keep the same images; which units are the most sensitive is
known only at ``compute``, when the masks are drawn from the kept activations.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from pse_lightning.analysis.dissection.masks import above_threshold, mask_thresholds, upsample
from pse_lightning.analysis.dissection.probe import ProbeResult
from pse_lightning.analysis.dissection.summary import LayerUnits


@dataclass
class SensitiveUnit:
    """One unit on the kept images (sorted by dataset index).

    Attributes:
        layer, unit: the unit; s: its sensitivity s_k; concept, category, iou: its best
            concept on the probe set.
        index: (k,) dataset indices; x, x_adv: (k, C, H, W) images in [0, 1].
        mask_clean, mask_adv: (k, H, W) bool activation masks on x and on x'.
        act_clean, act_adv: (k, H, W) the unit's upsampled activation S_k on x and on x'
            (where it responds even below its threshold).
        threshold: the mask threshold the masks use (T_k, or the unit's floor above it).
    """

    layer: str
    unit: int
    s: float
    concept: str
    category: str
    iou: float
    index: Tensor
    x: Tensor
    x_adv: Tensor
    mask_clean: Tensor
    mask_adv: Tensor
    act_clean: Tensor
    act_adv: Tensor
    threshold: float


class KeptActivations(Metric):
    """Images with dataset index < ``limit`` and each layer's activations on x and x'.

    Args:
        layers: number of dissected layers (``acts_<i>`` holds layer i).
        limit: keep images with dataset index below this (0: keep none).
    """

    is_differentiable = False
    full_state_update = False

    def __init__(self, layers: int, limit: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.layers, self.limit = int(layers), int(limit)
        for name in ("index", "x", "x_adv", *(f"acts_{i}" for i in range(self.layers))):
            self.add_state(name, [], dist_reduce_fx="cat")

    def update(self, index: Tensor, x: Tensor, x_adv: Tensor, acts: Sequence[Tensor]) -> None:
        """Keep the rows with ``index < limit``; ``acts[i]`` is (2N, K, h, w), clean rows
        first. A batch without such rows appends empty tensors of the right shape, so every
        process holds states of the same rank for the gather."""
        keep, n = index < self.limit, len(index)
        self.index.append(index[keep])
        self.x.append(x[keep].detach())
        self.x_adv.append(x_adv[keep].detach())
        for i, a in enumerate(acts):
            pair = torch.stack([a[:n][keep], a[n:][keep]], dim=1).detach()  # (k, 2, K, h, w)
            getattr(self, f"acts_{i}").append(pair)

    def compute(self) -> None:  # the result comes from gathered(), which keeps its shapes
        raise NotImplementedError("use KeptActivations.gathered()")

    def gathered(self) -> dict[str, Any] | None:
        """Every process's kept rows in dataset-index order, on the CPU; None when none."""
        with self.sync_context(
            dist_sync_fn=self.dist_sync_fn,
            should_sync=self._to_sync,
            should_unsync=self._should_unsync,
        ):
            if isinstance(self.index, list) and not self.index:  # a tensor once synchronised
                return None
            index = dim_zero_cat(self.index)
            if not index.numel():
                return None
            order = index.argsort()
            cat = lambda name: dim_zero_cat(getattr(self, name))[order].cpu()  # noqa: E731
            return {
                "index": index[order].cpu(),
                "x": cat("x"),
                "x_adv": cat("x_adv"),
                "acts": [cat(f"acts_{i}").float() for i in range(self.layers)],
            }


def sensitive_units(
    kept: dict[str, Any], probe: ProbeResult, units: dict[str, LayerUnits], top_units: int
) -> list[SensitiveUnit]:
    """The ``top_units`` units of largest s per layer (ties: lower unit) with their masks on
    the kept images, at the images' resolution."""
    size = tuple(kept["x"].shape[-2:])
    found = []
    for i, (name, layer) in enumerate(probe.layers.items()):
        s = units[name].s
        order = sorted(range(len(s)), key=lambda u: (-float(s[u]), u))[:top_units]
        acts = kept["acts"][i][:, :, order]  # (k, 2, U, h, w)
        thresholds, floors = layer.thresholds[order], layer.floors[order]
        s_clean, s_adv = upsample(acts[:, 0], size), upsample(acts[:, 1], size)  # (k, U, H, W)
        clean = above_threshold(s_clean, thresholds, floors)
        adv = above_threshold(s_adv, thresholds, floors)
        limits = mask_thresholds(thresholds, floors)
        for j, unit in enumerate(order):
            concept = int(layer.best_concept[unit])
            found.append(
                SensitiveUnit(
                    layer=name,
                    unit=unit,
                    s=float(s[unit]),
                    concept=probe.table.name_of(concept),
                    category=probe.table.category_of(concept),
                    iou=float(layer.best_iou[unit]),
                    index=kept["index"],
                    x=kept["x"],
                    x_adv=kept["x_adv"],
                    mask_clean=clean[:, j],
                    mask_adv=adv[:, j],
                    act_clean=s_clean[:, j].cpu(),
                    act_adv=s_adv[:, j].cpu(),
                    threshold=float(limits[j]),
                )  # fmt: skip
            )
    return found
