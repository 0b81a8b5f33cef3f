"""Real models as they are: torchvision's weights API, weights files, the analysed layers.

Nothing downloads: a stand-in weights file (random tensors under torchvision's real key
names and shapes) is put in a temporary torch hub cache under the file name torchvision
expects, and torchvision's own builder reads the same file for the reference logits.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

from pse_lightning import pipeline
from pse_lightning.data import ImageNetDataModule
from pse_lightning.models import CheckpointError, TorchvisionClassifier
from pse_lightning.models.layers import find_feature_layers
from pse_lightning.models.pretrained import (
    cached_file,
    default_weights,
    imagenet_wnids,
    preprocessing,
)

DATA = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "in_channels": 3}


def stand_in_state(arch: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """torchvision's keys and shapes with random values (BN statistics made valid)."""
    torch.manual_seed(seed)
    state = torchvision.models.get_model(arch, weights=None).state_dict()
    for key, value in state.items():
        if key.endswith("running_var"):
            state[key] = torch.rand_like(value) + 0.5
        elif key.endswith("running_mean"):
            state[key] = 0.1 * torch.randn_like(value)
    return state


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A temporary torch hub cache; any download attempt fails the test."""
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))

    def no_download(*args, **kwargs):
        raise AssertionError("a test tried to download")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    return tmp_path / "hub"


def put_in_cache(arch: str) -> dict[str, torch.Tensor]:
    state = stand_in_state(arch)
    path = cached_file(default_weights(arch))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


def reference_logits(net: nn.Module, model: TorchvisionClassifier, x: torch.Tensor):
    with torch.no_grad():
        return net.eval()((x - model.mean) / model.std)


def test_pretrained_keeps_the_head_for_imagenet_classes_and_matches_torchvision(hub) -> None:
    put_in_cache("resnet18")
    model = TorchvisionClassifier(
        arch="resnet18",
        num_classes=1000,
        image_size=224,
        class_names=list(imagenet_wnids()),
        pretrained=True,
        **DATA,
    ).eval()
    assert model.ready and model.source.endswith("ResNet18_Weights.IMAGENET1K_V1")
    assert model.class_names[:2] == ("tench", "goldfish")  # names from the weights' metadata
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    torch.testing.assert_close(model.mean, mean)  # the weights' normalisation, not the data's
    # torchvision's own builder reads the same cached file (no network: it is there).
    own = torchvision.models.get_model("resnet18", weights="DEFAULT")
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_logits(own, model, x), atol=1e-6, rtol=0)


def test_pretrained_head_is_replaced_for_other_classes(hub) -> None:
    state = put_in_cache("resnet18")
    model = TorchvisionClassifier(
        arch="resnet18",
        num_classes=4,
        image_size=224,
        class_names=["a", "b", "c", "d"],
        pretrained=True,
        **DATA,
    )
    assert not model.ready and model.class_names == ("a", "b", "c", "d")
    assert model.net.fc.out_features == 4
    torch.testing.assert_close(model.net.conv1.weight, state["conv1.weight"])
    # 1,000 classes in another order are not ImageNet's: the head is not kept either.
    shuffled = list(reversed(imagenet_wnids()))
    other = TorchvisionClassifier(
        arch="resnet18", num_classes=1000, image_size=224, class_names=shuffled,
        pretrained=True, **DATA,
    )  # fmt: skip
    assert not other.ready


def test_pretrained_offline_names_file_folder_and_url(hub, monkeypatch) -> None:
    url = default_weights("resnet18").url
    with pytest.raises(FileNotFoundError) as err:
        TorchvisionClassifier(
            arch="resnet18", num_classes=4, image_size=32, pretrained=True, **DATA
        )
    message = str(err.value)
    assert Path(url).name in message and str(hub / "checkpoints") in message and url in message
    assert "model.download=true" in message and "\n" not in message

    def offline(*args, **kwargs):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(RuntimeError, match=r"could not fetch https://.*resnet18-.*offline"):
        TorchvisionClassifier(
            arch="resnet18", num_classes=4, image_size=32, pretrained=True, download=True, **DATA
        )


def test_download_only_when_asked_puts_the_file_in_the_hub_cache(hub, monkeypatch) -> None:
    state = stand_in_state("resnet18")
    calls = []

    def fake_download(url, dst, hash_prefix=None, progress=True):
        calls.append((url, hash_prefix))
        torch.save(state, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    model = TorchvisionClassifier(
        arch="resnet18", num_classes=4, image_size=32, pretrained=True, download=True, **DATA
    )
    weights = default_weights("resnet18")
    assert calls == [(weights.url, "f37072fd")] and cached_file(weights).is_file()
    torch.testing.assert_close(model.net.layer1[0].conv1.weight, state["layer1.0.conv1.weight"])


# Weights files -----------------------------------------------------------------------------


def robustness_layout(state: dict, mean: list[float], std: list[float]) -> dict:
    """The madrylab robustness library's checkpoint: model, attacker copy and normaliser."""
    norm = {
        "module.normalizer.new_mean": torch.tensor(mean).view(3, 1, 1),
        "module.normalizer.new_std": torch.tensor(std).view(3, 1, 1),
        "module.attacker.normalize.new_mean": torch.tensor(mean).view(3, 1, 1),
        "module.attacker.normalize.new_std": torch.tensor(std).view(3, 1, 1),
    }
    model = {f"module.model.{k}": v for k, v in state.items()}
    attacker = {f"module.attacker.model.{k}": v for k, v in state.items()}
    return {"model": {**model, **attacker, **norm}, "epoch": 90}


