"""Selection and confirmation: an ablation's winner is a hypothesis, not a finding.

``experiment=pse_at_ablation`` trains many settings of PSE-AT and pgd_at on the same seeds.
A setting that beats pgd_at there was *selected* by that comparison: the same seeds chose it
and would judge it, so its verdict is biased upwards (the winner's curse). The comparison
therefore marks every such winner "selected, needs confirmation" (its robust-accuracy
Findings against the reference get that verdict, the judged one kept in the note) and names
the rerun: ``experiment=pse_at_confirm``, which trains the selected settings and pgd_at on
seeds disjoint from the ablation's. A confirmation run's verdicts stand only when its seeds
are indeed fresh (none of ``selection_seeds``); otherwise its winners stay "selected".

The stage comes from the sweep's callback config (``hydra.callbacks.comparison.selection``,
set by the two presets); a sweep without it is neither and is left as judged.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, replace
from typing import Any

from pse_lightning.core.findings import Finding
from pse_lightning.reporting.sweep_jobs import Job
from pse_lightning.reporting.tables import markdown_table

SELECTED = "selected, needs confirmation"
CONFIRMED_ON_FRESH_SEEDS = "confirmation on fresh seeds"
STAGES = ("select", "confirm")


@dataclass(frozen=True)
class Selection:
    """What the sweep is in a select-then-confirm study.

    Attributes:
        stage: ``select`` (an ablation: winners need confirmation) or ``confirm`` (a rerun
            of selected settings, to be judged on fresh seeds).
        reference: the variant a setting must beat (pgd_at).
        selection_seeds: the seeds the selection used; a confirmation must avoid them.
        confirm_with: the preset that confirms (named in the report's rerun command).
    """

    stage: str
    reference: str = "pgd_at"
    selection_seeds: tuple[str, ...] = ()
    confirm_with: str = "pse_at_confirm"

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"selection.stage must be one of {list(STAGES)}, got {self.stage!r}")

    @classmethod
    def from_config(cls, config: Any) -> Selection | None:
        """From the callback's ``selection`` mapping; None when it is absent."""
        if not config:
            return None
        seeds = tuple(str(s) for s in (config.get("selection_seeds") or ()))
        return cls(
            stage=str(config["stage"]),
            reference=str(config.get("reference", "pgd_at")),
            selection_seeds=seeds,
            confirm_with=str(config.get("confirm_with", "pse_at_confirm")),
        )


def robust_by_seed(jobs: list[Job]) -> dict[tuple[str, str], dict[str, float]]:
    """(variant, attack) -> seed -> robust accuracy, from each job's metrics."""
    table: dict[tuple[str, str], dict[str, float]] = {}
    for job in jobs:
        acc = job.metrics.get("test/robust_acc")
        if acc is not None:
            table.setdefault((job.variant, job.attack), {})[job.seed] = float(acc)
    return table


def winners(jobs: list[Job], reference: str) -> dict[str, dict[str, Any]]:
    """variant -> {attack: (mean difference, per-seed differences)} for every variant whose
    mean robust accuracy over the seeds it shares with ``reference`` exceeds the reference's,
    under at least one attack. "Beats" is any positive mean difference: the selection is
    generous on purpose, since confirmation, not this rule, makes the claim."""
    table = robust_by_seed(jobs)
    found: dict[str, dict[str, Any]] = {}
    for (variant, attack), accs in table.items():
        base = table.get((reference, attack))
        if variant == reference or base is None:
            continue
        shared = [s for s in accs if s in base]
        if not shared:
            continue
        diffs = {s: accs[s] - base[s] for s in shared}
        mean = statistics.fmean(diffs.values())
        if mean > 0:
            found.setdefault(variant, {})[attack] = {"mean_difference": mean, "by_seed": diffs}
    return found


def fresh_seeds(jobs: list[Job], selection: Selection) -> tuple[bool, list[str]]:
    """Whether no job used a seed of the selection, and the seeds that were reused."""
    reused = sorted({j.seed for j in jobs} & set(selection.selection_seeds))
    return not reused, reused


def statuses(jobs: list[Job], selection: Selection) -> dict[str, str]:
    """variant -> its status: SELECTED for an ablation's winners and for a confirmation run
    that reused selection seeds, CONFIRMED_ON_FRESH_SEEDS for a confirmation on fresh seeds."""
    variants = {j.variant for j in jobs} - {selection.reference}
    if selection.stage == "select":
        return dict.fromkeys(winners(jobs, selection.reference), SELECTED)
    fresh, _ = fresh_seeds(jobs, selection)
    return dict.fromkeys(sorted(variants), CONFIRMED_ON_FRESH_SEEDS if fresh else SELECTED)


def rerun_command(selection: Selection, variants: list[str]) -> str:
    return (
        f"python -m pse_lightning experiment={selection.confirm_with} "
        f"hydra.sweeper.params.ablation={','.join([selection.reference, *variants])}"
    )


def mark_findings(
    findings: list[Finding], records: list[dict], status: dict[str, str], selection: Selection
) -> tuple[list[Finding], list[dict]]:
    """Give every robust-accuracy Finding that involves a SELECTED variant, as the variant
    (against the reference, or against its matched control) or as the baseline (a control
    compared with a selected setting), the verdict SELECTED (the judged verdict kept in its
    note and record): the seeds that picked a setting as a winner favour it in every
    comparison on those seeds, so the selection must not make any of its claims. Records
    are matched by their ``variant``, ``baseline`` and ``measure`` fields."""
    selected = sorted(v for v, s in status.items() if s == SELECTED)
    marked_f, marked_r = [], []
    for finding, record in zip(findings, records, strict=True):
        hit = record.get("measure") == "robust" and (
            record.get("variant") in selected or record.get("baseline") in selected
        )
        if hit:
            picked = [str(record[k]) for k in ("variant", "baseline") if record[k] in selected]
            note = (
                f"judged {finding.verdict} on the seeds that selected it; confirm on fresh "
                f"seeds: {rerun_command(selection, picked)}"
            )
            finding = replace(finding, verdict=SELECTED, note=note)
            record = record | {"verdict": SELECTED, "judged_verdict": record.get("verdict")}
        marked_f.append(finding)
        marked_r.append(record)
    return marked_f, marked_r


def selection_section(jobs: list[Job], selection: Selection) -> tuple[str, dict[str, Any]]:
    """The report's selection section (markdown) and its JSON record."""
    status = statuses(jobs, selection)
    won = winners(jobs, selection.reference)
    fresh, reused = fresh_seeds(jobs, selection)
    rows = [
        [variant, attack, f"{cell['mean_difference']:+.3f}",
         ", ".join(f"{d:+.3f} (seed {s})" for s, d in cell["by_seed"].items()),
         status.get(variant, "")]
        for variant, cells in won.items() for attack, cell in cells.items()
    ]  # fmt: skip
    if selection.stage == "select":
        lead = (
            f"This sweep selects: every setting whose mean robust accuracy beats "
            f"{selection.reference} on these seeds is **{SELECTED}**, and its verdicts "
            "against the reference below are replaced by that mark (the judged verdict is in "
            "the note): the seeds that chose a setting cannot also confirm it."
        )
        if won:
            lead += f" Confirm on fresh seeds: `{rerun_command(selection, sorted(won))}`."
        else:
            lead += f" No setting beat {selection.reference}: nothing to confirm."
    elif fresh:
        lead = (
            f"This sweep confirms on fresh seeds (none of the selection's "
            f"{', '.join(selection.selection_seeds) or 'seeds'}): its verdicts below stand."
        )
    else:
        lead = (
            f"This sweep was meant to confirm, but it reused the selection's seeds "
            f"{', '.join(reused)}: its settings stay **{SELECTED}**; rerun on seeds disjoint "
            f"from {', '.join(selection.selection_seeds)}."
        )
    table = (
        markdown_table(
            [
                "variant",
                "attack",
                f"mean difference vs {selection.reference}",
                "per seed",
                "status",
            ],
            rows,
        )  # fmt: skip
        if rows
        else ""
    )
    text = "\n".join(["## Selection and confirmation", "", lead, "", table]).rstrip() + "\n"
    record = {
        "stage": selection.stage,
        "reference": selection.reference,
        "selection_seeds": list(selection.selection_seeds),
        "fresh_seeds": fresh,
        "status": status,
        "winners": won,
    }
    return text, record
