"""Claim 1 of the paper, as the PSE analysis tests it (docs/METHODS.md §7.13)."""

from __future__ import annotations

import math
from collections.abc import Mapping

from scipy.stats import binomtest

from pse_lightning.core.findings import Finding, not_measured
from pse_lightning.core.proportions import wilson_interval
from pse_lightning.core.pse_types import DOMINANCE_TYPES as TYPES

KEY = "pse_types"
CLAIM = "Perturbations are of three PSE types: suppression-, promotion-dominated, balanced"
# The smallest share for a PSE type to count as "occurring" (one perturbation in twenty).
MIN_TYPE_SHARE = 0.05


def pse_findings(scalars: Mapping[str, float]) -> list[Finding]:
    """Each type's share > MIN_TYPE_SHARE, intersection-union (the largest of the three
    one-sided exact binomial p-values; the rarest type's Wilson interval)."""
    n = scalars.get("n_images", math.nan)
    shares = [scalars.get(f"frac_{t}", math.nan) for t in TYPES]
    if not n > 0 or any(math.isnan(s) for s in shares):
        return [not_measured(KEY, CLAIM, "no successful attack to analyse")]
    n = int(n)
    counts = [round(s * n) for s in shares]
    intervals = [wilson_interval(c, n) for c in counts]
    p = max(binomtest(c, n, MIN_TYPE_SHARE, alternative="greater").pvalue for c in counts)
    rarest = min(range(3), key=lambda i: shares[i])
    effect = ", ".join(
        f"{t} {s:.2f} [{lo:.2f}, {hi:.2f}]"
        for t, s, (lo, hi) in zip(TYPES, shares, intervals, strict=True)
    )
    test = f"exact binomial over images, each share > {MIN_TYPE_SHARE} (largest p), n = {n}"
    low, high = intervals[rarest]
    return [Finding(KEY, CLAIM, effect, test, estimate=shares[rarest], low=low, high=high,
                    p=p, null=MIN_TYPE_SHARE)]  # fmt: skip
