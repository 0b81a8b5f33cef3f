"""ImageNet, or any class-per-folder image tree, read with torchvision's ImageFolder.

``dataset.root`` holds ``val/<class>/<image>`` and, to train, ``train/<class>/<image>``:
evaluating a ready model (pretrained weights) needs ``val/`` only, and ``train/`` is not
even scanned then. The class list (and so the model's head) comes from the folder names of
``val/``, which ``train/`` must match. Images are decoded with PIL and converted to RGB;
training uses a random resized crop and horizontal flip, evaluation the classic
resize-then-centre-crop (256 -> 224, scaled with ``image_size``), or the exact transform of
the model's pretrained weights (Inception-v3: 342 -> 299) when the model states one
(:meth:`ImageNetDataModule.use_preprocessing`). Nothing is normalised: the model
normalises inside.

ImageNet has no public labelled test split, so ``val/`` is the evaluation (test) split,
served in a seeded class-stratified order so that ``eval_samples`` images cover the classes
evenly; the validation split for training is held out of ``train/``.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torchvision
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import transforms
from typing_extensions import Unpack

from pse_lightning.data.digits import stratified_order
from pse_lightning.data.real import (
    ProbedDataModule,
    ProbedOptions,
    missing_data_error,
    split_train_val,
)
from pse_lightning.validation import InputError, require_at_least

log = logging.getLogger(__name__)
#: The file types ImageFolder reads (torchvision's list).
IMAGE_EXTENSIONS = torchvision.datasets.folder.IMG_EXTENSIONS

#: The resize-to-crop ratio of the standard ImageNet evaluation (resize 256, crop 224).
RESIZE_RATIO = 256 / 224
LAYOUT = (
    "It should be an ImageFolder tree: val/<class>/<image> (and train/<class>/<image> to "
    "train), with the same class folders in both (for ImageNet, the wnids n01440764, ...; the "
    "official val images come in one flat folder: sort them into class folders first, "
    "e.g. with the devkit's valprep.sh). Set dataset.root to that folder"
)


class FolderSamples(Dataset):
    """``(image, class)`` of a list of ``(path, class)`` samples, decoded on access.

    Args:
        samples: (path, class index) pairs, as ImageFolder scans them.
        transform: PIL image -> (3, H, W) float tensor in [0, 1].
        loader: path -> PIL image (ImageFolder's loader converts to RGB).
    """

    def __init__(
        self,
        samples: Sequence[tuple[str, int]],
        transform: Callable[..., Tensor],
        loader: Callable[[str], object] = torchvision.datasets.folder.default_loader,
    ) -> None:
        self.samples, self.transform, self.loader = list(samples), transform, loader

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, int]:
        path, label = self.samples[i]
        return (
            self.transform(read_image(path, self.loader)),
            torch.tensor(label, dtype=torch.long),
            i,
        )


class UnreadableImage(InputError):
    """An image file of the tree that cannot be decoded (one line, naming the file)."""


def read_image(path: str, loader: Callable[[str], object]) -> object:
    """``loader(path)``; a file PIL cannot read becomes :class:`UnreadableImage` naming it."""
    try:
        return loader(path)
    except (OSError, ValueError, SyntaxError) as err:  # PIL's errors for damaged files
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UnreadableImage(
            f"dataset.root: the image {path} cannot be read ({reason}); delete or replace it "
            "(an ImageFolder tree must hold readable images only)"
        ) from err


def eval_transform(
    image_size: int, resize_size: int | None = None, interpolation: str = "bilinear"
) -> Callable[..., Tensor]:
    """Resize the short side (to ``image_size * 256 / 224`` unless given), centre-crop,
    to [0, 1]."""
    resize = resize_size or round(image_size * RESIZE_RATIO)
    mode = transforms.InterpolationMode(interpolation)
    return transforms.Compose(
        [
            transforms.Resize(resize, interpolation=mode, antialias=True),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
        ]
    )


def train_transform(image_size: int) -> Callable[..., Tensor]:
    """Random resized crop (Szegedy et al., 2015) and horizontal flip, to [0, 1]."""
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(image_size, antialias=True),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
        ]
    )


class ImageNetDataModule(ProbedDataModule):
    """ImageNet (Russakovsky et al., 2015) or any ImageFolder tree with val/ (and train/).

    Args:
        root: folder with ``val/`` (and, to train, ``train/``) class folders.
        image_size: side of the crops fed to the model (224 for ImageNet models).
        num_val: ``train/`` images held out for validation (stratified by class, seeded).
        probe: a datamodule with concept masks for dissection (``dataset.probe``, usually
            Broden), or None.
        batch_size, num_workers, eval_samples, seed: see :class:`ImageDataModule`.

    Raises:
        ValueError: naming the ``dataset.<key>`` that is out of range.
    """

    name = "imagenet"
    in_channels = 3
    image_size = 224
    # torchvision's ImageNet statistics, which its pretrained weights expect.
    mean = (0.485, 0.456, 0.406)
    std = (0.229, 0.224, 0.225)

    def __init__(
        self,
        *,
        root: str,
        image_size: int = 224,
        num_val: int = 10000,
        **common: Unpack[ProbedOptions],
    ) -> None:
        super().__init__(**common)
        self.root = Path(root).expanduser()
        self.image_size = require_at_least("dataset.image_size", image_size, 8)
        self.num_val = require_at_least("dataset.num_val", num_val, 1)
        self.resize_size: int | None = None
        self.interpolation = "bilinear"
        self._class_names: list[str] | None = None

    @property
    def class_names(self) -> Sequence[str]:  # type: ignore[override]
        """Folder names of ``val/`` (known after ``setup``)."""
        if self._class_names is None:
            raise RuntimeError(
                "ImageNetDataModule.setup() must run before the classes are known: they "
                "come from the folders of dataset.root/val"
            )
        return self._class_names

    @property
    def num_classes(self) -> int:  # type: ignore[override]
        return len(self.class_names)

    @property
    def content_fingerprint(self) -> str:
        """Class folder names and the image count of ``train/`` (after ``setup``): part of
        the checkpoint identity, since ``root`` is not (the same data may move)."""
        if self.train_set is None:
            self.setup("fit")
        classes = "\n".join(self.class_names)
        size = len(self.train_set) + len(self.val_set)
        return hashlib.sha256(f"{classes}\n{size}".encode()).hexdigest()[:16]

    def check_layout(self, fit: bool = False) -> None:
        """Raise ``FileNotFoundError`` when ``root`` lacks ``val/`` (or ``train/``, to fit)."""
        missing = [f"{split}/" for split in ("train", "val") if not (self.root / split).is_dir()]
        if "val/" in missing or (fit and missing):
            layout = LAYOUT if "val/" in missing else f"Training needs it. {LAYOUT}"
            raise FileNotFoundError(missing_data_error(self.name, self.root, missing, layout))

    def scan_classes(self) -> list[str]:
        """The class folders of ``val/`` in ImageFolder's order, without listing images."""
        self.check_layout()
        try:
            classes, _ = torchvision.datasets.folder.find_classes(str(self.root / "val"))
        except FileNotFoundError as err:
            raise FileNotFoundError(
                f"dataset={self.name}: dataset.root/val ({self.root / 'val'}) has no class "
                f"folders. {LAYOUT}"
            ) from err
        return classes

    def check_readable(self, per_class: int = 2, limit: int = 256) -> None:
        """Decode a sample of the tree's images (``per_class`` of each class folder of
        ``val/`` and ``train/``, at most ``limit`` in all), so that a damaged file is found
        before any training; raise :class:`UnreadableImage` naming the first bad one."""
        splits = [s for s in ("val", "train") if (self.root / s).is_dir()]
        folders = [
            entry
            for split in splits
            for entry in sorted(os.scandir(self.root / split), key=lambda e: e.name)
            if entry.is_dir()
        ]
        take = max(1, min(per_class, limit // max(1, len(folders))))
        checked = 0
        for folder in folders:
            found = 0
            for entry in sorted(os.scandir(folder.path), key=lambda e: e.name):
                if found == take or checked == limit:
                    break
                if entry.is_file() and entry.name.lower().endswith(IMAGE_EXTENSIONS):
                    read_image(entry.path, torchvision.datasets.folder.default_loader)
                    found, checked = found + 1, checked + 1

    def use_preprocessing(self, crop_size: int, resize_size: int, interpolation: str) -> None:
        """Serve images as the model's pretrained weights expect (their own transform).

        Called after ``setup`` by the pipeline when the model states its preprocessing;
        the crop side replaces ``dataset.image_size``.
        """
        self.image_size = require_at_least("dataset.image_size", crop_size, 8)
        self.resize_size, self.interpolation = int(resize_size), str(interpolation)
        evaluation = eval_transform(self.image_size, self.resize_size, self.interpolation)
        for split in (self.val_set, self.test_set):
            if split is not None:
                split.transform = evaluation
        if self.train_set is not None:
            self.train_set.transform = train_transform(self.image_size)

    def _scan(self, split: str) -> torchvision.datasets.ImageFolder:
        try:
            return torchvision.datasets.ImageFolder(str(self.root / split))
        except FileNotFoundError as err:  # no class folders, or a class folder without images
            raise FileNotFoundError(
                f"dataset={self.name}: dataset.root/{split} ({self.root / split}) is not a "
                f"class-per-folder image tree: {err} {LAYOUT}"
            ) from err

    def prepare_data(self) -> None:
        """Check the layout now, so a wrong ``dataset.root`` fails before any work."""
        self.check_layout()
        super().prepare_data()

    def setup(self, stage: str | None = None) -> None:
        """Scan ``val/`` (the test split) once; to fit, also ``train/``, holding ``num_val``
        of its images out for validation; set up the probe.

        Raises:
            FileNotFoundError: the layout is wrong or a tree has no images.
            ValueError: ``train/`` has other classes than ``val/``, or ``num_val`` is too
                large for ``train/``.
        """
        if self.test_set is None:
            self._setup_test()
        if self.train_set is None and stage in (None, "fit", "validate"):
            self._setup_fit()
        self.setup_probe()

    def _evaluation(self) -> Callable[..., Tensor]:
        return eval_transform(self.image_size, self.resize_size, self.interpolation)

    def _setup_test(self) -> None:
        self.check_layout()
        val_tree = self._scan("val")
        # A class-stratified order: any prefix (eval_samples) covers the classes evenly.
        order = stratified_order(torch.tensor(val_tree.targets).numpy(), self.seed)
        self.test_set = FolderSamples(
            [val_tree.samples[i] for i in order.tolist()], self._evaluation()
        )
        self._class_names = list(val_tree.classes)
        log.info(
            "imagenet: %d classes, %d test images under %s",
            len(self._class_names),
            len(self.test_set),
            self.root / "val",
        )

    def _setup_fit(self) -> None:
        self.check_layout(fit=True)
        train_tree = self._scan("train")
        if train_tree.classes != self._class_names:
            val_classes = self._class_names or []
            only_train = sorted(set(train_tree.classes) - set(val_classes))
            only_val = sorted(set(val_classes) - set(train_tree.classes))
            raise ValueError(
                f"dataset={self.name}: the class folders of {self.root / 'val'} differ "
                f"from those of {self.root / 'train'} (only in train: {only_train[:5]}, "
                f"only in val: {only_val[:5]}). {LAYOUT}"
            )
        labels = torch.tensor(train_tree.targets, dtype=torch.long)
        train, val = split_train_val(labels, self.num_val, self.seed, "dataset.num_val")
        samples = train_tree.samples
        self.train_set = FolderSamples(
            [samples[i] for i in train.tolist()], train_transform(self.image_size)
        )
        self.val_set = FolderSamples([samples[i] for i in val.tolist()], self._evaluation())
        log.info(
            "imagenet: %d train / %d val images under %s",
            len(self.train_set),
            len(self.val_set),
            self.root / "train",
        )
