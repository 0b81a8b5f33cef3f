"""The on-disk report of a run: ``metrics.json``, ``report.md`` and PNG figures.

``report.md`` reads top-down: the Findings (the paper's claims tested on this run), the key
numbers of each part with one generated sentence on what they mean, the setup (the
"Reproduce" command line that reruns the job, then ``key=value`` lines that paste back as
overrides, and the checkpoint), one section per part with captioned figures, the glossary of every
metric and term shown, and last the raw dump of every logged metric.

``report.md``, ``findings.json`` and ``metrics.json`` are written to temporary files and
renamed into place together (all or none, metrics last), and a run that did not complete
keeps its ``INCOMPLETE`` marker (:mod:`~pse_lightning.core.run_status`), so an interrupted
evaluation or a full disk never leaves a report that looks complete.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from pytorch_lightning.loggers import Logger, WandbLogger
from torch import Tensor

from pse_lightning.core.contract import ReportContract, Term
from pse_lightning.core.findings import Finding
from pse_lightning.core.report import ReportSection
from pse_lightning.reporting.figures import (
    adversarial_examples_figure,
    norm_distribution_figure,
    summary_bar_figure,
)
from pse_lightning.reporting.files import json_text, write_files_atomic
from pse_lightning.reporting.findings import findings_markdown, run_findings
from pse_lightning.reporting.glossary import TERMS, glossary_markdown, terms_for, unexplained
from pse_lightning.reporting.rendering import wait_for_figures

log = logging.getLogger(__name__)
HEADINGS = ("Findings", "Key numbers", "Setup", "Glossary", "All metrics")
MISSING_CAPTION = "(no caption given)"
# What the run's analyses declare for a sweep (pse_lightning.core.contract), beside metrics.json.
CONTRACT_FILE = "contract.json"


def significant(value: Any, digits: int = 3) -> str:
    """A number at ``digits`` significant digits (NaN and None as 'n/a'; whole numbers as
    integers); anything else as ``str``."""
    if value is None:
        return "n/a"
    if isinstance(value, Tensor):
        value = float(value)
    if isinstance(value, (int, float)):
        if math.isnan(value):
            return "n/a"
        if float(value).is_integer() and abs(value) < 1e6:
            return str(int(value))
        return f"{value:.{digits}g}"
    return str(value)


def percent(share: float | None) -> str:
    """A share in [0, 1] as a percentage at 3 significant digits ('n/a' for NaN or None)."""
    if share is None or share != share:
        return "n/a"
    return f"{100 * share:.3g}%"


def metrics_table(scalars: dict[str, float]) -> str:
    rows = "\n".join(
        f"| `{k}` | {'n/a' if isinstance(v, float) and math.isnan(v) else f'{v:.4g}'} |"
        for k, v in sorted(scalars.items())
    )
    return "| metric | value |\n|---|---|\n" + rows


def key_numbers_markdown(section: ReportSection) -> str:
    """The section's key numbers as a two-column table, then its one-sentence meaning."""
    prefix = f"{section.prefix}/" if section.prefix else ""
    rows = [f"| `{prefix}{k}` | {significant(v)} |" for k, v in section.key_numbers.items()]
    return "\n".join(["| number | value |", "|---|---|", *rows, "", section.meaning])


def setup_markdown(
    setup: Mapping[str, str | None], reproduce: str = "", checkpoint: str = ""
) -> str:
    """The run's setup: the command that reruns it, then its ``key=value`` lines (valid
    overrides: the choices as typed, then the parameters) in a code block that copies
    cleanly, and the checkpoint evaluated."""
    lines = []
    if reproduce:
        lines += ["Reproduce:", "", "```", reproduce, "```", ""]
    entries = (k if v is None else f"{k}={v}" for k, v in setup.items())  # None: ``~key``
    lines.append("```\n" + "\n".join(entries) + "\n```")
    if checkpoint:
        lines += ["", f"Checkpoint: `{checkpoint}`"]
    return "\n".join(lines)


def override_value(value: Any) -> str:
    """A value as a Hydra override writes it: ``null``, ``true``/``false``, else ``str``."""
    if value is None:
        return "null"
    return str(value).lower() if isinstance(value, bool) else str(value)


