"""Every choice of every config group composes and instantiates; bad values fail early."""

from __future__ import annotations

import pytest
import torch
from helpers import group_choices
from hydra.errors import ConfigCompositionException, InstantiationException
from hydra.utils import instantiate

from pse_lightning import pipeline
from pse_lightning.attacks.base import Attack

GROUPS = [
    "dataset",
    "model",
    "attack",
    "analysis",
    "training",
    "trainer",
    "logger",
    "paths",
    "defense",
    "experiment",
]


def test_every_group_has_choices() -> None:
    for group in GROUPS:
        assert group_choices(group), f"conf/{group}/ has no choices"


@pytest.mark.parametrize(("group", "choice"), [(g, c) for g in GROUPS for c in group_choices(g)])
def test_choice_composes(make_cfg, group: str, choice: str) -> None:
    key = f"+experiment={choice}" if group == "experiment" else f"{group}={choice}"
    cfg = make_cfg(key.lstrip("+"), tiny=False)
    assert cfg.stage in pipeline.STAGES


@pytest.mark.parametrize("choice", group_choices("attack"))
def test_attack_choice_instantiates(make_cfg, choice: str) -> None:
    cfg = make_cfg(f"attack={choice}")
    assert isinstance(instantiate(cfg.attack), Attack)


@pytest.mark.parametrize("choice", group_choices("analysis"))
def test_analysis_choice_instantiates(make_cfg, choice: str) -> None:
    cfg = make_cfg(f"analysis={choice}")
    for name, sub in pipeline._analysis_configs(cfg).items():
        assert instantiate(sub).name == name


@pytest.mark.parametrize("choice", group_choices("model"))
def test_model_choice_instantiates(make_cfg, choice: str) -> None:
    cfg = make_cfg(f"model={choice}")
    model = instantiate(
        cfg.model, num_classes=3, in_channels=3, mean=[0.5] * 3, std=[0.25] * 3, image_size=32
    )
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 3)


@pytest.mark.parametrize("choice", group_choices("dataset"))
def test_dataset_choice_instantiates(make_cfg, choice: str) -> None:
    cfg = make_cfg(f"dataset={choice}", tiny=False)
    datamodule = instantiate(cfg.dataset)
    assert datamodule.batch_size >= 1


@pytest.mark.parametrize("choice", ["cpu", "ddp_cpu"])
def test_cpu_trainers_instantiate(make_cfg, choice: str) -> None:
    cfg = make_cfg(f"trainer={choice}")
    trainer = instantiate(cfg.trainer, logger=False)
    assert trainer.num_devices >= 1


def test_unknown_choice_lists_the_valid_ones(make_cfg) -> None:
    with pytest.raises(ConfigCompositionException, match=r"(?s)Available options.*pgd"):
        make_cfg("attack=nope")


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("attack.eps=-0.1", "attack.eps"),
        ("attack.eps=8", "attack.eps"),
        ("attack.steps=0", "attack.steps"),
        ("dataset.batch_size=0", "dataset.batch_size"),
        ("stage=train", "stage"),
    ],
)
def test_out_of_range_values_fail_before_heavy_work(make_cfg, override: str, key: str) -> None:
    cfg = make_cfg(override, "attack=pgd")
    with pytest.raises((ValueError, InstantiationException), match=key):
        pipeline.build(cfg)


@pytest.mark.parametrize("launcher", ["joblib", "submitit_slurm"])
def test_grid_launchers_compose(launcher: str) -> None:
    from helpers import CONF_DIR
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose("config", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    assert launcher.split("_")[0] in cfg.hydra.launcher._target_.lower()


def test_robust_vs_standard_is_one_grid_over_every_variant(make_cfg) -> None:
    from helpers import CONF_DIR
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose(
            "config", overrides=["experiment=robust_vs_standard"], return_hydra_config=True
        )
    params = cfg.hydra.sweeper.params
    assert set(params.training.split(",")) == set(group_choices("training"))
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    assert cfg.logger.group == "robust_vs_standard"
    assert "comparison" in cfg.hydra.callbacks
    # Every variant is also evaluated with AutoAttack at PGD's budget.
    assert set(params.attack.split(",")) == {"fgsm", "pgd", "autoattack"}


def test_robust_vs_standard_jobs_share_data_seed_and_training_attack() -> None:
    """Each grid point composes; every adversarial variant trains against the same PGD."""
    from helpers import CONF_DIR
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    jobs = []
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        for training in group_choices("training"):
            for attack in ("fgsm", "pgd", "autoattack"):
                jobs.append(
                    compose(
                        "config",
                        overrides=[
                            "experiment=robust_vs_standard",
                            f"training={training}",
                            f"attack={attack}",
                        ],
                    )
                )
    assert len(jobs) == 3 * len(group_choices("training"))
    assert len({OmegaConf.to_yaml(j.dataset) for j in jobs}) == 1
    assert {j.seed for j in jobs} == {0}
    for job in jobs:
        assert job.training.epochs == 6
        attack = job.training.objective.get("attack")
        if attack is not None:
            assert (attack.steps, attack.step_size, attack.eps) == (3, 0.0125, 0.03)
        assert list(job.analysis) == ["pse"]
