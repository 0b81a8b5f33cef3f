"""Real-data datamodules on tiny fixture trees: nothing is downloaded.

CIFAR-10 and MNIST read fake files in torchvision's own raw formats (pickled batches, IDX);
ImageNet reads a small ImageFolder tree; Broden reads a hand-made index.csv, category files
and segmentation PNGs whose pixels encode label numbers as R + 256 * G, so every concept
mask has a known answer.
"""

from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torchvision
from helpers import constructor_keys
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from pse_lightning import pipeline
from pse_lightning.data import (
    BrodenDataModule,
    CIFAR10DataModule,
    Concept,
    ImageNetDataModule,
    MNISTDataModule,
    ShapesDataModule,
)
from pse_lightning.data.broden import nearest_resize

CONF = Path(__file__).resolve().parents[2] / "conf" / "dataset"


def batch(loader) -> tuple:
    return next(iter(loader))


# CIFAR-10 ---------------------------------------------------------------------------------

CIFAR_PER_BATCH, CIFAR_TEST = 20, 12


def write_cifar(
    root: Path, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fake cifar-10-batches-py: 5 x 20 training and 12 test images, pickled as the originals.

    Returns:
        train images (100, 3, 32, 32) uint8, train labels, test images, test labels.
    """
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    n_train = 5 * CIFAR_PER_BATCH
    x_train = rng.integers(0, 256, (n_train, 3, 32, 32), dtype=np.uint8)
    y_train = np.arange(n_train) % 10
    x_test = rng.integers(0, 256, (CIFAR_TEST, 3, 32, 32), dtype=np.uint8)
    y_test = (np.arange(CIFAR_TEST) * 3) % 10

    def dump(name: str, x: np.ndarray, y: np.ndarray) -> None:
        with open(folder / name, "wb") as handle:  # rows are R plane, G plane, B plane
            pickle.dump({"data": x.reshape(len(x), -1), "labels": y.tolist()}, handle)

    for i in range(5):
        part = slice(i * CIFAR_PER_BATCH, (i + 1) * CIFAR_PER_BATCH)
        dump(f"data_batch_{i + 1}", x_train[part], y_train[part])
    dump("test_batch", x_test, y_test)
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump({"label_names": [f"class{k}" for k in range(10)]}, handle)
    return x_train, y_train, x_test, y_test


@pytest.fixture
def skip_md5(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake files cannot match CIFAR's MD5 sums: check existence only."""
    monkeypatch.setattr(
        torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path)
    )


def cifar(root: Path, **kwargs) -> CIFAR10DataModule:
    return CIFAR10DataModule(root=str(root), **{"num_val": 10, "batch_size": 8, **kwargs})


def test_cifar10_serves_the_files_images_in_chw_order(tmp_path: Path, skip_md5) -> None:
    x_train, y_train, x_test, y_test = write_cifar(tmp_path)
    dm = cifar(tmp_path, augment=False)
    dm.prepare_data()
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (90, 10, CIFAR_TEST)
    # Test split: torchvision's order, exact pixels, (x, y, index) batches in [0, 1].
    x, y, index = batch(dm.test_dataloader())
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32
    torch.testing.assert_close(x, torch.from_numpy(x_test[:8]).float() / 255, rtol=0, atol=0)
    assert y.tolist() == y_test[:8].tolist() and index.tolist() == list(range(8))
    # Train and val partition the training images; val holds one image of each class.
    seen = torch.cat([dm.train_set.images, dm.val_set.images]).flatten(1)
    original = torch.from_numpy(x_train).flatten(1)
    assert sorted(map(tuple, seen.tolist())) == sorted(map(tuple, original.tolist()))
    assert sorted(dm.val_set.labels.tolist()) == list(range(10))
    for images, labels in (
        (dm.train_set.images, dm.train_set.labels),
        (dm.val_set.images, dm.val_set.labels),
    ):
        match = (images.flatten(1)[:, None] == original[None]).all(-1).int().argmax(1)
        assert labels.tolist() == y_train[match.numpy()].tolist()


