"""The Findings at the top of every report: each claim of the paper, tested on this run.

The claims (docs/METHODS.md §7.13) are read off the run's logged metrics, so the section
is the same whether the report is written now or rebuilt from ``metrics.json`` later. Every
p-value shown here enters one Holm correction over the claims of the run; a verdict is
"supported" when the corrected test rejects at 0.05 in the claimed direction, "not
supported" when the interval excludes an effect of the claimed size (or points the other
way), and "inconclusive" otherwise. A claim whose analysis did not run is "not measured".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from scipy.stats import binomtest

from pse_lightning.core.proportions import holm_adjust, wilson_interval

ALPHA = 0.05
# The smallest share for a PSE type to count as "occurring" (one perturbation in twenty).
MIN_TYPE_SHARE = 0.05
# A "tight connection" between sensitivity and interpretability: |rho| of at least this.
MIN_TIGHT_RHO = 0.3
PSE_TYPES = ("suppression", "balanced", "promotion")


@dataclass(frozen=True)
class Finding:
    """One claim, its measured effect and the verdict at this sample size."""

    key: str
    claim: str
    effect: str
    test: str
    p: float = math.nan
    p_holm: float = math.nan
    verdict: str = "not measured"


def _get(scalars: dict[str, float], key: str) -> float:
    value = scalars.get(key, math.nan)
    return float(value) if value is not None else math.nan


def pse_types_finding(scalars: dict[str, float]) -> Finding:
    """Claim 1: suppression-dominated, promotion-dominated and balanced perturbations all
    occur; tested as every type's share > MIN_TYPE_SHARE (intersection-union: the largest
    of the three one-sided exact binomial p-values)."""
    claim = "Perturbations are of three PSE types: suppression-, promotion-dominated, balanced"
    n = _get(scalars, "test/pse/n_images")
    shares = [_get(scalars, f"test/pse/frac_{t}") for t in PSE_TYPES]
    if not n > 0 or any(math.isnan(s) for s in shares):
        return Finding("pse_types", claim, "PSE analysis not run", "—")
    n = int(n)
    counts = [round(s * n) for s in shares]
    intervals = [wilson_interval(c, n) for c in counts]
    p = max(binomtest(c, n, MIN_TYPE_SHARE, alternative="greater").pvalue for c in counts)
    eta2 = _get(scalars, "test/pse/pair_eta2")
    effect = ", ".join(
        f"{t} {s:.2f} [{lo:.2f}, {hi:.2f}]"
        for t, s, (lo, hi) in zip(PSE_TYPES, shares, intervals, strict=True)
    )
    if not math.isnan(eta2):
        effect += f"; (true, target) class pair explains η² = {eta2:.2f} of r's variance"
    against = any(hi < MIN_TYPE_SHARE for _, hi in intervals)
    test = f"exact binomial, each share > {MIN_TYPE_SHARE} (largest p), n = {n}"
    return Finding("pse_types", claim, effect, test, p, verdict="against" if against else "")


def cam_finding(scalars: dict[str, float]) -> Finding:
    """Claim 2: perturbations concentrate in the true class's discriminative region, beyond
    another class's region of the same area on the same image."""
    claim = "Perturbations concentrate in the class-discriminative (CAM) region of the true class"
    base = "test/cam/specific_true_top20"
    effect, low, high = (_get(scalars, base + s) for s in ("", "_low", "_high"))
    if math.isnan(effect):
        return Finding("cam_region", claim, "CAM analysis not run", "—")
    text = (
        f"IS² in the top-20% true-class CAM minus IS² in another class's: {effect:.3f} "
        f"[{low:.3f}, {high:.3f}] (Hodges–Lehmann)"
    )
    test = "Wilcoxon signed-rank over images"
    return Finding("cam_region", claim, text, test, _get(scalars, base + "_p"),
                   verdict="against" if high <= 0 else "")  # fmt: skip


