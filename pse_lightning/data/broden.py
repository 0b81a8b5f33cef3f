"""Broden (Bau et al., 2017): the concept probe set of network dissection.

Broden merges ADE20K, Pascal-Context, Pascal-Part, OpenSurfaces, DTD and colour-labelled
images, with per-pixel labels in six categories (colour, object, part, material, scene,
texture). This module reads the folder NetDissect-Lite downloads (``broden1_224`` or
``broden1_227``) as it is laid out:

- ``index.csv``: one row per image: ``image`` (path under ``images/``), ``split``, ``ih``,
  ``iw``, ``sh``, ``sw`` (image and segmentation sizes), then one column per category with
  ``;``-separated entries, each either a segmentation PNG (path under ``images/``) or a
  label number that holds for the whole image (scenes, textures);
- ``category.csv``: the categories (``name`` column), in order;
- ``c_<category>.csv``: the labels of one category: ``code`` (dense within the category),
  ``number`` (the global label number), ``name``, ``frequency``, ``coverage``;
- ``label.csv``: every global label number with its name (not needed here);
- segmentation PNGs encode the global label number of each pixel as ``R + 256 * G``
  (0: unlabelled).

It yields probe batches ``(x, concept_labels, index)`` exactly like the shapes probe split:
``x`` (N, C, image_size, image_size) in [0, 1], ``concept_labels`` (N, n_categories,
mask_size, mask_size) long holding global concept ids, one concept list for all
categories (:attr:`concepts`, id = position + 1). A concept is a (label, category) pair, so
a label that Broden lists in two categories (``door`` as object and as part) is two
concepts, each with one category, as dissection's per-category statistics need.

Each category channel holds one concept per pixel: where an image has several PNG layers
of one category (overlapping parts), the first listed layer wins at overlapping pixels. A
pixel number that the category's ``c_`` file does not list counts as unlabelled, as in
NetDissect-Lite's dense category maps.

Broden has no class labels: it is a probe set only. Use it as the ``probe`` of a
classification dataset (``+dataset@dataset.probe=broden``); as the run's main dataset it
fails at ``setup`` with that advice.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from pse_lightning.data.base import Concept, ImageDataModule
from pse_lightning.data.real import PROBE_OVERRIDE, missing_data_error
from pse_lightning.validation import require_at_least

log = logging.getLogger(__name__)

#: index.csv columns that describe the image rather than a category.
META_COLUMNS = ("image", "split", "ih", "iw", "sh", "sw")
ROOT_KEY = "dataset.probe.root"
LAYOUT = (
    "It should hold Broden as NetDissect-Lite uses it: index.csv, category.csv, "
    "c_<category>.csv for each category, and images/ with the images and segmentation "
    "PNGs that index.csv lists. On a machine that is online, download "
    "http://netdissect.csail.mit.edu/data/broden1_224.zip (broden1_227.zip for 227 px), "
    f"unzip it, and set {ROOT_KEY} (dataset.root when it is the main dataset) to the "
    "unzipped broden1_224 folder"
)
_CLASSIFICATION_STAGES = ("fit", "validate", "test", "predict")

#: One category entry of an index row: a whole-image label number or a PNG path.
Entry = int | str


def probe_only_error(what: str) -> ValueError:
    """Broden cannot be trained or evaluated on: it has concept masks, not classes."""
    return ValueError(
        f"dataset=broden is a probe set for network dissection and has no class labels, so "
        f"it cannot {what}. Choose a classification dataset and add Broden as its probe: "
        f"dataset=imagenet dataset.root=<imagenet folder> {PROBE_OVERRIDE}"
    )


@dataclass(frozen=True)
class BrodenImage:
    """One index.csv row: the image path and, per chosen category, its entries."""

    image: str
    split: str
    entries: tuple[tuple[Entry, ...], ...]


def parse_entries(value: str | None) -> tuple[Entry, ...]:
    """``"a.png;b.png"`` -> ("a.png", "b.png"); ``"17"`` -> (17,); empty -> ()."""
    items = [item for item in (value or "").split(";") if item]
    return tuple(int(item) if item.isdigit() else item for item in items)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def nearest_resize(layer: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour resize of an (h, w) label map to (size, size), pixel centres."""
    h, w = layer.shape
    if (h, w) == (size, size):
        return layer
    rows = np.minimum(((np.arange(size) + 0.5) * h / size).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(size) + 0.5) * w / size).astype(np.int64), w - 1)
    return layer[np.ix_(rows, cols)]


def decode_label_png(path: Path) -> np.ndarray:
    """Global label numbers (h, w) int64 of a Broden segmentation PNG: R + 256 * G."""
    with Image.open(path) as image:
        rgb = np.asarray(image.convert("RGB"), dtype=np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1]


