"""Every choice of every config group composes and instantiates; bad values fail early."""

from __future__ import annotations

import re

import pytest
import torch
from helpers import choices_setting, constructor_keys, group_choices
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
    "callbacks",
    "logger",
    "paths",
    "defense",
    "ablation",
    "experiment",
]


def test_every_group_has_choices() -> None:
    for group in GROUPS:
        assert group_choices(group), f"conf/{group}/ has no choices"


@pytest.mark.parametrize(("group", "choice"), [(g, c) for g in GROUPS for c in group_choices(g)])
def test_choice_composes(composed, group: str, choice: str) -> None:
    cfg = composed(f"{group}={choice}")  # shared with the config check's test below
    assert cfg.stage in pipeline.STAGES
    assert cfg.hydra.runtime.choices[group] == choice


@pytest.mark.parametrize("choice", group_choices("attack"))
def test_attack_choice_instantiates(composed, choice: str) -> None:
    cfg = composed(f"attack={choice}")
    assert isinstance(instantiate(cfg.attack), Attack)


@pytest.mark.parametrize("choice", group_choices("analysis"))
def test_analysis_choice_instantiates(composed, choice: str) -> None:
    cfg = composed(f"analysis={choice}")
    for name, sub in pipeline._analysis_configs(cfg).items():
        assert instantiate(sub).name == name


@pytest.mark.parametrize(
    "choice",
    [
        pytest.param(
            c,
            marks=pytest.mark.skip(reason="needs zoo weights: tests/models/test_zoo.py builds it"),
        )
        if c == "robustbench"
        else c
        for c in group_choices("model")
    ],
)
def test_model_choice_instantiates(composed, choice: str) -> None:
    cfg = composed(f"model={choice}")
    model = instantiate(
        cfg.model, num_classes=3, in_channels=3, mean=[0.5] * 3, std=[0.25] * 3, image_size=32
    )
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 3)


@pytest.mark.parametrize("choice", group_choices("dataset"))
def test_dataset_choice_instantiates(composed, choice: str) -> None:
    cfg = composed(f"dataset={choice}")
    datamodule = instantiate(cfg.dataset)
    assert datamodule.batch_size >= 1


@pytest.mark.parametrize("choice", ["cpu", "ddp_cpu"])
def test_cpu_trainers_instantiate(composed, choice: str) -> None:
    cfg = composed(f"trainer={choice}")
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


def trained_variants() -> list[str]:
    """Training choices that train (training=none evaluates a ready model as it is), the
    ablation's control aside (drift_at: experiment=pse_at_ablation,
    tests/training/test_study.py)."""
    return [c for c in group_choices("training") if c not in ("none", "drift_at")]


def test_robust_vs_standard_is_one_grid_over_every_variant(make_cfg) -> None:
    from helpers import CONF_DIR
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose(
            "config", overrides=["experiment=robust_vs_standard"], return_hydra_config=True
        )
    params = cfg.hydra.sweeper.params
    assert set(params.training.split(",")) == set(trained_variants())
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    assert cfg.logger.group == "robust_vs_standard"
    assert "comparison" in cfg.hydra.callbacks
    # Every variant is also evaluated with AutoAttack's APGD stages at PGD's budget (the
    # standard version does not fit the 2-core budget; the config says so).
    assert set(params.attack.split(",")) == {"pgd", "autoattack_fast"}


def test_robust_vs_standard_jobs_share_data_seed_and_training_attack() -> None:
    """Each grid point composes; every adversarial variant trains against the same PGD."""
    from helpers import CONF_DIR
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    jobs = []
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        for training in trained_variants():
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
    assert len(jobs) == 3 * len(trained_variants())
    assert len({OmegaConf.to_yaml(j.dataset) for j in jobs}) == 1
    assert {j.seed for j in jobs} == {0}
    for job in jobs:
        assert job.training.epochs == 6
        attack = job.training.objective.get("attack")
        if attack is not None:
            assert (attack.steps, attack.step_size, attack.eps) == (3, 0.0125, 0.03)
        assert list(job.analysis) == ["pse"]


# The config check (pse_lightning.cli.check): every input before any heavy work ----------


def _check(cfg) -> None:
    from helpers import CONF_DIR
    from omegaconf import OmegaConf

    from pse_lightning.cli.check import check_config

    check_config(cfg, OmegaConf.to_container(cfg.hydra.runtime.choices), CONF_DIR)


