"""Paired comparisons of a sweep's variants, judged like the per-run Findings.

Every variant of a sweep is evaluated on the same test images, so two trained models are
compared image by image: the exact McNemar test on the images only one of them gets right,
and Newcombe's paired interval for the difference of accuracies (docs/METHODS.md §7.6).

Training variants are procedures. With seed replicates (``seed=0,1,2``) each comparison of
two procedures is judged over seeds: seed s of a variant is paired with seed s of its
baseline, and a t-test on the S per-seed differences (S − 1 degrees of freedom) gives the
mean difference, its interval and p, beside the seed-to-seed SD and the per-seed accuracies
(:mod:`pse_lightning.core.replicates`). With one seed that claim is untestable. The per-seed
McNemar rows stay, each a comparison of two trained models.

Holm families: the procedure claims on robust accuracy (the question the study exists for);
clean-accuracy comparisons; the per-seed comparisons of trained models. A sweep of fixed
models (a model zoo) has no procedures: its robust and its clean comparisons are the two
families. Verdicts come from the rule of the run's Findings
(:func:`~pse_lightning.core.findings.judge`), Holm within each family, with one change that
makes "not supported" family-wise too: it is judged from simultaneous (Bonferroni)
intervals at level 1 − 0.05/m, m the family's tested claims, beside the 95 % interval that
"supported" reads (docs/METHODS.md §7.6). A directional claim ("more robust") stores the
one-sided p (one-sided t over seeds, one-sided exact McNemar), a "differ" claim the
two-sided p.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from itertools import combinations

import torch
from torch import Tensor

from pse_lightning.core.findings import ALPHA, Finding, judge, not_measured, untestable
from pse_lightning.core.proportions import (
    discordant_pairs,
    mcnemar_exact,
    paired_difference_interval,
)
from pse_lightning.core.replicates import procedure_difference, seed_t_test
from pse_lightning.reporting.outcomes import aligned
from pse_lightning.reporting.sweep_jobs import Job

# The smallest accuracy difference worth claiming between two trained models (one point):
# an interval inside (−MIN_GAIN, MIN_GAIN) says two models do not differ, one below
# +MIN_GAIN says a model is not more robust.
MIN_GAIN = 0.01
# The smallest difference worth claiming between two training procedures (two points, the
# size docs/METHODS.md §7.6 sizes the number of seeds for).
PROCEDURE_GAIN = 0.02
# The ablation's matched-strength control of a setting (docs/METHODS.md §6.5), compared with
# it directly: "pse_at beats pgd_at, drift_control does not" (or both, or neither) is a
# difference of verdicts, not a test of whether the PSE information adds anything beyond a
# penalty of the same strength; only pse_at against drift_control on the same seeds is.
MATCHED_CONTROLS = {"pse_at": "drift_control"}
TEST = "exact McNemar, paired on the same images"
MODELS_TEST = f"{TEST}: a comparison of two trained models"
PROCEDURE_TEST = (
    "t-test over training seeds on the per-seed paired differences (df = seeds − 1; p and "
    "t interval resample the seeds, each seed's difference averages its test images)"
)

# The Holm families, in the order the report shows them.
PROCEDURES = "training procedures"
ROBUST = "robust accuracy"
CLEAN = "clean accuracy"
MODELS = "trained models"
FAMILIES = (PROCEDURES, ROBUST, CLEAN, MODELS)

RULE = (
    f"Claimed sizes: {PROCEDURE_GAIN} (two points of accuracy) between training procedures, "
    f'{MIN_GAIN} between two trained models; for "more robust" a gain, for "differ" a '
    "difference either way. Procedures (seeds as replicates): p and interval from one t "
    "distribution over the per-seed differences, seed s of a variant paired with seed s of "
    "its baseline. Trained models: p exact McNemar, interval Newcombe's hybrid score "
    "interval for paired proportions; both resample the test images, not the training. "
    'p is one-sided for "more robust", two-sided for "differ". '
    "Holm families: procedure claims on robust accuracy; clean accuracy; the per-seed "
    "comparisons of trained models. Family-wise in both directions: Holm's p and the 95 % "
    "interval make a claim supported; a claim is not supported only when its simultaneous "
    f"interval (level 1 − {ALPHA}/m, m the tested claims of its table, Bonferroni; shown "
    "after the 95 % interval when m > 1) excludes every effect of the claimed size, so "
    'that across a table of m claims the chance of any spurious "not supported" stays '
    "under 5 % (judged from 95 % intervals it grew with m, about m × 2.5 %). "
    "Method: docs/METHODS.md §7.6."
)


@dataclass(frozen=True)
class Comparison:
    """One comparison the report shows: ``variant`` against ``baseline`` on one measure
    (``clean`` accuracy, or ``robust`` accuracy under ``attack``).

    ``procedures``: the variants are training procedures (a training sweep, or any sweep
    with seed replicates); each such comparison is judged over seeds (``over_seeds``, the
    row of the procedures) and, per seed, as a comparison of two trained models (``seed``,
    "" when the jobs do not name it).
    """

    variant: str
    baseline: str
    measure: str
    attack: str = ""
    directional: bool = False
    seed: str = ""
    procedures: bool = False
    over_seeds: bool = False

    @property
    def key(self) -> str:
        where = f"/{self.attack}" if self.attack else ""
        replicate = f"/seed={self.seed}" if self.seed else ""
        if self.procedures and not self.over_seeds and not self.seed:
            replicate = "/model"
        return f"{self.measure}/{self.variant}_vs_{self.baseline}{where}{replicate}"

    @property
    def family(self) -> str:
        """The Holm family the comparison is judged in."""
        if self.procedures and not self.over_seeds:
            return MODELS
        return CLEAN if self.measure == "clean" else PROCEDURES if self.procedures else ROBUST

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
        if self.over_seeds or not (self.seed or self.procedures):
            return claim
        models = f"the models trained with seed {self.seed}" if self.seed else "one model each"
        return f"{claim} ({models})"


def variant_pairs(variants: list[str]) -> list[tuple[str, str, bool]]:
    """(variant, baseline, directional) to compare. Training variants have a known
    question: each against standard training, and each other robust procedure (pse_at,
    trades) against pgd_at, one-directional claims (the variant is more robust); without
    standard, every variant against pgd_at
    (the PSE-AT ablation: each setting against its reference) and pse_at against its
    matched-strength control (:data:`MATCHED_CONTROLS`); other variants (models of a zoo)
    are compared in every pair, two-sided."""
    if "standard" in variants:
        pairs = [(v, "standard", True) for v in variants if v != "standard"]
        if "pgd_at" in variants:
            pairs += [(v, "pgd_at", True) for v in variants if v not in ("standard", "pgd_at")]
        return pairs
    if "pgd_at" in variants:
        pairs = [(v, "pgd_at", True) for v in variants if v != "pgd_at"]
        pairs += [(v, control, True) for v, control in MATCHED_CONTROLS.items()
                  if v in variants and control in variants]  # fmt: skip
        return pairs
    return [(a, b, False) for a, b in combinations(variants, 2)]


def comparison_plan(
    variants: list[str], attacks: list[str], seeds: list[str] | None = None
) -> list[Comparison]:
    """Every comparison of trained models in the report: per pair, clean accuracy, then
    robust per attack, once per seed. Training variants (a directional pair) or two or more
    seeds make the variants procedures: every seed gets its row (the seed named even when
    there is only one), and :func:`comparison_findings` adds the row over seeds. A sweep of
    fixed models with one seed compares each pair once."""
    pairs = variant_pairs(variants)
    seeds = [s for s in seeds or [] if s]
    procedures = len(seeds) > 1 or any(directional for _, _, directional in pairs)
    replicates = seeds if procedures and seeds else [""]
    plan = []
    for variant, baseline, directional in pairs:
        measures = [("clean", "", False), *(("robust", a, directional) for a in attacks)]
        for measure, attack, direction in measures:
            plan += [Comparison(variant, baseline, measure, attack, direction, s, procedures)
                     for s in replicates]  # fmt: skip
    return plan


def paired_test(
    correct_a: Tensor, correct_b: Tensor, alternative: str = "two-sided"
) -> dict[str, float]:
    """Accuracies, their difference with its paired 95% interval, the discordant counts and
    the exact McNemar p (against ``alternative``) of two variants on the same images."""
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
        "p": mcnemar_exact(correct_a, correct_b, alternative),
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


def _pair(c: Comparison, jobs: list[Job]) -> tuple[Tensor, Tensor] | None:
    """The two variants' per-image outcomes of comparison ``c``, aligned by image."""
    a, b = (
        _outcomes(jobs, v, "" if c.measure == "clean" else c.attack, c.seed)
        for v in (c.variant, c.baseline)
    )
    if a is None or b is None:
        return None
    return aligned(a, b, "clean_correct" if c.measure == "clean" else "adv_correct")


