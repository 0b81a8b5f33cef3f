"""MNIST through torchvision: 60000 training and 10000 test grey digits of 28 px.

Files come from ``dataset.root`` as torchvision lays them out (``MNIST/raw/``), downloaded
only when ``dataset.download=true``. Every model here accepts 28 px inputs (global
pooling, small-input stems); ``image_size`` above 28 zero-pads the digits centrally (the
LeNet-5 convention for 32 px), which keeps strokes unresampled and attack budgets
comparable.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path

import torch
import torchvision
from torch import Tensor
from typing_extensions import Unpack

from pse_lightning.data.real import (
    CorruptedData,
    TorchvisionDataModule,
    TorchvisionOptions,
    uint8_images,
)
from pse_lightning.validation import require_at_least

NATIVE_SIZE = 28
# Mean and standard deviation over every pixel of the 60000 training images at 28 px.
_MEAN_28, _STD_28 = 0.1307, 0.3081


class MNISTDataModule(TorchvisionDataModule):
    """MNIST (LeCun et al., 1998): 10 classes, 1 x 28 x 28, zero-padded to ``image_size``.

    Args:
        root: folder that holds (or will hold) ``MNIST/raw/``.
        download: fetch the files with torchvision when they are missing.
        image_size: side of the images; 28 is native, larger sizes pad with zeros.
        num_val: training images held out for validation (stratified, seeded).
        probe: a datamodule with concept masks for dissection (``dataset.probe``; Broden
            needs ``grayscale: true``), or None.
        batch_size, num_workers, eval_samples, seed: see :class:`ImageDataModule`.

    Raises:
        ValueError: naming the ``dataset.<key>`` that is out of range.
    """

    name = "mnist"
    num_classes = 10
    in_channels = 1
    image_size = NATIVE_SIZE
    mean = (_MEAN_28,)
    std = (_STD_28,)
    class_names = tuple(str(d) for d in range(10))
    files = tuple(
        f"MNIST/raw/{split}-{kind}-idx{dim}-ubyte"
        for split in ("train", "t10k")
        for kind, dim in (("images", 3), ("labels", 1))
    )
    source = torchvision.datasets.MNIST.mirrors[0]
    contents = "MNIST/raw/ with the four uncompressed IDX files: " + ", ".join(
        Path(name).name for name in files
    )

    def __init__(
        self,
        *,
        image_size: int = NATIVE_SIZE,
        **options: Unpack[TorchvisionOptions],
    ) -> None:
        super().__init__(**options)
        self.image_size = require_at_least("dataset.image_size", image_size, NATIVE_SIZE)
        # Zero padding keeps every moment's sum: scale E[x] and E[x^2] by the pixel share.
        share = NATIVE_SIZE**2 / self.image_size**2
        mean = _MEAN_28 * share
        self.mean = (mean,)
        self.std = (math.sqrt((_STD_28**2 + _MEAN_28**2) * share - mean**2),)

    def fetch(self) -> None:
        torchvision.datasets.MNIST(str(self.root), train=True, download=True)

    def check_readable(self) -> None:
        """Read each IDX file's header (magic 0x0801 or 0x0803, unsigned bytes, the sizes
        of every dimension) and compare the size it declares with the file's, so a truncated
        or fake file fails before any work, naming the file (the uncompressed files have no
        published checksum)."""
        for name in self.files:
            path = self.root / name
            dims = 3 if "images" in name else 1
            with open(path, "rb") as handle:
                head = handle.read(4 + 4 * dims)
            expected = -1  # a wrong magic number or a short header: nothing to compare
            if len(head) == 4 + 4 * dims and head[:4] == bytes((0, 0, 0x08, dims)):
                expected = 4 + 4 * dims + math.prod(struct.unpack(f">{dims}I", head[4:]))
            if expected != path.stat().st_size:
                raise CorruptedData(
                    f"dataset={self.name}: {path} is not an MNIST IDX file of "
                    f"{'images' if dims == 3 else 'labels'} (its header or size is wrong: "
                    f"truncated, damaged or another file) under dataset.root={self.root}; "
                    "delete it and run with dataset.download=true on a machine that is "
                    "online, or copy a good copy there"
                )

    def load_split(self, train: bool) -> tuple[Tensor, Tensor]:
        try:
            data = torchvision.datasets.MNIST(str(self.root), train=train, download=False)
        # torchvision checks the IDX headers with asserts and dtype/shape errors.
        except (RuntimeError, ValueError, TypeError, AssertionError) as err:
            raise self.corrupted(err) from err
        images = uint8_images(data.data, channels_last=False)  # (N, 1, 28, 28)
        extra = self.image_size - NATIVE_SIZE
        if extra:
            before = extra // 2
            images = torch.nn.functional.pad(images, (before, extra - before) * 2)
        return images, data.targets.long()
