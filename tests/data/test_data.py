"""Embedded datasets: determinism, the verified cache, batch contract and concept masks."""

from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pse_lightning.data import Concept, DigitsDataModule, ShapesDataModule
from pse_lightning.data.digits import stratified_order
from pse_lightning.data.shapes import (
    BACKGROUNDS,
    CATEGORIES,
    CONCEPTS,
    EDGE_ANGLES,
    PALETTE,
    PARTS,
    SHAPES,
    SPLITS,
    TEXTURES,
    VERTICES,
    _shape_masks,
    concept_label_maps,
    generate_shapes,
    part_maps,
    vertex_positions,
)

SMALL = dict(num_train=64, num_val=24, num_test=32, num_probe=20, batch_size=16)


def shapes(tmp_path: Path | None = None, **kwargs) -> ShapesDataModule:
    dm = ShapesDataModule(root=None if tmp_path is None else str(tmp_path), **{**SMALL, **kwargs})
    dm.setup()
    return dm


def all_arrays(dm: ShapesDataModule) -> dict[str, np.ndarray]:
    assert dm._arrays is not None
    return dm._arrays


# Shapes: determinism ----------------------------------------------------------------------


def test_same_seed_same_data_and_different_seed_different_data() -> None:
    a, b, c = shapes(seed=3)._arrays, shapes(seed=3)._arrays, shapes(seed=4)._arrays
    assert a.keys() == b.keys() == c.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    for split in SPLITS:
        assert not np.array_equal(a[f"{split}_images"], c[f"{split}_images"])
        assert not np.array_equal(a[f"{split}_object_mask"], c[f"{split}_object_mask"])


def test_splits_come_from_independent_streams() -> None:
    a = generate_shapes(32, 32, seed=0, split="train")["images"]
    b = generate_shapes(32, 32, seed=0, split="test")["images"]
    assert not np.array_equal(a, b)


# Shapes: cache ----------------------------------------------------------------------------


def test_cache_hit_returns_identical_data(tmp_path: Path) -> None:
    first = shapes(tmp_path, seed=1)
    path = first.cache_path
    assert path is not None and path.exists() and path.parent == tmp_path
    assert not list(tmp_path.glob("*.tmp")), "the temp file must be renamed into place"
    stamp = path.stat().st_mtime_ns
    second = shapes(tmp_path, seed=1)
    assert path.stat().st_mtime_ns == stamp, "a valid cache must be read, not rewritten"
    for key, value in all_arrays(first).items():
        np.testing.assert_array_equal(value, all_arrays(second)[key], err_msg=key)


def test_cache_name_depends_on_every_generation_parameter(tmp_path: Path) -> None:
    base = ShapesDataModule(root=str(tmp_path), **SMALL)
    names = {base.cache_path}
    for key, value in [
        ("num_train", 65),
        ("num_val", 25),
        ("num_test", 33),
        ("num_probe", 21),
        ("image_size", 24),
        ("seed", 9),
    ]:
        names.add(ShapesDataModule(root=str(tmp_path), **{**SMALL, key: value}).cache_path)
    assert len(names) == 7
    # Loader settings do not change the data, so they share the cache.
    same = ShapesDataModule(root=str(tmp_path), **{**SMALL, "batch_size": 7, "num_workers": 1})
    assert same.cache_path == base.cache_path


def _rewrite(path: Path, drop: str | None = None, **changes) -> None:
    with np.load(path, allow_pickle=False) as npz:
        arrays = {key: npz[key] for key in npz.files if key != drop}
    arrays.update(changes)
    with path.open("wb") as handle:
        np.savez(handle, **arrays)


