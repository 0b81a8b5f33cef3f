"""Claim 3 of the paper, as the dissection tests it (docs/METHODS.md §7.13)."""

from __future__ import annotations

import math
from collections.abc import Mapping

from pse_lightning.core.findings import Finding, not_measured

KEY = "sensitivity_interpretability"
CLAIM = "Units' sensitivity to attacks is tied to their interpretability"
# A "tight connection" between sensitivity and interpretability: |rho| of at least this.
MIN_TIGHT_RHO = 0.3


def dissection_findings(scalars: Mapping[str, float]) -> list[Finding]:
    """Per dissected layer: Spearman rho over units, two-way bootstrap CI, permutation p."""
    suffix = "/spearman_rho"
    layers = sorted(
        k[: -len(suffix)] for k in scalars if k.endswith(suffix) and "/random/" not in k
    )
    if not layers:
        return [not_measured(KEY, CLAIM, "no dissected layer")]
    found = []
    for layer in layers:
        get = lambda name, layer=layer: scalars.get(f"{layer}/{name}", math.nan)  # noqa: E731
        rho, low, high = get("spearman_rho"), get("spearman_ci_low"), get("spearman_ci_high")
        text = f"Spearman ρ(s, max IoU) = {rho:.2f} [{low:.2f}, {high:.2f}]"
        random_rho = get("random/spearman_rho")
        if not math.isnan(random_rho):
            text += f"; random-weights baseline ρ = {random_rho:.2f}"
        found.append(Finding(f"{KEY}/{layer}", f"{CLAIM} ({layer})", text,
                             "permutation test over units; two-way bootstrap interval",
                             estimate=rho, low=low, high=high, p=get("spearman_p"),
                             direction="two-sided", size=MIN_TIGHT_RHO))  # fmt: skip
    return found