# The interval of a finding at any two-sided level (for the simultaneous intervals).
Widen = Callable[[float], tuple[float, float]]


def _finding(c: Comparison, jobs: list[Job]) -> tuple[Finding, dict, Widen | None]:
    """Two trained models compared image by image (McNemar, Newcombe)."""
    pair = _pair(c, jobs)
    record = asdict(c) | {"key": c.key, "claim": c.claim, "family": c.family}
    if pair is None:
        text = "per-image outcomes missing (a job written before outcomes.json): not paired"
        return not_measured(c.key, c.claim, text), record, None
    direction = "greater" if c.directional else "two-sided"
    stats = paired_test(*pair, direction)
    text = (
        f"{stats['acc_variant']:.3f} − {stats['acc_baseline']:.3f} = {stats['difference']:+.3f} "
        f"[{stats['ci_low']:+.3f}, {stats['ci_high']:+.3f}]; n = {stats['n']}, only one right: "
        f"{stats['only_variant']} / {stats['only_baseline']}"
    )
    test = TEST
    if c.procedures:
        test = f"{MODELS_TEST} (seed {c.seed})" if c.seed else MODELS_TEST
    finding = Finding(
        c.key, c.claim, text, test,
        estimate=stats["difference"], low=stats["ci_low"], high=stats["ci_high"], p=stats["p"],
        direction=direction, size=MIN_GAIN,
    )  # fmt: skip

    def widen(confidence: float) -> tuple[float, float]:
        return paired_difference_interval(*pair, confidence)[1:]

    return finding, record | stats, widen


