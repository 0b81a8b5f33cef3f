"""Comparison report of a multirun, written into the sweep directory.

A Hydra callback (``hydra.callbacks``) runs after the last job of a sweep and reads each
job's ``metrics.json``, ``outcomes.json`` and Hydra files from disk, so it works for every
launcher (basic, joblib, SLURM) without talking to the jobs. The variants (whatever the jobs'
overrides set differently, the attack and the seed aside) are compared image by image on the
shared test images (docs/METHODS.md §7.6), with verdicts like the per-run Findings. Training
variants are procedures: the report opens with their comparison over the training seeds,
then shows each seed's two trained models image by image. When the jobs wrote
``findings.json``, their claims follow side by side, one column per attack
(``experiment=pse_types``).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from pse_lightning.core.findings import Finding, rule_text
from pse_lightning.core.pse_types import DOMINANCE_TYPES as PSE_TYPES
from pse_lightning.reporting.files import write_json_atomic, write_text_atomic
from pse_lightning.reporting.findings import findings_markdown
from pse_lightning.reporting.sweep_claims import claims_by_job
from pse_lightning.reporting.sweep_figures import (
    accuracy_eps_figure,
    accuracy_figure,
    lambda_figure,
    pse_types_figure,
)
from pse_lightning.reporting.sweep_jobs import (
    Job,
    attack_order,
    collect_jobs,
    mean_metrics,
    seeds,
    variant_order,
    variant_title,
)
from pse_lightning.reporting.sweep_selection import Selection, mark_findings, selection_section
from pse_lightning.reporting.sweep_stats import (
    CLEAN,
    MODELS,
    PROCEDURES,
    ROBUST,
    RULE,
    comparison_findings,
    comparison_plan,
)
from pse_lightning.reporting.tables import markdown_table

log = logging.getLogger(__name__)


def _num(value: float | None) -> float:
    """A table cell's number; a metric a job did not log is NaN (shown as n/a)."""
    return math.nan if value is None else float(value)


def variant_summary(
    jobs: list[Job], variants: list[str], attacks: list[str]
) -> dict[str, dict[str, Any]]:
    """variant -> clean accuracy, samples, ``robust_acc/<attack>``, ``pse/frac_<type>/<attack>``
    and the dissection's interpretable-unit counts; each the mean over the seed replicates."""
    summary: dict[str, dict[str, Any]] = {}
    for v in variants:
        mine = [j for j in jobs if j.variant == v]
        first = mean_metrics(mine)
        entry = {"clean_acc": first.get("test/clean_acc"), "samples": first.get("test/samples")}
        for attack in attacks:
            cell = mean_metrics([j for j in mine if j.attack == attack])
            if not cell:
                continue
            entry[f"robust_acc/{attack}"] = cell.get("test/robust_acc")
            for t in PSE_TYPES:
                if f"test/pse/frac_{t}" in cell:
                    entry[f"pse/frac_{t}/{attack}"] = cell[f"test/pse/frac_{t}"]
        entry |= {
            k.removeprefix("test/"): val
            for k, val in first.items()
            if k.startswith("test/dissection/") and "interpretable" in k
        }
        summary[v] = entry
    return summary


def comparison_tables(summary: dict[str, dict[str, Any]], title: str, attacks: list[str]) -> str:
    """Accuracy, PSE-type and interpretable-unit tables (variants as rows)."""
    accuracy = markdown_table(
        [title, "clean acc", *(f"robust acc ({a})" for a in attacks)],
        [[v, _num(s["clean_acc"]), *(_num(s.get(f"robust_acc/{a}")) for a in attacks)]
         for v, s in summary.items()],
    )  # fmt: skip
    parts = ["### Accuracy", "", accuracy]
    pse = [(v, a) for v in summary for a in attacks if f"pse/frac_balanced/{a}" in summary[v]]
    if pse:
        rows = [[v, a, *(_num(summary[v].get(f"pse/frac_{t}/{a}")) for t in PSE_TYPES)]
                for v, a in pse]  # fmt: skip
        table = markdown_table([title, "attack", *(f"frac_{t}" for t in PSE_TYPES)], rows)
        parts += ["", "### PSE types of the successful perturbations", "", table]
    units = sorted({k for s in summary.values() for k in s if k.startswith("dissection/")})
    if units:
        rows = [[v, *(_num(s.get(k)) for k in units)] for v, s in summary.items()]
        table = markdown_table([title, *(k.removeprefix("dissection/") for k in units)], rows)
        parts += ["", "### Interpretable units", "", table]
    return "\n".join(parts)


# Each Holm family's heading in comparison.md.
FAMILY_HEADINGS = {
    PROCEDURES: "## Findings: training procedures (seeds as replicates)",
    ROBUST: "## Findings",
    CLEAN: "## Findings: clean accuracy",
    MODELS: "## Findings: two trained models, seed by seed",
}


