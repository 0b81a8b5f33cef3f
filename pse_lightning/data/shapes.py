"""Shapes: the embedded default dataset, procedural, with per-pixel concept labels.

Each image holds one coloured geometric object (its class is the label) with a texture, on
a textured background, plus mild Gaussian noise. Every image carries four independent
factors, which are also its concepts for network dissection (Bau et al., 2017), and the
parts of its object, in the category order of :data:`CATEGORIES`:

- object: the shape (``circle``, ``square``, ...), at object pixels;
- colour: the object's palette colour, at object pixels;
- texture: the object's texture (``plain``, ``striped``, ...), at object pixels;
- background: the background pattern (``flat``, ``gradient``, ...), at the other pixels;
- part (like Broden's parts, shared across classes, none of them a class label):
  ``corner``, discs around the vertices of the polygonal shapes (square, triangle, cross,
  star; circles and rings have none); ``edge_0``, ``edge_45``, ``edge_90``, ``edge_135``,
  the band of pixels on either side of the object's boundary, by the boundary's local
  orientation (degrees counter-clockwise from horizontal, y up; the object's rotation is
  uniform, so every class has edges of every orientation across images); ``interior``,
  the object's other pixels. One part per pixel, in that order of precedence.

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

from pse_lightning.core.atomic import file_mode
from pse_lightning.core.locks import cache_lock
from pse_lightning.data.base import Concept, DataOptions, ImageDataModule, IndexedTensorDataset
from pse_lightning.validation import require_at_least

log = logging.getLogger(__name__)

#: Bump when the rendering changes: it is part of the cache hash, so old caches are rebuilt.
GENERATOR_VERSION = 1
#: Bump when the cached arrays change while the images do not (2: part maps added; 3: edges
#: by orientation). It is part of the cache hash, not of the random streams, so the images
#: stay the same.
LAYOUT_VERSION = 3

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
#: Edge orientations of the part category, degrees (the boundary's direction, y up).
EDGE_ANGLES = (0, 45, 90, 135)
PARTS = ("corner", *(f"edge_{angle}" for angle in EDGE_ANGLES), "interior")
CATEGORIES = ("object", "colour", "texture", "background", "part")
SPLITS = ("train", "val", "test", "probe")
_ARRAY_KEYS = ("images", "labels", "object_mask", "factors", "part_map")  # per split, cached

#: Global concept list: concept id = position + 1 (0 means "no concept of this category").
CONCEPTS: tuple[Concept, ...] = (
    *(Concept(name, "object") for name in SHAPES),
    *(Concept(name, "colour") for name in PALETTE),
    *(Concept(name, "texture") for name in TEXTURES),
    *(Concept(name, "background") for name in BACKGROUNDS),
    *(Concept(name, "part") for name in PARTS),
)
#: First global concept id of each category, in CATEGORIES order.
_FIRST_ID = np.array(
    [
        1,
        1 + len(SHAPES),
        1 + len(SHAPES) + len(PALETTE),
        1 + len(SHAPES) + len(PALETTE) + len(TEXTURES),
        1 + len(SHAPES) + len(PALETTE) + len(TEXTURES) + len(BACKGROUNDS),
    ]
)

_MIN_IMAGE_SIZE = 16  # below this, textures (period >= 3 px) and stars stop being legible
_CHUNK = 1024  # images rendered at once: bounds memory for large image sizes
_NOISE_STD = 0.03
_TEXTURE_DARKEN = 0.5  # pattern pixels of a textured object keep this fraction of the colour
_CORNER_RADIUS = 2.0  # px at 32 px (scaled with the image): the disc around each vertex
_EDGE_HALF_WIDTH = 1  # px at 32 px (scaled, at least 1): the edge band on each side
_EDGE_SIGMA = 1.0  # px at 32 px (scaled): the blur whose gradient gives the edge's normal


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


def _star_vertices() -> np.ndarray:
    sector = 2 * np.pi / 5
    outer = 1.1 * np.stack([np.cos(sector * np.arange(5)), np.sin(sector * np.arange(5))], 1)
    phi = sector / 2 + sector * np.arange(5)
    inner = 0.45 * np.stack([np.cos(phi), np.sin(phi)], 1)
    return np.concatenate([outer, inner])


def _triangle_vertices() -> np.ndarray:
    # Opposite each edge normal of _shape_masks, at the circumradius 1.15.
    angles = np.pi / 2 + 2 * np.pi * np.arange(3) / 3
    return 1.15 * np.stack([np.cos(angles), np.sin(angles)], 1)


_SIGNS = np.array([(1, 1), (1, -1), (-1, 1), (-1, -1)], dtype=np.float64)
#: Vertices (V, 2) of each shape in the object frame (u, v), in units of the radius, exactly
#: where the outlines of :func:`_shape_masks` meet: convex and concave ones alike.
VERTICES: dict[str, np.ndarray] = {
    "circle": np.zeros((0, 2)),
    "square": 0.78 * _SIGNS,
    "triangle": _triangle_vertices(),
    "cross": np.concatenate([_SIGNS * (1.0, 0.34), _SIGNS * (0.34, 1.0), _SIGNS * 0.34]),
    "ring": np.zeros((0, 2)),
    "star": _star_vertices(),
}


def vertex_positions(label: int, cx: float, cy: float, radius: float, theta: float) -> np.ndarray:
    """(V, 2) pixel coordinates (x, y) of one object's vertices (the inverse of the object
    frame of :func:`generate_shapes`: u = (dx cos θ + dy sin θ) / r, v = (−dx sin θ +
    dy cos θ) / r)."""
    u, v = VERTICES[SHAPES[label]].T
    cos, sin = math.cos(theta), math.sin(theta)
    return np.stack([cx + radius * (u * cos - v * sin), cy + radius * (u * sin + v * cos)], 1)


def _blurred_gradient(mask: Tensor, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """(d/dy, d/dx) of (n, 1, H, W) masks blurred by a Gaussian of ``sigma`` px, each (n, H, W)."""
    half = max(1, math.ceil(3 * sigma))
    t = torch.arange(-half, half + 1, dtype=torch.float32)
    kernel = torch.exp(-(t**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    blurred = F.conv2d(mask, kernel.view(1, 1, 1, -1), padding=(0, half))
    blurred = F.conv2d(blurred, kernel.view(1, 1, -1, 1), padding=(half, 0))[:, 0].numpy()
    gy, gx = np.gradient(blurred, axis=(1, 2))
    return gy, gx


def part_maps(
    label: np.ndarray,
    mask: np.ndarray,
    cx: np.ndarray,
    cy: np.ndarray,
    radius: np.ndarray,
    theta: np.ndarray,
    scale: float,
) -> np.ndarray:
    """(n, H, W) uint8 part of each pixel: 1 + its index in :data:`PARTS`, 0 for none.

    ``corner``: within ``_CORNER_RADIUS * scale`` px of a vertex (pixel centres);
    ``edge_<angle>``: otherwise within ``_EDGE_HALF_WIDTH`` px (scaled, Chebyshev
    distance) of a pixel on the other side of the object mask's boundary, on either side,
    binned by the boundary's orientation: the normal is the gradient of the mask blurred
    by a Gaussian of ``_EDGE_SIGMA`` px (scaled), the boundary runs at 90° to it, and the
    nearest of :data:`EDGE_ANGLES` (mod 180°) names the part; ``interior``: the remaining
    object pixels. Loops run over classes and vertices, never over images.

    Args:
        label: (n,) class indices; mask: (n, H, W) bool object masks; cx, cy, radius,
        theta: (n,) each object's centre, radius (px) and rotation, as rendered.
    """
    size = mask.shape[-1]
    coords = np.arange(size, dtype=np.float64) + 0.5
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    corner = np.zeros(mask.shape, dtype=bool)
    for k, name in enumerate(SHAPES):
        sel = np.flatnonzero(label == k)
        if not len(sel) or not len(VERTICES[name]):
            continue
        cos, sin, r = np.cos(theta[sel]), np.sin(theta[sel]), radius[sel]
        hit = np.zeros((len(sel), size, size), dtype=bool)
        for u, v in VERTICES[name]:
            vx = cx[sel] + r * (u * cos - v * sin)
            vy = cy[sel] + r * (u * sin + v * cos)
            d2 = (xx - vx[:, None, None]) ** 2 + (yy - vy[:, None, None]) ** 2
            hit |= d2 <= (_CORNER_RADIUS * scale) ** 2
        corner[sel] = hit
    width = max(1, round(_EDGE_HALF_WIDTH * scale))
    m = torch.from_numpy(mask)[:, None].float()
    pool = lambda t: F.max_pool2d(t, 2 * width + 1, stride=1, padding=width)  # noqa: E731
    dilated = pool(m)[:, 0].bool().numpy()
    eroded = ~pool(1 - m)[:, 0].bool().numpy()
    band = dilated & ~eroded
    gy, gx = _blurred_gradient(m, _EDGE_SIGMA * scale)
    # Boundary direction, y up: the normal (gx, -gy) turned by 90°, in [0°, 180°).
    angle = np.degrees(np.arctan2(-gy, gx)) + 90.0
    step = 180.0 / len(EDGE_ANGLES)
    orientation = np.round(np.mod(angle, 180.0) / step).astype(np.int64) % len(EDGE_ANGLES)
    out = np.zeros(mask.shape, dtype=np.uint8)
    out[mask] = 1 + PARTS.index("interior")
    out[band] = (1 + PARTS.index("edge_0") + orientation[band]).astype(np.uint8)
    out[corner] = 1 + PARTS.index("corner")
    return out


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
        (num, H, W) bool, ``factors`` (num, 4) int64: per image the index of its
        shape, colour, texture and background within its category, and ``part_map``
        (num, H, W) uint8 of :func:`part_maps`. The part maps draw no random numbers: the
        images are the same with or without them.
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
    parts = np.empty((num, image_size, image_size), dtype=np.uint8)
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
        parts[s] = part_maps(factors[s, 0], mask, cx[s], cy[s], radius[s], theta[s], scale)
    return {
        "images": images,
        "labels": factors[:, 0].astype(np.int64),
        "object_mask": masks,
        "factors": factors.astype(np.int64),
        "part_map": parts,
    }


def concept_label_maps(object_mask: Tensor, factors: Tensor, part_map: Tensor) -> Tensor:
    """Per-pixel global concept ids (N, 5, H, W) long, in :data:`CATEGORIES` order.

    Object, colour and texture concepts label the object's pixels, background concepts
    the rest, 0 elsewhere: each pixel has exactly one of {object, background} labelled.
    The part category labels the pixels of ``part_map`` > 0 (corners and the edge band
    reach just outside the object).

    Args:
        object_mask: (N, H, W) bool.
        factors: (N, 4) long, per image the factor index within each category.
        part_map: (N, H, W) integer, 1 + the index in :data:`PARTS`, 0 for no part.
    """
    first = torch.as_tensor(_FIRST_ID, device=factors.device)
    ids = factors.long() + first[:4]
    inside = object_mask.bool()[:, None]  # (N, 1, H, W)
    on_object = torch.tensor([True, True, True, False], device=factors.device)[None, :, None, None]
    labelled = torch.where(on_object, inside, ~inside)
    maps = torch.where(labelled, ids[:, :, None, None], torch.zeros_like(ids)[:, :, None, None])
    part = part_map.long()
    part = torch.where(part > 0, part - 1 + first[4], torch.zeros_like(part))
    return torch.cat([maps, part[:, None]], dim=1)


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
        os.fchmod(fd, file_mode())  # mkstemp makes 0600; the cache is a file like any other
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, meta=np.array(json.dumps(meta, sort_keys=True)), **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# Datasets and datamodule ------------------------------------------------------------------


class ConceptProbeDataset(Dataset):
    """Yields (x in [0, 1] (3, H, W), concept labels (5, H, W) long, index)."""

    def __init__(
        self, images: Tensor, object_mask: Tensor, factors: Tensor, part_map: Tensor
    ) -> None:
        self.images, self.object_mask, self.factors = images, object_mask, factors
        self.part_map = part_map

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, int]:
        one = slice(i, i + 1)
        labels = concept_label_maps(self.object_mask[one], self.factors[one], self.part_map[one])[
            0
        ]
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
            "layout": LAYOUT_VERSION,
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
            a["probe_images"], a["probe_object_mask"], a["probe_factors"], a["probe_part_map"]
        )

    def concept_labels(self, split: str) -> Tensor:
        """Per-pixel concept ids (N, 5, H, W) long of a whole split (after ``setup``)."""
        if self._arrays is None:
            raise RuntimeError("ShapesDataModule.setup() must run before concept_labels()")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
        return concept_label_maps(
            torch.from_numpy(self._arrays[f"{split}_object_mask"]),
            torch.from_numpy(self._arrays[f"{split}_factors"]),
            torch.from_numpy(self._arrays[f"{split}_part_map"]),
        )

    def probe_dataloader(self) -> DataLoader:
        """Probe split images with concept labels (5 categories), sharded without padding."""
        return self._loader(self.probe_set, shuffle=False)
