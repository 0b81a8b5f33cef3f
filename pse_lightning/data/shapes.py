"""Shapes: the embedded default dataset, procedural, with per-pixel concept labels.

Each image holds one coloured geometric object (its class is the label) with a texture, on
a textured background, plus mild Gaussian noise. Every image carries four independent
factors, which are also its concepts for network dissection (Bau et al., 2017), in the
category order of :data:`CATEGORIES`:

- object: the shape (``circle``, ``square``, ...), at object pixels;
- colour: the object's palette colour, at object pixels;
- texture: the object's texture (``plain``, ``striped``, ...), at object pixels;
- background: the background pattern (``flat``, ``gradient``, ...), at the other pixels.

So, like Broden, the dataset has real pixel masks, and dissection runs for real on a
machine with no data. Generation is vectorised over images (loops run over classes and
chunks, never over samples or pixels), deterministic from ``seed``, and cached under
``root`` in an ``.npz`` whose name hashes every generation parameter. The cache is
verified on load (parameters and a content checksum) and regenerated when it does not
match, so a stale or damaged file is never trusted just because it exists.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from typing_extensions import Unpack

from pse_lightning.core.locks import cache_lock
from pse_lightning.data.base import Concept, DataOptions, ImageDataModule, IndexedTensorDataset
from pse_lightning.validation import require_at_least

log = logging.getLogger(__name__)

#: Bump when the rendering changes: it is part of the cache hash, so old caches are rebuilt.
GENERATOR_VERSION = 1

SHAPES = ("circle", "square", "triangle", "cross", "ring", "star")
#: Saturated object colours (RGB in [0, 1]); backgrounds are desaturated, so an object
#: always differs from its background in hue even where brightness is similar.
PALETTE = {
    "red": (0.90, 0.12, 0.12),
    "green": (0.12, 0.78, 0.18),
    "blue": (0.15, 0.25, 0.95),
    "yellow": (0.92, 0.88, 0.10),
    "magenta": (0.88, 0.15, 0.85),
    "cyan": (0.10, 0.85, 0.90),
}
TEXTURES = ("plain", "striped", "dotted", "checkered")
BACKGROUNDS = ("flat", "gradient", "grid", "speckled")
CATEGORIES = ("object", "colour", "texture", "background")
SPLITS = ("train", "val", "test", "probe")
_ARRAY_KEYS = ("images", "labels", "object_mask", "factors")  # per split, in the cache

#: Global concept list: concept id = position + 1 (0 means "no concept of this category").
CONCEPTS: tuple[Concept, ...] = (
    *(Concept(name, "object") for name in SHAPES),
    *(Concept(name, "colour") for name in PALETTE),
    *(Concept(name, "texture") for name in TEXTURES),
    *(Concept(name, "background") for name in BACKGROUNDS),
)
#: First global concept id of each category, in CATEGORIES order.
_FIRST_ID = np.array(
    [
        1,
        1 + len(SHAPES),
        1 + len(SHAPES) + len(PALETTE),
        1 + len(SHAPES) + len(PALETTE) + len(TEXTURES),
    ]
)

_MIN_IMAGE_SIZE = 16  # below this, textures (period >= 3 px) and stars stop being legible
_CHUNK = 1024  # images rendered at once: bounds memory for large image sizes
_NOISE_STD = 0.03
_TEXTURE_DARKEN = 0.5  # pattern pixels of a textured object keep this fraction of the colour


# Rendering --------------------------------------------------------------------------------


def _shape_masks(label: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside tests for each class; u, v are object-frame coordinates in units of the radius.

    Args:
        label: (n,) class indices.
        u, v: (n, H, W) rotated coordinates relative to the object centre, divided by its
            radius, so every shape spans about [-1, 1].

    Returns:
        (n, H, W) bool object masks.
    """
    rho = np.hypot(u, v)
    phi = np.arctan2(v, u)
    mask = np.zeros(u.shape, dtype=bool)
    for k, name in enumerate(SHAPES):
        sel = label == k
        if not sel.any():
            continue
        uk, vk, rk, pk = u[sel], v[sel], rho[sel], phi[sel]
        if name == "circle":
            inside = rk <= 0.95
        elif name == "square":
            inside = np.maximum(np.abs(uk), np.abs(vk)) <= 0.78
        elif name == "triangle":
            # Regular triangle of circumradius 1.15: inside iff within the apothem of all
            # three edge normals.
            angles = np.pi / 2 + 2 * np.pi * np.arange(3) / 3 + np.pi / 3
            proj = uk[..., None] * np.cos(angles) + vk[..., None] * np.sin(angles)
            inside = proj.max(-1) <= 1.15 * 0.5
        elif name == "cross":
            arm = 0.34
            inside = ((np.abs(uk) <= 1.0) & (np.abs(vk) <= arm)) | (
                (np.abs(vk) <= 1.0) & (np.abs(uk) <= arm)
            )
        elif name == "ring":
            inside = (rk >= 0.55) & (rk <= 1.0)
        else:  # star: five points, outer radius 1.1, inner 0.45
            sector = 2 * np.pi / 5
            folded = np.abs(np.mod(pk, sector) - sector / 2)  # angle from nearest inner vertex
            # Edge from the inner vertex (angle 0 after folding) to the outer vertex
            # (angle sector/2): inside iff on the origin's side of that line.
            r_in, r_out = 0.45, 1.1
            ax, ay = r_in, 0.0
            bx, by = r_out * math.cos(sector / 2), r_out * math.sin(sector / 2)
            px, py = rk * np.cos(folded), rk * np.sin(folded)
            cross_p = (bx - ax) * (py - ay) - (by - ay) * (px - ax)
            inside = cross_p >= 0  # the origin's side: at p = 0 the product is by * ax > 0
        mask[sel] = inside
    return mask


