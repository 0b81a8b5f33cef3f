"""Resumable training and interrupted evaluation.

An interrupted fit resumed with ``resume=true`` ends with exactly the weights of an
uninterrupted fit (same seed, deterministic CPU); a partial checkpoint of another training is
never used; an evaluation that fails midway leaves no ``metrics.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from pse_lightning import pipeline
from pse_lightning.models import CheckpointError
from pse_lightning.models.checkpoint import cache_path, read_checkpoint, save_checkpoint
from pse_lightning.modules.training import RESUME_KEY, partial_checkpoint_path

EPOCHS = 3
# Six batches per epoch keep three epochs cheap.
FIT = ["stage=fit", f"training.epochs={EPOCHS}", "dataset.num_train=192", "dataset.num_val=64"]


class Interrupted(Exception):
    """Stands in for a preemption or a crash in the middle of training."""


class InterruptAt(pl.Callback):
    """Raises ``Interrupted`` before batch ``batch`` of epoch ``epoch`` and records the
    epochs and batches that each training run actually executed."""

    def __init__(self, epoch: int | None, batch: int = 0) -> None:
        self.epoch, self.batch = epoch, batch
        self.seen: list[tuple[int, int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if (trainer.current_epoch, batch_idx) == (self.epoch, self.batch):
            raise Interrupted(f"interrupted in epoch {self.epoch}")
        self.seen.append((trainer.current_epoch, batch_idx))


@pytest.fixture
def with_callback(monkeypatch: pytest.MonkeyPatch):
    """Add a callback to every trainer ``pipeline`` makes."""

    def _install(callback: pl.Callback) -> pl.Callback:
        make_trainer = pipeline.make_trainer

        def patched(cfg, logger, **overrides):
            overrides["callbacks"] = [*overrides.get("callbacks", []), callback]
            return make_trainer(cfg, logger, **overrides)

        monkeypatch.setattr(pipeline, "make_trainer", patched)
        return callback

    return _install


def _cache(cfg) -> Path:
    (path,) = Path(cfg.paths.checkpoint_dir).glob("*.pt")
    return path


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(path)[0]


def test_resumed_training_equals_uninterrupted_training(
    make_cfg, with_callback, tmp_path: Path
) -> None:
    spy = with_callback(InterruptAt(epoch=None))
    # resume=true with nothing to resume trains from scratch.
    straight = make_cfg(*FIT, f"paths.checkpoint_dir={tmp_path}/straight", "resume=true")
    pipeline.run(straight)
    assert {e for e, _ in spy.seen} == {0, 1, 2}
    expected = _weights(_cache(straight))

    cfg = make_cfg(*FIT, f"paths.checkpoint_dir={tmp_path}/resumed")
    spy.seen.clear()
    spy.epoch, spy.batch = 1, 3
    with pytest.raises(Interrupted):
        pipeline.run(cfg)
    assert not list(Path(cfg.paths.checkpoint_dir).glob("*.pt")), "an unfinished fit was cached"
    (partial,) = Path(cfg.paths.checkpoint_dir).glob("*.last.ckpt")
    assert not list(Path(cfg.paths.checkpoint_dir).glob(".*.tmp")), "a temporary file was left"
    assert torch.load(partial, map_location="cpu", weights_only=True)["epoch"] == 0

    spy.seen.clear()
    spy.epoch = None
    resume = make_cfg(*FIT, f"paths.checkpoint_dir={tmp_path}/resumed", "resume=true")
    pipeline.run(resume)
    # The epoch counter continued: epoch 0 was not run again, epoch 1 restarted from its start.
    assert spy.seen[0] == (1, 0) and {e for e, _ in spy.seen} == {1, 2}
    cache = _cache(resume)
    assert partial_checkpoint_path(cache) == partial
    assert not partial.exists(), "the partial checkpoint outlived a successful fit"
    resumed = _weights(cache)
    assert resumed.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(resumed[name], tensor), name


def test_partial_checkpoint_of_another_training_is_refused(
    make_cfg, with_callback, tmp_path: Path
) -> None:
    ckpt_dir = f"paths.checkpoint_dir={tmp_path}/ckpt"
    with_callback(InterruptAt(epoch=1))
    with pytest.raises(Interrupted):
        pipeline.run(make_cfg(*FIT, ckpt_dir))
    (partial,) = (tmp_path / "ckpt").glob("*.last.ckpt")
    # Another batch size changes every later step: the checkpoint must not be continued.
    other = make_cfg(*FIT, ckpt_dir, "resume=true", "dataset.batch_size=16")
    with pytest.raises(CheckpointError, match="dataset.batch_size"):
        pipeline.run(other)
    # A file renamed to another identity's name is caught by its recorded identity.
    lr = make_cfg(*FIT, ckpt_dir, "resume=true", "training.optimizer.lr=0.001")
    identity = pipeline.checkpoint_identity(lr, _datamodule(lr))
    forged = partial_checkpoint_path(
        cache_path(
            tmp_path / "ckpt",
            identity["model"],
            identity["dataset"],
            identity["training"],
            identity["digest"],
        )
    )
    assert forged != partial
    partial.rename(forged)
    with pytest.raises(CheckpointError, match="digest"):
        pipeline.run(lr)


def test_partial_checkpoint_loads_weights_only(make_cfg, with_callback) -> None:
    """Everything Lightning stores (loops, optimizer, one-cycle schedule) is plain data, and
    PSE-AT's running unit statistics (empty until the first step) are restored, not refused."""
    spy = with_callback(InterruptAt(epoch=1))
    pse_at = [
        *FIT,
        "training.epochs=2",
        "dataset.num_train=64",
        "training=pse_at",
        "training.adversary.steps=1",
    ]
    cfg = make_cfg(*pse_at)
    with pytest.raises(Interrupted):
        pipeline.run(cfg)
    (partial,) = Path(cfg.paths.checkpoint_dir).glob("*.last.ckpt")
    checkpoint = torch.load(partial, map_location="cpu", weights_only=True)
    assert json.loads(checkpoint[RESUME_KEY])["training"] == "pse_at"
    assert checkpoint["state_dict"]["objective.unit_var"].numel() > 0
    assert checkpoint["optimizer_states"] and checkpoint["lr_schedulers"]
    spy.epoch = None
    pipeline.run(make_cfg(*pse_at, "resume=true"))
    assert not partial.exists()


