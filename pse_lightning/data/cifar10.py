"""CIFAR-10 through torchvision: 50000 training and 10000 test colour images of 32 px.

Files come from ``dataset.root`` as torchvision lays them out (``cifar-10-batches-py/``),
downloaded only when ``dataset.download=true``. Images stay uint8 in memory (150 MB) and
reach the model in [0, 1]; the training split gets the standard random 4-pixel-shift crop
and horizontal flip.
"""

from __future__ import annotations

import torch
import torchvision
from torch import Tensor
from torch.utils.data import Dataset
from typing_extensions import Unpack

from pse_lightning.data.base import IndexedTensorDataset
from pse_lightning.data.real import (
    AugmentedTensorDataset,
    CorruptedData,
    TorchvisionDataModule,
    TorchvisionOptions,
    uint8_images,
)

FOLDER = "cifar-10-batches-py"
CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)


class CIFAR10DataModule(TorchvisionDataModule):
    """CIFAR-10 (Krizhevsky, 2009): 10 classes, 3 x 32 x 32.

    Args:
        root: folder that holds (or will hold) ``cifar-10-batches-py/``.
        download: fetch the archive with torchvision when the files are missing.
        num_val: training images held out for validation (stratified, seeded).
        augment: random crop (4-pixel padding) and horizontal flip on the training split.
        probe: a datamodule with concept masks for dissection (``dataset.probe``), or None.
        batch_size, num_workers, eval_samples, seed: see :class:`ImageDataModule`.

    Raises:
        ValueError: naming the ``dataset.<key>`` that is out of range.
    """

    name = "cifar10"
    num_classes = 10
    in_channels = 3
    image_size = 32
    # Per-channel mean and standard deviation over every pixel of the 50000 training images.
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)
    class_names = CLASSES
    files = (
        *(f"{FOLDER}/data_batch_{i}" for i in range(1, 6)),
        f"{FOLDER}/test_batch",
        f"{FOLDER}/batches.meta",
    )
    source = torchvision.datasets.CIFAR10.url
    contents = f"{FOLDER}/ with data_batch_1 to data_batch_5, test_batch and batches.meta"

    def __init__(
        self,
        *,
        augment: bool = True,
        **options: Unpack[TorchvisionOptions],
    ) -> None:
        super().__init__(**options)
        if not isinstance(augment, bool):
            raise ValueError(f"dataset.augment must be true or false, got {augment!r}")
        self.augment = augment

    def fetch(self) -> None:
        torchvision.datasets.CIFAR10(str(self.root), train=True, download=True)

    def check_readable(self) -> None:
        """Compare each file's MD5 checksum with torchvision's, so a truncated, damaged or
        fake file fails before any work, naming the file (torchvision itself would only say
        "not found or corrupted" once the data is set up)."""
        from torchvision.datasets.utils import check_integrity

        data = torchvision.datasets.CIFAR10
        expected = [*data.train_list, *data.test_list, [data.meta["filename"], data.meta["md5"]]]
        for name, md5 in expected:
            path = self.root / FOLDER / name
            if not check_integrity(str(path), md5):
                raise CorruptedData(
                    f"dataset={self.name}: {path} is not torchvision's {FOLDER}/{name} (its "
                    "MD5 checksum differs: truncated, damaged or another file) under "
                    f"dataset.root={self.root}; delete it and run with dataset.download=true "
                    "on a machine that is online, or copy a good copy there"
                )

    def load_split(self, train: bool) -> tuple[Tensor, Tensor]:
        try:
            data = torchvision.datasets.CIFAR10(str(self.root), train=train, download=False)
        except RuntimeError as err:  # torchvision's MD5 check failed
            raise self.corrupted(err) from err
        images = uint8_images(data.data, channels_last=True)  # (N, 32, 32, 3) in the files
        return images, torch.as_tensor(data.targets, dtype=torch.long)

    def train_dataset(self, images: Tensor, labels: Tensor) -> Dataset:
        if self.augment:
            return AugmentedTensorDataset(images, labels, pad=4, flip=True)
        return IndexedTensorDataset(images, labels)