def findings_sections(findings: list[Finding], records: list[dict]) -> dict[str, str]:
    """family -> its heading, Findings table and rule (one Holm family per table)."""
    sections = {}
    for family, heading in FAMILY_HEADINGS.items():
        mine = [f for f, r in zip(findings, records, strict=True) if r["family"] == family]
        if mine:
            table = findings_markdown(mine, rule_text("table"))
            sections[family] = "\n".join([heading, "", table, ""])
    return sections


def _claims_section(table: str, attacks_only: bool) -> list[str]:
    """The claims of every job side by side, first in the report."""
    what = "attack" if attacks_only else "job"
    return [
        f"## The runs' claims per {what}",
        "",
        f"Each column is one job ({what}): the claims its analyses tested, as that run judged "
        "them (its findings.json; Holm within the run, not across this table). Each cell: "
        "verdict (measured effect, 95% CI).",
        "",
        table,
        "",
    ]


def write_comparison(sweep_dir: Path, selection: Selection | None = None) -> Path | None:
    """Write ``comparison.md``, ``comparison.json`` and the figures into ``sweep_dir``;
    ``selection`` marks an ablation's winners (:mod:`.sweep_selection`)."""
    jobs = collect_jobs(sweep_dir)
    if not jobs:
        log.warning("no completed job with metrics.json under %s: no comparison", sweep_dir)
        return None
    title, variants, attacks = variant_title(jobs), variant_order(jobs), attack_order(jobs)
    replicates = seeds(jobs)
    summary = variant_summary(jobs, variants, attacks)
    findings, records = comparison_findings(jobs, comparison_plan(variants, attacks, replicates))
    selected = None if selection is None else selection_section(jobs, selection)
    if selected is not None:
        findings, records = mark_findings(findings, records, selected[1]["status"], selection)
    claims = claims_by_job(jobs)
    figures = [
        accuracy_figure(summary, variants, sweep_dir / "comparison.png"),
        pse_types_figure(jobs, variants, attacks, sweep_dir / "comparison_pse_types.png"),
        accuracy_eps_figure(jobs, variants, sweep_dir / "comparison_accuracy_eps.png"),
        lambda_figure(jobs, sweep_dir, sweep_dir / "comparison_lambda.png"),
    ]
    means = (
        f" With {len(replicates)} seeds (replicates: each variant trained once per seed), "
        "the tables show means over the seeds; the procedures are compared over the seeds, "
        "and each seed's two trained models image by image."
        if len(replicates) > 1
        else ""
    )
    row = "variant" if title == "variant" else f"{title} variant"
    sections = findings_sections(findings, records)
    rest = [sections[f] for f in (ROBUST, CLEAN, MODELS) if f in sections]
    text = "\n".join([
        f"# Comparison of {len(jobs)} jobs",
        "",
        *([sections[PROCEDURES]] if PROCEDURES in sections else []),
        *(_claims_section(claims[0], len(variants) == len(replicates) == 1) if claims else []),
        f"Each row is one {row}, evaluated with the same attacks (columns) on the "
        "same test images. Robust accuracy is the share of all evaluated images classified "
        f"correctly both clean and under attack.{means}",
        "",
        *([selected[0]] if selected else []),
        *(rest or ["## Findings", "", "Only one variant: nothing to compare.", ""]),
        *([RULE, ""] if findings else []),
        comparison_tables(summary, title, attacks),
        "",
        *[f"![{f.stem}]({f.name})" for f in figures if f is not None],
        "",
        "Job directories (under this sweep directory): "
        + ", ".join(
            f"{j.variant}/{j.attack}{f'/seed {j.seed}' if means else ''} → `{j.dir}`"
            for j in jobs
        ),
    ])  # fmt: skip
    write_json_atomic(
        sweep_dir / "comparison.json",
        {
            "variant_key": title,
            "seeds": replicates if len(replicates) > 1 else [],
            "variants": summary,
            "claims": claims[1] if claims else None,
            "comparisons": records,
            "verdicts": {f.key: f.verdict for f in findings},
            "selection": selected[1] if selected else None,
            "jobs": [j.dir for j in jobs],
        },
    )
    path = write_text_atomic(sweep_dir / "comparison.md", text)
    log.info("comparison written to %s", path)
    return path


class SweepComparison(Callback):
    """Hydra callback: after a multirun, compare its jobs in ``<sweep dir>/comparison.md``.

    Args:
        selection: the sweep's stage in a select-then-confirm study (``stage``: select or
            confirm, ``reference``, ``selection_seeds``, ``confirm_with``), as the
            ``pse_at_ablation`` and ``pse_at_confirm`` presets set it; None for any other.
    """

    def __init__(self, selection: Any = None) -> None:
        self.selection = Selection.from_config(selection)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        write_comparison(Path(config.hydra.sweep.dir), self.selection)