def robustbench_layout(state: dict, mean: list[float], std: list[float]) -> dict:
    """A RobustBench ImageNet model's state dict (its normalize_model wrapper)."""
    return {
        "normalize.mean": torch.tensor(mean).view(1, 3, 1, 1),
        "normalize.std": torch.tensor(std).view(1, 3, 1, 1),
        **{f"model.{k}": v for k, v in state.items()},
    }


ROBUST_STATS = ([0.4, 0.45, 0.5], [0.2, 0.21, 0.22])
LAYOUTS = {
    "torchvision": lambda s: s,
    "dataparallel": lambda s: {f"module.{k}": v for k, v in s.items()},
    "state_dict_wrapper": lambda s: {"state_dict": s, "epoch": 3},
    "model_wrapper": lambda s: {"model": {f"module.{k}": v for k, v in s.items()}},
    "robustness": lambda s: robustness_layout(s, *ROBUST_STATS),
    "robustbench": lambda s: robustbench_layout(s, *ROBUST_STATS),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_weights_files_in_every_layout_give_torchvisions_logits(tmp_path, layout) -> None:
    state = stand_in_state("resnet18")
    path = tmp_path / f"{layout}.pt"
    torch.save(LAYOUTS[layout](state), path)
    model = TorchvisionClassifier(
        arch="resnet18", num_classes=1000, image_size=224, weights=str(path), **DATA
    ).eval()
    assert model.ready and model.source == str(path)
    expected_mean = ROBUST_STATS[0] if layout.startswith("robust") else DATA["mean"]
    torch.testing.assert_close(model.mean.flatten(), torch.tensor(expected_mean))
    net = torchvision.models.resnet18()
    net.load_state_dict(state)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_logits(net, model, x), atol=1e-6, rtol=0)


def test_weights_file_with_another_head_is_fine_tuned(tmp_path) -> None:
    state = stand_in_state("resnet18")
    torch.save(state, tmp_path / "w.pt")
    model = TorchvisionClassifier(
        arch="resnet18", num_classes=10, image_size=224, weights=str(tmp_path / "w.pt"), **DATA
    )
    assert not model.ready and model.net.fc.out_features == 10
    torch.testing.assert_close(model.net.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])


