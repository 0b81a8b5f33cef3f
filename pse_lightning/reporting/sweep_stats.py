"""Paired comparisons of a sweep's variants, judged like the per-run Findings.

Every variant of a sweep is evaluated on the same test images, so two variants are compared
image by image: the exact McNemar test on the images only one of them gets right, and
Newcombe's paired interval for the difference of accuracies (docs/METHODS.md §7.6). The
p-values of every comparison shown form one Holm family, and the verdicts come from the same
rule as the run's Findings (:func:`~pse_lightning.reporting.findings.judge`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from itertools import combinations

from torch import Tensor

from pse_lightning.core.findings import Finding, judge, not_measured, rule_text
from pse_lightning.core.proportions import (
    discordant_pairs,
    mcnemar_exact,
    paired_difference_interval,
)
from pse_lightning.reporting.outcomes import aligned
from pse_lightning.reporting.sweep_jobs import Job

# The smallest accuracy difference worth claiming (one point): an interval inside
# (−MIN_GAIN, MIN_GAIN) says two variants do not differ, one below +MIN_GAIN says a variant
# is not more robust.
MIN_GAIN = 0.01
TEST = "exact McNemar, paired on the same images"
RULE = rule_text("comparison") + (
    f' The claimed size is {MIN_GAIN} (one point of accuracy): for "more robust" a gain, for '
    f'"differ" a difference either way. p: exact McNemar; interval: Newcombe\'s hybrid '
    "score interval for paired proportions; both resample the test images (binomial model "
    "of the discordant pairs). Method: docs/METHODS.md §7.6."
)


@dataclass(frozen=True)
class Comparison:
    """One comparison the report shows: ``variant`` against ``baseline`` on one measure
    (``clean`` accuracy, or ``robust`` accuracy under ``attack``)."""

    variant: str
    baseline: str
    measure: str
    attack: str = ""
    directional: bool = False

    @property
    def key(self) -> str:
        where = f"/{self.attack}" if self.attack else ""
        return f"{self.measure}/{self.variant}_vs_{self.baseline}{where}"

    @property
    def claim(self) -> str:
        if self.measure == "clean":
            return f"{self.variant} and {self.baseline} differ in clean accuracy"
        if self.directional:
            return f"{self.variant} is more robust than {self.baseline} under {self.attack}"
        return f"{self.variant} and {self.baseline} differ in robust accuracy under {self.attack}"


def variant_pairs(variants: list[str]) -> list[tuple[str, str, bool]]:
    """(variant, baseline, directional) to compare. Training variants have a known
    question: each against standard training and pse_at against pgd_at, one-directional
    claims (the variant is more robust); other variants (models of a zoo) are compared in
    every pair, two-sided."""
    if "standard" in variants:
        pairs = [(v, "standard", True) for v in variants if v != "standard"]
        if "pse_at" in variants and "pgd_at" in variants:
            pairs.append(("pse_at", "pgd_at", True))
        return pairs
    return [(a, b, False) for a, b in combinations(variants, 2)]


def comparison_plan(variants: list[str], attacks: list[str]) -> list[Comparison]:
    """Every comparison of the report: per pair, clean accuracy, then robust per attack."""
    plan = []
    for variant, baseline, directional in variant_pairs(variants):
        plan.append(Comparison(variant, baseline, "clean"))
        plan += [Comparison(variant, baseline, "robust", a, directional) for a in attacks]
    return plan


def paired_test(correct_a: Tensor, correct_b: Tensor) -> dict[str, float]:
    """Accuracies, their difference with its paired 95% interval, the discordant counts and
    the exact McNemar p of two variants on the same images."""
    theta, low, high = paired_difference_interval(correct_a, correct_b)
    only_a, only_b = discordant_pairs(correct_a, correct_b)
    return {
        "acc_variant": float(correct_a.float().mean()),
        "acc_baseline": float(correct_b.float().mean()),
        "difference": theta,
        "ci_low": low,
        "ci_high": high,
        "n": int(correct_a.numel()),
        "only_variant": only_a,
        "only_baseline": only_b,
        "p": mcnemar_exact(correct_a, correct_b),
    }


def _outcomes(jobs: list[Job], variant: str, attack: str) -> dict[str, Tensor] | None:
    """A variant's per-image outcomes under ``attack`` (any attack for clean accuracy: the
    clean outcomes do not depend on it)."""
    for job in jobs:
        if job.variant == variant and attack in ("", job.attack) and job.outcomes is not None:
            return job.outcomes
    return None


def _finding(c: Comparison, jobs: list[Job]) -> tuple[Finding, dict]:
    a, b = (
        _outcomes(jobs, v, "" if c.measure == "clean" else c.attack)
        for v in (c.variant, c.baseline)
    )
    record = asdict(c) | {"key": c.key, "claim": c.claim}
    if a is None or b is None:
        text = "per-image outcomes missing (a job written before outcomes.json): not paired"
        return not_measured(c.key, c.claim, text), record
    column = "clean_correct" if c.measure == "clean" else "adv_correct"
    stats = paired_test(*aligned(a, b, column))
    text = (
        f"{stats['acc_variant']:.3f} − {stats['acc_baseline']:.3f} = {stats['difference']:+.3f} "
        f"[{stats['ci_low']:+.3f}, {stats['ci_high']:+.3f}]; n = {stats['n']}, only one right: "
        f"{stats['only_variant']} / {stats['only_baseline']}"
    )
    finding = Finding(
        c.key, c.claim, text, TEST,
        estimate=stats["difference"], low=stats["ci_low"], high=stats["ci_high"], p=stats["p"],
        direction="greater" if c.directional else "two-sided", size=MIN_GAIN,
    )  # fmt: skip
    return finding, record | stats


def comparison_findings(
    jobs: list[Job], plan: list[Comparison]
) -> tuple[list[Finding], list[dict]]:
    """The judged Findings of ``plan`` (one Holm family) and the same as JSON records."""
    built = [_finding(c, jobs) for c in plan]
    judged = judge([f for f, _ in built])
    records = [
        r | {"p_holm": f.p_holm, "verdict": f.verdict}
        for f, (_, r) in zip(judged, built, strict=True)
    ]
    return judged, records
