"""A claim tested on a run, and the one rule that turns its test into a verdict.

Analyses declare the claims they test (``Analysis.findings``) as :class:`Finding` objects;
the report and the sweep comparison only judge and print them. The rule (docs/METHODS.md
§7.13) asks one thing of every finding: its p-value and its interval come from the same
resampling scheme, named in ``test``, so the two cannot disagree about what was resampled.

- *supported*: the Holm-corrected p < ALPHA **and** the interval excludes ``null`` in the
  claimed direction;
- *not supported*: the interval excludes every effect of the claimed size (beyond ``null``
  by at least ``size``, in the claimed direction; for a two-sided claim, the interval lies
  inside (null − size, null + size)), or the corrected test rejects the other way;
- *inconclusive*: anything else at this sample size;
- *not measured* / *untestable*: set by the analysis (``status``) with the reason in
  ``note``; such findings stay out of the Holm family.

It sits in ``core`` because analyses declare findings and ``reporting`` judges them, and
neither may import the other.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

from pse_lightning.core.proportions import holm_adjust

ALPHA = 0.05
Direction = Literal["greater", "less", "two-sided"]
NOT_MEASURED = "not measured"
UNTESTABLE = "untestable"
SUPPORTED = "supported"
NOT_SUPPORTED = "not supported"
INCONCLUSIVE = "inconclusive"


@dataclass(frozen=True)
class Finding:
    """One claim, its measured effect, its test and (after :func:`judge`) its verdict.

    Attributes:
        key: a stable identifier (``metrics.json`` ``findings``, W&B ``findings/<key>``).
        claim: the paper's claim in words.
        effect: the measured effect and its 95 % interval, as printed.
        test: the test *and* the resampling scheme its p and interval share.
        estimate, low, high: the effect and its 95 % interval, on the scale of ``null``.
        p: the test's p-value (one-sided when ``direction`` is one-sided).
        direction: the claimed direction of the effect relative to ``null``.
        null: the value of "no effect" (0 for a difference, 0.05 for a share that "occurs").
        size: the smallest effect beyond ``null`` that counts as the claim (>= 0); an
            interval that excludes every such effect makes the claim *not supported*.
        status: "" when testable, else ``not measured`` or ``untestable``.
        note: why it is untestable or not measured, or a caveat the reader needs.
        p_holm: p after Holm over the family it was judged in (set by :func:`judge`).
        verdict: set by :func:`judge`.
    """

    key: str
    claim: str
    effect: str
    test: str
    estimate: float = math.nan
    low: float = math.nan
    high: float = math.nan
    p: float = math.nan
    direction: Direction = "greater"
    null: float = 0.0
    size: float = 0.0
    status: str = ""
    note: str = ""
    p_holm: float = math.nan
    verdict: str = ""

    @property
    def tested(self) -> bool:
        """Whether the finding enters the Holm family: testable, with a finite p."""
        return not self.status and not math.isnan(self.p)


def not_measured(key: str, claim: str, why: str) -> Finding:
    """A claim this run could not measure (its analysis did not run, or saw no data)."""
    return Finding(key, claim, why, "—", status=NOT_MEASURED, note=why)


def untestable(key: str, claim: str, effect: str, test: str, why: str) -> Finding:
    """A claim measured but not testable here (``why`` says what is missing)."""
    return Finding(key, claim, effect, test, status=UNTESTABLE, note=why)


def judge(
    found: Sequence[Finding],
    simultaneous: Sequence[tuple[float, float] | None] | None = None,
) -> list[Finding]:
    """Holm over the tested findings of ``found`` (one family) and every finding's verdict;
    ``simultaneous``, one entry per finding, the family-wise interval its "not supported"
    is judged from (:func:`verdict`; None: its 95 % interval)."""
    adjusted = holm_adjust([f.p if f.tested else math.nan for f in found])
    wide = list(simultaneous) if simultaneous is not None else [None] * len(found)
    return [
        replace(f, verdict=f.status)
        if f.status
        else replace(f, p_holm=p_holm, verdict=verdict(f, p_holm, interval))
        for f, p_holm, interval in zip(found, adjusted, wide, strict=True)
    ]


def verdict(f: Finding, p_holm: float, simultaneous: tuple[float, float] | None = None) -> str:
    """The rule of the module docstring for one testable finding.

    *Supported* reads the 95 % interval (``low``, ``high``); *not supported* reads
    ``simultaneous`` when given: an interval wide enough to hold for the whole family at
    once (the sweep passes Bonferroni intervals at level 1 − ALPHA/m, docs/METHODS.md
    §7.6), so "not supported" is family-wise as Holm makes "supported"; without it, the
    95 % interval (the per-run rule). A "less" claim is a "greater" claim on the negated
    scale. With ``size`` >= 0, an interval below ``null`` (the test rejecting the other
    way) is below ``null + size`` too, so one comparison covers both ways of "not
    supported".
    """
    if any(math.isnan(v) for v in (f.low, f.high)) or math.isnan(p_holm):
        return INCONCLUSIVE
    wide_low, wide_high = (f.low, f.high) if simultaneous is None else simultaneous
    if math.isnan(wide_low) or math.isnan(wide_high):
        wide_low, wide_high = f.low, f.high
    rejects = p_holm < ALPHA
    if f.direction == "two-sided":
        if rejects and (f.low > f.null or f.high < f.null):
            return SUPPORTED
        if f.size > 0 and f.null - f.size < wide_low and wide_high < f.null + f.size:
            return NOT_SUPPORTED
        return INCONCLUSIVE
    sign = 1.0 if f.direction == "greater" else -1.0
    low = min(sign * f.low, sign * f.high)
    high = max(sign * wide_low, sign * wide_high)
    if rejects and low > sign * f.null:
        return SUPPORTED
    if high < sign * f.null + f.size:
        return NOT_SUPPORTED
    return INCONCLUSIVE


def rule_text(what: str = "table", simultaneous: bool = False) -> str:
    """The sentence under a Findings table that says how its verdicts were made;
    ``simultaneous``: "not supported" read from the simultaneous intervals (the sweep's)."""
    interval = (
        f"simultaneous interval (level 1 − {ALPHA}/m, m the tested claims of this {what}; "
        "the 95 % interval when m = 1)"
        if simultaneous
        else "interval"
    )
    return (
        f"Holm's correction runs over every tested p-value in this {what}. Each claim's "
        "p-value and interval come from the one resampling scheme its test column names. "
        f"Supported: the corrected test rejects at {ALPHA} and the 95 % interval excludes "
        f"no effect, in the claimed direction. Not supported: the {interval} excludes every "
        "effect of the claimed size, or the test rejects the other way. Otherwise "
        "inconclusive at this sample size. Untestable: measured, but this run cannot test "
        "it (the row says why). Method: docs/METHODS.md §7.13."
    )