@pytest.mark.parametrize(
    "damage", ["pixels", "params", "missing", "no_parts", "truncated", "garbage"]
)
def test_tampered_or_corrupt_cache_is_regenerated(tmp_path: Path, damage: str) -> None:
    reference = all_arrays(shapes(seed=2))
    dm = ShapesDataModule(root=str(tmp_path), seed=2, **SMALL)
    dm.prepare_data()
    path = dm.cache_path
    assert path is not None
    if damage == "pixels":
        with np.load(path, allow_pickle=False) as npz:
            images = npz["train_images"].copy()
        images[0] = 255 - images[0]
        _rewrite(path, train_images=images)
    elif damage == "params":
        with np.load(path, allow_pickle=False) as npz:
            meta = json.loads(str(npz["meta"]))
        meta["params"]["seed"] = 99
        _rewrite(path, meta=np.array(json.dumps(meta)))
    elif damage == "missing":
        _rewrite(path, drop="probe_factors")
    elif damage == "no_parts":  # a cache written before the part maps existed
        _rewrite(path, drop="probe_part_map")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
    else:
        path.write_bytes(b"not an npz file")
    dm.setup()
    for key, value in all_arrays(dm).items():
        np.testing.assert_array_equal(value, reference[key], err_msg=key)
    # The damaged file was replaced by a valid one.
    with np.load(path, allow_pickle=False) as npz:
        np.testing.assert_array_equal(npz["train_images"], reference["train_images"])
        assert json.loads(str(npz["meta"]))["params"] == dm.params
        assert "probe_factors" in npz.files and "probe_part_map" in npz.files
    assert zipfile.is_zipfile(path)


def test_cache_name_changes_with_the_layout_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Caches written before the part maps (layout 1) have another name and are never read.
    import pse_lightning.data.shapes as module

    now = ShapesDataModule(root=str(tmp_path), **SMALL).cache_path
    monkeypatch.setattr(module, "LAYOUT_VERSION", 1)
    assert ShapesDataModule(root=str(tmp_path), **SMALL).cache_path != now


def test_part_maps_leave_the_images_as_they_were() -> None:
    # Digests of the images and masks the generator made before the part maps were added
    # (the part maps draw no random numbers, so trained checkpoints stay valid).
    import hashlib

    for split, images, masks in [
        ("train", "35fa1a1e2acbd281", "63fbc54e5d93ea78"),
        ("probe", "e6cfdf1d27991ed5", "d6bb1893ef31a922"),
    ]:
        data = generate_shapes(12, 32, seed=0, split=split)
        assert hashlib.sha256(data["images"].tobytes()).hexdigest()[:16] == images
        assert hashlib.sha256(data["object_mask"].tobytes()).hexdigest()[:16] == masks


# Shapes: batches and concepts -------------------------------------------------------------


def test_batches_are_unit_range_nchw_with_unique_covering_indices() -> None:
    dm = shapes()
    for loader, size in [
        (dm.train_dataloader(), 64),
        (dm.val_dataloader(), 24),
        (dm.test_dataloader(), 32),
    ]:
        seen = []
        for x, y, index in loader:
            assert x.dtype == torch.float32 and x.shape[1:] == (3, 32, 32)
            assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
            assert y.dtype == torch.int64 and int(y.min()) >= 0 and int(y.max()) < 6
            seen.append(index)
        index = torch.cat(seen)
        assert sorted(index.tolist()) == list(range(size))


def test_eval_samples_limits_the_test_loader() -> None:
    dm = shapes(eval_samples=10)
    index = torch.cat([i for _, _, i in dm.test_dataloader()])
    assert sorted(index.tolist()) == list(range(10))


def test_every_class_and_factor_present_and_balanced() -> None:
    data = generate_shapes(60, 32, seed=0, split="train")
    for column, k in enumerate((len(SHAPES), len(PALETTE), len(TEXTURES), len(BACKGROUNDS))):
        counts = np.bincount(data["factors"][:, column], minlength=k)
        assert counts.max() - counts.min() <= 1 and counts.min() >= 1
    np.testing.assert_array_equal(data["labels"], data["factors"][:, 0])


def test_concept_list_and_categories() -> None:
    dm = ShapesDataModule(**SMALL)
    assert tuple(dm.categories) == CATEGORIES
    assert CATEGORIES == ("object", "colour", "texture", "background", "part")
    assert tuple(dm.class_names) == SHAPES and dm.num_classes == len(SHAPES)
    assert all(isinstance(c, Concept) and c.category in CATEGORIES for c in CONCEPTS)
    assert len({c.name for c in CONCEPTS}) == len(CONCEPTS)
    # Object concepts are the classes, in class order: id = class + 1.
    assert [c.name for c in CONCEPTS[: len(SHAPES)]] == list(SHAPES)
    # The parts come last (the other ids are unchanged) and no class category holds them.
    edges = ["edge_0", "edge_45", "edge_90", "edge_135"]
    assert (
        [c.name for c in CONCEPTS[-len(PARTS) :]] == list(PARTS) == ["corner", *edges, "interior"]
    )
    assert all(c.category == "part" for c in CONCEPTS[-len(PARTS) :])
    assert dm.class_categories == ("object",)