def _texture_patterns(
    texture: np.ndarray, xx: np.ndarray, yy: np.ndarray, rng: np.random.Generator, scale: float
) -> np.ndarray:
    """(n, H, W) bool pattern for each image's object texture (False everywhere for plain)."""
    n = len(texture)
    angle = rng.uniform(0, np.pi, n)[:, None, None]
    phase = rng.uniform(0, 1, n)[:, None, None]
    ox = rng.uniform(0, 8 * scale, n)[:, None, None]
    oy = rng.uniform(0, 8 * scale, n)[:, None, None]
    pattern = np.zeros((n, *xx.shape), dtype=bool)
    for k, name in enumerate(TEXTURES):
        sel = texture == k
        if name == "plain" or not sel.any():
            continue
        x, y = xx + ox[sel], yy + oy[sel]
        if name == "striped":
            t = (xx * np.cos(angle[sel]) + yy * np.sin(angle[sel])) / (4.0 * scale) + phase[sel]
            pattern[sel] = np.mod(t, 1.0) < 0.5
        elif name == "dotted":
            period = 4.0 * scale
            dx = np.mod(x, period) - period / 2
            dy = np.mod(y, period) - period / 2
            pattern[sel] = dx**2 + dy**2 <= (1.1 * scale) ** 2
        else:  # checkered
            period = 3.0 * scale
            pattern[sel] = (np.floor(x / period) + np.floor(y / period)) % 2 == 0
    return pattern


def _backgrounds(
    background: np.ndarray,
    xx: np.ndarray,
    yy: np.ndarray,
    rng: np.random.Generator,
    scale: float,
) -> np.ndarray:
    """(n, 3, H, W) float32 background images, desaturated, of each image's pattern kind."""
    n = len(background)
    size = xx.shape[0]
    grey = rng.uniform(0.15, 0.85, n)
    tint = rng.uniform(-0.08, 0.08, (n, 3))
    base = np.clip(grey[:, None] + tint, 0, 1).astype(np.float32)[:, :, None, None]
    sign = np.where(grey < 0.5, 1.0, -1.0).astype(np.float32)[:, None, None, None]
    angle = rng.uniform(0, 2 * np.pi, n)[:, None, None]
    offset = rng.uniform(0, 8 * scale, (n, 2))
    blobs = rng.uniform(-1, 1, (n, 1, 4, 4)).astype(np.float32)
    out = np.broadcast_to(base, (n, 3, size, size)).copy()
    for k, name in enumerate(BACKGROUNDS):
        sel = background == k
        if name == "flat" or not sel.any():
            continue
        if name == "gradient":
            ramp = (xx * np.cos(angle[sel]) + yy * np.sin(angle[sel])) / size  # ~[-1.4, 1.4]
            out[sel] += (0.18 * sign[sel][:, 0] * ramp)[:, None].astype(np.float32)
        elif name == "grid":
            period = 8.0 * scale
            on_x = np.mod(xx + offset[sel, 0, None, None], period) < scale
            on_y = np.mod(yy + offset[sel, 1, None, None], period) < scale
            out[sel] += (0.25 * sign[sel][:, 0] * (on_x | on_y))[:, None].astype(np.float32)
        else:  # speckled: smooth low-frequency blotches
            smooth = F.interpolate(
                torch.from_numpy(blobs[sel]),
                size=(size, size),
                mode="bilinear",
                align_corners=False,
            ).numpy()
            out[sel] += 0.15 * smooth
    return out


