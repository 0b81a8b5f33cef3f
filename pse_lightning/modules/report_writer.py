"""Writes the run's report from inside the trainer, on global rank zero only.

Living in a callback (not in the caller of ``trainer.test``) makes it work for every
strategy, including spawned DDP processes whose results never return to the caller. It is
handed everything it writes: the analyses at construction, the evaluation's result through
:meth:`ReportWriter.receive` (the pipeline passes it to the evaluation module as its
``on_result``); it reads nothing off the LightningModule.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.loggers import Logger

from pse_lightning.analysis.base import Analysis
from pse_lightning.core.report import ReportSection
from pse_lightning.core.run_status import RunMarker
from pse_lightning.core.threads import torch_threads
from pse_lightning.modules.evaluation import EvaluationResult
from pse_lightning.modules.example_panels import example_map_columns, example_panels_section
from pse_lightning.reporting.findings import run_findings
from pse_lightning.reporting.outcomes import write_outcomes
from pse_lightning.reporting.rendering import background_figures
from pse_lightning.reporting.report import log_report_to_wandb, with_prefix, write_report


class ReportWriter(pl.Callback):
    """After the test loop: per-image outcomes, analysis sections, figures, report.md,
    contract.json, then metrics.json.

    Args:
        analyses: name -> the analyses evaluated (their ``report``, ``findings``,
            ``glossary``, ``key_results``, ``sweep_tables`` and ``example_panel`` shape
            what is written).
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        title: str,
        setup: dict[str, str | None],
        class_names: Sequence[str],
        analyses: Mapping[str, Analysis] | None = None,
        sections: Sequence[ReportSection] = (),
        extra: dict | None = None,
        budget: tuple[str, float] | None = None,
        reproduce: str = "",
        checkpoint: str = "",
        marker: RunMarker | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.title = title
        self.setup = setup
        self.class_names = list(class_names)
        self.analyses = dict(analyses or {})
        self.sections = list(sections)
        self.extra = extra or {}
        self.budget = budget
        self.reproduce = reproduce
        self.checkpoint = checkpoint
        self.marker = marker
        self.result: EvaluationResult | None = None

    def receive(self, result: EvaluationResult) -> None:
        """Take the evaluation's reduced result (every rank; only rank zero writes it)."""
        self.result = result

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        if self.result is None:
            raise RuntimeError(
                "the report writer received no result: pass its receive method to the "
                "EvaluationModule as on_result"
            )
        if self.marker is not None:
            self.marker.enter("report")
        # Figures and findings are small operations: one thread (core/threads.py); the
        # figures render in forked children while the next is drawn (reporting/rendering.py).
        with torch_threads(1), background_figures():
            self.write(self.result, trainer.logger)

    def write(self, result: EvaluationResult, logger: Logger | None = None) -> None:
        """Write the report of ``result`` and log it to ``logger`` (W&B only)."""
        fig_dir = self.run_dir / "figures"
        analyses = {n: a for n, a in self.analyses.items() if n in result.analyses}
        panels = {
            name: panel
            for name, analysis in analyses.items()
            if (panel := analysis.example_panel(result.analyses[name])) is not None
        }
        panel_section = example_panels_section(panels, fig_dir, self.class_names)
        own = [
            with_prefix(analysis.report(result.analyses[name], fig_dir, self.class_names), name)
            for name, analysis in analyses.items()
        ]
        sections = [*self.sections, *([] if panel_section is None else [panel_section]), *own]
        findings = run_findings([
            finding
            for name, analysis in analyses.items()
            for finding in analysis.findings(result.analyses[name])
        ])  # fmt: skip
        contracts = [analysis.contract(name) for name, analysis in analyses.items()]
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
            glossary=[t.under(n) for n, a in analyses.items() for t in a.glossary()],
            contracts=contracts,
        )
        examples = result.examples
        if examples:  # the W&B table also shows the analyses' maps of each example
            examples = {**examples, **example_map_columns(panels, examples["index"])}
        log_report_to_wandb(
            logger,
            written,
            sections,
            scalars=result.scalars,
            examples=examples,
            class_names=self.class_names,
            verdicts={f.key: f.verdict for f in findings},
            key_results=[key for c in contracts for key in c.full_keys()],
        )
