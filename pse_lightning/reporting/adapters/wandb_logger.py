"""The one place that relies on private attributes of Lightning's ``WandbLogger``.

Lightning offers no public way to rename a logger's run, or to set its job type, after
the logger is built but before its run starts, nor to ask whether the run exists without
starting it. The run's keyword arguments for ``wandb.init`` live in ``_wandb_init`` (a dict),
its name in ``_name`` and the run in ``_experiment`` (None until started);
tests/core/test_adapters.py
fails when the installed Lightning changes them.
"""

from __future__ import annotations

from typing import Any

from pytorch_lightning.loggers import WandbLogger

#: The private attributes used here and their kind before the run starts.
PRIVATE: dict[str, type | None] = {"_wandb_init": dict, "_name": None, "_experiment": None}


def run_started(logger: WandbLogger) -> bool:
    """Whether the logger's W&B run exists (touching ``logger.experiment`` would start it)."""
    return logger._experiment is not None


def init_kwargs(logger: WandbLogger) -> dict[str, Any]:
    """The keyword arguments the logger will pass to ``wandb.init`` (mutable until the run
    starts)."""
    return logger._wandb_init


def set_run_name(logger: WandbLogger, name: str) -> None:
    """Name the run before it starts (``wandb.init(name=...)`` and the logger's ``name``)."""
    logger._wandb_init["name"] = name
    logger._name = name