def test_cifar10_eval_samples_and_seeded_split(tmp_path: Path, skip_md5) -> None:
    write_cifar(tmp_path)
    a, b, c = (cifar(tmp_path, seed=s, eval_samples=5) for s in (0, 0, 1))
    for dm in (a, b, c):
        dm.setup()
    assert sum(len(x) for x, _, _ in a.test_dataloader()) == 5
    assert torch.equal(a.val_set.images, b.val_set.images)
    assert not torch.equal(a.val_set.images, c.val_set.images)


def test_cifar10_augmentation_is_a_shifted_crop_or_its_mirror(tmp_path: Path, skip_md5) -> None:
    write_cifar(tmp_path)
    dm = cifar(tmp_path, augment=True)
    dm.setup()
    clean = dm.train_set.images[3].float() / 255
    padded = torch.nn.functional.pad(clean, (4, 4, 4, 4))
    crops = [padded[:, dy : dy + 32, dx : dx + 32] for dy in range(9) for dx in range(9)]
    candidates = torch.stack(crops + [c.flip(-1) for c in crops])
    torch.manual_seed(0)
    variants = set()
    for _ in range(30):
        x, y, index = dm.train_set[3]
        hit = (candidates == x).flatten(1).all(1).nonzero().flatten().tolist()
        assert hit, "augmented image is no padded crop (or mirror) of the original"
        variants.add(hit[0])
        assert int(y) == int(dm.train_set.labels[3]) and index == 3
    assert len(variants) > 5  # it really is random


def test_cifar10_missing_files_name_path_and_fix(tmp_path: Path) -> None:
    dm = cifar(tmp_path / "nowhere")
    for call in (dm.prepare_data, dm.setup):
        with pytest.raises(FileNotFoundError) as info:
            call()
        message = str(info.value)
        assert str(tmp_path / "nowhere") in message
        assert "cifar-10-batches-py/data_batch_1" in message
        assert "dataset.download=true" in message


def test_cifar10_offline_download_fails_with_the_fix(tmp_path, monkeypatch) -> None:
    def offline(*args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", offline)
    dm = cifar(tmp_path, download=True)
    with pytest.raises(RuntimeError, match=r"(?s)could not fetch .*cifar-10-python.*offline"):
        dm.prepare_data()


def test_cifar10_download_runs_only_when_files_are_missing(
    tmp_path, monkeypatch, skip_md5
) -> None:
    calls = []

    def fake_download(url, download_root, filename=None, md5=None, **kwargs):
        calls.append(url)
        write_cifar(Path(download_root))

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", fake_download)
    dm = cifar(tmp_path, download=True)
    dm.prepare_data()
    dm.prepare_data()  # files now present: no second download
    assert calls == [torchvision.datasets.CIFAR10.url]
    dm.setup()
    assert len(dm.test_set) == CIFAR_TEST


def test_cifar10_corrupted_files_are_reported(tmp_path: Path) -> None:
    write_cifar(tmp_path)  # real MD5 check: the fake files fail it
    with pytest.raises(RuntimeError, match=r"(?s)incomplete or corrupted.*dataset.download=true"):
        cifar(tmp_path).setup()


# MNIST ------------------------------------------------------------------------------------


def write_idx(path: Path, array: np.ndarray) -> None:
    """IDX file: magic (0, 0, type 0x08 = ubyte, ndim), big-endian sizes, raw bytes."""
    with open(path, "wb") as handle:
        handle.write(struct.pack(">BBBB", 0, 0, 0x08, array.ndim))
        handle.write(struct.pack(f">{array.ndim}I", *array.shape))
        handle.write(array.astype(np.uint8).tobytes())


def write_mnist(root: Path, n_train: int = 40, n_test: int = 12) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(1)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    x_train = rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8)
    x_test = rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8)
    y_train, y_test = np.arange(n_train) % 10, (np.arange(n_test) * 7) % 10
    write_idx(raw / "train-images-idx3-ubyte", x_train)
    write_idx(raw / "train-labels-idx1-ubyte", y_train)
    write_idx(raw / "t10k-images-idx3-ubyte", x_test)
    write_idx(raw / "t10k-labels-idx1-ubyte", y_test)
    return x_train, y_train, x_test, y_test