def _over_seeds(
    c: Comparison, jobs: list[Job], planned: list[Comparison]
) -> tuple[Finding, dict, Widen | None]:
    """Two training procedures compared over the seeds of ``planned``: the t-test on the
    per-seed differences (:func:`~pse_lightning.core.replicates.procedure_difference`);
    untestable with one seed, not measured when fewer than two seeds have outcomes."""
    pooled = replace(c, seed="", over_seeds=True)
    record = asdict(pooled) | {"key": pooled.key, "claim": pooled.claim, "family": pooled.family}
    direction = "greater" if c.directional else "two-sided"
    pairs = [(p.seed, pair) for p in planned if (pair := _pair(p, jobs)) is not None]
    if len(planned) < 2:
        why = (
            "one training seed per variant: how far a procedure's accuracy moves from one "
            "training seed to the next is not measured, so two procedures cannot be told "
            "apart (the model row compares two trained models); sweep seed=0,1,2 or more "
            "(docs/METHODS.md §7.6)"
        )
        effect = "one seed: see the trained-model row"
        finding = untestable(pooled.key, pooled.claim, effect, PROCEDURE_TEST, why)
        return replace(finding, direction=direction, size=PROCEDURE_GAIN), record, None
    if len(pairs) < 2:
        why = f"{len(pairs)} seed(s) with per-image outcomes: no spread across seeds"
        return not_measured(pooled.key, pooled.claim, why), record, None
    stats = procedure_difference([pair for _, pair in pairs], direction)
    names = [seed for seed, _ in pairs]
    each = ", ".join(
        f"{a:.3f} − {b:.3f} (seed {s})"
        for s, a, b in zip(names, stats["acc_variant"], stats["acc_baseline"], strict=True)
    )
    effect = (
        f"{stats['difference']:+.3f} [{stats['ci_low']:+.3f}, {stats['ci_high']:+.3f}], "
        f"seed-to-seed SD {stats['sd_difference']:.3f} over {stats['seeds']} seeds: {each}"
    )
    missing = [p.seed for p in planned if p.seed not in names]
    notes = (
        [f"seed(s) {', '.join(missing)} without per-image outcomes left out"] if missing else []
    )
    if stats["degenerate"]:
        notes.append(
            "every seed gave the same difference: the seed-to-seed SD is 0, so the t-test "
            "has no spread to judge by (p 1; interval unbounded unless the difference is 0)"
        )
    note = "; ".join(notes)
    finding = Finding(
        pooled.key, pooled.claim, effect, PROCEDURE_TEST,
        estimate=stats["difference"], low=stats["ci_low"], high=stats["ci_high"], p=stats["p"],
        direction=direction, size=PROCEDURE_GAIN, note=note,
    )  # fmt: skip
    seeds = [[s, d] for s, d in zip(names, stats["differences"], strict=True)]
    extra = {"seeds": seeds, "n_seeds": stats["seeds"], "mean_difference": stats["difference"]}
    differences = torch.tensor(stats["differences"], dtype=torch.float64)

    def widen(confidence: float) -> tuple[float, float]:
        _, _, low, high, _ = seed_t_test(differences, confidence)
        return float(low), float(high)

    return finding, record | stats | extra, widen