def generate_shapes(num: int, image_size: int, seed: int, split: str) -> dict[str, np.ndarray]:
    """Render ``num`` shapes images of one split, deterministically from (seed, split).

    Every factor (class, colour, texture, background) is balanced: each value occurs
    ``num // k`` or ``num // k + 1`` times, in a seeded random order, so every class is
    present in any split of at least ``num_classes`` images.

    Args:
        num: number of images.
        image_size: side H = W in pixels.
        seed: dataset seed; each split draws from its own stream ``(seed, split)``.
        split: one of :data:`SPLITS`.

    Returns:
        ``images`` (num, 3, H, W) uint8, ``labels`` (num,) int64, ``object_mask``
        (num, H, W) bool and ``factors`` (num, 4) int64: per image the index of its
        shape, colour, texture and background within its category.
    """
    stream = np.random.SeedSequence([seed % 2**64, SPLITS.index(split), GENERATOR_VERSION])
    rng = np.random.default_rng(stream)
    sizes = (len(SHAPES), len(PALETTE), len(TEXTURES), len(BACKGROUNDS))
    factors = np.stack([rng.permutation(np.arange(num) % k) for k in sizes], axis=1)
    scale = image_size / 32.0
    radius = rng.uniform(0.22, 0.38, num) * image_size
    margin = 1.15 * radius + 1.0
    cx = rng.uniform(margin, image_size - margin)
    cy = rng.uniform(margin, image_size - margin)
    theta = rng.uniform(0, 2 * np.pi, num)
    palette = np.array(list(PALETTE.values()), dtype=np.float32)
    colour = np.clip(palette[factors[:, 1]] + rng.uniform(-0.06, 0.06, (num, 3)), 0, 1)

    coords = np.arange(image_size, dtype=np.float64) + 0.5
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    images = np.empty((num, 3, image_size, image_size), dtype=np.uint8)
    masks = np.empty((num, image_size, image_size), dtype=bool)
    for start in range(0, num, _CHUNK):
        s = slice(start, min(start + _CHUNK, num))
        dx = xx - cx[s, None, None]
        dy = yy - cy[s, None, None]
        cos, sin = np.cos(theta[s])[:, None, None], np.sin(theta[s])[:, None, None]
        r = radius[s, None, None]
        u, v = (dx * cos + dy * sin) / r, (-dx * sin + dy * cos) / r
        mask = _shape_masks(factors[s, 0], u, v)
        pattern = _texture_patterns(factors[s, 2], xx, yy, rng, scale)
        shade = np.where(pattern, _TEXTURE_DARKEN, 1.0).astype(np.float32)
        obj = colour[s, :, None, None].astype(np.float32) * shade[:, None]
        img = _backgrounds(factors[s, 3], xx, yy, rng, scale)
        img = np.where(mask[:, None], obj, img)
        img += rng.normal(0, _NOISE_STD, img.shape).astype(np.float32)
        images[s] = np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)
        masks[s] = mask
    return {
        "images": images,
        "labels": factors[:, 0].astype(np.int64),
        "object_mask": masks,
        "factors": factors.astype(np.int64),
    }


