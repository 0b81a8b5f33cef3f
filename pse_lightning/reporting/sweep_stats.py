"""Paired comparisons of a sweep's variants, judged like the per-run Findings.

Every variant of a sweep is evaluated on the same test images, so two variants are compared
image by image: the exact McNemar test on the images only one of them gets right, and
Newcombe's paired interval for the difference of accuracies (docs/METHODS.md §7.6). The
p-values of every comparison shown form one Holm family, and the verdicts come from the same
rule as the run's Findings (:func:`~pse_lightning.reporting.findings.judge`).

A sweep over seeds (``seed=0,1,2``) has replicates: each variant is paired with its baseline
within each seed, and that McNemar test compares two trained models (its images are
resampled, the training is not). Across seeds the report gives the mean difference and its
seed-to-seed spread only; a claim about the training procedures is left untestable.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, replace
from itertools import combinations

from torch import Tensor

from pse_lightning.core.findings import Finding, judge, not_measured, rule_text, untestable
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
    "of the discordant pairs). With seed replicates, each seed's test compares two trained "
    "models; the row across seeds gives the mean difference and its seed-to-seed SD, and is "
    "untestable until a test resamples the seeds. Method: docs/METHODS.md §7.6."
)
ACROSS_SEEDS = (
    "none across seeds: the per-seed tests resample images, not training; mean and "
    "seed-to-seed SD of the per-seed differences"
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
    seed: str = ""

    @property
    def key(self) -> str:
        where = f"/{self.attack}" if self.attack else ""
        replicate = f"/seed={self.seed}" if self.seed else ""
        return f"{self.measure}/{self.variant}_vs_{self.baseline}{where}{replicate}"

    @property
    def claim(self) -> str:
        if self.measure == "clean":
            claim = f"{self.variant} and {self.baseline} differ in clean accuracy"
        elif self.directional:
            claim = f"{self.variant} is more robust than {self.baseline} under {self.attack}"
        else:
            claim = (
                f"{self.variant} and {self.baseline} differ in robust accuracy under {self.attack}"
            )
        return f"{claim} (the models trained with seed {self.seed})" if self.seed else claim


def variant_pairs(variants: list[str]) -> list[tuple[str, str, bool]]:
    """(variant, baseline, directional) to compare. Training variants have a known
    question: each against standard training and pse_at against pgd_at, one-directional
    claims (the variant is more robust); without standard, every variant against pgd_at
    (the PSE-AT ablation: each setting against its reference); other variants (models of a
    zoo) are compared in every pair, two-sided."""
    if "standard" in variants:
        pairs = [(v, "standard", True) for v in variants if v != "standard"]
        if "pse_at" in variants and "pgd_at" in variants:
            pairs.append(("pse_at", "pgd_at", True))
        return pairs
    if "pgd_at" in variants:
        return [(v, "pgd_at", True) for v in variants if v != "pgd_at"]
    return [(a, b, False) for a, b in combinations(variants, 2)]


def comparison_plan(
    variants: list[str], attacks: list[str], seeds: list[str] | None = None
) -> list[Comparison]:
    """Every comparison of the report: per pair, clean accuracy, then robust per attack;
    each once per seed when ``seeds`` holds two or more replicates, else once (any seed)."""
    replicates = seeds if seeds is not None and len(seeds) > 1 else [""]
    plan = []
    for variant, baseline, directional in variant_pairs(variants):
        measures = [("clean", "", False), *(("robust", a, directional) for a in attacks)]
        for measure, attack, direction in measures:
            plan += [Comparison(variant, baseline, measure, attack, direction, s)
                     for s in replicates]  # fmt: skip
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


def _outcomes(
    jobs: list[Job], variant: str, attack: str, seed: str = ""
) -> dict[str, Tensor] | None:
    """A variant's per-image outcomes under ``attack`` (any attack for clean accuracy: the
    clean outcomes do not depend on it) with ``seed`` (any seed when "")."""
    for job in jobs:
        mine = job.variant == variant and attack in ("", job.attack) and seed in ("", job.seed)
        if mine and job.outcomes is not None:
            return job.outcomes
    return None


def _finding(c: Comparison, jobs: list[Job]) -> tuple[Finding, dict]:
    a, b = (
        _outcomes(jobs, v, "" if c.measure == "clean" else c.attack, c.seed)
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
    test = f"{TEST}: a comparison of two trained models (seed {c.seed})" if c.seed else TEST
    finding = Finding(
        c.key, c.claim, text, test,
        estimate=stats["difference"], low=stats["ci_low"], high=stats["ci_high"], p=stats["p"],
        direction="greater" if c.directional else "two-sided", size=MIN_GAIN,
    )  # fmt: skip
    return finding, record | stats


def _across_seeds(c: Comparison, per_seed: list[tuple[Finding, dict]]) -> tuple[Finding, dict]:
    """The seed replicates of one comparison summarised: the per-seed differences, their mean
    and seed-to-seed SD, untestable (no test resamples the training)."""
    pooled = replace(c, seed="")
    measured = [(r["seed"], f.estimate) for f, r in per_seed if not f.status]
    diffs = [d for _, d in measured]
    record = asdict(pooled) | {"key": pooled.key, "claim": pooled.claim, "seeds": measured}
    if len(diffs) < 2:
        why = f"{len(diffs)} seed(s) with per-image outcomes: no spread across seeds"
        return not_measured(pooled.key, pooled.claim, why), record
    mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    each = ", ".join(f"{d:+.3f} (seed {s})" for s, d in measured)
    effect = f"mean {mean:+.3f}, seed-to-seed SD {sd:.3f} over {len(diffs)} seeds: {each}"
    why = (
        "a claim about the training procedures needs a test that resamples seeds; the "
        "per-seed rows each compare two trained models"
    )
    finding = replace(
        untestable(pooled.key, pooled.claim, effect, ACROSS_SEEDS, why),
        estimate=mean,
        direction="greater" if c.directional else "two-sided",
        size=MIN_GAIN,
    )
    return finding, record | {"mean_difference": mean, "sd_difference": sd}


def comparison_findings(
    jobs: list[Job], plan: list[Comparison]
) -> tuple[list[Finding], list[dict]]:
    """The judged Findings of ``plan`` (one Holm family over the per-seed tests) and the same
    as JSON records; with seed replicates, each comparison's row across seeds comes first."""
    built: list[tuple[Finding, dict]] = []
    groups: dict[Comparison, list[tuple[Finding, dict]]] = {}
    for c in plan:
        groups.setdefault(replace(c, seed=""), []).append(_finding(c, jobs))
    for pooled, per_seed in groups.items():
        if any(r["seed"] for _, r in per_seed):
            built.append(_across_seeds(pooled, per_seed))
        built += per_seed
    judged = judge([f for f, _ in built])
    records = [
        r | {"p_holm": f.p_holm, "verdict": f.verdict}
        for f, (_, r) in zip(judged, built, strict=True)
    ]
    return judged, records