class BrodenProbeDataset(Dataset):
    """Yields (x in [0, 1] (C, S, S), concept labels (n_categories, M, M) long, index).

    Args:
        root: the Broden folder.
        rows: the images to serve, in order (index = position).
        lookups: per category, global label number -> concept id (0: not in the category).
        image_size: S, the side images are resized to (bilinear) when they differ.
        mask_size: M, the side label maps are resized to (nearest) when they differ.
        grayscale: serve one luminance channel instead of RGB.
    """

    def __init__(
        self,
        root: Path,
        rows: Sequence[BrodenImage],
        lookups: Sequence[np.ndarray],
        image_size: int,
        mask_size: int,
        grayscale: bool,
    ) -> None:
        self.root, self.rows, self.lookups = root, list(rows), list(lookups)
        self.image_size, self.mask_size, self.grayscale = image_size, mask_size, grayscale

    def __len__(self) -> int:
        return len(self.rows)

    def concept_ids(self, category: int, numbers: np.ndarray | int) -> np.ndarray:
        """Map global label numbers to concept ids of one category (0 where unlisted)."""
        lut = self.lookups[category]
        numbers = np.asarray(numbers, dtype=np.int64)
        inside = (numbers >= 0) & (numbers < len(lut))
        return np.where(inside, lut[np.clip(numbers, 0, len(lut) - 1)], 0)

    def image(self, row: BrodenImage) -> Tensor:
        with Image.open(self.root / "images" / row.image) as image:
            image = image.convert("L" if self.grayscale else "RGB")
            size = (self.image_size, self.image_size)
            if image.size != size:
                image = image.resize(size, Image.Resampling.BILINEAR)
            pixels = np.asarray(image, dtype=np.uint8)
        x = torch.from_numpy(pixels.copy())
        x = x[None] if x.dim() == 2 else x.permute(2, 0, 1)
        return x.float() / 255.0

    def labels(self, row: BrodenImage) -> Tensor:
        m = self.mask_size
        out = np.zeros((len(row.entries), m, m), dtype=np.int64)
        for g, entries in enumerate(row.entries):
            for entry in entries:
                if isinstance(entry, int):
                    layer = np.full((m, m), self.concept_ids(g, entry), dtype=np.int64)
                else:
                    numbers = decode_label_png(self.root / "images" / entry)
                    layer = nearest_resize(self.concept_ids(g, numbers), m)
                out[g] = np.where(out[g] == 0, layer, out[g])  # the first layer wins
        return torch.from_numpy(out)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, int]:
        row = self.rows[i]
        return self.image(row), self.labels(row), i


