"""Reproducible and comparable runs: the report's Setup and Reproduce line paste back into the
CLI and compose the same config; W&B runs carry the group choices and are named by what a
sweep varies; an unmeasured share is NaN (printed n/a), never 0."""

from __future__ import annotations

import math
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import CONF_DIR
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from pse_lightning import pipeline
from pse_lightning.analysis.pse import statistics
from pse_lightning.modules.attack_metrics import AttackMetrics
from pse_lightning.reporting.loggers import command_args, reproduce_command, run_config
from pse_lightning.reporting.report import attack_meaning, setup_markdown, write_report
from pse_lightning.reporting.wandb_run import artifact_name

TINY = ["dataset.num_train=64", "dataset.num_val=32", "dataset.num_test=32", "logger=none"]


def compose_job(*overrides: str) -> DictConfig:
    """The config Hydra gives a job started with ``overrides``, its ``hydra`` node included."""
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


def job_config(cfg: DictConfig, resolve: bool = False) -> dict[str, Any]:
    """What the job runs with: the config without Hydra's own node and the run directory
    (a new one each run), resolved or not."""
    cfg = cfg.copy()
    with open_dict(cfg):
        del cfg["hydra"]
        cfg.paths.run_dir = None
    return OmegaConf.to_container(cfg, resolve=resolve)


@pytest.fixture
def as_hydra_job() -> Iterator[Any]:
    """Split a composed config as the CLI does: the config the job gets (without the
    ``hydra`` node) and the :class:`~pse_lightning.pipeline.JobContext` (choices, overrides)
    the entry point passes. Hydra's state is set as in a job (``${hydra:...}`` paths resolve
    through it), but with no choices or overrides: the pipeline gets those from ``job``."""

    def _split(cfg: DictConfig) -> tuple[DictConfig, pipeline.JobContext]:
        job = pipeline.JobContext.from_hydra(cfg.hydra)
        blank = cfg.copy()
        with open_dict(blank):
            blank.hydra.runtime.choices = {}
            blank.hydra.overrides.task = []
        HydraConfig.instance().set_config(blank)
        cfg = cfg.copy()
        with open_dict(cfg):
            del cfg["hydra"]
        return cfg, job

    yield _split
    HydraConfig.instance().cfg = None


JOBS = [
    ("attack=pgd", "attack.eps=0.01", "analysis=[pse,cam]", "seed=3"),
    ("model=small_cnn", "attack=cw", "experiment=smoke", "+attack.extra=1"),
    ("analysis=none", "~defense", "training.epochs=2"),
]


@pytest.mark.parametrize("overrides", JOBS)
def test_reproduce_line_composes_the_same_config(tmp_path: Path, overrides: tuple) -> None:
    cfg = compose_job(f"paths.root={tmp_path}", *overrides)
    line = reproduce_command(cfg.hydra.runtime.choices, list(cfg.hydra.overrides.task))
    args = shlex.split(line)
    assert args[:3] == ["python", "-m", "pse_lightning"]
    assert "model=small_cnn" in args and "attack=" + cfg.hydra.runtime.choices.attack in args
    again = compose_job(*args[3:])
    assert job_config(again) == job_config(cfg)
    # Pasted again, the rerun's own line is the same: nothing is lost or added twice.
    assert sorted(command_args(again.hydra.runtime.choices, list(again.hydra.overrides.task))) \
        == sorted(args[3:])  # fmt: skip


def test_setup_block_pastes_back_as_overrides(tmp_path: Path, as_hydra_job: Any) -> None:
    cfg = compose_job(f"paths.root={tmp_path}", *TINY, "attack=cw", "attack.steps=7")
    _, job = as_hydra_job(cfg)
    parts = pipeline.build(cfg)
    setup = pipeline.report_setup(cfg, parts, job)
    # The choices as typed (not the class name "smallcnn"), the overrides, the parameters.
    assert setup["model"] == "small_cnn" and setup["attack"] == "cw"
    assert setup["analysis"] == "all" and setup["attack.steps"] == "7"
    assert list(setup)[:4] == ["dataset", "model", "attack", "analysis"]  # the defaults' order
    assert not {"True", "False", "None"} & set(setup.values())  # as Hydra writes them
    # The parameters are resolved values (attack.seed=0 for ${seed}): equal once resolved.
    again = compose_job(*(f"{key}={value}" for key, value in setup.items()))
    assert job_config(again, resolve=True) == job_config(cfg, resolve=True)
    line = pipeline.reproduce(job)
    assert job_config(compose_job(*shlex.split(line)[3:])) == job_config(cfg)


def test_setup_outside_hydra_names_what_was_built(tmp_path: Path) -> None:
    """The Python API has no choices to quote: the setup falls back, no Reproduce line."""
    cfg = compose_job(f"paths.root={tmp_path}", *TINY, "attack=pgd", "analysis=[pse,cam]")
    parts = pipeline.build(cfg)
    setup = pipeline.report_setup(cfg, parts)
    assert setup["attack"] == "pgd" and setup["analysis"] == "[pse,cam]"
    assert pipeline.reproduce() == ""


