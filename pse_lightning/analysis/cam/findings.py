"""Claim 2 of the paper, as the CAM analysis tests it (docs/METHODS.md §7.13).

Two findings, each a Wilcoxon signed-rank test over images with its Hodges–Lehmann interval
(one scheme for p and interval, §7.9):

- ``cam_region`` (the verdict on Claim 2): the same-class null of §3.8, d = IS² in the top
  20 % of the true class's map minus IS² in the top 20 % of the same class's map on another
  image of that class. It is the null the calibration (§7.12) shows holding its level when a
  class's maps sit differently from other classes'; the other-class null and the lift over
  a random mask do not, so they appear only as context in the note.
- ``cam_vs_object`` (where the dataset has ground-truth object masks): the true class's CAM
  region against the object mask of the same area, directional ("greater": specific to the
  CAM beyond the object), so that a perturbation that is merely on the object makes the
  claim *not supported*; the note says which side the interval is on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from pse_lightning.analysis.cam.result import FINDING_AREA, FINDING_TAG
from pse_lightning.core.findings import Finding, not_measured

KEY = "cam_region"
CLAIM = "Perturbations concentrate in the class-discriminative (CAM) region of the true class"
OBJECT_KEY = "cam_vs_object"
OBJECT_CLAIM = (
    "The perturbation is specific to the true class's CAM region beyond the object: the CAM "
    "region catches more of it than the ground-truth object mask of the same area"
)
TEST = "Wilcoxon signed-rank over images; Hodges–Lehmann interval"
UNCALIBRATED = "not calibrated for a verdict"


def cam_findings(scalars: Mapping[str, float]) -> list[Finding]:
    """Claim 2 from the same-class null and the CAM-vs-object comparison."""
    return [_region_finding(scalars), _object_finding(scalars)]


def _test(scalars: Mapping[str, float], base: str) -> tuple[float, float, float, float]:
    return tuple(scalars.get(base + s, math.nan) for s in ("", "_low", "_high", "_p"))


def one_sided_p(p_two_sided: float, estimate: float) -> float:
    """P of the signed-rank test for "greater" from its two-sided p.

    The signed-rank statistic's null distribution is symmetric, so the one-sided p is half
    the two-sided one when the statistic lies above its null mean. The statistic T⁺ counts
    the positive Walsh averages, so it lies above its mean when their median, the
    Hodges–Lehmann estimate, is positive. Otherwise the effect points away from the claim
    and 1 − p/2 (at least 1/2: never a rejection) stands in for P(T⁺ ≥ t), which exceeds it
    by the point mass P(T⁺ = t) of the exact distribution.
    """
    if math.isnan(p_two_sided) or math.isnan(estimate):
        return math.nan
    return p_two_sided / 2 if estimate > 0 else 1 - p_two_sided / 2


def _region_finding(scalars: Mapping[str, float]) -> Finding:
    effect, low, high, p = _test(scalars, f"specific_same_true_{FINDING_TAG}")
    if math.isnan(effect):
        why = (
            "no scored image"
            if not scalars.get("scored", 0) > 0
            else "the same-class null needs the evaluation split's labels, two scored images "
            f"of a class and {FINDING_AREA} among analysis.cam.areas"
        )
        return not_measured(KEY, CLAIM, why)
    share = f"top {FINDING_AREA:.0%}"
    text = (
        f"IS² in the {share} of the true class's CAM minus IS² in the {share} of the same "
        f"class's CAM on another image of that class: {effect:.3f} [{low:.3f}, {high:.3f}] "
        "(Hodges–Lehmann)"
    )
    return Finding(KEY, CLAIM, text, TEST + " (one-sided p)", estimate=effect, low=low,
                   high=high, p=one_sided_p(p, effect), direction="greater",
                   note=_context(scalars))  # fmt: skip


def _context(scalars: Mapping[str, float]) -> str:
    """The other-class null and the random-mask lift, shown beside the verdict only."""
    parts = []
    effect, low, high, _ = _test(scalars, f"specific_true_{FINDING_TAG}")
    if not math.isnan(effect):
        parts.append(f"against another class's map on the same image {effect:.3f} "
                     f"[{low:.3f}, {high:.3f}]")  # fmt: skip
    lift = scalars.get(f"lift_true_{FINDING_TAG}", math.nan)
    if not math.isnan(lift):
        parts.append(f"lift over a random mask {lift:.2f}")
    return f"context, {UNCALIBRATED}: " + "; ".join(parts) if parts else ""


def _object_finding(scalars: Mapping[str, float]) -> Finding:
    effect, low, high, p = _test(scalars, OBJECT_KEY)
    if math.isnan(effect):
        why = (
            "the object mask and the CAM region caught the same energy on every image"
            if "is_object" in scalars
            else "no ground-truth object masks: the dataset has none (only shapes has them)"
        )
        return not_measured(OBJECT_KEY, OBJECT_CLAIM, why)
    text = (
        "IS² in the true class's CAM region minus IS² in the ground-truth object mask, at "
        f"the object's area on each image: {effect:.3f} [{low:.3f}, {high:.3f}] "
        "(Hodges–Lehmann)"
    )
    if low > 0:
        note = "the interval lies above 0: specific to the CAM, beyond the object"
    elif high < 0:
        note = "the interval lies below 0: on the object, not specific to the CAM"
    else:
        note = "the interval holds 0: the CAM region is not told apart from the object"
    # Directional, as the paper's reading of a CAM needs it: energy on the object rather
    # than on the CAM (an interval below 0) makes the claim "not supported".
    return Finding(OBJECT_KEY, OBJECT_CLAIM, text, TEST + " (one-sided p)", estimate=effect,
                   low=low, high=high, p=one_sided_p(p, effect), direction="greater",
                   note=note)  # fmt: skip