def mnist(root: Path, **kwargs) -> MNISTDataModule:
    return MNISTDataModule(root=str(root), **{"num_val": 10, "batch_size": 6, **kwargs})


def test_mnist_native_size_one_channel(tmp_path: Path) -> None:
    _, _, x_test, y_test = write_mnist(tmp_path)
    dm = mnist(tmp_path)
    dm.prepare_data()
    dm.setup()
    assert (dm.num_classes, dm.in_channels, dm.image_size) == (10, 1, 28)
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (30, 10, 12)
    x, y, index = batch(dm.test_dataloader())
    assert x.shape == (6, 1, 28, 28)
    torch.testing.assert_close(x[:, 0], torch.from_numpy(x_test[:6]).float() / 255, rtol=0, atol=0)
    assert y.tolist() == y_test[:6].tolist() and index.tolist() == list(range(6))


def test_mnist_pads_centrally_and_rescales_its_statistics(tmp_path: Path) -> None:
    _, _, x_test, _ = write_mnist(tmp_path)
    dm = mnist(tmp_path, image_size=32)
    dm.setup()
    x = dm.test_set[0][0]
    assert x.shape == (1, 32, 32)
    torch.testing.assert_close(x[0, 2:30, 2:30], torch.from_numpy(x_test[0]).float() / 255)
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert float(x[0][border].abs().max()) == 0.0
    # Independent check of the padded statistics: give 28 px data exactly MNIST's moments,
    # zero-pad it, and measure.
    data = torch.rand(64, 28, 28, dtype=torch.float64)
    data = (data - data.mean()) / data.std(unbiased=False) * 0.3081 + 0.1307
    padded = torch.nn.functional.pad(data, (2, 2, 2, 2))
    assert dm.mean[0] == pytest.approx(float(padded.mean()), rel=1e-9)
    assert dm.std[0] == pytest.approx(float(padded.std(unbiased=False)), rel=1e-9)
    assert mnist(tmp_path).mean == (0.1307,) and mnist(tmp_path).std == (0.3081,)


def test_mnist_rejects_sizes_below_native() -> None:
    with pytest.raises(ValueError, match="dataset.image_size"):
        MNISTDataModule(root="x", image_size=20)


def test_mnist_missing_and_offline_errors(tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(
        FileNotFoundError,
        match=r"(?s)MNIST/raw/train-images-idx3-ubyte.*"
        r"dataset.download=true",
    ):
        mnist(tmp_path).prepare_data()

    def offline(*args, **kwargs):
        raise URLError("network is unreachable")

    monkeypatch.setattr(torchvision.datasets.mnist, "download_and_extract_archive", offline)
    with pytest.raises(RuntimeError, match=r"(?s)could not fetch.*offline.*copy"):
        mnist(tmp_path, download=True).prepare_data()


def test_mnist_truncated_file_is_reported(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    path = tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:9])
    with pytest.raises(RuntimeError, match="incomplete or corrupted"):
        mnist(tmp_path).setup()


# ImageNet folders ----------------------------------------------------------------------------

COLOURS = {"ant": (255, 0, 0), "bee": (0, 255, 0), "cat": (0, 0, 255)}


def write_folder(root: Path, per_class: dict[str, int]) -> None:
    """train/<class>/*.png and val/<class>/*.png, each image a flat class colour."""
    for split, count in per_class.items():
        for name, colour in COLOURS.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for k in range(count):
                size = (40 + 4 * k, 30)  # various sizes and aspect ratios
                Image.new("RGB", size, colour).save(folder / f"{name}_{k}.png")


def imagenet(root: Path, **kwargs) -> ImageNetDataModule:
    args = {"image_size": 16, "num_val": 3, "batch_size": 4, "seed": 0, **kwargs}
    return ImageNetDataModule(root=str(root), **args)


