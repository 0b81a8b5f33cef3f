"""The datamodule contract every dataset follows.

Batches are ``(x, y, index)``: images in [0, 1] (never normalised: normalisation lives in
the model), integer labels, and each sample's dataset index. The index keys per-sample
randomness in attacks and lets evaluation under DDP count every sample exactly once.
Probe batches for network dissection are ``(x, concept_labels, index)`` where
``concept_labels`` is (N, n_categories, H, W) long: per pixel and category the global
concept id (0 means "no concept of this category here").
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TypedDict

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from pse_lightning.core.distributed import rank_world
from pse_lightning.validation import require_at_least

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Concept:
    """A visual concept for dissection: its name and its category (object, colour...)."""

    name: str
    category: str


class IndexedTensorDataset(Dataset):
    """Images (N, C, H, W) uint8 or float and labels (N,), yielding (x in [0,1], y, index)."""

    def __init__(self, images: Tensor, labels: Tensor, offset: int = 0) -> None:
        self.images = images
        self.labels = labels.long()
        self.offset = offset

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, int]:
        x = self.images[i]
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        return x, self.labels[i], self.offset + i


class ShardSampler(Sampler[int]):
    """Rank r of W takes indices r, r+W, r+2W, ...: no padding, no duplicates.

    torch's DistributedSampler pads the last shard with repeated samples (pytorch #25162),
    which would count some samples twice in evaluation metrics.
    """

    def __init__(self, length: int, rank: int, world_size: int) -> None:
        self.length, self.rank, self.world_size = length, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world_size))


class DataOptions(TypedDict, total=False):
    """The keywords every datamodule takes, declared once: a subclass's constructor ends
    with ``**common: Unpack[DataOptions]`` (or a larger options dict) and passes them on
    to ``ImageDataModule.__init__`` (which documents them); the static config check follows
    ``**common`` there."""

    batch_size: int
    num_workers: int
    eval_samples: int | None
    seed: int


class ImageDataModule(pl.LightningDataModule):
    """Base datamodule: splits, loaders and the facts models need about the images.

    Subclasses set ``train_set``, ``val_set``, ``test_set`` (datasets yielding
    ``(x, y, index)``) in ``setup`` and fill the class attributes below.

    Args:
        batch_size: images per batch for every loader.
        num_workers: DataLoader worker processes.
        eval_samples: evaluate attacks on the first ``eval_samples`` test images only
            (null for the whole test split).
        seed: seed for splits, generation and (unless ``shuffle_seed`` is set) training
            shuffles.

    Attributes:
        shuffle_seed: seed of the training shuffle when it is not ``seed``: the pipeline sets
            it to the run's ``seed`` (the training randomness), while ``seed`` is the config's
            ``data_seed``, so training replicates share their data and test images.
    """

    name: str = "base"
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: Sequence[str]
    concepts: Sequence[Concept] = ()
    categories: Sequence[str] = ()
    #: Categories whose concepts are the class labels (dissection: class-selective units).
    class_categories: Sequence[str] = ()

    def __init__(
        self,
        *,
        batch_size: int = 128,
        num_workers: int = 0,
        eval_samples: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.batch_size = require_at_least("dataset.batch_size", batch_size, 1)
        self.num_workers = require_at_least("dataset.num_workers", num_workers, 0)
        if eval_samples is not None:
            require_at_least("dataset.eval_samples", eval_samples, 1)
        self.eval_samples = eval_samples
        self._told_cap = False
        self.seed = int(seed)
        self.shuffle_seed: int | None = None
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    @property
    def training_seed(self) -> int:
        """The seed of the training shuffle: ``shuffle_seed``, else ``seed``."""
        return self.seed if self.shuffle_seed is None else int(self.shuffle_seed)

    # Loaders -------------------------------------------------------------------------------

    def _loader(self, dataset: Dataset, *, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before its loaders")
        rank, world = rank_world()
        if shuffle:
            # For any world size (1 included: no process group needed, no padding): Lightning
            # calls set_epoch, so each epoch's order is a function of (seed, epoch) only and a
            # resumed training sees the orders of an uninterrupted one.
            sampler = torch.utils.data.DistributedSampler(
                dataset, num_replicas=world, rank=rank, shuffle=True, seed=self.training_seed
            )
            return DataLoader(
                dataset, self.batch_size, sampler=sampler, num_workers=self.num_workers
            )
        sampler = ShardSampler(len(dataset), rank, world)
        return DataLoader(dataset, self.batch_size, sampler=sampler, num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """The evaluation split, limited to ``eval_samples``, sharded without padding."""
        dataset = self.test_set
        if self.eval_samples is not None and dataset is not None:
            if self.eval_samples > len(dataset) and not self._told_cap and rank_world()[0] == 0:
                self._told_cap = True  # once, however often the loader is made
                log.warning(
                    "dataset.eval_samples=%d is more than the %d test images of dataset=%s: "
                    "evaluating all %d",
                    self.eval_samples,
                    len(dataset),
                    self.name,
                    len(dataset),
                )
            dataset = torch.utils.data.Subset(dataset, range(min(self.eval_samples, len(dataset))))
        return self._loader(dataset, shuffle=False)

    def probe_dataloader(self) -> DataLoader:
        """Images with per-pixel concept labels for network dissection."""
        raise NotImplementedError(
            f"dataset={self.name} has no concept masks for network dissection; use "
            "dataset=shapes (built in) or point analysis.probe at a Broden dataset"
        )
