"""Writes the run's report from inside the trainer, on global rank zero only.

Living in a callback (not in the caller of ``trainer.test``) makes it work for every
strategy, including spawned DDP processes whose results never return to the caller.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytorch_lightning as pl

from pse_lightning.core.report import ReportSection
from pse_lightning.core.threads import torch_threads
from pse_lightning.modules.example_panels import example_map_columns, example_panels_section
from pse_lightning.reporting.findings import run_findings
from pse_lightning.reporting.outcomes import write_outcomes
from pse_lightning.reporting.report import log_report_to_wandb, with_prefix, write_report


class ReportWriter(pl.Callback):
    """After the test loop: per-image outcomes, analysis sections, figures, report.md, then
    metrics.json."""

    def __init__(
        self,
        run_dir: str | Path,
        *,
        title: str,
        setup: dict[str, str | None],
        class_names: Sequence[str],
        sections: Sequence[ReportSection] = (),
        extra: dict | None = None,
        budget: tuple[str, float] | None = None,
        reproduce: str = "",
        checkpoint: str = "",
    ) -> None:
        self.run_dir = Path(run_dir)
        self.title = title
        self.setup = setup
        self.class_names = list(class_names)
        self.sections = list(sections)
        self.extra = extra or {}
        self.budget = budget
        self.reproduce = reproduce
        self.checkpoint = checkpoint

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        # Figures and findings are small operations: one thread (core/threads.py).
        with torch_threads(1):
            self._write(trainer, pl_module)

    def _write(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        result = pl_module.result
        fig_dir = self.run_dir / "figures"
        panels = example_panels_section(result.analyses, fig_dir, self.class_names)
        sections = (
            self.sections
            + ([] if panels is None else [panels])
            + [
                with_prefix(
                    analysis.report(result.analyses[name], fig_dir, self.class_names), name
                )
                for name, analysis in pl_module.analyses.items()
            ]
        )
        findings = run_findings([
            finding
            for name, analysis in pl_module.analyses.items()
            for finding in analysis.findings(result.analyses[name])
        ])  # fmt: skip
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
            norms=result.norms,
            budget=self.budget,
            findings=findings,
            reproduce=self.reproduce,
            checkpoint=self.checkpoint,
        )
        examples = result.examples
        if examples:  # the W&B table also shows each example's PSE and CAM maps
            examples = {**examples, **example_map_columns(result.analyses, examples["index"])}
        log_report_to_wandb(
            trainer.logger,
            written,
            sections,
            scalars=result.scalars,
            examples=examples,
            class_names=self.class_names,
            verdicts={f.key: f.verdict for f in findings},
        )
