"""Shared fixtures: compose the real ``conf/`` with tiny overrides, offline W&B in tmp."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import CONF_DIR
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

# Small enough for seconds, large enough that small_cnn learns the task.
TINY = [
    "dataset.num_train=768",
    "dataset.num_val=128",
    "dataset.num_test=128",
    "dataset.num_probe=64",
    "dataset.eval_samples=48",
    "dataset.batch_size=32",
    "training.epochs=1",
    "trainer.enable_progress_bar=false",
]


@pytest.fixture(autouse=True, scope="session")
def _offline_wandb(tmp_path_factory: pytest.TempPathFactory) -> None:
    home = tmp_path_factory.mktemp("wandb_home")
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ["WANDB_SILENT"] = "true"
    os.environ["WANDB_CONFIG_DIR"] = str(home / "config")
    os.environ["WANDB_CACHE_DIR"] = str(home / "cache")
    os.environ["WANDB_DATA_DIR"] = str(home / "data")
    # Under pytest-xdist (`make test`: one worker per core) each worker keeps one thread.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    torch.set_num_threads(max(1, min(2, torch.get_num_threads()) // workers))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One dataset cache for the whole session (generation is deterministic)."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture
def make_cfg(tmp_path: Path, data_dir: Path) -> Callable[..., DictConfig]:
    """Compose ``conf/`` as the CLI would, with a run directory under ``tmp_path``."""

    def _make(*overrides: str, tiny: bool = True) -> DictConfig:
        base = [
            f"paths.root={tmp_path}",
            f"paths.run_dir={tmp_path}/run",
            f"paths.data_dir={data_dir}",
            "logger=none",
            # Mechanics tests use a cheap attack; test_pipeline runs the defaults too.
            "attack=pgd",
            "analysis=none",
        ]
        with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
            return compose("config", overrides=base + (TINY if tiny else []) + list(overrides))

    return _make