class FailMidEvaluation(pl.Callback):
    """Raises after the first test batch while ``armed``."""

    armed = True

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self.armed:
            raise Interrupted("evaluation interrupted")


def test_interrupted_evaluation_leaves_no_metrics(make_cfg, with_callback, tmp_path: Path) -> None:
    evaluate = ["attack=fgsm", "dataset.eval_samples=64", "stage=evaluate"]
    weights = save_checkpoint(tmp_path / "random.pt", pipeline.build(make_cfg()).model, {})
    cfg = make_cfg(*evaluate, f"model_checkpoint={weights}")
    fail = with_callback(FailMidEvaluation())
    with pytest.raises(Interrupted):
        pipeline.run(cfg)
    run_dir = Path(cfg.paths.run_dir)
    assert not (run_dir / "metrics.json").exists()
    assert not (run_dir / "report.md").exists()
    # The same evaluation, uninterrupted, does write both (so the check above can fail).
    fail.armed = False
    pipeline.run(cfg)
    assert json.loads((run_dir / "metrics.json").read_text())["metrics"]["test/samples"] == 64
    assert (run_dir / "report.md").is_file()


def _datamodule(cfg):
    datamodule = pipeline.instantiate(cfg.dataset)
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule


@pytest.mark.slow
def test_ddp_resumed_training_equals_uninterrupted_training(
    make_cfg, with_callback, tmp_path: Path
) -> None:
    """Two gloo processes: rank zero writes the partial checkpoint while both save it."""
    fit = [*FIT, "training.epochs=2", "trainer=ddp_cpu"]
    straight = make_cfg(*fit, f"paths.checkpoint_dir={tmp_path}/straight")
    pipeline.run(straight)
    expected = _weights(_cache(straight))

    ckpt_dir = tmp_path / "resumed"
    spy = with_callback(InterruptAt(epoch=1))  # pickled into both spawned workers
    with pytest.raises(Exception, match="interrupted in epoch 1"):
        pipeline.run(make_cfg(*fit, f"paths.checkpoint_dir={ckpt_dir}"))
    (partial,) = ckpt_dir.glob("*.last.ckpt")
    assert not list(ckpt_dir.glob("*.pt")) and not list(ckpt_dir.glob(".*.tmp"))
    spy.epoch = None
    resume = make_cfg(*fit, f"paths.checkpoint_dir={ckpt_dir}", "resume=true")
    pipeline.run(resume)
    assert not partial.exists()
    resumed = _weights(_cache(resume))
    for name, tensor in expected.items():
        assert torch.equal(resumed[name], tensor), name