class BrodenDataModule(ImageDataModule):
    """The Broden probe set for network dissection (no classes: probe batches only).

    Args:
        root: the Broden folder (``broden1_224``: index.csv, category.csv, c_*.csv,
            images/).
        categories: categories to label, in this order (null: all of category.csv).
        split: keep only images of this index.csv split (``train``/``val``; null: all).
        image_size: side the images are served at (224 for broden1_224); match the model's
            input size.
        mask_size: side of the label maps (112: broden1_224's segmentation size).
        grayscale: one luminance channel, for grey models (MNIST).
        batch_size, num_workers: of the probe loader.

    Raises:
        ValueError: naming the ``dataset.<key>`` that is out of range.
    """

    name = "broden"
    in_channels = 3
    image_size = 224
    mean = (0.485, 0.456, 0.406)
    std = (0.229, 0.224, 0.225)
    class_names: Sequence[str] = ()

    def __init__(
        self,
        *,
        root: str,
        categories: Sequence[str] | None = None,
        split: str | None = None,
        image_size: int = 224,
        mask_size: int = 112,
        grayscale: bool = False,
        shuffle: bool = True,
        seed: int = 0,
        batch_size: int = 64,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        if not isinstance(shuffle, bool):
            raise ValueError(f"dataset.shuffle must be true or false, got {shuffle!r}")
        # index.csv is grouped by source dataset (ADE, Pascal, textures...): a seeded order
        # makes any prefix (analysis.dissection.max_probe_images) a uniform random subset.
        self.shuffle, self.seed = shuffle, int(seed)
        self.root = Path(root).expanduser()
        if categories is not None and (isinstance(categories, str) or not len(categories)):
            raise ValueError(
                "dataset.categories must be a non-empty list of Broden categories or null "
                f"(all), got {categories!r}"
            )
        self.wanted = None if categories is None else [str(c) for c in categories]
        self.split = None if split is None else str(split)
        self.image_size = require_at_least("dataset.image_size", image_size, 8)
        self.mask_size = require_at_least("dataset.mask_size", mask_size, 1)
        if not isinstance(grayscale, bool):
            raise ValueError(f"dataset.grayscale must be true or false, got {grayscale!r}")
        self.grayscale = grayscale
        self.in_channels = 1 if grayscale else 3
        self.concepts: list[Concept] = []
        self.categories: list[str] = []
        self.probe_set: BrodenProbeDataset | None = None

    @property
    def num_classes(self) -> int:  # type: ignore[override]
        raise probe_only_error("be a model's training data")

    # Layout ------------------------------------------------------------------------------

    def chosen_categories(self) -> list[str]:
        """The categories to label: ``categories`` checked against category.csv."""
        available = [row["name"] for row in read_csv(self.root / "category.csv")]
        if self.wanted is None:
            return available
        unknown = [c for c in self.wanted if c not in available]
        if unknown:
            raise ValueError(
                f"dataset.categories {unknown} are not Broden categories; category.csv in "
                f"{self.root} lists {available}"
            )
        return list(self.wanted)

    def check_layout(self) -> list[str]:
        """Raise ``FileNotFoundError`` for missing files; return the chosen categories."""
        needed = ["index.csv", "category.csv"]
        missing = [name for name in needed if not (self.root / name).is_file()]
        if not (self.root / "images").is_dir():
            missing.append("images/")
        categories = [] if missing else self.chosen_categories()
        missing += [f"c_{c}.csv" for c in categories if not (self.root / f"c_{c}.csv").is_file()]
        if missing:
            raise FileNotFoundError(
                missing_data_error(self.name, self.root, missing, LAYOUT, key=ROOT_KEY)
            )
        return categories

    def lookup(self, category: str) -> tuple[list[Concept], np.ndarray]:
        """The concepts of one category (by code) and its number -> local position + 1."""
        rows = read_csv(self.root / f"c_{category}.csv")
        try:
            listed = sorted((int(r["code"]), int(r["number"]), r["name"]) for r in rows)
        except (KeyError, ValueError) as err:
            raise ValueError(
                f"{self.root / f'c_{category}.csv'} must have integer code and number columns "
                f"and a name column ({err}). {LAYOUT}"
            ) from err
        listed = [(code, number, name) for code, number, name in listed if number > 0]
        lut = np.zeros(max((n for _, n, _ in listed), default=0) + 1, dtype=np.int64)
        for position, (_code, number, _name) in enumerate(listed):
            lut[number] = position + 1
        return [Concept(name, category) for _, _, name in listed], lut

    # Lightning hooks ---------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Check the layout now, so a wrong root fails before any model work."""
        self.check_layout()

    def setup(self, stage: str | None = None) -> None:
        """Read the index and the category files (once); ``stage='probe'`` or None.

        Raises:
            ValueError: asked to serve a training/evaluation stage (Broden has no
                classes), or no image has labels of the chosen categories and split.
            FileNotFoundError: the layout is incomplete.
        """
        if stage in _CLASSIFICATION_STAGES:
            raise probe_only_error(f"serve the '{stage}' stage")
        if self.probe_set is not None:
            return
        categories = self.check_layout()
        concepts: list[Concept] = []
        lookups = []
        for category in categories:
            own, lut = self.lookup(category)
            lookups.append(np.where(lut > 0, lut + len(concepts), 0))
            concepts.extend(own)
        index = read_csv(self.root / "index.csv")
        if index and "image" not in index[0]:
            raise ValueError(f"{self.root / 'index.csv'} has no 'image' column. {LAYOUT}")
        rows = []
        for record in index:
            if self.split is not None and record.get("split") != self.split:
                continue
            entries = tuple(parse_entries(record.get(c)) for c in categories)
            if any(entries):  # like NetDissect-Lite: keep images with any chosen label
                rows.append(BrodenImage(record["image"], record.get("split", ""), entries))
        if not rows:
            raise ValueError(
                f"no image in {self.root / 'index.csv'} has labels of dataset.categories "
                f"{categories} in dataset.split={self.split}"
            )
        if self.shuffle:
            order = np.random.default_rng(self.seed).permutation(len(rows))
            rows = [rows[i] for i in order.tolist()]
        self.categories, self.concepts = list(categories), concepts
        self.probe_set = BrodenProbeDataset(
            self.root, rows, lookups, self.image_size, self.mask_size, self.grayscale
        )
        log.info(
            "broden: %d probe images, %d concepts in %s", len(rows), len(concepts), categories
        )

    def probe_dataloader(self) -> DataLoader:
        """Probe images with per-category concept labels, sharded without padding."""
        if self.probe_set is None:
            self.setup("probe")
        return self._loader(self.probe_set, shuffle=False)

    def train_dataloader(self) -> DataLoader:
        raise probe_only_error("be trained on")

    def val_dataloader(self) -> DataLoader:
        raise probe_only_error("be validated on")

    def test_dataloader(self) -> DataLoader:
        raise probe_only_error("be evaluated on")