def concept_label_maps(object_mask: Tensor, factors: Tensor) -> Tensor:
    """Per-pixel global concept ids (N, 4, H, W) long from object masks and factors.

    Object, colour and texture concepts label the object's pixels, background concepts
    the rest, 0 elsewhere: each pixel has exactly one of {object, background} labelled.

    Args:
        object_mask: (N, H, W) bool.
        factors: (N, 4) long, per image the factor index within each category.
    """
    ids = factors.long() + torch.as_tensor(_FIRST_ID, device=factors.device)
    inside = object_mask.bool()[:, None]  # (N, 1, H, W)
    on_object = torch.tensor([True, True, True, False], device=factors.device)[None, :, None, None]
    labelled = torch.where(on_object, inside, ~inside)
    return torch.where(labelled, ids[:, :, None, None], torch.zeros_like(ids)[:, :, None, None])


# Cache ------------------------------------------------------------------------------------


def _checksum(arrays: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for key in sorted(arrays):
        a = np.ascontiguousarray(arrays[key])
        digest.update(f"{key}:{a.dtype.str}:{a.shape}".encode())
        digest.update(a.tobytes())
    return digest.hexdigest()


def params_hash(params: dict[str, int]) -> str:
    """Short stable hash of the generation parameters (names the cache file)."""
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]