def test_probe_concept_masks_partition_object_and_background() -> None:
    dm = shapes()
    batches = list(dm.probe_dataloader())
    x = torch.cat([b[0] for b in batches])
    labels = torch.cat([b[1] for b in batches])
    index = torch.cat([b[2] for b in batches])
    assert sorted(index.tolist()) == list(range(20))
    assert x.shape == (20, 3, 32, 32) and labels.shape == (20, 5, 32, 32)
    assert labels.dtype == torch.long
    a = all_arrays(dm)
    mask = torch.from_numpy(a["probe_object_mask"])[index]
    factors = torch.from_numpy(a["probe_factors"])[index]
    on_object = labels[:, :3] > 0
    # Object, colour and texture are labelled exactly on the object ...
    assert torch.equal(on_object, mask[:, None].expand_as(on_object))
    # ... background exactly elsewhere: every pixel is object xor background.
    assert torch.equal(labels[:, 3] > 0, ~mask)
    assert torch.equal((labels[:, 0] > 0) ^ (labels[:, 3] > 0), torch.ones_like(mask))
    # Each labelled pixel carries its image's concept, of the right category.
    for cat, name in enumerate(CATEGORIES):
        ids = labels[:, cat][labels[:, cat] > 0]
        assert all(CONCEPTS[i - 1].category == name for i in ids.unique().tolist())
    obj_ids = torch.where(mask, labels[:, 0], 0).amax((1, 2))
    big = mask.flatten(1).any(1)
    assert torch.equal(obj_ids[big] - 1, factors[big, 0])
    bg_names = [CONCEPTS[int(labels[n, 3][~mask[n]][0]) - 1].name for n in range(20)]
    assert bg_names == [BACKGROUNDS[int(f)] for f in factors[:, 3]]
    # Parts: every object pixel has one; the others only in the edge band or at a corner.
    assert bool((labels[:, 4] > 0)[mask].all())
    names = {CONCEPTS[i - 1].name for i in labels[:, 4][~mask].unique().tolist() if i}
    assert names == {"corner"} | {f"edge_{a}" for a in EDGE_ANGLES}


def test_object_pixels_have_the_object_colour() -> None:
    # Plain objects are one colour plus noise (std 0.03), so inside the mask each channel
    # sits near the palette colour (jitter 0.06) and the shape is where the labels say.
    data = generate_shapes(120, 32, seed=5, split="probe")
    palette = np.array(list(PALETTE.values()))
    plain = data["factors"][:, 2] == TEXTURES.index("plain")
    for n in np.flatnonzero(plain):
        pixels = data["images"][n].reshape(3, -1)[:, data["object_mask"][n].ravel()] / 255.0
        colour = palette[data["factors"][n, 1]]
        assert np.abs(np.median(pixels, axis=1) - colour).max() < 0.1


def test_every_object_has_pixels_and_stays_inside_the_image() -> None:
    data = generate_shapes(200, 32, seed=0, split="train")
    mask = data["object_mask"]
    area = mask.mean((1, 2))
    assert area.min() > 0.03 and area.max() < 0.6
    border = mask[:, 0].any(1) | mask[:, -1].any(1) | mask[:, :, 0].any(1) | mask[:, :, -1].any(1)
    assert not border.any()


def test_concept_label_maps_known_answer() -> None:
    mask = torch.tensor([[[True, False], [False, False]]])
    factors = torch.tensor([[2, 1, 3, 0]])
    part_map = torch.tensor([[[6, 2], [1, 0]]], dtype=torch.uint8)  # interior, edge_0, corner
    maps = concept_label_maps(mask, factors, part_map)
    c = 1 + len(SHAPES)  # first colour id; ids follow CONCEPTS order
    t = c + len(PALETTE)
    b = t + len(TEXTURES)
    p = b + len(BACKGROUNDS)
    expected = torch.tensor(
        [
            [
                [[3, 0], [0, 0]],
                [[c + 1, 0], [0, 0]],
                [[t + 3, 0], [0, 0]],
                [[0, b], [b, b]],
                [[p + 5, p + 1], [p, 0]],
            ]
        ]
    )
    assert torch.equal(maps, expected)
    assert CONCEPTS[3 - 1].name == SHAPES[2] and CONCEPTS[b - 1].name == BACKGROUNDS[0]
    assert [CONCEPTS[i - 1].name for i in (p, p + 1, p + 5)] == ["corner", "edge_0", "interior"]


