"""Claim 2 of the paper, as the CAM analysis tests it (docs/METHODS.md §7.13)."""

from __future__ import annotations

import math
from collections.abc import Mapping

from pse_lightning.core.findings import Finding, not_measured

KEY = "cam_region"
CLAIM = "Perturbations concentrate in the class-discriminative (CAM) region of the true class"


def cam_findings(scalars: Mapping[str, float]) -> list[Finding]:
    """The specific effect at 20 % area (Hodges–Lehmann, Wilcoxon signed-rank)."""
    base = "specific_true_top20"
    effect, low, high, p = (scalars.get(base + s, math.nan) for s in ("", "_low", "_high", "_p"))
    if math.isnan(effect):
        return [not_measured(KEY, CLAIM, "no scored image")]
    text = (
        f"IS² in the top-20% true-class CAM minus IS² in another class's: {effect:.3f} "
        f"[{low:.3f}, {high:.3f}] (Hodges–Lehmann)"
    )
    test = "Wilcoxon signed-rank over images; Hodges–Lehmann interval"
    return [Finding(KEY, CLAIM, text, test, estimate=effect, low=low, high=high, p=p,
                    direction="two-sided")]  # fmt: skip
