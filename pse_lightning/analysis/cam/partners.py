"""Another evaluated image of the same class: the source of the same-class null mask.

The same-class null (docs/METHODS.md §3.8) scores an image's perturbation against the CAM
mask of the same class on a different image of that class. Masks of one class share its
typical place and spread on the image, so a perturbation that is merely centre-biased (or
biased wherever that class's maps lie) scores alike on both, where the other-class null
would still see an effect when the true class's maps are more concentrated than others'.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset

from pse_lightning.core.randomness import uniform

_SAME_CLASS_STREAM = 8  # randomness stream of the partner draw (core.randomness)


def evaluation_labels(dataset: Dataset | None) -> Tensor | None:
    """(N,) labels of an evaluation split whose dataset index is its position (the
    project's tensor datasets and image folders), or None when they cannot be read
    without loading every image."""
    if isinstance(dataset, Subset):
        base = evaluation_labels(dataset.dataset)
        if base is None:
            return None
        return base[torch.as_tensor(list(dataset.indices), dtype=torch.long)]
    if getattr(dataset, "offset", 0) != 0:
        return None
    labels = getattr(dataset, "labels", None)
    if isinstance(labels, Tensor):
        return labels.long()
    samples = getattr(dataset, "samples", None)
    if samples is not None:
        return torch.tensor([int(label) for _, label in samples], dtype=torch.long)
    return None


class SameClassPartners:
    """Draws, for each evaluated image, another evaluated image of its class.

    The draw is uniform over the other images of the class and depends only on (seed,
    dataset index), so an image gets the same partner under any batching or process count.

    Args:
        dataset: the evaluation split (``x, y, index`` items, index = position).
        labels: (N,) its labels (:func:`evaluation_labels`).
        seed: the analysis seed.
    """

    def __init__(self, dataset: Any, labels: Tensor, seed: int) -> None:
        self.dataset, self.labels, self.seed = dataset, labels.long(), int(seed)
        self.order = self.labels.argsort(stable=True)  # positions grouped by class
        counts = torch.bincount(self.labels)
        self.count, self.start = counts, counts.cumsum(0) - counts
        rank = torch.empty_like(self.order)
        rank[self.order] = torch.arange(len(self.labels)) - self.start[self.labels[self.order]]
        self.rank = rank  # each image's place within its class

    def partners(self, index: Tensor) -> Tensor:
        """(N,) the partner's position for each dataset index; -1 where the class has no
        other evaluated image."""
        index = index.cpu().long()
        y = self.labels[index]
        free = self.count[y] - 1
        u = uniform(index, (1,), self.seed, _SAME_CLASS_STREAM)[:, 0]
        r = torch.minimum((u * free).long(), (free - 1).clamp_min(0))
        r = r + (r >= self.rank[index]).long()  # skip the image itself
        j = self.order[(self.start[y] + r).clamp_max(len(self.order) - 1)]
        return torch.where(free > 0, j, -1)

    def images(self, partners: Tensor, like: Tensor) -> Tensor:
        """The partner images (N, C, H, W) on ``like``'s device; zeros where there is none."""
        rows = [
            self.dataset[int(j)][0] if j >= 0 else torch.zeros(like.shape[1:])
            for j in partners.tolist()
        ]
        return torch.stack(rows).to(device=like.device, dtype=like.dtype)
