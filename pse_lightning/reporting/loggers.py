"""Experiment loggers: W&B (offline by default), with clean teardown for multiruns."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pytorch_lightning.loggers import Logger, WandbLogger

from pse_lightning.validation import require_choice

log = logging.getLogger(__name__)
WANDB_MODES = ("offline", "online", "disabled")


def wandb_logger(
    *,
    project: str = "pse_lightning",
    entity: str | None = None,
    mode: str = "offline",
    group: str | None = None,
    name: str | None = None,
    tags: Sequence[str] = (),
    save_dir: str = ".",
    config: dict[str, Any] | None = None,
) -> WandbLogger:
    """A Lightning WandbLogger whose run lives inside the run directory.

    Offline mode writes a complete run under ``<save_dir>/wandb/offline-run-*`` that
    ``wandb sync`` uploads later; online mode needs ``WANDB_API_KEY`` or ``wandb login``.
    """
    require_choice("logger.mode", mode, WANDB_MODES)
    if mode == "online" and not (os.environ.get("WANDB_API_KEY") or _netrc_has_wandb()):
        raise ValueError(
            "logger.mode=online needs W&B credentials: run `wandb login` or set WANDB_API_KEY, "
            "or keep logger.mode=offline and upload later with `wandb sync`"
        )
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    import wandb

    # A run left open by an earlier job of the same process would be silently reused
    # (wandb #1314): every job starts its own.
    if wandb.run is not None:
        wandb.finish()
    logger = WandbLogger(
        project=project,
        entity=entity,
        mode=mode,
        group=group,
        name=name,
        tags=list(tags),
        save_dir=save_dir,
        config=config,
    )
    # Lightning always passes anonymous=None to wandb.init, which wandb >= 0.19 answers with
    # a deprecation warning on every run; an absent key means the same.
    init_kwargs = getattr(logger, "_wandb_init", None)
    if isinstance(init_kwargs, dict) and init_kwargs.get("anonymous", False) is None:
        del init_kwargs["anonymous"]
    return logger


def _netrc_has_wandb() -> bool:
    netrc = Path.home() / ".netrc"
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def finish_logger(logger: Logger | None, *, failed: bool = False) -> None:
    """Close the logger's run, so the next job of a multirun starts a fresh one."""
    if isinstance(logger, WandbLogger):
        import wandb

        if wandb.run is not None:
            wandb.finish(exit_code=1 if failed else 0)
    elif logger is not None:
        logger.finalize("failed" if failed else "success")
