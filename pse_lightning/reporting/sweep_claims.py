"""The claims of a sweep's runs side by side: claim × job (attack) → verdict (effect).

Every run judges the claims its analyses declare and writes them to ``findings.json``
(:mod:`pse_lightning.core.findings`). A sweep over attacks at the same images and the same
model (``experiment=pse_types``) asks how each claim fares under each attack; this module
reads the jobs' findings and lays them out in one table, one row per claim key, one column per
job. It iterates over whatever findings the jobs wrote and names no metric of any analysis.
The verdicts are each run's own: Holm ran within that run, not across this table.
"""

from __future__ import annotations

import math
from typing import Any

from pse_lightning.reporting.sweep_jobs import Job, attack_order, seeds, variant_order
from pse_lightning.reporting.tables import markdown_table

# A finding's fields copied into comparison.json, beside its verdict.
FIELDS = ("verdict", "effect", "test", "estimate", "low", "high", "p", "p_holm", "note")


def claim_columns(jobs: list[Job]) -> list[tuple[str, Job]]:
    """(column label, job) for every job with findings, ordered by variant, attack, seed. The
    label names the attack, and the variant and seed only when the sweep varies them."""
    with_findings = [j for j in jobs if j.findings is not None]
    variants, attacks, replicates = (
        variant_order(with_findings),
        attack_order(with_findings),
        seeds(with_findings),
    )

    def label(job: Job) -> str:
        parts = [job.variant] if len(variants) > 1 else []
        parts.append(job.attack)
        if len(replicates) > 1:
            parts.append(f"seed {job.seed}")
        return " / ".join(parts)

    def rank(job: Job) -> tuple[int, int, int]:
        return (
            variants.index(job.variant),
            attacks.index(job.attack),
            replicates.index(job.seed),
        )

    return [(label(j), j) for j in sorted(with_findings, key=rank)]


def _cell(finding: dict[str, Any]) -> str:
    """verdict (effect) for a measured claim; the verdict alone for one not measured."""
    verdict = finding.get("verdict") or finding.get("status") or "not judged"
    if verdict == "not measured":
        return verdict
    effect = str(finding.get("effect", "")).replace("|", "\\|")
    return f"**{verdict}** ({effect})" if effect else f"**{verdict}**"


def _number(value: Any) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def claims_by_job(jobs: list[Job]) -> tuple[str, dict[str, Any]] | None:
    """The markdown table claim × job and the same as JSON (``columns``; ``rows`` with key,
    claim and per column the verdict, effect, test, estimate, interval, p, Holm p, note);
    None when no job wrote ``findings.json``."""
    columns = claim_columns(jobs)
    if not columns:
        return None
    claims: dict[str, str] = {}
    cells: dict[str, dict[str, dict[str, Any]]] = {}
    for label, job in columns:
        for finding in job.findings or []:
            key = str(finding["key"])
            claims.setdefault(key, str(finding.get("claim", key)))
            cells.setdefault(key, {})[label] = {f: _number(finding.get(f)) for f in FIELDS}
    labels = [label for label, _ in columns]
    rows = [
        [claim.replace("|", "\\|"), *(_cell(cells[key][lb]) if lb in cells[key] else "—"
                                      for lb in labels)]
        for key, claim in claims.items()
    ]  # fmt: skip
    table = markdown_table(["claim", *labels], rows)
    record = {
        "columns": labels,
        "jobs": {label: job.dir for label, job in columns},
        "rows": [{"key": k, "claim": c, "cells": cells[k]} for k, c in claims.items()],
    }
    return table, record
