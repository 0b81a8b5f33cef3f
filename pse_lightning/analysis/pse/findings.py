"""Claim 1 of the paper, as the PSE analysis tests it (docs/METHODS.md §7.13)."""

from __future__ import annotations

import math
from collections.abc import Mapping

from pse_lightning.analysis.pse.clusters import CENTRAL, MIN_TYPE_SHARE, sweep_key
from pse_lightning.analysis.pse.statistics import SWEEP
from pse_lightning.core.findings import ALPHA, Finding, not_measured
from pse_lightning.core.pse_types import DOMINANCE_TYPES as TYPES

KEY = "pse_types"
CLAIM = "Perturbations are of three PSE types: suppression-, promotion-dominated, balanced"


def pse_findings(scalars: Mapping[str, float]) -> list[Finding]:
    """The rarest type's share > MIN_TYPE_SHARE at every central threshold q.

    Per q of the sweep (tau_s = q, tau_p = 1 - q) one cluster bootstrap over (true, target)
    class pairs gives the rarest share's p and percentile interval (``rarest_q*`` scalars).
    Intersection-union over ``CENTRAL``: the claim's p is the largest p there and its
    estimate that q's share; its interval is the envelope of the central q's intervals
    (lowest lower limit, highest upper limit). So it is *supported* only where it holds at
    every central q, and *not supported* only where it fails at every central q: a claim
    that holds at some thresholds and not at others is inconclusive, since which threshold
    is right is not part of the paper's claim. The effect text says where it holds, the
    modes of r and the within-pair share of the variance of r.
    """
    tags = {q: f"rarest_{sweep_key(q)}" for q in SWEEP}
    needed = [f"{tag}{end}" for tag in tags.values() for end in ("", "_low", "_high", "_p")]
    if not scalars.get("n_images", 0) > 0 or any(k not in scalars for k in needed):
        return [not_measured(KEY, CLAIM, "no successful attack to analyse")]
    values = {q: {end: scalars[f"{tag}{end}"] for end in ("", "_low", "_high", "_p")}
              for q, tag in tags.items()}  # fmt: skip
    central = [q for q in SWEEP if any(math.isclose(q, c) for c in CENTRAL)]
    if any(math.isnan(values[q]["_p"]) for q in central):
        return [not_measured(KEY, CLAIM, "no image with a defined PSE ratio r")]
    worst = max(central, key=lambda q: values[q]["_p"])
    holds = [q for q in SWEEP if values[q]["_p"] < ALPHA and values[q]["_low"] > MIN_TYPE_SHARE]
    fails = [q for q in SWEEP if q not in holds]
    qs = lambda group: "{" + ", ".join(f"{q:.3g}" for q in group) + "}"  # noqa: E731
    shares = ", ".join(
        f"{t} {scalars.get(f'frac_{t}', math.nan):.2f} "
        f"[{scalars.get(f'frac_{t}_low', math.nan):.2f}, "
        f"{scalars.get(f'frac_{t}_high', math.nan):.2f}]"
        for t in TYPES
    )
    v = values[worst]
    low = min(values[q]["_low"] for q in central)
    high = max(values[q]["_high"] for q in central)
    effect = (
        f"rarest share {v['']:.3f} [{v['_low']:.3f}, {v['_high']:.3f}] at q = {worst:.3g} "
        f"(the central q with the largest p), envelope over the central q [{low:.3f}, "
        f"{high:.3f}]; rarest share > {MIN_TYPE_SHARE} "
        f"(p < {ALPHA}, interval above it) at q ∈ {qs(holds)}, not at q ∈ {qs(fails)}; "
        f"configured thresholds: {shares}; {modes_text(scalars)}; within-pair share of the "
        f"variance of r {scalars.get('pair_within_share', math.nan):.2f}"
    )
    test = (
        f"cluster bootstrap over (true, target) class pairs "
        f"({int(scalars.get('n_bootstrap', 0))} replicates of "
        f"{int(scalars.get('n_pair_clusters', 0))} pairs): per q, rarest type share > "
        f"{MIN_TYPE_SHARE}, p = (1 + #replicates <= {MIN_TYPE_SHARE}) / (B + 1), percentile "
        f"interval; intersection-union over q ∈ {qs(central)} (largest p, envelope of the "
        "intervals)"
    )
    note = ""
    if scalars.get("n_pairs_hashed", 0) > 0:
        note = (
            f"{int(scalars['n_pairs_hashed'])} images have a class beyond "
            "analysis.pair_classes: their pairs share hashed slots (fewer, larger clusters)"
        )
    if holds and fails and any(q in holds for q in central):
        note = "; ".join(filter(None, [note, f"depends on the threshold: holds at q ∈ "
                                             f"{qs(holds)}, not at q ∈ {qs(fails)}"]))  # fmt: skip
    return [Finding(KEY, CLAIM, effect, test, estimate=v[""], low=low, high=high,
                    p=v["_p"], null=MIN_TYPE_SHARE, note=note)]  # fmt: skip


def modes_text(scalars: Mapping[str, float]) -> str:
    """The modes result: BIC's number of mixture components and the LR tests' p."""
    k = int(scalars.get("mixture_k", 0) or 0)
    if k == 0:
        return "modes of r: too few images to fit a mixture"
    return (
        f"Gaussian mixture on r: BIC prefers k = {k} components (bootstrap LR test 1 vs 2 "
        f"p = {scalars.get('mixture_p_1v2', math.nan):.3g}, 2 vs 3 "
        f"p = {scalars.get('mixture_p_2v3', math.nan):.3g}; the LR test treats images as "
        "independent, so differences between class pairs alone can add a mode)"
    )