def dissection_findings(scalars: dict[str, float]) -> list[Finding]:
    """Claim 3, per dissected layer: units' attack sensitivity is tied to their
    interpretability (Spearman rho over units, two-way bootstrap CI, permutation p)."""
    claim = "Units' sensitivity to attacks is tied to their interpretability"
    prefix, suffix = "test/dissection/", "/spearman_rho"
    layers = sorted(
        k[len(prefix) : -len(suffix)]
        for k in scalars
        if k.startswith(prefix) and k.endswith(suffix) and "/random/" not in k
    )
    if not layers:
        return [Finding("sensitivity_interpretability", claim, "dissection not run", "—")]
    found = []
    for layer in layers:
        get = lambda name, layer=layer: _get(scalars, f"{prefix}{layer}/{name}")  # noqa: E731
        rho, low, high = get("spearman_rho"), get("spearman_ci_low"), get("spearman_ci_high")
        text = f"Spearman ρ(s, max IoU) = {rho:.2f} [{low:.2f}, {high:.2f}]"
        random_rho = get("random/spearman_rho")
        if not math.isnan(random_rho):
            text += f"; random-weights baseline ρ = {random_rho:.2f}"
        small = low > -MIN_TIGHT_RHO and high < MIN_TIGHT_RHO
        found.append(Finding(f"sensitivity_interpretability/{layer}", f"{claim} ({layer})",
                             text, "permutation test over units", get("spearman_p"),
                             verdict="against" if small else ""))  # fmt: skip
    return found


def training_finding() -> Finding:
    return Finding(
        "pse_training",
        "PSE-informed adversarial training improves robustness",
        "measured across runs: experiment=robust_vs_standard (see its sweep report)",
        "paired comparison of pse_at and pgd_at",
    )


def run_findings(scalars: dict[str, float]) -> list[Finding]:
    """Every claim this run can speak to, with Holm-corrected p-values and verdicts."""
    found = [pse_types_finding(scalars), cam_finding(scalars), *dissection_findings(scalars)]
    return [*judge(found), training_finding()]


def judge(found: list[Finding]) -> list[Finding]:
    """Holm over the family ``found`` and each tested claim's verdict; a finding built with
    ``verdict="against"`` (its interval excludes the claimed effect) is "not supported"."""
    adjusted = holm_adjust([f.p for f in found])  # untested claims (NaN) stay out
    return [
        f if math.isnan(p_holm) else replace(f, p_holm=p_holm, verdict=_verdict(f, p_holm))
        for f, p_holm in zip(found, adjusted, strict=True)
    ]


def _verdict(finding: Finding, p_holm: float) -> str:
    if finding.verdict == "against":
        return "not supported"
    return "supported" if p_holm < ALPHA else "inconclusive"


RUN_RULE = (
    f"Holm's correction runs over every p-value in this table. Supported: the corrected "
    f"test rejects at {ALPHA} in the claimed direction. Not supported: the interval "
    f"excludes an effect of the claimed size (a type share ≥ {MIN_TYPE_SHARE}, |ρ| ≥ "
    f"{MIN_TIGHT_RHO}) or points the other way. Otherwise inconclusive at this sample "
    "size. Method: docs/METHODS.md §7.13."
)


def findings_markdown(findings: list[Finding], rule: str = RUN_RULE) -> str:
    """The Findings table and ``rule``, the sentence that says how its verdicts were made."""
    rows = [
        f"| {f.claim} | {f.effect} | {f.test} | {_p(f.p)} | {_p(f.p_holm)} | **{f.verdict}** |"
        for f in findings
    ]
    return "\n".join([
        "| claim | measured effect (95% CI) | test | p | p (Holm) | verdict |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        rule,
    ])  # fmt: skip


def _p(value: float) -> str:
    if math.isnan(value):
        return "—"
    return f"{value:.2g}" if value >= 1e-4 else "<1e-4"