EDGE_CODES = [1 + PARTS.index(f"edge_{a}") for a in EDGE_ANGLES]


def _render(label: int, size: int, centre: float, radius: float, theta: float) -> np.ndarray:
    """(1, size, size) object mask of one shape, in the frame generate_shapes uses."""
    coords = np.arange(size, dtype=np.float64) + 0.5
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    dx, dy = xx - centre, yy - centre
    u = (dx * np.cos(theta) + dy * np.sin(theta)) / radius
    v = (-dx * np.sin(theta) + dy * np.cos(theta)) / radius
    return _shape_masks(np.array([label]), u[None], v[None])


def _parts(label: int, size: int, centre: float, radius: float, theta: float):
    mask = _render(label, size, centre, radius, theta)
    one = lambda value: np.array([value], dtype=np.float64)  # noqa: E731
    pm = part_maps(
        np.array([label]), mask, one(centre), one(centre), one(radius), one(theta), size / 32
    )
    return mask[0], pm[0]


def test_square_corners_sit_at_its_four_vertices() -> None:
    # Axis-aligned square of half-side 0.78 * 10 = 7.8 px centred at (16, 16): vertices at
    # 16 ± 7.8. Corner pixels are those whose centre is within 2 px of one of them.
    mask, pm = _parts(SHAPES.index("square"), 32, 16.0, 10.0, 0.0)
    assert mask.sum() == 16 * 16  # pixel centres 8.5 .. 23.5
    corner = pm == 1 + PARTS.index("corner")
    ys, xs = np.nonzero(corner)
    for vx in (8.2, 23.8):
        for vy in (8.2, 23.8):
            near = (np.abs(xs + 0.5 - vx) < 3) & (np.abs(ys + 0.5 - vy) < 3)
            assert near.sum() >= 9  # a disc of radius 2 holds 9 to 13 pixel centres
            cx, cy = (xs[near] + 0.5).mean(), (ys[near] + 0.5).mean()
            assert abs(cx - vx) < 0.35 and abs(cy - vy) < 0.35
    # Nothing else: every corner pixel is near one of the four vertices ...
    far = np.minimum(np.abs(xs + 0.5 - 8.2), np.abs(xs + 0.5 - 23.8)) >= 2
    far |= np.minimum(np.abs(ys + 0.5 - 8.2), np.abs(ys + 0.5 - 23.8)) >= 2
    assert not far.any()
    # ... the edge band is the mask's 1-px boundary on each side (rows/cols 7-8, 23-24),
    # and the interior the rest of the object.
    edge_or_corner = np.zeros((32, 32), dtype=bool)
    edge_or_corner[7:25, 7:25] = True
    edge_or_corner[9:23, 9:23] = False
    edge = np.isin(pm, EDGE_CODES)
    assert np.array_equal(edge | corner, edge_or_corner | corner)
    # Orientation: the top and bottom sides run at 0°, the left and right sides at 90°.
    rows, cols = np.nonzero(edge)
    horizontal = (rows <= 8) | (rows >= 23)
    assert np.all(pm[rows[horizontal], cols[horizontal]] == 1 + PARTS.index("edge_0"))
    assert np.all(pm[rows[~horizontal], cols[~horizontal]] == 1 + PARTS.index("edge_90"))
    assert np.array_equal(pm == 1 + PARTS.index("interior"), mask & ~edge_or_corner & ~corner)
    assert not ((pm > 0) & ~edge_or_corner & ~mask & ~corner).any()


def test_diagonal_edges_of_a_diamond() -> None:
    # A square turned by 45° in image coordinates (y down): its upper-right and lower-left
    # sides run from top-left to bottom-right on screen (135°, y up), the other two at 45°.
    mask, pm = _parts(SHAPES.index("square"), 32, 16.0, 10.0, math.pi / 4)
    rows, cols = np.nonzero(np.isin(pm, EDGE_CODES))
    y, x = rows + 0.5 - 16, cols + 0.5 - 16
    falling = (x > 0) == (y < 0)  # upper right or lower left on screen
    assert np.all(pm[rows[falling], cols[falling]] == 1 + PARTS.index("edge_135"))
    assert np.all(pm[rows[~falling], cols[~falling]] == 1 + PARTS.index("edge_45"))
    assert falling.sum() > 20 and (~falling).sum() > 20