def test_weights_file_for_another_architecture_names_both(tmp_path) -> None:
    torch.save(stand_in_state("resnet18"), tmp_path / "r18.pt")
    with pytest.raises(CheckpointError) as err:
        TorchvisionClassifier(
            arch="resnet50", num_classes=1000, image_size=224, weights=str(tmp_path / "r18.pt"),
            **DATA,
        )  # fmt: skip
    message = str(err.value)
    assert "model.arch=resnet50" in message and "model.arch=resnet18" in message
    assert "missing keys" in message and "shape mismatches" in message


def test_unreadable_or_code_bearing_weights_are_refused(tmp_path) -> None:
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a PyTorch weights file"):
        TorchvisionClassifier(
            arch="resnet18", num_classes=4, image_size=32, weights=str(tmp_path / "bad.pt"), **DATA
        )
    torch.save({"epoch": 3, "note": "no tensors"}, tmp_path / "empty.pt")
    with pytest.raises(CheckpointError, match="holds no state dict"):
        TorchvisionClassifier(
            arch="resnet18", num_classes=4, image_size=32, weights=str(tmp_path / "empty.pt"),
            **DATA,
        )  # fmt: skip


def test_bad_arch_and_both_weight_sources() -> None:
    with pytest.raises(ValueError, match=r"model.arch must be one of \[.*'inception_v3'"):
        TorchvisionClassifier(arch="resnet51", num_classes=4, image_size=32, **DATA)
    with pytest.raises(ValueError, match="pass one"):
        TorchvisionClassifier(
            arch="resnet18", num_classes=4, image_size=32, pretrained=True, weights="w.pt", **DATA
        )
    with pytest.raises(ValueError, match="at least 75 px"):
        TorchvisionClassifier(arch="inception_v3", num_classes=4, image_size=32, **DATA)


# Layers and preprocessing ------------------------------------------------------------------


def test_inception_preprocessing_comes_from_its_weights() -> None:
    prep = preprocessing(default_weights("inception_v3"))
    assert (prep.crop_size, prep.resize_size, prep.interpolation) == (299, 342, "bilinear")
    assert preprocessing(default_weights("efficientnet_b0")).interpolation == "bicubic"


LAYERS = {
    "resnet50": ("layer4", ("layer3", "layer4"), "fc"),
    "wide_resnet50_2": ("layer4", ("layer3", "layer4"), "fc"),
    "inception_v3": ("Mixed_7c", ("Mixed_7b", "Mixed_7c"), "fc"),
    "vgg16": ("features.29", ("features.27", "features.29"), None),
    "densenet121": ("features.norm5", ("features.transition3", "features.norm5"), None),
    "efficientnet_b0": ("features.8", ("features.7", "features.8"), "classifier.1"),
    "regnet_y_400mf": (
        "trunk_output.block4",
        ("trunk_output.block3", "trunk_output.block4"),
        "fc",
    ),
    "convnext_tiny": ("features.7", ("features.6", "features.7"), None),
}


@pytest.mark.parametrize("arch", list(LAYERS))
def test_analysed_layers_are_found_in_the_module_tree(arch: str) -> None:
    if arch.startswith("regnet"):  # its initialisation cannot run on the meta device
        net = torchvision.models.get_model(arch, weights=None)
    else:
        with torch.device("meta"):  # the tree only: no memory, no initialisation
            net = torchvision.models.get_model(arch, weights=None)
    found = find_feature_layers(net, arch)
    assert (found.feature_layer, found.dissection_layers, found.head) == LAYERS[arch]


@pytest.mark.parametrize("arch", ["vit_b_16", "swin_t"])
def test_transformers_have_no_cam_layer_and_say_so(arch: str) -> None:
    with torch.device("meta"):
        net = torchvision.models.get_model(arch, weights=None)
    found = find_feature_layers(net, arch)
    assert found.feature_layer is None and found.dissection_layers == ()
    assert f"model.arch={arch}" in found.missing and "CAM" in found.missing


