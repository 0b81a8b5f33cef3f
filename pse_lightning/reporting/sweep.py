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
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from pse_lightning.core.contract import SweepTable
from pse_lightning.core.findings import Finding, rule_text
from pse_lightning.reporting.files import write_json_atomic, write_text_atomic
from pse_lightning.reporting.findings import findings_markdown
from pse_lightning.reporting.sweep_claims import claims_by_job
from pse_lightning.reporting.sweep_figures import (
    accuracy_eps_figure,
    accuracy_figure,
    lambda_figure,
    stacked_share_figure,
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


def declared_tables(jobs: list[Job]) -> list[tuple[str, SweepTable]]:
    """(prefix, table) of every sweep table the jobs' analyses declared (``contract.json``),
    once each, in job order."""
    found: dict[tuple[str, str], tuple[str, SweepTable]] = {}
    for job in jobs:
        for contract in job.contracts:
            for table in contract.sweep_tables:
                found.setdefault((contract.prefix, table.title), (contract.prefix, table))
    return list(found.values())


def table_columns(prefix: str, table: SweepTable, keys: Iterable[str]) -> list[str]:
    """The table's columns (un-prefixed keys) given the logged ``keys`` (``test/...``): all
    its ``keys``, in their order, when one was logged (a missing one shows as n/a), or the
    keys its ``pattern`` selects, sorted."""
    mine = {k.removeprefix(f"test/{prefix}/") for k in keys if k.startswith(f"test/{prefix}/")}
    if table.keys:
        return list(table.keys) if mine & set(table.keys) else []
    return sorted(k for k in mine if table.selects(k))


def variant_summary(
    jobs: list[Job],
    variants: list[str],
    attacks: list[str],
    tables: Sequence[tuple[str, SweepTable]] = (),
) -> dict[str, dict[str, Any]]:
    """variant -> clean accuracy, samples, ``robust_acc/<attack>`` and the columns of the
    declared ``tables``: ``<prefix>/<key>/<attack>`` for a table per attack, else
    ``<prefix>/<key>``; each the mean over the seed replicates."""
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
            for prefix, table in tables:
                if table.per_attack:
                    for key in table_columns(prefix, table, cell):
                        if f"test/{prefix}/{key}" in cell:
                            entry[f"{prefix}/{key}/{attack}"] = cell[f"test/{prefix}/{key}"]
        for prefix, table in tables:
            if not table.per_attack:
                for key in table_columns(prefix, table, first):
                    entry[f"{prefix}/{key}"] = first[f"test/{prefix}/{key}"]
        summary[v] = entry
    return summary


def comparison_tables(
    summary: dict[str, dict[str, Any]],
    title: str,
    attacks: list[str],
    tables: Sequence[tuple[str, SweepTable]] = (),
) -> str:
    """The accuracy table, then each declared table that has numbers (variants as rows)."""
    accuracy = markdown_table(
        [title, "clean acc", *(f"robust acc ({a})" for a in attacks)],
        [[v, _num(s["clean_acc"]), *(_num(s.get(f"robust_acc/{a}")) for a in attacks)]
         for v, s in summary.items()],
    )  # fmt: skip
    parts = ["### Accuracy", "", accuracy]
    for prefix, table in tables:
        if table.per_attack:
            found = {
                f"test/{k.removesuffix(f'/{a}')}"
                for s in summary.values()
                for k in s
                for a in attacks
                if k.startswith(f"{prefix}/") and k.endswith(f"/{a}")
            }
            columns = table_columns(prefix, table, found)
            shown = [(v, a) for v in summary for a in attacks
                     if any(f"{prefix}/{k}/{a}" in summary[v] for k in columns)]  # fmt: skip
            if not shown:
                continue
            rows = [[v, a, *(_num(summary[v].get(f"{prefix}/{k}/{a}")) for k in columns)]
                    for v, a in shown]  # fmt: skip
            text = markdown_table([title, "attack", *columns], rows)
        else:
            logged = {f"test/{k}" for s in summary.values() for k in s}
            columns = table_columns(prefix, table, logged)
            if not columns:
                continue
            rows = [[v, *(_num(s.get(f"{prefix}/{k}")) for k in columns)]
                    for v, s in summary.items()]  # fmt: skip
            text = markdown_table([title, *columns], rows)
        parts += ["", f"### {table.title}", "", text]
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
            table = findings_markdown(mine, rule_text("table", simultaneous=True))
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
    tables = declared_tables(jobs)
    summary = variant_summary(jobs, variants, attacks, tables)
    findings, records = comparison_findings(jobs, comparison_plan(variants, attacks, replicates))
    selected = None if selection is None else selection_section(jobs, selection)
    if selected is not None:
        findings, records = mark_findings(findings, records, selected[1]["status"], selection)
    claims = claims_by_job(jobs)
    figures = [
        accuracy_figure(summary, variants, sweep_dir / "comparison.png"),
        *(
            stacked_share_figure(
                jobs,
                variants,
                attacks,
                prefix,
                table,
                sweep_dir / f"comparison_{table.figure}.png",
            )
            for prefix, table in tables
            if table.figure
        ),
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
        comparison_tables(summary, title, attacks, tables),
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