def flatten_params(prefix: str, params: Mapping[str, Any]) -> dict[str, str]:
    """``{prefix}.{key}`` -> value for a component's constructor parameters, nested mappings
    flattened and Hydra's ``_target_``/``_partial_`` left out (the choice names the class)."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        if str(key).startswith("_"):
            continue
        if isinstance(value, Mapping):
            flat.update(flatten_params(f"{prefix}.{key}", value))
        else:
            flat[f"{prefix}.{key}"] = override_value(value)
    return flat


def attack_section(
    scalars: dict[str, float],
    examples: dict[str, Tensor],
    norms: dict[str, Tensor],
    class_names: Sequence[str],
    fig_dir: Path,
    budget: tuple[str, float] | None = None,
) -> ReportSection:
    """The attack's own part: accuracy bars, the kept examples and the norm distribution."""
    get = lambda key: scalars.get(f"test/{key}", math.nan)  # noqa: E731
    keys = ("clean_acc", "robust_acc", "success_rate", "l2_median", "linf_median")
    section = ReportSection(title="Attack", key_numbers={k: get(k) for k in keys})
    section.meaning = attack_meaning(scalars)
    section.figures.append(summary_bar_figure(scalars, fig_dir / "summary.png"))
    section.captions["summary"] = (
        "Share of the test images classified correctly before (clean acc) and after the "
        "attack (robust acc), and the attack's success rate over the correctly classified "
        "images; 1 = all images."
    )
    if examples:
        section.figures.append(
            adversarial_examples_figure(
                examples, class_names, fig_dir / "adversarial_examples.png"
            )
        )
        section.captions["adversarial_examples"] = (
            "The test images of lowest dataset index. Top: clean image with its label and "
            "clean prediction; middle: adversarial image and its prediction (red when the "
            "attack succeeded); bottom: the perturbation δ = x' − x as grey + a·δ, with the "
            "amplification a (largest |δ| to the full grey range) and the L2 and L∞ norms "
            "(pixels in [0, 1]) written on each panel."
        )
    if norms and len(norms.get("l2", ())):
        section.figures.append(
            norm_distribution_figure(norms, fig_dir / "perturbation_norms.png", budget=budget)
        )
        section.captions["perturbation_norms"] = (
            f"Distribution of the perturbation norms of the {len(norms['l2'])} successful "
            "adversarial examples: histogram (left axis, images), empirical CDF (right "
            "axis, share) and the median (dashed); norms in pixel units, images in [0, 1]. "
            "For a minimum-norm attack this is the distance to the decision boundary it found."
        )
    return section


def attack_meaning(scalars: dict[str, float]) -> str:
    """One sentence on the attack's numbers, generated from them."""
    n = scalars.get("test/samples", math.nan)
    clean, robust = scalars.get("test/clean_acc", math.nan), scalars.get("test/robust_acc")
    if not clean > 0:
        return (
            f"The model classified none of the {significant(n)} test images correctly, so "
            "nothing was attacked."
        )
    attacked = f"{significant(round(clean * n))} " if n == n else ""
    text = (
        f"The attack succeeded on {percent(scalars.get('test/success_rate'))} of the "
        f"{attacked}correctly classified test images, lowering accuracy from "
        f"{percent(clean)} to {percent(robust)}"
    )
    l2 = scalars.get("test/l2_median", math.nan)
    if l2 == l2:
        text += (
            f"; the median successful perturbation has L2 norm {significant(l2)} and L∞ norm "
            f"{significant(scalars.get('test/linf_median'))} (pixels in [0, 1])"
        )
    return text + "."


def figure_markdown(run_dir: Path, figure: Path, caption: str, number: int) -> list[str]:
    """An embedded figure and its numbered caption on the next line."""
    rel = Path(figure).resolve().relative_to(run_dir.resolve())
    return [f"![{Path(figure).stem}]({rel})", f"*Figure {number}. {caption}*", ""]


def report_markdown(
    run_dir: Path,
    title: str,
    setup: Mapping[str, str | None],
    scalars: dict[str, float],
    sections: Sequence[ReportSection],
    findings: str,
    reproduce: str = "",
    checkpoint: str = "",
    glossary: Sequence[Term] = TERMS,
) -> str:
    """The text of ``report.md`` (see the module docstring for its order); ``glossary``
    holds every entry the run's parts declare."""
    lines = [f"# {title}", "", "## Findings", "", findings, "", "## Key numbers", ""]
    for section in sections:
        if section.key_numbers or section.meaning:
            lines += [f"### {section.title}", "", key_numbers_markdown(section), ""]
    lines += ["## Setup", "", setup_markdown(setup, reproduce, checkpoint), ""]
    number = 0
    for section in sections:
        lines += [f"## {section.title}", ""]
        if section.markdown:
            lines += [section.markdown, ""]
        for figure in section.figures:
            number += 1
            caption = section.captions.get(Path(figure).stem)
            if caption is None:
                log.warning("report: %s has no caption in section %r", figure, section.title)
            lines += figure_markdown(run_dir, Path(figure), caption or MISSING_CAPTION, number)
    lines += ["## Glossary", "", glossary_markdown(terms_for(scalars, glossary)), ""]
    others = unexplained(scalars, glossary)
    if others:  # a user's own analysis: its keys are defined where it is written
        listed = ", ".join(f"`{key}`" for key in others)
        lines += [f"Not in the glossary (defined by the analysis that logs them): {listed}.", ""]
    lines += ["## All metrics", "", metrics_table(scalars), ""]
    return "\n".join(lines)


