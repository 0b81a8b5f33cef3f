"""Models take [0, 1] inputs; checkpoints round-trip and fail loudly when they should."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from pse_lightning.models import CheckpointError, SmallCNN, TorchvisionClassifier, load_weights
from pse_lightning.models.checkpoint import cache_path, config_digest, save_checkpoint

STATS = {"mean": [0.4, 0.5, 0.6], "std": [0.2, 0.25, 0.3]}


def small(seed: int = 0, widths=(8, 16)) -> SmallCNN:
    torch.manual_seed(seed)
    return SmallCNN(num_classes=4, in_channels=3, widths=list(widths), **STATS).eval()


def test_normalisation_lives_inside_the_model() -> None:
    model = small()
    x = torch.rand(2, 3, 16, 16)
    mean = torch.tensor(STATS["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(STATS["std"]).view(1, 3, 1, 1)
    torch.testing.assert_close(model(x), model.net((x - mean) / std))


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "vgg16"])
def test_torchvision_models_take_small_images_and_name_their_layers(request, arch: str) -> None:
    if arch == "vgg16":  # the session's (conftest.py), built with these arguments
        model = request.getfixturevalue("small_vgg16")
    else:
        model = TorchvisionClassifier(
            arch=arch, num_classes=4, in_channels=3, image_size=32, **STATS
        )
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 4)
    assert (model.head is None) == (arch == "vgg16")
    for name in (model.feature_layer, *model.dissection_layers):
        model.get_submodule(name)
    assert not any(getattr(m, "inplace", False) for m in model.modules())


def test_pretrained_weights_missing_offline_names_the_file(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"resnet18-.*\.pth"):
        TorchvisionClassifier(
            arch="resnet18", num_classes=4, in_channels=3, image_size=32, pretrained=True, **STATS
        )


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    model, other = small(0), small(1)
    path = save_checkpoint(tmp_path / "m.pt", model, {"model": "smallcnn", "num_classes": 4})
    meta = load_weights(other, path, expect={"model": "smallcnn"})
    assert meta["num_classes"] == 4
    x = torch.rand(3, 3, 16, 16)
    torch.testing.assert_close(other(x), model(x))
    assert not list(tmp_path.glob(".*tmp")), "temporary file left behind"


def test_missing_checkpoint_says_how_to_get_one(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="stage=fit"):
        load_weights(small(), tmp_path / "absent.pt")


def test_corrupt_checkpoint(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "m.pt", small(), {})
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="truncated"):
        load_weights(small(), path)


def test_pickled_code_is_never_executed(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"state_dict": Evil(), "meta_json": "{}"}))
    with pytest.raises(CheckpointError):
        load_weights(small(), path)
    assert not (tmp_path / "pwned").exists()


def test_mismatched_checkpoint_names_keys_and_shapes(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "m.pt", small(widths=(8, 16, 32)), {"model": "smallcnn"})
    with pytest.raises(CheckpointError, match=r"unexpected keys \['net.features.2"):
        load_weights(small(widths=(8, 16)), path)
    path = save_checkpoint(tmp_path / "w.pt", small(widths=(8, 24)), {})
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_weights(small(widths=(8, 16)), path)
    with pytest.raises(CheckpointError, match="model='resnet18'"):
        load_weights(small(), tmp_path / "m.pt", expect={"model": "resnet18"})


def test_cache_key_depends_on_config() -> None:
    a = cache_path("c", "smallcnn", "shapes", "standard", config_digest({"lr": 1}))
    b = cache_path("c", "smallcnn", "shapes", "standard", config_digest({"lr": 2}))
    assert a != b and a.name.startswith("smallcnn-shapes-standard-")
