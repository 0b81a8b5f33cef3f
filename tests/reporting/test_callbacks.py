"""The ``callbacks`` config group: trainer callbacks chosen on the command line."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import CONF_DIR, group_choices
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from pytorch_lightning.callbacks import (
    EarlyStopping,
    LearningRateMonitor,
    ModelCheckpoint,
    RichProgressBar,
)

from pse_lightning import pipeline
from pse_lightning.cli.check import check_config
from pse_lightning.modules.progress import LineProgress
from pse_lightning.validation import InputError

CHOSEN = {
    "early_stopping": EarlyStopping,
    "model_checkpoint": ModelCheckpoint,
    "lr_monitor": LearningRateMonitor,
    "rich_progress": RichProgressBar,
}


def _checked(*overrides: str) -> None:
    base = ["attack=pgd", "analysis=none", "logger=none"]
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose("config", overrides=base + list(overrides), return_hydra_config=True)
    check_config(cfg, OmegaConf.to_container(cfg.hydra.runtime.choices), CONF_DIR)


def _kinds(trainer) -> list[type]:
    return [type(c) for c in trainer.callbacks]


def test_the_group_has_the_template_choices() -> None:
    assert set(group_choices("callbacks")) == {"default", *CHOSEN}


def test_default_adds_no_callback(make_cfg) -> None:
    """The default run's trainer carries the callbacks it carried before the group existed:
    Lightning's own, the pipeline's, and the line progress off a terminal."""
    cfg = make_cfg("trainer.enable_progress_bar=true")
    assert not cfg.callbacks
    trainer = pipeline.make_trainer(cfg, None)
    assert LineProgress in _kinds(trainer)  # pytest's output is not a terminal
    assert not set(_kinds(trainer)) & set(CHOSEN.values())
    assert trainer.checkpoint_callback is None  # trainer.enable_checkpointing: false


@pytest.mark.parametrize("choice", sorted(CHOSEN))
def test_each_choice_is_instantiated_into_the_trainer(make_cfg, choice: str) -> None:
    cfg = make_cfg(f"callbacks={choice}", "trainer.enable_progress_bar=true")
    trainer = pipeline.make_trainer(cfg, None)
    assert CHOSEN[choice] in _kinds(trainer)
    if choice == "rich_progress":  # one progress bar: the chosen one replaces the line
        assert LineProgress not in _kinds(trainer)
    if choice == "model_checkpoint":  # Lightning needs enable_checkpointing for it
        assert isinstance(trainer.checkpoint_callback, ModelCheckpoint)


def test_several_choices_and_a_tuned_key(make_cfg) -> None:
    cfg = make_cfg("callbacks=[early_stopping,lr_monitor]", "callbacks.early_stopping.patience=7")
    trainer = pipeline.make_trainer(cfg, None, callbacks=[])
    stopping = [c for c in trainer.callbacks if isinstance(c, EarlyStopping)]
    assert len(stopping) == 1 and stopping[0].patience == 7
    assert LearningRateMonitor in _kinds(trainer)


def test_a_null_entry_is_skipped(make_cfg) -> None:
    cfg = make_cfg("callbacks=[early_stopping,lr_monitor]", "callbacks.lr_monitor=null")
    assert [type(c) for c in pipeline.configured_callbacks(cfg)] == [EarlyStopping]


@pytest.mark.parametrize("choice", sorted(CHOSEN))
def test_the_config_check_accepts_lightning_callbacks_named_in_files(choice: str) -> None:
    _checked(f"callbacks={choice}")


def test_the_config_check_names_a_misspelt_callback_key() -> None:
    with pytest.raises(InputError, match=r"callbacks\.early_stopping\.patiense"):
        _checked("callbacks=early_stopping", "+callbacks.early_stopping.patiense=3")
    with pytest.raises(InputError, match="must be an integer"):
        _checked("callbacks=early_stopping", "callbacks.early_stopping.patience=soon")


def test_training_with_early_stopping_and_a_checkpoint_callback(make_cfg, tmp_path: Path) -> None:
    """From the config to a trained model: the checkpoint callback writes under the run
    directory; the weights cache the pipeline evaluates is written as before."""
    cfg = make_cfg(
        "stage=fit",
        "callbacks=[early_stopping,model_checkpoint]",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
    )
    pipeline.run(cfg)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("*.ckpt")) == [
        "epoch_000.ckpt",
        "last.ckpt",
    ]
    assert len(list(Path(cfg.paths.checkpoint_dir).glob("*.pt"))) == 1