def simultaneous(
    built: list[tuple[Finding, dict, Widen | None]],
) -> list[tuple[Finding, dict, tuple[float, float] | None]]:
    """One Holm family's findings with their simultaneous intervals: Bonferroni, each tested
    finding's interval at level 1 − ALPHA/m (m the family's tested findings), the interval
    its "not supported" is judged from. With m > 1 the effect text and the record say so;
    with m = 1 it is the 95 % interval."""
    m = sum(f.tested for f, _, _ in built)
    confidence = 1 - ALPHA / max(m, 1)
    out = []
    for finding, record, widen in built:
        if not finding.tested or widen is None:
            out.append((finding, record, None))
            continue
        low, high = widen(confidence)
        record = record | {
            "simultaneous_confidence": confidence,
            "simultaneous_low": low,
            "simultaneous_high": high,
            "family_size": m,
        }
        if m > 1:
            level = f"{100 * confidence:.3g}"
            text = f"{finding.effect}; simultaneous {level} % interval [{low:+.3f}, {high:+.3f}]"
            finding = replace(finding, effect=text)
        out.append((finding, record, (low, high)))
    return out


def comparison_findings(
    jobs: list[Job], plan: list[Comparison]
) -> tuple[list[Finding], list[dict]]:
    """The judged Findings of ``plan`` and the same as JSON records, family by family
    (:data:`FAMILIES`, Holm within each): for training procedures the rows over seeds
    first, then the per-seed comparisons of trained models."""
    groups: dict[Comparison, list[Comparison]] = {}
    for c in plan:
        groups.setdefault(replace(c, seed=""), []).append(c)
    built: list[tuple[Finding, dict, Widen | None]] = []
    for pooled, planned in groups.items():
        if pooled.procedures:
            built.append(_over_seeds(pooled, jobs, planned))
        built += [_finding(c, jobs) for c in planned]
    judged: list[Finding] = []
    records: list[dict] = []
    for family in FAMILIES:
        members = simultaneous([b for b in built if b[1]["family"] == family])
        if not members:
            continue
        judged += judge([f for f, _, _ in members], [wide for _, _, wide in members])
        records += [
            r | {"p_holm": f.p_holm, "verdict": f.verdict, "size": f.size, "note": f.note,
                 "effect": f.effect, "direction": f.direction}
            for f, (_, r, _) in zip(judged[-len(members) :], members, strict=True)
        ]  # fmt: skip
    return judged, records
