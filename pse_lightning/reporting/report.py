"""The on-disk report of a run: ``metrics.json``, ``report.md`` and PNG figures.

``metrics.json`` is written last and atomically: its presence means the run completed, so
an interrupted evaluation never leaves a report that looks complete.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pytorch_lightning.loggers import Logger, WandbLogger

from pse_lightning.core.report import ReportSection
from pse_lightning.reporting.figures import adversarial_examples_figure, summary_bar_figure
from pse_lightning.reporting.files import write_json_atomic, write_text_atomic
from pse_lightning.reporting.findings import findings_markdown, run_findings

log = logging.getLogger(__name__)


def metrics_table(scalars: dict[str, float]) -> str:
    rows = "\n".join(
        f"| `{k}` | {'n/a' if isinstance(v, float) and math.isnan(v) else f'{v:.4g}'} |"
        for k, v in sorted(scalars.items())
    )
    return "| metric | value |\n|---|---|\n" + rows


def write_report(
    run_dir: str | Path,
    *,
    title: str,
    setup: dict[str, str],
    scalars: dict[str, float],
    examples: dict[str, Any],
    class_names: Sequence[str],
    sections: Sequence[ReportSection] = (),
    extra: dict[str, Any] | None = None,
) -> dict[str, Path]:
    """Write figures, ``report.md`` and finally ``metrics.json`` into ``run_dir``.

    Returns:
        name -> path of everything written (figures included), for logging.
    """
    run_dir = Path(run_dir)
    fig_dir = run_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    written["summary"] = summary_bar_figure(scalars, fig_dir / "summary.png")
    if examples:
        written["examples"] = adversarial_examples_figure(
            examples, class_names, fig_dir / "adversarial_examples.png"
        )
    findings = run_findings(scalars)
    lines = [f"# {title}", "", "## Findings", "", findings_markdown(findings), ""]
    lines += ["## Setup", ""]
    lines += [f"- **{k}**: `{v}`" for k, v in setup.items()]
    lines += ["", "## Results", "", f"![summary]({written['summary'].relative_to(run_dir)})", ""]
    if "examples" in written:
        lines += [
            "## Adversarial examples",
            "",
            "Top: clean image (index, label, clean prediction); middle: adversarial image "
            "(prediction in red when the attack succeeded); bottom: the perturbation, "
            "amplified to fill the grey range.",
            "",
            f"![examples]({written['examples'].relative_to(run_dir)})",
            "",
        ]
    for section in sections:
        lines += [f"## {section.title}", "", section.markdown, ""]
        for figure in section.figures:
            rel = Path(figure).resolve().relative_to(run_dir.resolve())
            lines += [f"![{Path(figure).stem}]({rel})", ""]
            written[f"{section.title}/{Path(figure).stem}"] = Path(figure)
    lines += ["## All metrics", "", metrics_table(scalars), ""]
    write_text_atomic(run_dir / "report.md", "\n".join(lines))
    written["report"] = run_dir / "report.md"
    verdicts = {f.key: f.verdict for f in findings}
    payload = {"metrics": scalars, "findings": verdicts, **(extra or {})}
    written["metrics"] = write_json_atomic(run_dir / "metrics.json", payload)
    log.info("report written to %s", run_dir / "report.md")
    return written


def log_report_to_wandb(
    logger: Logger | None,
    written: dict[str, Path],
    sections: Sequence[ReportSection],
    *,
    scalars: dict[str, float] | None = None,
    examples: dict[str, Any] | None = None,
    class_names: Sequence[str] = (),
) -> None:
    """The evaluation's figures, tables, per-example table, key results and report
    artifact in the W&B run (see :mod:`~pse_lightning.reporting.wandb_run`); rank zero only.
    """
    if not isinstance(logger, WandbLogger):
        return
    from pse_lightning.reporting.wandb_run import log_evaluation

    log_evaluation(
        logger.experiment,
        written=written,
        sections=sections,
        scalars=scalars or {},
        examples=examples or {},
        class_names=class_names,
    )