@pytest.mark.parametrize("name", SHAPES)
def test_edge_band_is_the_boundary_of_the_object_mask(name: str) -> None:
    # Independent of the pooling the generator uses: a pixel is in the band iff its 3x3
    # neighbourhood holds pixels of both the object and the background.
    k = SHAPES.index(name)
    mask, pm = _parts(k, 32, 16.0, 11.0, 0.4)
    padded = np.pad(mask, 1, mode="edge")
    views = [padded[i : i + 32, j : j + 32] for i in range(3) for j in range(3)]
    band = np.any(views, axis=0) & ~np.all(views, axis=0)
    corner = pm == 1 + PARTS.index("corner")
    assert np.array_equal(np.isin(pm, EDGE_CODES), band & ~corner)
    assert np.array_equal(pm == 1 + PARTS.index("interior"), mask & ~band & ~corner)
    assert corner.any() == bool(len(VERTICES[name]))  # circles and rings have no corners


@pytest.mark.parametrize("name", ["square", "triangle", "cross", "star"])
def test_every_vertex_is_a_corner_of_the_rendered_outline(name: str) -> None:
    # At 256 px an edge is locally straight, so a disc around a point of the outline is
    # half object; around a vertex it is clearly less (convex) or more (concave). A vertex
    # list rotated, scaled or with outer and inner swapped puts points off the outline or
    # on straight edges and fails.
    k, size, radius, theta = SHAPES.index(name), 256, 90.0, 0.7
    mask = _render(k, size, 128.0, radius, theta)[0]
    coords = np.arange(size) + 0.5
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    vertices = vertex_positions(k, 128.0, 128.0, radius, theta)
    assert len(vertices) == {"square": 4, "triangle": 3, "cross": 12, "star": 10}[name]
    for vx, vy in vertices:
        disc = (xx - vx) ** 2 + (yy - vy) ** 2 <= 6.0**2
        share = mask[disc].mean()
        assert share < 0.4 or share > 0.6, (name, vx, vy, share)
        assert 0.05 < share < 0.95  # on the outline, not off it
    # Control: the midpoint between a vertex and the next along the outline of the square
    # is on a straight edge, where the disc is half object.
    if name == "square":
        (ax, ay), (bx, by) = vertices[0], vertices[1]
        mid = (xx - (ax + bx) / 2) ** 2 + (yy - (ay + by) / 2) ** 2 <= 6.0**2
        assert abs(mask[mid].mean() - 0.5) < 0.08


def test_part_maps_of_generated_images() -> None:
    data = generate_shapes(60, 32, seed=1, split="probe")
    pm, mask, label = data["part_map"], data["object_mask"], data["labels"]
    assert pm.dtype == np.uint8 and pm.shape == mask.shape and int(pm.max()) <= len(PARTS)
    corners = (pm == 1 + PARTS.index("corner")).any((1, 2))
    round_shape = np.isin(label, [SHAPES.index("circle"), SHAPES.index("ring")])
    assert np.array_equal(corners, ~round_shape)
    assert np.isin(pm, EDGE_CODES).any((1, 2)).all()
    assert (pm[mask] > 0).all() and not (pm[~mask] == 1 + PARTS.index("interior")).any()


def test_fixed_mean_std_match_generated_data() -> None:
    x = generate_shapes(600, 32, seed=0, split="train")["images"] / 255.0
    np.testing.assert_allclose(x.mean((0, 2, 3)), ShapesDataModule.mean, atol=0.02)
    np.testing.assert_allclose(x.std((0, 2, 3)), ShapesDataModule.std, atol=0.02)