def test_imagenet_folder_classes_transforms_and_splits(tmp_path: Path) -> None:
    write_folder(tmp_path, {"train": 4, "val": 3})
    dm = imagenet(tmp_path)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.num_classes == 3 and list(dm.class_names) == ["ant", "bee", "cat"]
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (9, 3, 9)
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        for x, y, _index in loader:
            assert x.shape[1:] == (3, 16, 16) and x.dtype == torch.float32
            assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
            expected = torch.tensor([COLOURS[dm.class_names[c]] for c in y.tolist()]) / 255
            torch.testing.assert_close(x.mean((2, 3)), expected.float(), atol=1e-3, rtol=0)
    # Val holds one image per class out of train; the test order is class-stratified.
    assert sorted(int(dm.val_set[i][1]) for i in range(3)) == [0, 1, 2]
    assert sorted(int(dm.test_set[i][1]) for i in range(3)) == [0, 1, 2]
    assert [dm.test_set[i][2] for i in range(9)] == list(range(9))


def test_imagenet_crop_sizes_follow_image_size(tmp_path: Path) -> None:
    write_folder(tmp_path, {"train": 2, "val": 1})
    dm = imagenet(tmp_path, image_size=24, num_val=1)
    dm.setup()
    assert dm.test_set[0][0].shape == (3, 24, 24) and dm.train_set[0][0].shape == (3, 24, 24)


def test_imagenet_missing_and_malformed_trees(tmp_path: Path) -> None:
    with pytest.raises(
        FileNotFoundError, match=r"(?s)train/, val/ missing.*train/<class>/<image>"
    ):
        imagenet(tmp_path / "nowhere").prepare_data()
    write_folder(tmp_path, {"train": 2})
    flat = tmp_path / "val"
    flat.mkdir()
    Image.new("RGB", (8, 8)).save(flat / "ILSVRC2012_val_00000001.png")
    with pytest.raises(FileNotFoundError, match=r"(?s)not a class-per-folder.*valprep"):
        imagenet(tmp_path, num_val=1).setup()
    (flat / "ant").mkdir()
    Image.new("RGB", (8, 8)).save(flat / "ant" / "a.png")
    with pytest.raises(ValueError, match=r"only in train: \['bee', 'cat'\]"):
        imagenet(tmp_path, num_val=1).setup()


def test_imagenet_num_val_too_large(tmp_path: Path) -> None:
    write_folder(tmp_path, {"train": 2, "val": 1})
    with pytest.raises(ValueError, match="dataset.num_val must be <= 3"):
        imagenet(tmp_path, num_val=4).setup()


def test_imagenet_classes_unknown_before_setup() -> None:
    with pytest.raises(RuntimeError, match="setup"):
        ImageNetDataModule(root="x").num_classes  # noqa: B018


# Broden ------------------------------------------------------------------------------------

#: Global label numbers (as in label.csv) and the categories whose c_ files list them.
LABELS = {
    1: "red",
    2: "blue",
    3: "person",
    4: "door",
    5: "wheel",
    6: "kitchen",
    7: "street",
    300: "car",
}
CATEGORY_LABELS = {"color": [1, 2], "object": [3, 4, 300], "part": [4, 5], "scene": [6, 7]}
#: The concept list the datamodule must build: categories in category.csv order, each
#: category's labels by code; a label in two categories is two concepts.
EXPECTED_CONCEPTS = [Concept(LABELS[n], c) for c, ns in CATEGORY_LABELS.items() for n in ns]
CONCEPT_ID = {(c.category, c.name): i + 1 for i, c in enumerate(EXPECTED_CONCEPTS)}


def concept_id(category: str, number: int) -> int:
    """Independent reference: concept id of a label number in a category (0 if unlisted)."""
    if number not in CATEGORY_LABELS[category]:
        return 0
    return CONCEPT_ID[(category, LABELS[number])]


