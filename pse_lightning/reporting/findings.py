"""The Findings at the top of every report: the paper's claims, as the analyses test them.

Each analysis declares the claims it tests (``Analysis.findings``,
:class:`~pse_lightning.core.findings.Finding`); this module judges them as one Holm family
with the rule of :mod:`pse_lightning.core.findings` (docs/METHODS.md §7.13), adds the one
claim no single run can test (PSE-informed training, judged by a sweep) and prints the
table. It names no metric of any analysis.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from pse_lightning.core.findings import Finding, judge, not_measured, rule_text

TRAINING_KEY = "pse_training"
TRAINING_CLAIM = "PSE-informed adversarial training improves robustness"


def training_finding() -> Finding:
    """Claim 4: a claim about a training procedure, measured across runs only."""
    return not_measured(
        TRAINING_KEY,
        TRAINING_CLAIM,
        "measured across runs: experiment=robust_vs_standard (see its sweep report)",
    )


def run_findings(declared: Sequence[Finding]) -> list[Finding]:
    """The analyses' declared findings judged as one Holm family, then the training claim."""
    return judge([*declared, training_finding()])


RUN_RULE = rule_text("table")


def findings_markdown(findings: Sequence[Finding], rule: str = RUN_RULE) -> str:
    """The Findings table and ``rule``, the sentence that says how its verdicts were made."""
    rows = [
        f"| {f.claim} | {f.effect} | {f.test} | {_p(f.p)} | {_p(f.p_holm)} | "
        f"**{f.verdict}**{_note(f)} |"
        for f in findings
    ]
    return "\n".join([
        "| claim | measured effect (95% CI) | test and resampling scheme | p | p (Holm) "
        "| verdict |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        rule,
    ])  # fmt: skip


def _note(f: Finding) -> str:
    return f" ({f.note})" if f.note and f.note != f.effect else ""


def _p(value: float) -> str:
    if math.isnan(value):
        return "—"
    if value >= 1e-4:
        return f"{value:.2g}"
    return f"{value:.1e}" if value > 0 else "0"
