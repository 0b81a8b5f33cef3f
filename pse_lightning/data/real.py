"""What the real-data datamodules (CIFAR-10, MNIST, ImageNet folders, Broden) share.

- Clear failures: a missing dataset names the path, what belongs there and the fix; a
  download that fails (offline machine, firewall) says so instead of a bare URLError.
- :class:`ProbedDataModule`: a classification datamodule that may carry a second datamodule
  as its dissection probe set (``dataset.probe``, usually Broden). Network dissection reads
  ``concepts``, ``categories`` and ``probe_dataloader()`` from the run's datamodule, so the
  classification data and the concept data travel together and the pipeline needs no
  separate probe config.
- :class:`AugmentedTensorDataset`: the standard random crop and flip on uint8 tensors.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from typing_extensions import Required, Unpack

from pse_lightning.core.locks import cache_lock
from pse_lightning.data.base import Concept, DataOptions, ImageDataModule, IndexedTensorDataset
from pse_lightning.data.digits import stratified_order
from pse_lightning.validation import InputError, require_at_least

log = logging.getLogger(__name__)

#: ``dataset.probe`` override that adds the Broden probe set to a classification dataset.
PROBE_OVERRIDE = "+dataset@dataset.probe=broden dataset.probe.root=<broden folder>"


def missing_data_error(
    name: str, root: Path, missing: Iterable[str], layout: str, key: str = "dataset.root"
) -> str:
    """The message for a dataset whose files are not at its root folder.

    Args:
        name: the dataset choice (``cifar10``...).
        root: the resolved root folder.
        missing: the missing files or folders, relative to ``root``.
        layout: what the folder should hold and how to get it.
        key: the config key of the root folder.
    """
    missing = list(missing)
    shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
    return f"dataset={name}: {shown} missing under {key}={root}. {layout}"


def run_download(name: str, root: Path, source: str, download: Callable[[], Any]) -> None:
    """Run a torchvision download, turning network failures into an actionable error.

    torchvision raises ``URLError`` (an ``OSError``) from a failed fetch, or, for MNIST,
    a ``RuntimeError`` after every mirror failed; both mean the files did not arrive.

    Raises:
        RuntimeError: the download failed; names the URL, the target folder and the fix.
    """
    log.info("downloading %s from %s into %s", name, source, root)
    root.mkdir(parents=True, exist_ok=True)
    try:
        download()
    except (OSError, RuntimeError) as err:
        raise RuntimeError(
            f"dataset={name}: dataset.download=true could not fetch {source} into "
            f"dataset.root={root} ({type(err).__name__}: {err}). This machine may be "
            "offline: run once with dataset.download=true on a machine that is online and "
            f"copy {root} here, or point dataset.root at an existing copy"
        ) from err


def split_train_val(labels: Tensor, num_val: int, seed: int, key: str) -> tuple[Tensor, Tensor]:
    """Hold ``num_val`` samples of a training set out for validation, stratified by class.

    Returns:
        (train indices, val indices), each sorted ascending.

    Raises:
        ValueError: ``num_val`` leaves fewer than one training sample per class.
    """
    n, classes = len(labels), int(labels.max()) + 1 if len(labels) else 0
    if num_val > n - classes:
        raise ValueError(
            f"{key} must be <= {n - classes} (the training set has {n} images in "
            f"{classes} classes), got {num_val}"
        )
    order = torch.from_numpy(stratified_order(labels.numpy(), seed))
    return order[num_val:].sort().values, order[:num_val].sort().values


class AugmentedTensorDataset(IndexedTensorDataset):
    """uint8 images (N, C, H, W) with a random ``pad``-pixel-shift crop and horizontal flip.

    The standard CIFAR training augmentation (He et al., 2016). It draws from torch's
    global generator, which Lightning seeds per worker; evaluation splits never augment.
    """

    def __init__(self, images: Tensor, labels: Tensor, pad: int = 4, flip: bool = True) -> None:
        super().__init__(images, labels)
        self.pad, self.flip = pad, flip

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, int]:
        x, y, index = super().__getitem__(i)
        if self.pad:
            h, w = x.shape[-2:]
            padded = torch.nn.functional.pad(x, (self.pad,) * 4)
            dy, dx = torch.randint(0, 2 * self.pad + 1, (2,)).tolist()
            x = padded[:, dy : dy + h, dx : dx + w]
        if self.flip and bool(torch.rand(()) < 0.5):
            x = x.flip(-1)
        return x, y, index


class ProbedOptions(DataOptions, total=False):
    """:class:`DataOptions` and the ``probe`` of a :class:`ProbedDataModule`."""

    probe: ImageDataModule | None


class TorchvisionOptions(ProbedOptions, total=False):
    """:class:`ProbedOptions` and the files of a :class:`TorchvisionDataModule`."""

    root: Required[str]
    download: bool
    num_val: int


class ProbedDataModule(ImageDataModule):
    """A classification datamodule that may carry a probe datamodule for dissection.

    With ``probe`` set (Hydra instantiates ``dataset.probe`` first, for example
    ``+dataset@dataset.probe=broden``), :attr:`concepts`, :attr:`categories` and
    :meth:`probe_dataloader` come from it, and ``prepare_data``/``setup`` prepare it too.
    The probe only changes what dissection reads: training and evaluation batches are the
    classification dataset's alone.

    Args:
        probe: a datamodule with concept masks (Broden, or shapes), or None.
        batch_size, num_workers, eval_samples, seed: see :class:`ImageDataModule`.

    Raises:
        TypeError: ``probe`` is not a datamodule.
    """

    def __init__(
        self,
        *,
        probe: ImageDataModule | None = None,
        **common: Unpack[DataOptions],
    ) -> None:
        super().__init__(**common)
        if probe is not None and not isinstance(probe, ImageDataModule):
            raise TypeError(
                "dataset.probe must be a datamodule config with a _target_ (add one with "
                f"{PROBE_OVERRIDE}), got {type(probe).__name__}"
            )
        self.probe = probe
        self._probe_ready = False

    @property
    def concepts(self) -> Sequence[Concept]:  # type: ignore[override]
        return () if self.probe is None else self.probe.concepts

    @property
    def categories(self) -> Sequence[str]:  # type: ignore[override]
        return () if self.probe is None else self.probe.categories

    def prepare_data(self) -> None:
        """Check or fetch the probe's files (Lightning calls this on local rank 0)."""
        if self.probe is not None:
            self.probe.prepare_data()

    def setup_probe(self) -> None:
        """Load the probe set (once) and check that the model can read its images."""
        if self.probe is None or self._probe_ready:
            return
        self.probe.setup("probe")
        if self.probe.in_channels != self.in_channels:
            raise ValueError(
                f"dataset.probe yields {self.probe.in_channels}-channel images but "
                f"dataset={self.name} has {self.in_channels}-channel images; for Broden set "
                f"dataset.probe.grayscale={str(self.in_channels == 1).lower()}"
            )
        if self.probe.image_size != self.image_size:
            log.warning(
                "dataset.probe images are %d px, the model is trained on %d px images; "
                "dissection runs at the probe's size (set dataset.probe.image_size=%d to match)",
                self.probe.image_size,
                self.image_size,
                self.image_size,
            )
        self._probe_ready = True

    def probe_dataloader(self) -> DataLoader:
        """The probe set's loader; without a probe, the base class's explanation."""
        if self.probe is None:
            raise NotImplementedError(
                f"dataset={self.name} has no concept masks for network dissection; add a "
                f"probe set: {PROBE_OVERRIDE}"
            )
        return self.probe.probe_dataloader()