def _read_cache(path: Path, params: dict[str, int]) -> dict[str, np.ndarray] | None:
    """The cached arrays if ``path`` holds exactly what ``params`` generate, else None."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            stored = {key: npz[key] for key in npz.files}
        meta = json.loads(str(stored.pop("meta")))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        log.warning("shapes cache %s is unreadable (%s); regenerating it", path, err)
        return None
    if meta.get("params") != params or meta.get("hash") != params_hash(params):
        log.warning("shapes cache %s was made with other parameters; regenerating it", path)
        return None
    expected = {f"{split}_{key}" for split in SPLITS for key in _ARRAY_KEYS}
    if set(stored) != expected:
        log.warning("shapes cache %s lacks or adds arrays; regenerating it", path)
        return None
    if meta.get("checksum") != _checksum(stored):
        log.warning("shapes cache %s fails its checksum; regenerating it", path)
        return None
    return stored


def _stamp(path: Path) -> tuple[int, int, int] | None:
    """(inode, size, mtime) of a file, None when absent: tells whether it was replaced."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _write_cache(path: Path, arrays: dict[str, np.ndarray], params: dict[str, int]) -> None:
    """Write atomically: a temp file in the same folder, then os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"params": params, "hash": params_hash(params), "checksum": _checksum(arrays)}
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the cache is shared like any data file
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, meta=np.array(json.dumps(meta, sort_keys=True)), **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# Datasets and datamodule ------------------------------------------------------------------


class ConceptProbeDataset(Dataset):
    """Yields (x in [0, 1] (3, H, W), concept labels (4, H, W) long, index)."""

    def __init__(self, images: Tensor, object_mask: Tensor, factors: Tensor) -> None:
        self.images, self.object_mask, self.factors = images, object_mask, factors

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, int]:
        labels = concept_label_maps(self.object_mask[i : i + 1], self.factors[i : i + 1])[0]
        return self.images[i].float() / 255.0, labels, i


class ShapesDataModule(ImageDataModule):
    """Coloured geometric objects on textured backgrounds, with concept masks.

    The train, val, test and probe splits are generated from independent streams derived
    from ``seed``. The probe split (network dissection) is its own split, disjoint in
    generation from the test split, so units are labelled on images the attacks never see.

    Args:
        root: folder for the cached ``.npz``; None generates in memory without caching.
        image_size: side of the square images in pixels (>= 16).
        num_train, num_val, num_test, num_probe: images per split.
        batch_size, num_workers, eval_samples, seed: see :class:`ImageDataModule`.

    Raises:
        ValueError: naming the ``dataset.<key>`` that is out of range.
    """

    name = "shapes"
    num_classes = len(SHAPES)
    in_channels = 3
    image_size = 32
    # Per-channel statistics of the default train split (seed 0, 5000 images at 32 px),
    # fixed so the model can be built before the data are generated.
    mean = (0.4861, 0.4852, 0.4868)
    std = (0.2533, 0.2414, 0.2527)
    class_names = SHAPES
    concepts = CONCEPTS
    categories = CATEGORIES
    #: The object concepts are the class labels: a unit interpretable for one of them is
    #: class-selective (the dissection's class-controlled tests leave them out).
    class_categories = ("object",)

    def __init__(
        self,
        *,
        root: str | None = None,
        image_size: int = 32,
        num_train: int = 5000,
        num_val: int = 500,
        num_test: int = 1000,
        num_probe: int = 500,
        **common: Unpack[DataOptions],
    ) -> None:
        super().__init__(**common)
        self.root = None if root is None else Path(root)
        self.image_size = require_at_least("dataset.image_size", image_size, _MIN_IMAGE_SIZE)
        self.sizes = {
            split: require_at_least(f"dataset.num_{split}", n, 1)
            for split, n in zip(SPLITS, (num_train, num_val, num_test, num_probe), strict=True)
        }
        self.probe_set: Dataset | None = None
        self._arrays: dict[str, np.ndarray] | None = None

    @property
    def params(self) -> dict[str, int]:
        """Every parameter the generated data depend on (hashed into the cache name)."""
        return {
            "version": GENERATOR_VERSION,
            "image_size": self.image_size,
            "seed": self.seed,
            **{f"num_{split}": n for split, n in self.sizes.items()},
        }

    @property
    def cache_path(self) -> Path | None:
        """Where the cache lives: ``root/shapes-<hash of params>.npz`` (None without root)."""
        if self.root is None:
            return None
        return self.root / f"shapes-{params_hash(self.params)}.npz"

    def _generate(self) -> dict[str, np.ndarray]:
        arrays: dict[str, np.ndarray] = {}
        for split, n in self.sizes.items():
            data = generate_shapes(n, self.image_size, self.seed, split)
            arrays.update({f"{split}_{key}": value for key, value in data.items()})
        return arrays

    def load_arrays(self) -> dict[str, np.ndarray]:
        """The generated splits: from a verified cache, else generated (and cached)."""
        path = self.cache_path
        if path is None:
            return self._generate()
        seen = _stamp(path)
        if seen is not None:
            arrays = _read_cache(path, self.params)
            if arrays is not None:
                return arrays
        # Concurrent jobs generate once: the others wait, then read what the first wrote.
        with cache_lock(path, "to finish generating the shapes dataset"):
            if _stamp(path) not in (None, seen):
                arrays = _read_cache(path, self.params)
                if arrays is not None:
                    return arrays
            log.info("generating the shapes dataset into %s", path)
            arrays = self._generate()
            _write_cache(path, arrays, self.params)
        return arrays

    def prepare_data(self) -> None:
        """Generate and cache once per node (Lightning calls this on local rank 0)."""
        if self.root is not None:
            self.load_arrays()

    def setup(self, stage: str | None = None) -> None:
        """Load every split (all are small); later calls reuse the loaded arrays."""
        if self._arrays is None:
            self._arrays = self.load_arrays()
        a = {key: torch.from_numpy(value) for key, value in self._arrays.items()}
        self.train_set = IndexedTensorDataset(a["train_images"], a["train_labels"])
        self.val_set = IndexedTensorDataset(a["val_images"], a["val_labels"])
        self.test_set = IndexedTensorDataset(a["test_images"], a["test_labels"])
        self.probe_set = ConceptProbeDataset(
            a["probe_images"], a["probe_object_mask"], a["probe_factors"]
        )

    def concept_labels(self, split: str) -> Tensor:
        """Per-pixel concept ids (N, 4, H, W) long of a whole split (after ``setup``)."""
        if self._arrays is None:
            raise RuntimeError("ShapesDataModule.setup() must run before concept_labels()")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
        return concept_label_maps(
            torch.from_numpy(self._arrays[f"{split}_object_mask"]),
            torch.from_numpy(self._arrays[f"{split}_factors"]),
        )

    def probe_dataloader(self) -> DataLoader:
        """Probe split images with concept labels (4 categories), sharded without padding."""
        return self._loader(self.probe_set, shuffle=False)
