"""TrainingModule: fits a classifier with a configurable objective."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from pse_lightning.modules.distributed import unshare_tensors

EPOCH_STRIDE = 1_000_003


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
        self.log_dict({f"train/{k}": v for k, v in logs.items()}, prog_bar=True,
                      on_step=True, on_epoch=True, batch_size=len(x))
        return loss

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
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
