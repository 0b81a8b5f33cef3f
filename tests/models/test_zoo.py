"""RobustBench zoo models (model=robustbench) with stand-in registries and weights files.

Most tests replace robustbench's registry by a stand-in (a small network in the zoo's
conventions: its own normalisation buffers, keys under RobustBench's wrappers), so they
run without the package; those that read the real registry skip when robustbench is not
installed (the `robust` extra). Nothing downloads: robustbench's download function is
replaced, and a test that reached the network would fail.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import group_choices
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from pse_lightning.cli.preflight import check_environment
from pse_lightning.models import CheckpointError, RobustBenchClassifier, zoo_registry
from pse_lightning.validation import InputError

HAS_ROBUSTBENCH = importlib.util.find_spec("robustbench") is not None
needs_robustbench = pytest.mark.skipif(
    not HAS_ROBUSTBENCH, reason="robustbench is not installed (pip install '.[robust]')"
)
DATA = {"num_classes": 10, "in_channels": 3, "mean": [0.5] * 3, "std": [0.2] * 3}


class TinyZooNet(nn.Module):
    """A WideResNet-shaped stand-in: its own mu/sigma buffers, three blocks, bn, relu, fc."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mu", torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1))
        self.register_buffer("sigma", torch.tensor([0.2, 0.3, 0.25]).view(1, 3, 1, 1))
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.block1 = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(inplace=True))
        self.block2 = nn.Sequential(nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.ReLU())
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block2(self.block1(self.conv1((x - self.mu) / self.sigma)))
        return self.fc(nn.functional.adaptive_avg_pool2d(self.relu(self.bn1(out)), 1).flatten(1))


