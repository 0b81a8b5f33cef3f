"""experiment=robust_vs_standard_zoo and experiment=paper_imagenet: composed, and run end to
end on tiny fixture trees with stand-in weights (random tensors in the real key layouts and
shapes) in a temporary torch hub cache, so nothing downloads.

The end-to-end runs are the CLI in a subprocess (Hydra's multirun, the sweep callback),
with CIFAR's MD5 check relaxed for the fake files as tests/data/test_real_data.py does; steps and
sample counts are shrunk by overrides. WideResNet-28-10 and ResNet-50 at 224 px on CPU keep
them slow.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
import yaml
from helpers import CONF_DIR, ROOT
from hydra import compose, initialize_config_dir
from test_pretrained import imagenet_val_tree, stand_in_state
from test_real_data import write_broden, write_cifar
from test_zoo import needs_robustbench
from test_zoo import stand_in_state as zoo_stand_in_state
from torch import nn

from pse_lightning.data import ImageNetDataModule
from pse_lightning.models.pretrained import (
    cached_file,
    default_weights,
    imagenet_wnids,
    preprocessing,
)

ZOO_MODELS = ("Standard", "Carmon2019Unlabeled")


def composed(*overrides: str):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


def test_robust_vs_standard_zoo_composes_one_group_of_two_zoo_models_untrained() -> None:
    cfg = composed("experiment=robust_vs_standard_zoo")
    params = cfg.hydra.sweeper.params
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN" and "comparison" in cfg.hydra.callbacks
    assert params["model.name"].split(",") == list(ZOO_MODELS)
    assert set(params.attack.split(",")) == {"fgsm", "pgd", "autoattack"}
    assert cfg.logger.group == "robust_vs_standard_zoo" and cfg.training.name == "none"
    assert cfg.model._target_.endswith("RobustBenchClassifier")
    assert (cfg.model.dataset, cfg.model.threat_model) == ("cifar10", "Linf")
    assert cfg.dataset._target_.endswith("CIFAR10DataModule")
    for attack in ("fgsm", "pgd", "autoattack"):  # every job: same data, budget, analyses
        job = composed("experiment=robust_vs_standard_zoo", f"attack={attack}")
        assert job.attack.eps == pytest.approx(8 / 255, abs=1e-6)
        assert list(job.analysis) == ["pse", "cam"] and job.dataset.eval_samples == 500


def test_paper_imagenet_composes_pretrained_resnet50_three_attacks_broden_probe() -> None:
    cfg = composed("experiment=paper_imagenet")
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN" and cfg.logger.group == "paper_imagenet"
    assert set(cfg.hydra.sweeper.params.attack.split(",")) == {"cw", "ead", "strattack"}
    assert (cfg.model.arch, cfg.model.pretrained, cfg.training.name) == ("resnet50", True, "none")
    assert cfg.dataset._target_.endswith("ImageNetDataModule")
    assert cfg.dataset.probe._target_.endswith("BrodenDataModule")
    assert set(cfg.analysis) == {"pse", "cam", "dissection"}


# End to end ------------------------------------------------------------------------------

#: The CLI with CIFAR's MD5 check reduced to "the file exists" (fake files cannot match).
_CLI = """
import os, sys
import torchvision.datasets.cifar as cifar
cifar.check_integrity = lambda path, md5=None: os.path.isfile(path)
from pse_lightning.cli.app import main
sys.argv = ["pse_lightning", *sys.argv[1:]]
main()
"""


def run_cli(tmp_path: Path, *overrides: str) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "TORCH_HOME": str(tmp_path / "torch"),
        "WANDB_MODE": "offline",  # the experiments' W&B group, offline
        "WANDB_SILENT": "true",
        "HYDRA_FULL_ERROR": "1",
    }
    result = subprocess.run(
        # Job folders by number: the shrinking overrides would make names too long.
        [
            sys.executable,
            "-c",
            _CLI,
            f"paths.root={tmp_path}",
            "hydra.sweep.subdir=${hydra.job.num}",
            *overrides,
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout}\n{result.stderr[-6000:]}")


def job_metrics(tmp_path: Path) -> dict[str, dict]:
    """``{the job's overrides, space-separated: metrics}`` of every multirun job."""
    jobs = {}
    for path in sorted((tmp_path / "multirun").glob("*/*/*/metrics.json")):
        overrides = yaml.safe_load((path.parent / ".hydra" / "overrides.yaml").read_text())
        jobs[" ".join(overrides)] = json.loads(path.read_text())["metrics"]
    return jobs


def write_zoo_stand_ins(tmp_path: Path, x_test: torch.Tensor) -> nn.Module:
    """Standard as a bare state dict, Carmon2019Unlabeled as its authors saved it
    (``state_dict`` with DataParallel's ``module.``), in RobustBench's file layout.

    A random WRN-28-10 gives every image the same class by a wide margin; the robust
    stand-in's head bias is centred on the fixture images (``x_test``, (N, 3, 32, 32) in
    [0, 1]) so that its predictions depend on the image and attacks can flip them.

    Returns:
        The robust stand-in as loaded, to label the fixture images with its predictions.
    """
    from pse_lightning.models.zoo_registry import zoo_entry

    folder = tmp_path / "torch" / "hub" / "robustbench" / "cifar10" / "Linf"
    folder.mkdir(parents=True)
    for seed, name in enumerate(ZOO_MODELS):
        net = zoo_entry(name, "cifar10", "Linf").build()
        state = zoo_stand_in_state(net, seed=seed)
        net.load_state_dict(state)
        if name == "Carmon2019Unlabeled":
            with torch.no_grad():
                state["fc.bias"] -= net.eval()(x_test).mean(0)
            net.load_state_dict(state)
            state = {"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 200}
        torch.save(state, folder / f"{name}.pt")
    return net.eval()


def label_cifar_test_images(root: Path, net: nn.Module) -> None:
    """Relabel the fake test batch with ``net``'s predictions, so that its images are
    clean-correct and get attacked and analysed (random weights would get them wrong)."""
    path = root / "cifar-10-batches-py" / "test_batch"
    with open(path, "rb") as handle:
        batch = pickle.load(handle)
    with torch.no_grad():
        batch["labels"] = net(cifar_images(batch["data"])).argmax(1).tolist()
    with open(path, "wb") as handle:
        pickle.dump(batch, handle)


def cifar_images(rows) -> torch.Tensor:
    """CIFAR's uint8 rows (R, G, B planes) as the datamodule serves them: (N, 3, 32, 32)."""
    return torch.as_tensor(rows, dtype=torch.float32).view(-1, 3, 32, 32) / 255


def make_first_served_image_correct(tmp_path: Path, weights_file: Path) -> None:
    """Raise the stand-in ResNet-50's bias for the class of the first image the run serves
    until that image is classified correctly (by 0.5), so CW, EAD and StrAttack attack it."""
    data = ImageNetDataModule(root=str(tmp_path / "imagenet"), num_workers=0, seed=0,
                              eval_samples=1, batch_size=1)  # fmt: skip
    data.prepare_data()
    data.setup("test")
    prep = preprocessing(default_weights("resnet50"))
    data.use_preprocessing(prep.crop_size, prep.resize_size, prep.interpolation)
    x, y, _ = next(iter(data.test_dataloader()))
    state = torch.load(weights_file, weights_only=True)
    net = torchvision.models.resnet50()
    net.load_state_dict(state)
    mean, std = torch.tensor(prep.mean).view(1, 3, 1, 1), torch.tensor(prep.std).view(1, 3, 1, 1)
    with torch.no_grad():
        logits = net.eval()((x - mean) / std)[0]
    state["fc.bias"][y] += logits.max() - logits[y] + 0.5
    torch.save(state, weights_file)


@pytest.mark.slow
@needs_robustbench
def test_robust_vs_standard_zoo_runs_end_to_end(tmp_path: Path) -> None:
    x_test = write_cifar(tmp_path / "cifar")[2]
    robust = write_zoo_stand_ins(tmp_path, cifar_images(x_test.reshape(len(x_test), -1)))
    label_cifar_test_images(tmp_path / "cifar", robust)
    small = [
        "experiment=robust_vs_standard_zoo",
        f"dataset.root={tmp_path}/cifar",
        "dataset.num_val=10",
        "dataset.eval_samples=2",
        "dataset.batch_size=2",
        "trainer.enable_progress_bar=false",
        "analysis.pse.steps=4",
        "analysis.pse.max_steps=4",
        "analysis.cam.shifts=8",
    ]
    run_cli(tmp_path, *small, "attack=fgsm,pgd")
    run_cli(tmp_path, *small, "attack=autoattack", "attack.steps=2", "attack.target_classes=2")
    jobs = job_metrics(tmp_path)
    assert len(jobs) == 6, sorted(jobs)
    for name in ZOO_MODELS:
        for attack in ("fgsm", "pgd", "autoattack"):
            (job,) = [m for o, m in jobs.items() if f"model.name={name}" in o and attack in o]
            assert job["test/samples"] == 2 and "test/robust_acc" in job
            if name == "Carmon2019Unlabeled":  # its own predictions label the images
                assert job["test/clean_acc"] == 1
                assert job["test/cam/evaluated"] == 2
    # The stand-in robust model is as weak as random weights: PGD flips both images, and
    # PSE and CAM analyse them.
    carmon_pgd = [m for o, m in jobs.items() if "Carmon" in o and "attack=pgd" in o][0]
    assert carmon_pgd["test/success_rate"] == 1 and carmon_pgd["test/pse/n_images"] == 2
    assert carmon_pgd["test/cam/scored"] == 2
    sweeps = sorted((tmp_path / "multirun").glob("*/*/comparison.md"))
    assert sweeps, "the sweep callback wrote no comparison"
    assert not any((tmp_path / "outputs" / "checkpoints").glob("*.pt"))  # nothing trained


@pytest.mark.slow
def test_paper_imagenet_runs_end_to_end(tmp_path: Path) -> None:
    path = (
        tmp_path / "torch" / "hub" / "checkpoints" / cached_file(default_weights("resnet50")).name
    )
    path.parent.mkdir(parents=True)
    torch.save(stand_in_state("resnet50"), path)
    imagenet_val_tree(tmp_path / "imagenet", imagenet_wnids())
    make_first_served_image_correct(tmp_path, path)
    write_broden(tmp_path / "broden")
    run_cli(
        tmp_path,
        "experiment=paper_imagenet",
        f"dataset.root={tmp_path}/imagenet",
        "dataset.num_workers=0",
        "dataset.eval_samples=1",
        "dataset.batch_size=1",
        f"dataset.probe.root={tmp_path}/broden",
        "dataset.probe.image_size=64",
        "dataset.probe.mask_size=32",
        "trainer.enable_progress_bar=false",
        "attack.steps=2",
        "attack.binary_search_steps=1",
        "analysis.pse.steps=4",
        "analysis.pse.max_steps=4",
        "analysis.cam.shifts=8",
        "analysis.dissection.permutations=50",
        "analysis.dissection.bootstrap=10",
    )
    jobs = job_metrics(tmp_path)
    assert len(jobs) == 3, sorted(jobs)
    for attack in ("cw", "ead", "strattack"):
        (job,) = [m for o, m in jobs.items() if f"attack={attack}" in o]
        assert job["test/samples"] == 1 and job["test/clean_acc"] == 1
        assert any(k.startswith("test/dissection/") for k in job), sorted(job)
    assert not (tmp_path / "imagenet" / "train").exists()