def write_png(path: Path, numbers: np.ndarray) -> None:
    rgb = np.stack([numbers % 256, numbers // 256, np.zeros_like(numbers)], -1).astype(np.uint8)
    Image.fromarray(rgb, "RGB").save(path)


def write_broden(root: Path) -> dict:
    """A 4-image Broden tree (8 px images, 4 px label maps); returns the written facts."""
    images = root / "images" / "src"
    images.mkdir(parents=True)
    (root / "category.csv").write_text(
        "name,first,last,count,frequency\n"
        + "".join(f"{c},1,9,{len(ns)},10\n" for c, ns in CATEGORY_LABELS.items())
    )
    (root / "label.csv").write_text(
        "number,name,category,frequency,coverage,syns\n0,-,,0,0,\n"
        + "".join(f"{n},{name},x(1),1,1.0,\n" for n, name in LABELS.items())
    )
    for category, numbers in CATEGORY_LABELS.items():
        rows = "".join(f"{k + 1},{n},{LABELS[n]},1,1.0\n" for k, n in enumerate(numbers))
        (root / f"c_{category}.csv").write_text("code,number,name,frequency,coverage\n" + rows)
    rng = np.random.default_rng(2)
    pixels = rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    for i in range(4):
        Image.fromarray(pixels[i], "RGB").save(images / f"im{i}.png")  # lossless
    colour = np.array([[1, 1, 2, 2]] * 2 + [[0, 2, 2, 0]] * 2)
    obj = np.array([[3, 3, 0, 0], [3, 3, 4, 4], [300, 300, 4, 4], [300, 5, 0, 0]])
    part_a = np.array([[0, 0, 0, 0], [0, 0, 4, 4], [0, 0, 4, 5], [5, 5, 0, 0]])
    part_b = np.array([[5, 5, 0, 0], [0, 0, 5, 5], [0, 0, 5, 5], [0, 0, 0, 0]])  # under part_a
    obj1 = np.array([[300] * 4, [5] * 4, [0] * 4, [3] * 4])  # 5 (wheel) is no object
    for name, array in (("c0", colour), ("o0", obj), ("pa", part_a), ("pb", part_b), ("o1", obj1)):
        write_png(images / f"{name}.png", array)
    header = "image,split,ih,iw,sh,sw," + ",".join(CATEGORY_LABELS) + "\n"
    rows = [
        "src/im0.png,train,8,8,4,4,src/c0.png,src/o0.png,src/pa.png;src/pb.png,6",
        "src/im1.png,train,8,8,4,4,,src/o1.png,,",
        "src/im2.png,val,8,8,4,4,,,,",  # nothing labelled: dropped
        "src/im3.png,val,8,8,4,4,,,,7;6",  # whole-image scene labels: the first wins
    ]
    (root / "index.csv").write_text(header + "\n".join(rows) + "\n")
    reference = np.vectorize(concept_id)
    empty = np.zeros((4, 4), dtype=np.int64)
    part = np.where(
        reference("part", part_a) > 0, reference("part", part_a), reference("part", part_b)
    )
    labels = [
        np.stack(
            [
                reference("color", colour),
                reference("object", obj),
                part,
                np.full((4, 4), concept_id("scene", 6)),
            ]
        ),
        np.stack([empty, reference("object", obj1), empty, empty]),
        np.stack([empty, empty, empty, np.full((4, 4), concept_id("scene", 7))]),
    ]
    return {"pixels": pixels[[0, 1, 3]], "labels": np.stack(labels)}


def broden(root: Path, **kwargs) -> BrodenDataModule:
    args = {"image_size": 8, "mask_size": 4, "batch_size": 4, "shuffle": False, **kwargs}
    return BrodenDataModule(root=str(root), **args)


def test_broden_concepts_are_label_category_pairs(tmp_path: Path) -> None:
    write_broden(tmp_path)
    dm = broden(tmp_path)
    dm.prepare_data()
    dm.setup("probe")
    assert dm.categories == list(CATEGORY_LABELS)
    assert dm.concepts == EXPECTED_CONCEPTS
    assert Concept("door", "object") in dm.concepts and Concept("door", "part") in dm.concepts


def test_broden_probe_batches_decode_masks_exactly(tmp_path: Path) -> None:
    facts = write_broden(tmp_path)
    dm = broden(tmp_path)
    dm.setup()
    x, labels, index = batch(dm.probe_dataloader())
    assert index.tolist() == [0, 1, 2]  # the unlabelled image is dropped
    assert x.shape == (3, 3, 8, 8) and x.dtype == torch.float32
    expected_x = torch.from_numpy(facts["pixels"]).permute(0, 3, 1, 2).float() / 255
    torch.testing.assert_close(x, expected_x, rtol=0, atol=0)
    assert labels.dtype == torch.long and labels.shape == (3, 4, 4, 4)
    assert labels.tolist() == facts["labels"].tolist()
    # Label 300 needs the green channel: it decodes to 'car', not to 300 % 256 = 44.
    car = CONCEPT_ID[("object", "car")]
    assert int(labels[0, 1, 2, 0]) == car and int(labels[1, 1, 0, 0]) == car


def test_broden_resizes_images_and_label_maps(tmp_path: Path) -> None:
    facts = write_broden(tmp_path)
    dm = broden(tmp_path, image_size=16, mask_size=8)
    dm.setup()
    x, labels, _ = batch(dm.probe_dataloader())
    assert x.shape == (3, 3, 16, 16) and labels.shape == (3, 4, 8, 8)
    upsampled = np.kron(facts["labels"], np.ones((2, 2), dtype=np.int64))  # nearest, x2
    assert labels.tolist() == upsampled.tolist()
    assert nearest_resize(np.arange(16).reshape(4, 4), 2).tolist() == [[5, 7], [13, 15]]


def test_broden_categories_split_and_grayscale(tmp_path: Path) -> None:
    facts = write_broden(tmp_path)
    dm = broden(tmp_path, categories=["scene", "color"], split="train", grayscale=True)
    dm.setup()
    assert dm.categories == ["scene", "color"] and dm.in_channels == 1
    assert [c.category for c in dm.concepts] == ["scene", "scene", "color", "color"]
    x, labels, index = batch(dm.probe_dataloader())
    assert index.tolist() == [0] and x.shape == (1, 1, 8, 8)  # im1 has no scene or colour
    # Ids are positions in this run's own concept list: scene first.
    assert labels[0, 0].unique().tolist() == [1]  # kitchen
    colour = facts["labels"][0, 0]
    assert labels[0, 1].tolist() == np.where(colour > 0, colour + 2, 0).tolist()
    grey = np.asarray(Image.fromarray(facts["pixels"][0]).convert("L"), dtype=np.float32) / 255
    torch.testing.assert_close(x[0, 0], torch.from_numpy(grey), rtol=0, atol=0)


def test_broden_errors_name_the_fix(tmp_path: Path) -> None:
    with pytest.raises(
        FileNotFoundError,
        match=r"(?s)index.csv, category.csv, images/ missing "
        r"under dataset.probe.root.*broden1_224.zip",
    ):
        broden(tmp_path / "nowhere").prepare_data()
    write_broden(tmp_path)
    with pytest.raises(ValueError, match=r"dataset.categories \['texture'\]"):
        broden(tmp_path, categories=["texture"]).setup()
    (tmp_path / "c_part.csv").unlink()
    with pytest.raises(FileNotFoundError, match="c_part.csv missing"):
        broden(tmp_path).setup()
    with pytest.raises(ValueError, match="dataset.categories"):
        BrodenDataModule(root="x", categories="object")


def test_broden_is_a_probe_set_only(tmp_path: Path) -> None:
    write_broden(tmp_path)
    dm = broden(tmp_path)
    with pytest.raises(ValueError, match=r"(?s)probe set.*\+dataset@dataset.probe=broden"):
        dm.setup("fit")
    dm.setup("probe")
    for call in (dm.train_dataloader, dm.val_dataloader, dm.test_dataloader):
        with pytest.raises(ValueError, match="no class labels"):
            call()


# Probe sets on classification datasets -----------------------------------------------------


def test_classification_dataset_carries_the_broden_probe(tmp_path: Path, skip_md5) -> None:
    write_cifar(tmp_path / "cifar")
    facts = write_broden(tmp_path / "broden")
    dm = cifar(tmp_path / "cifar", probe=broden(tmp_path / "broden"))
    assert not dm.concepts  # known once the probe is set up
    dm.prepare_data()
    dm.setup("fit")
    assert dm.concepts == EXPECTED_CONCEPTS and dm.categories == list(CATEGORY_LABELS)
    x, labels, index = batch(dm.probe_dataloader())
    assert labels.tolist() == facts["labels"].tolist() and x.shape == (3, 3, 8, 8)
    # Training batches stay CIFAR's.
    assert batch(dm.train_dataloader())[0].shape[1:] == (3, 32, 32)


def test_dissection_runs_on_the_broden_probe(tmp_path: Path, skip_md5) -> None:
    from pse_lightning.analysis.dissection import Dissection
    from pse_lightning.models import SmallCNN

    write_cifar(tmp_path / "cifar")
    write_broden(tmp_path / "broden")
    dm = cifar(tmp_path / "cifar", probe=broden(tmp_path / "broden"))
    dm.setup()
    torch.manual_seed(0)
    model = SmallCNN(num_classes=10, in_channels=3, mean=dm.mean, std=dm.std, widths=(4, 8))
    analysis = Dissection(bins=16, permutations=0, bootstrap=0, top_images=1, top_units=1)
    analysis.prepare(model, dm)
    assert analysis.probe.probe_images == 3
    assert analysis.probe.concepts == EXPECTED_CONCEPTS
    for layer in analysis.probe.layers.values():
        assert layer.iou.shape[1] == len(EXPECTED_CONCEPTS) + 1


def test_probe_channels_must_match(tmp_path: Path) -> None:
    write_mnist(tmp_path / "mnist")
    write_broden(tmp_path / "broden")
    dm = mnist(tmp_path / "mnist", probe=broden(tmp_path / "broden"))
    with pytest.raises(ValueError, match="dataset.probe.grayscale=true"):
        dm.setup()
    ok = mnist(tmp_path / "mnist", probe=broden(tmp_path / "broden", grayscale=True))
    ok.setup()
    assert batch(ok.probe_dataloader())[0].shape == (3, 1, 8, 8)


def test_shapes_can_be_the_probe_too(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    probe = ShapesDataModule(num_train=8, num_val=4, num_test=4, num_probe=6, image_size=16)
    probe.in_channels = 1  # stand-in for a grey probe: only the channel count is checked
    dm = mnist(tmp_path, probe=probe)
    dm.setup()
    assert dm.categories == probe.categories and len(batch(dm.probe_dataloader())[0]) == 6


def test_without_probe_dissection_is_refused_with_the_fix(tmp_path: Path) -> None:
    with pytest.raises(NotImplementedError, match=r"dataset=mnist .*\+dataset@dataset.probe"):
        mnist(tmp_path).probe_dataloader()
    with pytest.raises(TypeError, match="dataset.probe"):
        MNISTDataModule(root="x", probe={"root": "y"})


# Configs -----------------------------------------------------------------------------------

REAL = [
    ("cifar10", CIFAR10DataModule),
    ("mnist", MNISTDataModule),
    ("imagenet", ImageNetDataModule),
    ("broden", BrodenDataModule),
]


@pytest.mark.parametrize(("name", "cls"), REAL)
def test_yaml_keys_are_the_constructor_kwargs(name: str, cls: type) -> None:
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    assert cfg._target_ == f"pse_lightning.data.{cls.__name__}"
    assert set(cfg.keys()) - {"_target_"} == constructor_keys(cls)


@pytest.mark.parametrize(("name", "cls"), REAL)
def test_yaml_composes_and_instantiates_without_touching_files(make_cfg, name, cls) -> None:
    cfg = make_cfg(f"dataset={name}", tiny=False)
    dm = instantiate(cfg.dataset)
    assert type(dm) is cls
    folder = {"broden": "broden1_224"}.get(name, name)
    assert dm.root == Path(cfg.paths.data_dir) / folder
    assert not dm.root.exists()  # composing and instantiating read and fetch nothing


def test_broden_composes_as_the_probe_of_a_dataset(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg(
        "dataset=imagenet",
        "+dataset@dataset.probe=broden",
        f"dataset.probe.root={tmp_path}/b",
        "dataset.probe.image_size=112",
        tiny=False,
    )
    dm = instantiate(cfg.dataset)
    assert isinstance(dm.probe, BrodenDataModule)
    assert dm.probe.root == tmp_path / "b" and dm.probe.image_size == 112


def test_pipeline_builds_on_real_data_and_fails_at_once_without_it(
    make_cfg, tmp_path, skip_md5
) -> None:
    write_cifar(tmp_path / "cifar")
    cfg = make_cfg(
        "dataset=cifar10", f"dataset.root={tmp_path}/cifar", "dataset.num_val=10", tiny=False
    )
    parts = pipeline.build(cfg)
    assert parts.model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    cfg = make_cfg("dataset=cifar10", f"dataset.root={tmp_path}/none", tiny=False)
    with pytest.raises(FileNotFoundError, match="dataset.download=true"):
        pipeline.build(cfg)
    write_broden(tmp_path / "broden")
    cfg = make_cfg("dataset=broden", f"dataset.root={tmp_path}/broden", tiny=False)
    with pytest.raises(ValueError, match="probe set"):
        pipeline.build(cfg)


def test_imagenet_trees_at_other_roots_never_share_a_checkpoint(make_cfg, tmp_path) -> None:
    """root is not part of the checkpoint identity (data may move), so the tree's content
    is: other classes or images give another cache entry, the same tree moved the same."""
    write_folder(tmp_path / "a", {"train": 4, "val": 3})
    write_folder(tmp_path / "moved", {"train": 4, "val": 3})
    write_folder(tmp_path / "b", {"train": 5, "val": 3})

    def identity(root: Path) -> dict:
        cfg = make_cfg(
            "dataset=imagenet",
            f"dataset.root={root}",
            "dataset.num_val=3",
            "dataset.image_size=16",
            "dataset.num_workers=0",
            tiny=False,
        )
        return pipeline.checkpoint_identity(cfg, pipeline.build(cfg).datamodule)

    a, moved, b = identity(tmp_path / "a"), identity(tmp_path / "moved"), identity(tmp_path / "b")
    assert a == moved
    assert a["digest"] != b["digest"] and a["num_classes"] == b["num_classes"] == 3


def test_broden_shuffled_order_is_a_seeded_permutation_of_the_file_order(tmp_path: Path) -> None:
    """index.csv is grouped by source dataset; the default seeded order makes a prefix of
    the probe set (analysis.dissection.max_probe_images) a random subset."""
    write_broden(tmp_path / "broden")

    def served(**kwargs) -> list[list]:
        dm = broden(tmp_path / "broden", batch_size=1, **kwargs)
        dm.setup("probe")
        return [labels[0].tolist() for _x, labels, _index in dm.probe_dataloader()]

    in_file_order = served()
    orders = {seed: served(shuffle=True, seed=seed) for seed in range(6)}
    for seed, order in orders.items():
        assert sorted(map(str, order)) == sorted(map(str, in_file_order)), seed
        assert order == served(shuffle=True, seed=seed)  # deterministic
    assert any(order != in_file_order for order in orders.values())
    with pytest.raises(ValueError, match="dataset.shuffle"):
        broden(tmp_path / "broden", shuffle="yes")


def test_mnist_files_are_checked_before_any_work(tmp_path: Path) -> None:
    """Each IDX file's magic number and declared size against the file: good files pass, a
    truncated or fake one fails naming the file (before setup reads anything)."""
    write_mnist(tmp_path)
    mnist(tmp_path).check_readable()
    raw = tmp_path / "MNIST" / "raw"
    labels = raw / "train-labels-idx1-ubyte"
    labels.write_bytes(labels.read_bytes()[:-1])  # one label short
    with pytest.raises(RuntimeError, match=r"train-labels-idx1-ubyte is not an MNIST IDX file"):
        mnist(tmp_path).check_readable()
    write_idx(labels, np.zeros(40, dtype=np.uint8))
    (raw / "t10k-images-idx3-ubyte").write_bytes(b"fake")
    with pytest.raises(RuntimeError, match=r"t10k-images-idx3-ubyte is not an MNIST IDX file"):
        mnist(tmp_path).check_readable()