def write_report(
    run_dir: str | Path,
    *,
    title: str,
    setup: dict[str, str | None],
    scalars: dict[str, float],
    examples: dict[str, Any],
    class_names: Sequence[str],
    sections: Sequence[ReportSection] = (),
    extra: dict[str, Any] | None = None,
    norms: dict[str, Tensor] | None = None,
    budget: tuple[str, float] | None = None,
    findings: Sequence[Finding] | None = None,
    reproduce: str = "",
    checkpoint: str = "",
    glossary: Sequence[Term] = (),
    contracts: Sequence[ReportContract] = (),
) -> dict[str, Path]:
    """Write figures, ``report.md`` and finally ``metrics.json`` into ``run_dir``.

    Args:
        sections: the analyses' parts, in order, after the attack's own.
        norms: per-image ``l2``/``linf`` norms of the successful perturbations.
        budget: (norm, ε) of a budgeted attack, marked on the norm distribution.
        reproduce: the command line that reruns the job (empty: none known).
        checkpoint: the checkpoint evaluated.
        glossary: the entries the analyses that ran declare, prefixed with their names
            (:meth:`~pse_lightning.core.contract.Term.under`); the attack's are added here.
        contracts: what each analysis that ran declares for a sweep, written to
            ``contract.json`` (before ``metrics.json``, which marks the run complete).
        findings: the judged Findings (:func:`~pse_lightning.reporting.findings.run_findings`
            of what the analyses declared); None: no analysis declared any.

    Returns:
        name -> path of everything written (figures included), for logging.
    """
    run_dir = Path(run_dir)
    fig_dir = run_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    attack = attack_section(scalars, examples, norms or {}, class_names, fig_dir, budget)
    parts = [attack, *sections]
    written: dict[str, Path] = {Path(f).stem: Path(f) for f in attack.figures}
    for section in sections:
        key = section.prefix or section.title
        written.update({f"{key}/{Path(f).stem}": Path(f) for f in section.figures})
    findings = run_findings([]) if findings is None else list(findings)
    text = report_markdown(
        run_dir, title, setup, scalars, parts, findings_markdown(findings), reproduce,
        checkpoint, (*TERMS, *glossary),
    )  # fmt: skip
    verdicts = {f.key: f.verdict for f in findings}
    payload = {"metrics": scalars, "findings": verdicts, **(extra or {})}
    wait_for_figures()  # report.md names them: each is on disk first
    # All three or none (a full disk): renamed into place only once all are written.
    files = {
        "report": (run_dir / "report.md", text),
        "findings": (run_dir / "findings.json", json_text([asdict(f) for f in findings])),
        "contract": (
            run_dir / CONTRACT_FILE,
            json_text({"analyses": [c.to_json() for c in contracts]}),
        ),
        "metrics": (run_dir / "metrics.json", json_text(payload)),
    }
    write_files_atomic(dict(files.values()))
    written.update({key: path for key, (path, _) in files.items()})
    # The command line names the report last; the Python API returns its path.
    log.debug("report written to %s", run_dir / "report.md")
    return written


def with_prefix(section: ReportSection, prefix: str) -> ReportSection:
    """The section with its metric prefix set (its keys are logged as ``test/<prefix>/``)."""
    return replace(section, prefix=prefix)


def log_report_to_wandb(
    logger: Logger | None,
    written: dict[str, Path],
    sections: Sequence[ReportSection],
    *,
    scalars: dict[str, float] | None = None,
    examples: dict[str, Any] | None = None,
    class_names: Sequence[str] = (),
    verdicts: dict[str, str] | None = None,
    key_results: Sequence[str] = (),
) -> None:
    """The evaluation's figures, tables, per-example table, key results (the attack's and
    the analyses' ``key_results``, ``<name>/<key>``) and report artifact in the W&B run (see
    :mod:`~pse_lightning.reporting.wandb_run`); rank zero only.
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
        verdicts=verdicts or {},
        declared=key_results,
    )