def uint8_images(array: np.ndarray | Tensor, channels_last: bool) -> Tensor:
    """(N, C, H, W) contiguous uint8 tensor from (N, H, W, C) or (N, H, W) arrays."""
    x = torch.as_tensor(array)
    if x.dim() == 3:
        x = x[:, None]
    elif channels_last:
        x = x.permute(0, 3, 1, 2)
    return x.contiguous()


class CorruptedData(InputError, RuntimeError):
    """Data files that exist but cannot be read or verified: the user's to replace (one
    line, no traceback, on the command line)."""


class TorchvisionDataModule(ProbedDataModule):
    """A small torchvision dataset held in memory: train/val split of the training set.

    Subclasses name their files (relative to ``root``), how to fetch them and how to load
    one split as uint8 images. The test split is torchvision's test set in its own order
    (so ``eval_samples`` takes the same images as other libraries' "first N test images");
    the val split holds ``num_val`` training images out, stratified by class and seeded.

    Args:
        root: folder holding the files (as torchvision lays them out).
        download: fetch missing files with torchvision (needs a network); false fails at
            once with a message saying what to put where.
        num_val: training images held out for validation.
        probe, batch_size, num_workers, eval_samples, seed: see :class:`ProbedDataModule`.
    """

    #: Files the dataset needs, relative to ``root``.
    files: tuple[str, ...] = ()
    #: Where torchvision downloads from (for messages).
    source: str = ""
    #: The files in words (for messages).
    contents: str = ""

    def __init__(
        self,
        *,
        root: str,
        download: bool = False,
        num_val: int = 5000,
        **common: Unpack[ProbedOptions],
    ) -> None:
        super().__init__(**common)
        if not isinstance(download, bool):
            raise ValueError(f"dataset.download must be true or false, got {download!r}")
        self.root = Path(root).expanduser()
        self.download = download
        self.num_val = require_at_least("dataset.num_val", num_val, 1)

    # Subclass hooks ----------------------------------------------------------------------

    def fetch(self) -> None:
        """Download the files into ``root`` (torchvision's own downloader)."""
        raise NotImplementedError

    def load_split(self, train: bool) -> tuple[Tensor, Tensor]:
        """One split as images (N, C, H, W) uint8 and labels (N,) long."""
        raise NotImplementedError

    def train_dataset(self, images: Tensor, labels: Tensor) -> Dataset:
        """The training split's dataset (subclasses add augmentation)."""
        return IndexedTensorDataset(images, labels)

    # Files -------------------------------------------------------------------------------

    def missing_files(self) -> list[str]:
        """The needed files that are not under ``root`` (relative paths)."""
        return [name for name in self.files if not (self.root / name).is_file()]

    def layout(self) -> str:
        """What belongs under ``root`` and how to get it there (ends the error message)."""
        return (
            f"It should hold torchvision's {self.name} files ({self.contents}). Run "
            f"once with dataset.download=true on a machine that is online (torchvision fetches "
            f"{self.source}), or copy those files there, or set dataset.root to a folder "
            "that has them"
        )

    def check_files(self) -> None:
        """Raise ``FileNotFoundError`` naming what is missing where, and the fix."""
        missing = self.missing_files()
        if missing:
            raise FileNotFoundError(
                missing_data_error(self.name, self.root, missing, self.layout())
            )

    def prepare_data(self) -> None:
        """Download when asked and needed; otherwise only check that the files are there."""
        if self.missing_files() and self.download:
            # Concurrent jobs download once; the others wait and find the files there.
            with cache_lock(self.root / f"{self.name}-download", "to finish downloading"):
                if self.missing_files():
                    run_download(self.name, self.root, self.source, self.fetch)
        self.check_files()
        super().prepare_data()

    def setup(self, stage: str | None = None) -> None:
        """Load both splits into memory (once), split val from train, set up the probe."""
        if self.train_set is None:
            self.check_files()
            x_train, y_train = self.load_split(train=True)
            x_test, y_test = self.load_split(train=False)
            train, val = split_train_val(y_train, self.num_val, self.seed, "dataset.num_val")
            self.train_set = self.train_dataset(x_train[train], y_train[train])
            self.val_set = IndexedTensorDataset(x_train[val], y_train[val])
            self.test_set = IndexedTensorDataset(x_test, y_test)
        self.setup_probe()

    def corrupted(self, err: Exception) -> RuntimeError:
        """The error for files that exist but torchvision cannot read or verify."""
        return CorruptedData(
            f"dataset={self.name}: torchvision could not load the files under "
            f"dataset.root={self.root} ({err}); they are incomplete or corrupted. Delete "
            "them and run with dataset.download=true on a machine that is online, or copy a "
            "good copy there"
        )