@pytest.mark.parametrize("arch", ["resnet18", "efficientnet_b0", "regnet_y_400mf"])
def test_found_head_is_exactly_linear_on_the_pooled_feature_map(arch: str) -> None:
    torch.manual_seed(0)
    model = TorchvisionClassifier(arch=arch, num_classes=5, image_size=64, **DATA).eval()
    feats = {}
    layer = model.get_submodule(model.feature_layer)
    handle = layer.register_forward_hook(lambda m, i, o: feats.update(a=o))
    with torch.no_grad():
        logits = model(torch.rand(2, 3, 64, 64))
    handle.remove()
    head = model.get_submodule(model.head)
    with torch.no_grad():
        torch.testing.assert_close(head(feats["a"].mean((2, 3))), logits, atol=1e-5, rtol=0)


# The pipeline ------------------------------------------------------------------------------


def imagenet_val_tree(root: Path, classes) -> None:
    """val/<wnid>/<one image> only: evaluating a ready model needs nothing else."""
    for k, wnid in enumerate(classes):
        (root / "val" / wnid).mkdir(parents=True)
        Image.new("RGB", (12, 10), (k % 256, 40, 200)).save(root / "val" / wnid / "a.png")


def imagenet_cfg(make_cfg, root: Path, *extra: str):
    return make_cfg(
        "dataset=imagenet",
        f"dataset.root={root}",
        "dataset.num_workers=0",
        "dataset.eval_samples=2",
        "dataset.batch_size=2",
        "model=resnet18",
        "attack.steps=1",
        "trainer.enable_progress_bar=false",
        *extra,
        tiny=False,
    )


@pytest.mark.slow
def test_pretrained_imagenet_model_is_evaluated_on_val_only_without_training(
    make_cfg, hub, tmp_path, monkeypatch
) -> None:
    put_in_cache("resnet18")
    imagenet_val_tree(tmp_path / "imagenet", imagenet_wnids())

    def no_training(*args, **kwargs):
        raise AssertionError("a ready model was trained")

    monkeypatch.setattr(pipeline, "fit", no_training)
    for extra in ([], ["training=none"]):
        cfg = imagenet_cfg(make_cfg, tmp_path / "imagenet", "model.pretrained=true", *extra)
        results = pipeline.run(cfg)
        # Stand-in weights get both images wrong: they are counted, and no attack statistic
        # is made up for images that were never attacked (NaN, not 0).
        assert results["test/samples"] == 2
        assert results["test/clean_acc"] + results["test/clean_misclassified"] / 2 == 1
    assert not (tmp_path / "imagenet" / "train").exists()
    assert not any(Path(cfg.paths.checkpoint_dir).glob("*.pt"))  # nothing cached


def test_training_none_refuses_a_model_that_is_not_ready(make_cfg, hub, tmp_path) -> None:
    put_in_cache("resnet18")
    imagenet_val_tree(tmp_path / "imagenet", ["n01440764", "n01443537"])
    cfg = imagenet_cfg(make_cfg, tmp_path / "imagenet", "model.pretrained=true", "training=none")
    with pytest.raises(ValueError, match=r"does not have the 2 classes.*fine-tune it"):
        pipeline.run(cfg)
    cfg = imagenet_cfg(make_cfg, tmp_path / "imagenet", "training=none")
    with pytest.raises(ValueError, match="has no trained weights"):
        pipeline.run(cfg)
    cfg = make_cfg("stage=fit", "training=none")
    with pytest.raises(ValueError, match="stage=fit trains a new model"):
        pipeline.run(cfg)


def test_imagenet_serves_the_weights_transform(tmp_path) -> None:
    imagenet_val_tree(tmp_path, ["n01440764", "n01443537"])
    dm = ImageNetDataModule(root=str(tmp_path), image_size=16, num_workers=0)
    dm.prepare_data()
    dm.setup("test")
    assert dm.test_set[0][0].shape == (3, 16, 16) and dm.train_set is None
    dm.use_preprocessing(40, 46, "bicubic")
    assert dm.test_set[0][0].shape == (3, 40, 40) and dm.image_size == 40
    with pytest.raises(FileNotFoundError, match=r"train/ missing.*Training needs it"):
        dm.setup("fit")