def test_setup_keeps_a_deleted_group(tmp_path: Path, as_hydra_job: Any) -> None:
    cfg, job = as_hydra_job(compose_job(f"paths.root={tmp_path}", *TINY, "~defense", "attack=pgd"))
    setup = pipeline.report_setup(cfg, pipeline.build(cfg), job)
    assert setup["~defense"] is None and "defense" not in setup
    assert "\n~defense\n" in setup_markdown(setup)


def test_report_carries_the_reproduce_line(tmp_path: Path) -> None:
    line = "python -m pse_lightning attack=cw 'analysis=[pse,cam]'"
    write_report(tmp_path, title="t", setup={"attack": "cw"}, scalars={}, examples={},
                 class_names=[], reproduce=line, checkpoint="/c/w.pt")  # fmt: skip
    text = (tmp_path / "report.md").read_text()
    setup = text[text.index("## Setup") :]
    assert f"```\n{line}\n```" in setup and "Reproduce" in setup
    assert "attack=cw" in setup and "`/c/w.pt`" in setup


def stage_start(
    split: tuple[DictConfig, pipeline.JobContext], monkeypatch: pytest.MonkeyPatch
) -> dict[str, Any]:
    """What :func:`pipeline.start_stage` hands the logger: the run's name and config."""
    cfg, job = split
    seen: dict[str, Any] = {}
    monkeypatch.setattr(pipeline, "start_run", lambda logger, **kw: seen.update(kw))
    pipeline.start_stage(cfg, pipeline.build(cfg), "evaluate", job)
    return seen


def test_wandb_config_has_the_group_choices(
    tmp_path: Path, as_hydra_job: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = compose_job(f"paths.root={tmp_path}", *TINY, "attack=cw", "experiment=smoke")
    config = stage_start(as_hydra_job(cfg), monkeypatch)["config"]
    assert config["choices/attack"] == "cw" and config["choices/experiment"] == "smoke"
    assert config["choices/defense"] == "none" and config["choices/model"] == "small_cnn"
    assert not any(key.startswith("choices/hydra") for key in config)
    assert config["attack"]["_target_"].endswith("CWL2")  # the resolved config is still there
    # An unset group is left out rather than logged as a choice named "None".
    assert "choices/experiment" not in run_config({}, {"experiment": None, "attack": "cw"})


def test_run_names_tell_sweep_jobs_apart(
    tmp_path: Path, as_hydra_job: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    names = []
    for eps in ("0.01", "0.02"):
        cfg = compose_job(f"paths.root={tmp_path}", *TINY, "attack=pgd", f"attack.eps={eps}")
        names.append(stage_start(as_hydra_job(cfg), monkeypatch)["name"])
    assert names[0] != names[1]
    assert names[0].startswith("pgd-small_cnn-shapes-standard-s0")
    assert "attack.eps=0.01" in names[0] and "attack.eps=0.02" in names[1]
    # Paths (excluded from Hydra's job folder names) and choices already named stay out.
    assert "paths.root" not in names[0] and "attack=pgd" not in names[0]


def attack_metrics(y: torch.Tensor, clean_pred: torch.Tensor) -> dict[str, torch.Tensor]:
    metric = AttackMetrics()
    n = len(y)
    logits = torch.nn.functional.one_hot(clean_pred, 3).float()
    x = torch.zeros(n, 1, 2, 2)
    metric.update(x, x, y, logits, logits, torch.zeros(n, dtype=torch.bool), torch.arange(n))
    return metric.compute()


def test_unmeasured_success_rate_is_nan_not_zero() -> None:
    y = torch.tensor([0, 1, 2])
    none_correct = attack_metrics(y, torch.tensor([1, 2, 0]))
    assert none_correct["clean_acc"] == 0 and math.isnan(none_correct["success_rate"])
    assert attack_meaning({"test/success_rate": float("nan")}).count("n/a") >= 1
    measured = attack_metrics(y, torch.tensor([0, 2, 0]))  # one correct, not flipped
    assert measured["success_rate"] == 0 and measured["clean_acc"] == pytest.approx(1 / 3)


def test_unmeasured_type_and_group_shares_are_nan() -> None:
    empty = statistics.type_fractions(torch.zeros(4, dtype=torch.long))
    assert all(math.isnan(v) for v in empty.values())
    counts = torch.tensor([1, 0, 2, 1])
    assert sum(float(v) for v in statistics.type_fractions(counts).values()) == 1
    groups = statistics.group_fractions(torch.tensor([0, 0, 0, 5]))  # no defined type
    assert math.isnan(groups["group_frac_promotion"]) and groups["group_frac_active"] == 0
    assert math.isnan(statistics.group_fractions(torch.zeros(4))["group_frac_active"])


def test_artifact_names_from_long_run_names_are_valid() -> None:
    """A run name with overrides (``=``, ``[``) still names a valid W&B artifact."""
    wandb = pytest.importorskip("wandb")
    short = artifact_name("report", "pgd-small_cnn-s0-attack.eps=0.01-analysis=[pse,cam]")
    assert short == "report-pgd-small_cnn-s0-attack.eps_0.01-analysis__pse_cam"
    names = {artifact_name("report", f"pgd-s0-{'dataset.num_train=256-' * 9}eps={e}")
             for e in (1, 2)}  # fmt: skip
    assert len(names) == 2 and all(len(n) <= 128 for n in names)
    for name in (short, *names):
        wandb.Artifact(name, type="report")  # raises on an invalid name
