"""Claim 3 of the paper, as the dissection tests it (docs/METHODS.md §7.13).

Per dissected layer, three findings, each the trained network's ρ minus the random-weights
baseline's (a random network's units have their own, non-zero ρ: zero is not the null), with
interval and p from one two-way bootstrap (§7.3):

- ``<layer>``: ρ(s, best IoU over every concept);
- ``<layer>/non_class``: ρ(s, best IoU over the concepts that are not class labels), so a
  class-selective unit is not counted as interpretable (only when the dataset names its
  class categories);
- ``<layer>/partial_target``: the partial ρ(s, best IoU | f_k), f_k the share of the
  attack's targets that go to the unit's preferred class (the class traffic that makes
  class-selective units change).

A layer whose interpretable units (of the kind the finding counts) are no more than the
random-weights baseline's is untestable: its "interpretable" units are not above chance.
The plain ``<layer>`` row is untestable too when most of its interpretable units are
interpretable for no non-class concept (class detectors): its ρ then measures class traffic,
and the two controlled rows are the test.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

from pse_lightning.core.findings import Finding, not_measured, untestable

KEY = "sensitivity_interpretability"
CLAIM = "Units' sensitivity to attacks is tied to their interpretability"
# A "tight connection" between sensitivity and interpretability: |rho| of at least this.
MIN_TIGHT_RHO = 0.3
TEST = (
    "trained − random-weights ρ; two-way bootstrap (units of each network resampled, the "
    "same evaluation- and probe-image weights for both): percentile interval and two-sided "
    "sign p of the difference"
)
#: The plain ρ is untestable as a claim about interpretability when at least this share of
#: a layer's interpretable units has no non-class concept (they are class detectors).
CLASS_DOMINATED = 0.5
#: (key suffix, the ρ in words, its key prefix, the interpretable count that gates it).
VARIANTS = (
    ("", "ρ(s, max IoU)", "", "interpretable"),
    ("/non_class", "ρ(s, max IoU over non-class concepts)", "non_class/",
     "non_class/interpretable"),
    ("/partial_target", "partial ρ(s, max IoU | target share)", "partial_target/",
     "interpretable"),
)  # fmt: skip


def dissection_findings(scalars: Mapping[str, float]) -> list[Finding]:
    """Per dissected layer and :data:`VARIANTS` entry: trained − random Δρ (§7.13)."""
    suffix = "/spearman_rho"
    layers = sorted(
        k[: -len(suffix)]
        for k in scalars
        if k.endswith(suffix) and "/random/" not in k and "/non_class/" not in k
    )
    if not layers:
        return [not_measured(KEY, CLAIM, "no dissected layer")]
    found = []
    for layer in layers:
        get = lambda name, layer=layer: float(scalars.get(f"{layer}/{name}", math.nan))  # noqa: E731
        for variant in VARIANTS:
            if variant[2] == "non_class/" and f"{layer}/non_class/spearman_rho" not in scalars:
                continue
            found.append(_finding(layer, get, *variant))
    return found


def _finding(
    layer: str,
    get: Callable[[str], float],
    key_suffix: str,
    what: str,
    prefix: str,
    count_key: str,
) -> Finding:
    key, claim = f"{KEY}/{layer}{key_suffix}", f"{CLAIM} ({layer}{key_suffix})"
    rho_key = "partial_target_rho" if prefix == "partial_target/" else f"{prefix}spearman_rho"
    rho, random_rho = get(rho_key), get(f"random/{rho_key}")
    trained_n, random_n = get(count_key), get(f"random/{count_key}")
    if math.isnan(random_rho):
        why = "no random-weights baseline (analysis.random_baseline: false): Δρ not measured"
        return untestable(key, claim, f"trained {what} = {rho:.2f}", TEST, why)
    delta = get(f"{prefix}delta_rho")
    low, high = get(f"{prefix}delta_rho_ci_low"), get(f"{prefix}delta_rho_ci_high")
    effect = (
        f"Δ{what} trained − random = {delta:.2f} [{low:.2f}, {high:.2f}] "
        f"(trained {rho:.2f}, random {random_rho:.2f})"
    )
    counts = f"{trained_n:.0f} interpretable units trained, {random_n:.0f} at random weights"
    if not trained_n > random_n:
        why = f"{counts}: the layer's interpretable units do not exceed chance"
        return untestable(key, claim, effect, TEST, why)
    class_units = trained_n - get("non_class/interpretable")
    if not prefix and class_units >= CLASS_DOMINATED * trained_n:
        why = (
            f"{class_units:.0f} of {trained_n:.0f} interpretable units are not interpretable "
            "for any non-class concept: here 'interpretable' means class-selective, and ρ "
            f"tracks how often the attack targets a unit's class (ρ(s, target share) = "
            f"{get('target_share_rho'):.2f}); the class-controlled rows test the claim"
        )
        return untestable(key, claim, effect, TEST, why)
    note = counts
    if delta * rho < 0:  # the difference comes from the random network alone
        note += (
            f"; the trained network's own ρ ({rho:.2f}) has the other sign: the difference "
            f"comes from the random network's ρ ({random_rho:.2f}), not from a tie in the "
            "trained one"
        )
    return Finding(key, claim, effect, TEST, estimate=delta, low=low, high=high,
                   p=get(f"{prefix}delta_rho_p"), direction="two-sided", null=0.0,
                   size=MIN_TIGHT_RHO, note=note)  # fmt: skip
