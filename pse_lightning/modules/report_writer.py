"""Writes the run's report from inside the trainer, on global rank zero only.

Living in a callback (not in the caller of ``trainer.test``) makes it work for every
strategy, including spawned DDP processes whose results never return to the caller.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytorch_lightning as pl

from pse_lightning.core.report import ReportSection
from pse_lightning.reporting.outcomes import write_outcomes
from pse_lightning.reporting.report import log_report_to_wandb, write_report


class ReportWriter(pl.Callback):
    """After the test loop: per-image outcomes, analysis sections, figures, report.md, then
    metrics.json."""

    def __init__(
        self,
        run_dir: str | Path,
        *,
        title: str,
        setup: dict[str, str],
        class_names: Sequence[str],
        sections: Sequence[ReportSection] = (),
        extra: dict | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.title = title
        self.setup = setup
        self.class_names = list(class_names)
        self.sections = list(sections)
        self.extra = extra or {}

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        result = pl_module.result
        sections = self.sections + [
            analysis.report(result.analyses[name], self.run_dir / "figures", self.class_names)
            for name, analysis in pl_module.analyses.items()
        ]
        if result.outcomes:  # before metrics.json, which marks the run complete
            write_outcomes(self.run_dir, result.outcomes)
        written = write_report(
            self.run_dir,
            title=self.title,
            setup=self.setup,
            scalars=result.scalars,
            examples=result.examples,
            class_names=self.class_names,
            sections=sections,
            extra=self.extra,
        )
        log_report_to_wandb(
            trainer.logger,
            written,
            sections,
            scalars=result.scalars,
            examples=result.examples,
            class_names=self.class_names,
        )