def stand_in_state(net: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """The architecture's keys and shapes with random values at its own scale.

    Each floating tensor is redrawn around its initial mean with its initial spread (0.1
    for constant ones: BN weights around 1, biases around 0), so a deep stand-in stays
    finite; BN running variances are positive; the normalisation constants are kept.
    """
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in net.state_dict().items():
        if not value.is_floating_point() or key.endswith(("mu", "sigma", "mean", "std")):
            state[key] = value.clone()
        elif key.endswith("running_var"):
            state[key] = torch.rand(value.shape, generator=gen) + 0.5
        else:
            spread = float(value.std()) if value.numel() > 1 and value.std() > 0 else 0.1
            state[key] = value.mean() + spread * torch.randn(value.shape, generator=gen)
    return state


@pytest.fixture
def zoo(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A stand-in registry and a temporary torch hub cache; downloads fail the test."""
    entries = {
        "cifar10": {
            "Linf": {
                "Tiny": {"model": TinyZooNet, "gdrive_id": "id-tiny"},
                "TinyEnsemble": {"model": TinyZooNet, "gdrive_id": ["a", "b"]},
            },
            "L2": {"TinyL2": {"model": TinyZooNet, "gdrive_id": "id-l2"}},
        }
    }
    monkeypatch.setattr(zoo_registry, "registry", lambda: entries)
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))

    def no_download(*args, **kwargs):
        raise AssertionError("a test tried to download")

    monkeypatch.setattr(
        zoo_registry,
        "import_robustbench",
        lambda: SimpleNamespace(download_gdrive_new=no_download),
    )
    return tmp_path / "hub" / "robustbench"


def zoo_file(model_dir: Path, name: str = "Tiny", threat: str = "Linf") -> Path:
    path = model_dir / "cifar10" / threat / f"{name}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def reference_logits(state: dict, x: torch.Tensor) -> torch.Tensor:
    net = TinyZooNet()
    net.load_state_dict(state)
    with torch.no_grad():
        return net.eval()(x)


LAYOUTS = {
    "bare": lambda s: s,
    "DataParallel": lambda s: {f"module.{k}": v for k, v in s.items()},
    "state_dict + module. (Carmon2019Unlabeled)": lambda s: {
        "state_dict": {f"module.{k}": v for k, v in s.items()},
        "epoch": 100,
    },
    "model. prefix (Chen2020Efficient)": lambda s: {f"model.{k}": v for k, v in s.items()},
    "last/best snapshots": lambda s: {"last": s, "best": {k: v + 1 for k, v in s.items()}},
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_zoo_files_in_every_wrapper_give_the_architectures_logits(zoo, layout) -> None:
    state = stand_in_state(TinyZooNet())
    torch.save(LAYOUTS[layout](state), zoo_file(zoo))
    model = RobustBenchClassifier(name="Tiny", image_size=32, **DATA).eval()
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_logits(state, x), atol=1e-6, rtol=0)
    # The zoo net normalises itself: the wrapper must not normalise again.
    assert model.mean.abs().sum() == 0 and (model.std == 1).all()
    assert model.ready and "cifar10/Linf/Tiny" in model.source


def test_a_file_without_the_normalisation_buffers_keeps_the_architectures(zoo) -> None:
    state = stand_in_state(TinyZooNet())
    torch.save({k: v for k, v in state.items() if k not in ("mu", "sigma")}, zoo_file(zoo))
    model = RobustBenchClassifier(name="Tiny", image_size=32, **DATA).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_logits(state, x), atol=1e-6, rtol=0)


def test_analysed_layers_are_found_and_in_place_activations_turned_off(zoo) -> None:
    torch.save(stand_in_state(TinyZooNet()), zoo_file(zoo))
    model = RobustBenchClassifier(name="Tiny", image_size=32, **DATA)
    # The last block extended over the bn + relu that follow it; Grad-CAM (no GAP module).
    assert model.feature_layer == "net.relu" and model.head is None
    assert model.dissection_layers == ("net.block1", "net.relu")
    assert not any(getattr(m, "inplace", False) for m in model.modules())


def test_a_file_for_another_architecture_lists_the_keys(zoo) -> None:
    state = stand_in_state(TinyZooNet())
    state["fc.weight"] = torch.zeros(100, 8)
    state["extra.weight"] = torch.zeros(1)
    del state["conv1.bias"]
    torch.save(state, zoo_file(zoo))
    expected = (
        r"missing keys \['conv1.bias'\].*unexpected keys \['extra.weight'\]"
        r".*fc.weight: file \(100, 8\) vs model \(10, 8\)"
    )
    with pytest.raises(CheckpointError, match=expected):
        RobustBenchClassifier(name="Tiny", image_size=32, **DATA)


def test_code_bearing_files_are_refused(zoo) -> None:
    torch.save({"state_dict": stand_in_state(TinyZooNet()), "args": SimpleNamespace(lr=1)},
               zoo_file(zoo))  # fmt: skip
    with pytest.raises(CheckpointError, match=r"holds pickled Python objects.*refused for safety"):
        RobustBenchClassifier(name="Tiny", image_size=32, **DATA)


def test_missing_file_names_file_folder_and_download_and_fetches_only_when_asked(
    zoo, monkeypatch
) -> None:
    folder = zoo / "cifar10" / "Linf"
    with pytest.raises(FileNotFoundError) as info:
        RobustBenchClassifier(name="Tiny", image_size=32, **DATA)
    message = str(info.value)
    assert f"Tiny.pt in {folder}" in message and "model.download=true" in message
    assert not folder.exists()
    state = stand_in_state(TinyZooNet(), seed=3)
    calls = []

    def fake_download(gdrive_id: str, path: Path) -> None:
        calls.append(gdrive_id)
        torch.save({"state_dict": state}, path)

    monkeypatch.setattr(
        zoo_registry,
        "import_robustbench",
        lambda: SimpleNamespace(download_gdrive_new=fake_download),
    )
    model = RobustBenchClassifier(name="Tiny", image_size=32, download=True, **DATA).eval()
    assert calls == ["id-tiny"] and (folder / "Tiny.pt").is_file()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_logits(state, x), atol=1e-6, rtol=0)
    RobustBenchClassifier(name="Tiny", image_size=32, download=True, **DATA)
    assert calls == ["id-tiny"]  # present now: not fetched again


def test_failed_download_leaves_nothing_and_says_so(zoo, monkeypatch) -> None:
    def offline(gdrive_id: str, path: Path) -> None:
        Path(path).write_bytes(b"<html>partial")
        raise ConnectionError("no route to host")

    monkeypatch.setattr(
        zoo_registry, "import_robustbench", lambda: SimpleNamespace(download_gdrive_new=offline)
    )
    with pytest.raises(RuntimeError, match=r"could not fetch model.name=Tiny.*offline"):
        RobustBenchClassifier(name="Tiny", image_size=32, download=True, **DATA)
    assert not (zoo / "cifar10" / "Linf" / "Tiny.pt").exists()


def test_unknown_names_list_close_ones_and_other_threat_models(zoo) -> None:
    with pytest.raises(ValueError, match=r"model.name=Tiyn is not in .* close names: \['Tiny'"):
        RobustBenchClassifier(name="Tiyn", image_size=32, **DATA)
    with pytest.raises(ValueError, match=r"it is a cifar10/L2 model: set model.dataset/model.thr"):
        RobustBenchClassifier(name="TinyL2", image_size=32, **DATA)
    with pytest.raises(ValueError, match=r"TinyEnsemble .* is an ensemble"):
        RobustBenchClassifier(name="TinyEnsemble", image_size=32, **DATA)
    with pytest.raises(ValueError, match=r"model.threat_model must be one of"):
        RobustBenchClassifier(name="Tiny", threat_model="linf", image_size=32, **DATA)


def test_the_dataset_must_serve_the_zoo_models_classes_and_size(zoo) -> None:
    torch.save(stand_in_state(TinyZooNet()), zoo_file(zoo))
    with pytest.raises(ValueError, match=r"10 classes .* but the dataset has 3 classes.*dataset="):
        RobustBenchClassifier(name="Tiny", image_size=32, **{**DATA, "num_classes": 3})
    with pytest.raises(ValueError, match=r"takes 32 px cifar10 images, but the dataset serves 64"):
        RobustBenchClassifier(name="Tiny", image_size=64, **DATA)


def test_without_robustbench_the_error_says_how_to_install(monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "robustbench" else real(name)
    )
    with pytest.raises(ValueError, match=r"needs the robustbench package: pip install"):
        zoo_registry.import_robustbench()


def zoo_model_cfg(model_dir: Path, **keys):
    return OmegaConf.create(
        {
            "model": {
                "_target_": "pse_lightning.models.RobustBenchClassifier",
                "name": "Tiny",
                "dataset": "cifar10",
                "threat_model": "Linf",
                "model_dir": str(model_dir),
                "download": False,
                **keys,
            }
        }
    )


def test_preflight_catches_a_missing_zoo_file_before_the_run(tmp_path) -> None:
    with pytest.raises(InputError, match=r"needs Tiny.pt in .*cifar10/Linf.*model.download=true"):
        check_environment(zoo_model_cfg(tmp_path), None)
    zoo_file(tmp_path, "Tinyy")
    (tmp_path / "cifar10" / "Linf" / "Tinyy.pt").touch()
    with pytest.raises(InputError, match=r"close names: \['Tinyy'\]"):
        check_environment(zoo_model_cfg(tmp_path), None)
    check_environment(zoo_model_cfg(tmp_path, download=True), None)  # will be fetched
    check_environment(zoo_model_cfg(tmp_path, name="Tinyy"), None)


# The real registry ------------------------------------------------------------------------


@needs_robustbench
def test_the_real_registry_builds_wrn_28_10_for_standard_and_carmon(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    standard = zoo_registry.zoo_entry("Standard", "cifar10", "Linf")
    robust = zoo_registry.zoo_entry("Carmon2019Unlabeled", "cifar10", "Linf")
    with torch.device("meta"):
        a, b = standard.build(), robust.build()
    shapes_a = {k: v.shape for k, v in a.state_dict().items()}
    shapes_b = {k: v.shape for k, v in b.state_dict().items() if not k.startswith("sub_block1")}
    assert shapes_a == shapes_b and shapes_a["fc.weight"] == (10, 640)  # same WRN-28-10
    assert sum(v.numel() for v in a.parameters()) > 36_000_000
    with pytest.raises(ValueError, match=r"close names: \['Carmon2019Unlabeled'"):
        zoo_registry.zoo_entry("Carmon2019Unlabled", "cifar10", "Linf")
    with pytest.raises(ValueError, match=r"torchvision's: use model=resnet50"):
        zoo_registry.zoo_entry("Standard_R50", "imagenet", "Linf")


@needs_robustbench
def test_a_real_imagenet_entry_loads_a_robustness_library_file(tmp_path, monkeypatch) -> None:
    """Salman2020Do_R18 is robustbench's normalize_model(resnet18): its file (the robustness
    library's layout) needs the attacker copy dropped and the ``model.`` prefix added."""
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    entry = zoo_registry.zoo_entry("Salman2020Do_R18", "imagenet", "Linf")
    reference = entry.build()
    state = stand_in_state(reference)
    inner = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    payload = {
        "model": {
            **{f"module.model.{k}": v for k, v in inner.items()},
            **{f"module.attacker.model.{k}": v + 1 for k, v in inner.items()},
            "module.normalizer.new_mean": state["normalize.mean"],
            "module.normalizer.new_std": state["normalize.std"],
        },
        "epoch": 90,
    }
    path = tmp_path / "md" / "imagenet" / "Linf" / "Salman2020Do_R18.pt"
    path.parent.mkdir(parents=True)
    torch.save(payload, path)
    model = RobustBenchClassifier(
        name="Salman2020Do_R18",
        dataset="imagenet",
        model_dir=str(tmp_path / "md"),
        image_size=224,
        **{**DATA, "num_classes": 1000},
    ).eval()
    reference.load_state_dict(state)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference.eval()(x), atol=1e-6, rtol=0)
    assert (model.preprocessing.crop_size, model.preprocessing.resize_size) == (224, 256)
    assert model.feature_layer == "net.model.layer4" and model.head == "net.model.fc"


@pytest.mark.parametrize("choice", group_choices("attack"))
def test_every_attack_runs_on_a_zoo_model(zoo, composed, choice: str) -> None:
    """The wrapper is an ordinary Classifier: each attack config (CAM-guided ones through
    the found feature layer) returns a valid adversarial batch."""
    torch.save(stand_in_state(TinyZooNet()), zoo_file(zoo))
    model = RobustBenchClassifier(name="Tiny", image_size=32, **DATA).eval()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model(x).argmax(1)
    # Iterations and queries are budgets, not mechanisms: fewer run the same code path.
    steps = ["attack.steps=10", "attack.square_queries=100"]
    budget = {"square": ["attack.n_queries=100"], "fab": ["attack.steps=10"],
              "autoattack": steps, "autoattack_fast": steps[:1]}  # fmt: skip
    cfg = composed(f"attack={choice}", *budget.get(choice, []))
    result = instantiate(cfg.attack)(model, x, y)
    assert result.x_adv.shape == x.shape
    assert result.x_adv.min() >= 0 and result.x_adv.max() <= 1


def test_dissection_finds_and_probes_the_zoo_models_layers(zoo, tmp_path, monkeypatch) -> None:
    import torchvision
    from test_real_data import broden, cifar, write_broden, write_cifar

    from pse_lightning.analysis.dissection import Dissection

    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity",
                        lambda path, md5=None: Path(path).is_file())  # fmt: skip
    write_cifar(tmp_path / "cifar")
    write_broden(tmp_path / "broden")
    dm = cifar(tmp_path / "cifar", probe=broden(tmp_path / "broden"))
    dm.setup()
    torch.save(stand_in_state(TinyZooNet()), zoo_file(zoo))
    model = RobustBenchClassifier(name="Tiny", image_size=32, **DATA).eval()
    analysis = Dissection(bins=16, permutations=0, bootstrap=0, top_images=1, top_units=1)
    analysis.prepare(model, dm)
    assert set(analysis.probe.layers) == {"net.block1", "net.relu"}
    assert analysis.probe.probe_images == 3