def test_other_image_size() -> None:
    dm = shapes(image_size=48)
    x, _, _ = next(iter(dm.train_dataloader()))
    assert x.shape[1:] == (3, 48, 48) and dm.image_size == 48
    assert next(iter(dm.probe_dataloader()))[1].shape[1:] == (5, 48, 48)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"num_train": 0}, "dataset.num_train"),
        ({"num_val": 0}, "dataset.num_val"),
        ({"num_test": -1}, "dataset.num_test"),
        ({"num_probe": 0}, "dataset.num_probe"),
        ({"image_size": 8}, "dataset.image_size"),
        ({"batch_size": 0}, "dataset.batch_size"),
        ({"num_train": 2.5}, "dataset.num_train"),
    ],
)
def test_shapes_bad_arguments_name_the_key(kwargs: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key):
        ShapesDataModule(**{**SMALL, **kwargs})


def test_loaders_before_setup_fail_clearly() -> None:
    with pytest.raises(RuntimeError, match="setup"):
        ShapesDataModule(**SMALL).train_dataloader()


# Digits -----------------------------------------------------------------------------------


def test_digits_shapes_range_and_splits() -> None:
    dm = DigitsDataModule(num_val=100, num_test=200, seed=0)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (1497, 100, 200)
    x, y, index = next(iter(dm.train_dataloader()))
    assert x.dtype == torch.float32 and x.shape[1:] == (1, 32, 32)
    assert dm.in_channels == 1 and dm.num_classes == 10
    for split in (dm.train_set, dm.val_set, dm.test_set):
        assert float(split.images.min()) >= 0.0 and float(split.images.max()) <= 1.0
        counts = torch.bincount(split.labels, minlength=10)
        assert counts.min() >= 1
        # Stratified: each class within one image of its share of the split.
        share = torch.bincount(
            torch.cat([s.labels for s in (dm.train_set, dm.val_set, dm.test_set)]), minlength=10
        )
        expected = share * len(split) / share.sum()
        assert (counts - expected).abs().max() <= 1.0
    index = torch.cat([i for _, _, i in dm.test_dataloader()])
    assert sorted(index.tolist()) == list(range(200))


def test_digits_splits_are_disjoint_and_deterministic() -> None:
    def images(seed: int) -> list[torch.Tensor]:
        dm = DigitsDataModule(seed=seed)
        dm.setup()
        return [dm.train_set.images, dm.val_set.images, dm.test_set.images]

    a, b, c = images(0), images(0), images(1)
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    assert not torch.equal(a[2], c[2])
    rows = torch.cat(a).flatten(1)
    assert len(rows) == 1797
    order = stratified_order(np.repeat(np.arange(10), 5), seed=0)
    assert sorted(order.tolist()) == list(range(50))


def test_digits_resize_known_answer_and_mean_std() -> None:
    # At image_size=8 the images are the raw sklearn digits divided by 16.
    from sklearn.datasets import load_digits

    x, y = DigitsDataModule(image_size=8).load_tensors()
    raw = load_digits()
    np.testing.assert_allclose(x[:, 0].numpy(), raw.images / 16.0, atol=1e-7)
    np.testing.assert_array_equal(y.numpy(), raw.target)
    x32, _ = DigitsDataModule().load_tensors()
    np.testing.assert_allclose(float(x32.mean()), DigitsDataModule.mean[0], atol=1e-3)
    np.testing.assert_allclose(float(x32.std()), DigitsDataModule.std[0], atol=1e-3)


def test_digits_has_no_probe_masks() -> None:
    with pytest.raises(NotImplementedError, match="dataset=digits"):
        DigitsDataModule().probe_dataloader()


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"num_val": 0}, "dataset.num_val"),
        ({"num_test": 0}, "dataset.num_test"),
        ({"image_size": 4}, "dataset.image_size"),
        ({"num_test": 1500, "num_val": 200}, "dataset.num_val \\+ dataset.num_test"),
    ],
)
def test_digits_bad_arguments_name_the_key(kwargs: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key):
        DigitsDataModule(**kwargs)


# Configs ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "cls"), [("shapes", ShapesDataModule), ("digits", DigitsDataModule)]
)
def test_yaml_keys_are_the_constructor_kwargs(name: str, cls: type) -> None:
    from helpers import constructor_keys
    from omegaconf import OmegaConf

    conf = Path(__file__).resolve().parents[2] / "conf" / "dataset" / f"{name}.yaml"
    cfg = OmegaConf.load(conf)
    assert cfg._target_ == f"pse_lightning.data.{cls.__name__}"
    assert set(cfg.keys()) - {"_target_"} == constructor_keys(cls)
