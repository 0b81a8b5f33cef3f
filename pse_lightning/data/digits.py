"""Digits: scikit-learn's bundled handwritten digits, the second offline dataset.

1797 grey 8x8 images (values 0..16) of the digits 0-9 ship inside scikit-learn, so this
real dataset needs no download. They are scaled to [0, 1] and resized bilinearly to
``image_size`` so the same models and attack budgets apply as on the other datasets.
There are no concept masks, so network dissection needs another probe dataset.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from typing_extensions import Unpack

from pse_lightning.data.base import DataOptions, ImageDataModule, IndexedTensorDataset
from pse_lightning.validation import require_at_least

NUM_DIGITS = 1797  # images in sklearn.datasets.load_digits
_MIN_TRAIN = 100


def stratified_order(labels: np.ndarray, seed: int) -> np.ndarray:
    """A seeded permutation in which every prefix holds the classes in near-equal shares.

    Each sample gets the key (rank within its class + 0.5) / class size, ranks drawn at
    random; sorting by that key interleaves the classes, so the first n samples hold
    round(n * share) of each class up to one. Splits cut from this order are stratified
    for any sizes, which sklearn's ``train_test_split`` is not for splits smaller than the
    number of classes.

    Args:
        labels: (N,) integer class labels.
        seed: seed of the random ranks.

    Returns:
        (N,) int64 permutation of ``range(N)``.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed % 2**64, 7]))
    perm = rng.permutation(len(labels))
    key = np.empty(len(labels), dtype=np.float64)
    for c in np.unique(labels):  # a loop over the 10 classes, not over samples
        members = perm[labels[perm] == c]  # this class, in random order
        key[members] = (np.arange(len(members)) + 0.5) / len(members)
    tie = np.empty(len(labels), dtype=np.int64)
    tie[perm] = np.arange(len(labels))
    return np.lexsort((tie, key))


class DigitsDataModule(ImageDataModule):
    """Handwritten digits 0-9, grey, resized to ``image_size``, split test/val/train.

    The test split takes the first ``num_test`` images of a seeded stratified order, the
    val split the next ``num_val``, and train the rest (1797 - num_val - num_test).

    Args:
        image_size: side of the resized square images in pixels (>= 8).
        num_val, num_test: images in the val and test splits.
        batch_size, num_workers, eval_samples, seed: see :class:`ImageDataModule`.

    Raises:
        ValueError: naming the ``dataset.<key>`` that is out of range.
    """

    name = "digits"
    num_classes = 10
    in_channels = 1
    image_size = 32
    # Statistics of all 1797 images at 32 px, fixed so the model can be built before setup.
    mean = (0.3053,)
    std = (0.3236,)
    class_names = tuple(str(d) for d in range(10))

    def __init__(
        self,
        *,
        image_size: int = 32,
        num_val: int = 180,
        num_test: int = 360,
        **common: Unpack[DataOptions],
    ) -> None:
        super().__init__(**common)
        self.image_size = require_at_least("dataset.image_size", image_size, 8)
        self.num_val = require_at_least("dataset.num_val", num_val, 1)
        self.num_test = require_at_least("dataset.num_test", num_test, 1)
        if num_val + num_test > NUM_DIGITS - _MIN_TRAIN:
            raise ValueError(
                f"dataset.num_val + dataset.num_test must be <= {NUM_DIGITS - _MIN_TRAIN} "
                f"(leaving {_MIN_TRAIN} of the {NUM_DIGITS} digits to train on), got "
                f"{num_val} + {num_test}"
            )

    def load_tensors(self) -> tuple[Tensor, Tensor]:
        """All digits as images (1797, 1, S, S) float32 in [0, 1] and labels (1797,) long."""
        from sklearn.datasets import load_digits  # here: 0.3 s to import, only this set needs it

        digits = load_digits()
        x = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]
        if self.image_size != 8:
            x = F.interpolate(
                x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False
            )
        return x.clamp_(0.0, 1.0), torch.from_numpy(digits.target.astype(np.int64))

    def setup(self, stage: str | None = None) -> None:
        """Resize and split (deterministic from ``seed``; under a second to rebuild)."""
        if self.train_set is not None:
            return
        x, y = self.load_tensors()
        order = torch.from_numpy(stratified_order(y.numpy(), self.seed))
        test = order[: self.num_test]
        val = order[self.num_test : self.num_test + self.num_val]
        train = order[self.num_test + self.num_val :]
        self.train_set = IndexedTensorDataset(x[train], y[train])
        self.val_set = IndexedTensorDataset(x[val], y[val])
        self.test_set = IndexedTensorDataset(x[test], y[test])
