"""TrainingModule: fits a classifier with a configurable objective; resumable training.

An interrupted fit resumes from a full trainer checkpoint (weights, optimizer, scheduler,
loop counters) that :class:`ResumeCheckpoint` writes after every epoch. Resuming gives the
weights of an uninterrupted run exactly: attack randomness is keyed by (sample index, epoch)
and the datamodule's training shuffle by (seed, epoch), so nothing depends on how many epochs
this process has already run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from pse_lightning.core.distributed import unshare_tensors
from pse_lightning.models.checkpoint import CheckpointError

EPOCH_STRIDE = 1_000_003
# Key of the JSON record in a partial checkpoint that says which training it belongs to.
RESUME_KEY = "pse_lightning_resume"


class TrainingModule(pl.LightningModule):
    """Orchestrates training: the objective computes the loss, this class only loops.

    Args:
        model: a :class:`~pse_lightning.models.Classifier`.
        objective: ``(model, x, y, index) -> (loss, logs)``.
        optimizer: a partial optimizer constructor taking the parameters.
        scheduler: a partial LR scheduler constructor (stepped every batch) or None.
    """

    def __init__(
        self,
        model: nn.Module,
        objective: Callable[..., tuple[Tensor, dict[str, Tensor]]],
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.objective = objective
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.val_acc = MulticlassAccuracy(num_classes=model.num_classes, average="micro")

    def setup(self, stage: str) -> None:
        unshare_tensors(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y, index = batch
        # Attacks key their randomness by sample index: shifting it each epoch gives fresh,
        # still reproducible random starts.
        loss, logs = self.objective(self.model, x, y, index + self.current_epoch * EPOCH_STRIDE)
        self.log_dict(
            {f"train/{k}": v for k, v in logs.items()},
            prog_bar=True,
            on_step=True,
            on_epoch=True,
            batch_size=len(x),
        )
        return loss

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Size lazily allocated buffers (running statistics that start empty, e.g.
        ``PSEObjective.unit_var``) like the checkpoint's, so the strict load that follows
        fills them instead of failing on a shape mismatch."""
        state = checkpoint.get("state_dict", {})
        for name, buffer in list(self.named_buffers()):
            saved = state.get(name)
            if buffer.numel() == 0 and isinstance(saved, Tensor) and saved.shape != buffer.shape:
                owner_name, _, attr = name.rpartition(".")
                owner = self.get_submodule(owner_name) if owner_name else self
                setattr(owner, attr, torch.empty_like(saved, device=buffer.device))

    def validation_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> None:
        x, y, _ = batch
        self.val_acc.update(self.model(x), y)

    def on_validation_epoch_end(self) -> None:
        self.log("val/acc", self.val_acc.compute(), prog_bar=True)
        self.val_acc.reset()

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.model.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(
            optimizer, total_steps=int(self.trainer.estimated_stepping_batches)
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


def partial_checkpoint_path(cache: str | Path) -> Path:
    """Where the resumable trainer checkpoint of the training that produces ``cache`` lives:
    beside it, named by the same identity (``<model>-<dataset>-<training>-<digest>.last.ckpt``).
    """
    cache = Path(cache)
    return cache.with_name(f"{cache.stem}.last.ckpt")


class ResumeCheckpoint(pl.Callback):
    """Saves a full trainer checkpoint at the end of every training epoch, atomically.

    Every rank calls ``trainer.save_checkpoint`` (it is collective); global rank zero writes
    a temporary file and renames it over ``path``, so an interruption while saving leaves the
    previous epoch's checkpoint intact. ``key`` (JSON-able: the checkpoint identity plus the
    settings that shape the continuation) is stored in the checkpoint and checked before a
    resume by :func:`check_partial_checkpoint`.
    """

    def __init__(self, path: str | Path, key: dict[str, Any]) -> None:
        self.path = Path(path)
        self.key = key

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint[RESUME_KEY] = json.dumps(self.key, sort_keys=True, default=str)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        if trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # Collective; ends with a barrier, so rank zero has written when it returns.
            trainer.save_checkpoint(tmp, weights_only=False)
            if trainer.is_global_zero:
                os.replace(tmp, self.path)
        finally:
            if trainer.is_global_zero and tmp.exists():
                tmp.unlink()


def check_partial_checkpoint(path: str | Path, key: dict[str, Any]) -> int:
    """Verify that the partial checkpoint at ``path`` belongs to this training.

    Read with ``weights_only=True`` (a checkpoint is data, never code) and memory-mapped, so
    a large model is not read twice.

    Returns:
        The number of completed epochs recorded in it.

    Raises:
        CheckpointError: unreadable, not written by :class:`ResumeCheckpoint`, or written
            for another training (identity or run shape differ).
    """
    path = Path(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        saved = json.loads(checkpoint[RESUME_KEY])
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise CheckpointError(
            f"partial checkpoint {path} cannot be used to resume ({type(err).__name__}: {err});"
            " delete it or run with resume=false to train from scratch"
        ) from err
    diff = sorted(k for k in set(saved) | set(key) if saved.get(k) != key.get(k))
    if diff:
        details = ", ".join(f"{k}={saved.get(k)!r} (this run: {key.get(k)!r})" for k in diff)
        raise CheckpointError(
            f"partial checkpoint {path} belongs to another training: {details}; rerun with the "
            "recorded settings to resume it, or with resume=false to train from scratch"
        )
    return int(checkpoint.get("epoch", -1)) + 1
