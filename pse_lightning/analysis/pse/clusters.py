"""Type shares resampled by (true, target) class pair: the cluster bootstrap of Claim 1.

Images that share a (true, target) pair are not independent replicates: the pair explains
most of the variance of r (docs/METHODS.md §2.7). The unit of resampling is therefore the
pair. The metric keeps, per pair *slot*, the type counts at every threshold of the sweep and
at the configured thresholds, and the sums of r and r^2 (fixed-size ``sum`` states).

Slots: a pair with both classes < ``pair_classes`` has its own slot
(label * pair_classes + target); any other pair is hashed into the same table of
pair_classes^2 slots and may share a slot with other pairs (counted as
``n_pairs_hashed``). Merging independent clusters keeps them independent, so the bootstrap
stays valid, only with fewer and larger clusters (wider intervals); with K <= pair_classes
classes every pair is exact. Memory: pair_classes^2 x (3 len(SWEEP) + 4 + 2) numbers.
"""

from __future__ import annotations

import math

import torch
from torch import Generator, Tensor

from pse_lightning.analysis.pse.statistics import NONE, PSE_TYPES, SWEEP, classify

# A type "occurs" when its share exceeds this (one perturbation in twenty).
MIN_TYPE_SHARE = 0.05
# The sweep's central thresholds q (tau_s = q, tau_p = 1 - q) over which Claim 1 must hold.
CENTRAL = (0.25, 0.3, 1 / 3, 0.4)
_HASH = 1_000_003


def pair_slots(label: Tensor, target: Tensor, pair_classes: int) -> tuple[Tensor, Tensor]:
    """Slot ids (N,) in [0, pair_classes^2) and the mask of pairs that were hashed."""
    label, target = label.long(), target.long()
    exact = (label < pair_classes) & (target < pair_classes) & (label >= 0) & (target >= 0)
    slots = pair_classes * pair_classes
    hashed = (label * _HASH + target) % slots
    return torch.where(exact, label * pair_classes + target, hashed), ~exact


def slot_tallies(r: Tensor, slot: Tensor, tau_s: float, tau_p: float, slots: int):
    """Per slot: sweep type counts (slots, len(SWEEP), 3), configured type counts
    (slots, 4), and (n, sum r, sum r^2) over the defined r (slots, 3) float64."""
    dev = r.device
    sweep = torch.zeros(slots, len(SWEEP), 3, dtype=torch.long, device=dev)
    defined = ~torch.isnan(r)
    s_def, r_def = slot[defined], r[defined].double()
    for i, q in enumerate(SWEEP):
        kind = classify(r_def, q, 1.0 - q)
        sweep[:, i].index_put_((s_def, kind), torch.ones_like(kind), accumulate=True)
    kind = classify(r, tau_s, tau_p)
    types = torch.zeros(slots, len(PSE_TYPES), dtype=torch.long, device=dev)
    types.index_put_((slot, kind), torch.ones_like(kind), accumulate=True)
    moments = torch.zeros(slots, 3, dtype=torch.float64, device=dev)
    moments.index_add_(0, s_def, torch.stack([torch.ones_like(r_def), r_def, r_def**2], 1))
    return sweep, types, moments


def bootstrap_weights(clusters: int, replicates: int, gen: Generator) -> Tensor:
    """(replicates, clusters) multinomial counts: each replicate draws ``clusters`` clusters
    with replacement (the cluster bootstrap)."""
    draws = torch.randint(clusters, (replicates, clusters), generator=gen)
    weights = torch.zeros(replicates, clusters, dtype=torch.float64)
    return weights.scatter_add_(1, draws, torch.ones_like(draws, dtype=torch.float64))


def within_pair_share(moments: Tensor) -> Tensor:
    """SS_within / SS_total of r over the slots (1 - eta^2 by slot); NaN without spread."""
    m = moments.double()
    n, s1, s2 = m[:, 0], m[:, 1], m[:, 2]
    total = s2.sum() - s1.sum() ** 2 / n.sum().clamp_min(1)
    within = (s2 - s1**2 / n.clamp_min(1)).sum()
    if not bool(total > 1e-12 * n.sum().clamp_min(1)):
        return torch.tensor(math.nan, dtype=torch.float64)
    return (within / total).clamp(0, 1)


def rarest_share_test(
    sweep: Tensor, types: Tensor, *, replicates: int = 2000, seed: int = 0
) -> dict[str, Tensor]:
    """Claim 1 per threshold q, and the configured type shares, by one cluster bootstrap.

    Args:
        sweep: (slots, len(SWEEP), 3) type counts among defined r per slot.
        types: (slots, 4) type counts at the configured thresholds per slot.
        replicates: bootstrap replicates B.

    Returns (float64): ``rarest`` (len(SWEEP),) the smallest of the three shares among the
    images with a defined r; ``p`` (len(SWEEP),) = (1 + #{rarest* <= MIN_TYPE_SHARE}) /
    (B + 1); ``low``/``high`` its 2.5 and 97.5 percentiles; ``type_low``/``type_high``
    (3,) percentile intervals of the configured dominance-type shares over all analysed
    images (``frac_<type>``); ``clusters`` the resampled slots. NaN when nothing is typed.
    """
    sweep, types = sweep.double().cpu(), types.double().cpu()
    used = types.sum(1) > 0
    sweep, types = sweep[used], types[used]
    g = len(types)
    nan_s = torch.full((len(SWEEP),), math.nan, dtype=torch.float64)
    nan_3 = torch.full((3,), math.nan, dtype=torch.float64)
    out = {"rarest": nan_s, "p": nan_s, "low": nan_s, "high": nan_s,
           "type_low": nan_3, "type_high": nan_3, "clusters": torch.tensor(g)}  # fmt: skip
    defined = sweep.sum(-1)  # (g, S)
    if g == 0:
        return out
    gen = torch.Generator().manual_seed(seed)
    w = bootstrap_weights(g, replicates, gen)
    if bool(defined.sum() > 0):
        totals = sweep.sum(0)
        out["rarest"] = (totals / totals.sum(-1, keepdim=True)).min(-1).values
        boot = torch.einsum("bg,gsk->bsk", w, sweep)
        rarest = (boot / boot.sum(-1, keepdim=True).clamp_min(1e-12)).min(-1).values
        # a replicate that drew no image with a defined r has no share: it counts as failing
        rarest = torch.where(boot.sum(-1) > 0, rarest, 0.0)
        out["p"] = (1 + (rarest <= MIN_TYPE_SHARE).sum(0).double()) / (replicates + 1)
        q = torch.tensor([0.025, 0.975], dtype=torch.float64)
        out["low"], out["high"] = torch.quantile(rarest, q, dim=0)
    boot_t = w @ types
    shares = boot_t[:, :NONE] / boot_t.sum(-1, keepdim=True).clamp_min(1e-12)
    out["type_low"], out["type_high"] = torch.quantile(
        shares, torch.tensor([0.025, 0.975], dtype=torch.float64), dim=0
    )
    return out


def sweep_key(q: float) -> str:
    """The scalar-key tag of threshold q: 0.25 -> 'q250', 1/3 -> 'q333'."""
    return f"q{round(1000 * q):03d}"