@pytest.mark.parametrize(("group", "choice"), [(g, c) for g in GROUPS for c in group_choices(g)])
def test_every_choice_passes_the_config_check(composed, group: str, choice: str) -> None:
    """No false alarms: each shipped file is a valid config."""
    _check(composed(f"{group}={choice}"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["+unknown_key=1"], r"^unknown_key is not a setting \(top-level keys: .*seed, stage"),
        (["seed=abc"], r"^seed must be an integer, got 'abc'$"),
        (["stage=train"], r"^stage must be one of \['auto', 'fit', 'evaluate'\], got 'train'$"),
        (
            ["attack=cw", "+attack.eps=-1"],
            r"^attack\.eps is not a setting of attack=cw \(pse_lightning\.attacks\.CWL2; its "
            r"keys: abort_early, .*\); eps is a setting of attack="
            + re.escape(", ".join(choices_setting("attack", "eps"))),
        ),
        (["attack=pgd", "+attack.epss=0.1"], r"^attack\.epss is not a setting of attack=pgd"),
        (["analysis=pse", "analysis.pse.steps=0"], r"^analysis\.pse\.steps must be >= 1, got 0$"),
        (["analysis=all", "+analysis.pse.bogus=1"], r"^analysis\.pse\.bogus is not a setting"),
        (["attack=cam_cw", "attack.attack.steps=0"], r"^attack\.attack\.steps must be >= 1"),
        (["+trainer.max_epochs=abc"], r"^trainer\.max_epochs must be an integer or null"),
        (["training.epochs=x"], r"^training\.epochs must be an integer, got 'x'$"),
        (["training.epochs=0"], r"^training\.epochs must be >= 1, got 0$"),
        (["training=pgd_at", "training.adversary.steps=1.5"], r"objective\.attack\.steps must"),
        (["stage=fit", "model_checkpoint=w.pt"], r"^stage=fit trains a new model"),
        (["log_examples=-1"], r"^log_examples must be >= 0, got -1$"),
    ],
)
def test_bad_inputs_are_named_by_their_full_key(
    composed, overrides: list[str], message: str
) -> None:
    from pse_lightning.validation import InputError

    with pytest.raises(InputError, match=message):
        _check(composed(*overrides))


@pytest.mark.parametrize(
    "overrides",
    [
        ["attack=pgd", "attack.steps=0"],
        ["attack=pgd", "attack.eps=8"],
        ["attack=pgd_l2", "attack.eps=-1"],
        ["attack=pgd", "attack.norm=l3"],
        ["attack=cw", "attack.kappa=-1"],
        ["attack=ead", "attack.decision_rule=XX"],
        ["attack=strattack", "attack.refine_quantile=2.0"],
        ["attack=fgsm", "attack.target_rule=nope"],
        ["dataset.batch_size=0"],
        ["defense=neuron_mask", "defense.fill=x"],
        ["training=trades", "training.objective.beta=-1.0"],
    ],
)
def test_static_range_checks_say_what_the_constructor_says(composed, overrides) -> None:
    """The check re-runs the constructor's own require_* call: same bounds, same words."""
    from pse_lightning.validation import InputError

    cfg = composed(*overrides)
    group = overrides[-1].split(".")[0]
    node = cfg.training.objective if group == "training" else cfg[group]
    with pytest.raises((ValueError, InstantiationException)) as constructor:
        instantiate(node)
    with pytest.raises(InputError) as check:
        _check(composed(*overrides))
    cause = constructor.value.__cause__ or constructor.value
    assert str(check.value) == str(cause)


@pytest.mark.parametrize(
    "target",
    [
        "pse_lightning.attacks.PGD",
        "pse_lightning.attacks.CWL2",
        "pse_lightning.attacks.EAD",
        "pse_lightning.attacks.StrAttack",
        "pse_lightning.attacks.CAMGuided",
        "pse_lightning.data.ShapesDataModule",
        "pse_lightning.data.CIFAR10DataModule",
        "pse_lightning.data.ImageNetDataModule",
        "pse_lightning.models.TorchvisionClassifier",
        "pytorch_lightning.Trainer",
        "torch.optim.AdamW",
    ],
)
def test_source_signature_matches_the_imported_one(target: str) -> None:
    """The keys read from source without importing are those Python reports on import."""

    from hydra.utils import get_object

    from pse_lightning.cli.signature import signature_of

    named = constructor_keys(get_object(target))  # **common: its typed dict's keys
    signature = signature_of(target)
    assert signature is not None and not signature.open
    assert set(signature.params) == named


def test_analysis_keys_include_the_metric_options_only() -> None:
    """**kwargs that reach torchmetrics.Metric take its options and nothing else."""
    from pse_lightning.cli.signature import signature_of

    signature = signature_of("pse_lightning.analysis.pse.PSE")
    assert signature is not None and not signature.open
    assert {"steps", "tol", "sync_on_compute", "dist_sync_on_step"} <= set(signature.params)
    assert "bogus" not in signature.params


def test_the_config_files_are_read_once_per_process(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """A multirun's preflight checks every job with its own ConfigFiles: the YAML files
    behind ``targets`` and the choices are read once, not once per job; a file that changes
    is read again."""
    from pathlib import Path

    from helpers import CONF_DIR

    from pse_lightning.cli import check

    reads: list[Path] = []
    real = Path.read_text

    def counting(self: Path, *args, **kwargs) -> str:  # noqa: ANN002, ANN003
        if self.suffix == ".yaml":
            reads.append(self)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", counting)
    check._read_text.cache_clear()
    check._parse.cache_clear()
    files = sorted(CONF_DIR.rglob("*.yaml"))
    for _job in range(3):
        each = check.ConfigFiles(CONF_DIR)
        assert "pse_lightning.analysis.pse.PSE" in each.targets
        each.keys_at("attack")
    assert sorted(reads) == files  # every file once, for three jobs
    extension = tmp_path / "attack"
    extension.mkdir()
    (extension / "mine.yaml").write_text("_target_: my.Attack\n")
    assert "my.Attack" in check.ConfigFiles(CONF_DIR, [tmp_path]).targets
    (extension / "mine.yaml").write_text("_target_: my.OtherAttack\n")
    assert "my.OtherAttack" in check.ConfigFiles(CONF_DIR, [tmp_path]).targets
