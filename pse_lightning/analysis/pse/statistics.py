"""PSE statistics: pure functions from attributions and reduced counts to the reported numbers.

Maps, per-image totals and group scores (docs/METHODS.md §2.4-§2.5), the PSE ratio and the
image type (§2.6), the ratio histogram and the threshold sweep, and the scalar summary that
``PSE.compute`` logs. Tensors in, tensors out, no state: every per-image result depends on
that image alone, and every summary is a function of sums that reduce exactly across
processes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from pse_lightning.core.pse_types import DOMINANCE_TYPES

PSE_TYPES: tuple[str, ...] = (*DOMINANCE_TYPES, "none")
SUPPRESSION, BALANCED, PROMOTION, NONE = range(4)
HIST_BINS = 20
# Symmetric threshold sweep q: tau_s = q, tau_p = 1 - q (the default pair is q = 1/3).
SWEEP: tuple[float, ...] = (0.1, 0.2, 0.25, 0.3, 1 / 3, 0.4, 0.45)
# A class pair with fewer images with a defined r is flagged: its mean r is noise.
MIN_PAIR_IMAGES = 5


def promotion_suppression_maps(attr_true: Tensor, attr_target: Tensor) -> tuple[Tensor, Tensor]:
    """Pixel maps (N, H, W): promotion sum_ch [a^t]_+ and suppression sum_ch [-a^{t0}]_+."""
    return attr_target.clamp_min(0).sum(dim=1), (-attr_true).clamp_min(0).sum(dim=1)


def attribution_totals(attr_true: Tensor, attr_target: Tensor) -> Tensor:
    """Gross per-image totals (N, 4): promotion, suppression, and their counter-effects.

    Columns: P = sum [a^t]_+, S = sum [-a^{t0}]_+, counter-promotion sum [-a^t]_+ (pixels
    that lower the target), counter-suppression sum [a^{t0}]_+ (pixels that raise the true
    class). P - counter-promotion = sum a^t and S - counter-suppression = -sum a^{t0}.
    """
    a_t, a_0 = attr_target.flatten(1), attr_true.flatten(1)
    return torch.stack(
        [
            a_t.clamp_min(0).sum(1),
            (-a_0).clamp_min(0).sum(1),
            (-a_t).clamp_min(0).sum(1),
            a_0.clamp_min(0).sum(1),
        ],
        dim=1,
    )


def grid_group_map(height: int, width: int, group_size: int, device: torch.device) -> Tensor:
    """(H, W) long ids of non-overlapping ``group_size`` squares, row-major (edges partial)."""
    cols = -(-width // group_size)
    rows = torch.arange(height, device=device) // group_size
    return rows[:, None] * cols + (torch.arange(width, device=device) // group_size)[None, :]


def group_scores(
    attr_true: Tensor, attr_target: Tensor, group_map: Tensor
) -> tuple[Tensor, Tensor]:
    """Net group scores P_G = sum_{i in G} a^t_i and S_G = -sum_{i in G} a^{t0}_i.

    Args:
        attr_true, attr_target: (N, C, H, W) attributions.
        group_map: (H, W) or (N, H, W) long group ids >= 0 (all channels of a pixel share
            its group).

    Returns:
        (P_G, S_G), each (N, G) with G = max id + 1; empty groups score 0.
    """
    n, _, h, w = attr_true.shape
    if group_map.shape not in ((h, w), (n, h, w)):
        raise ValueError(
            f"group_map must have shape ({h}, {w}) or ({n}, {h}, {w}), "
            f"got {tuple(group_map.shape)}"
        )
    ids = group_map.to(attr_true.device).long().expand(n, h, w).reshape(n, h * w)
    if ids.numel() and int(ids.min()) < 0:
        raise ValueError("group_map ids must be >= 0")
    num_groups = int(ids.max()) + 1 if ids.numel() else 0
    pixel_t = attr_target.sum(dim=1).reshape(n, h * w)
    pixel_0 = attr_true.sum(dim=1).reshape(n, h * w)
    zeros = pixel_t.new_zeros(n, num_groups)
    return zeros.scatter_add(1, ids, pixel_t), -zeros.scatter_add(1, ids, pixel_0)


def pse_ratio(promotion: Tensor, suppression: Tensor) -> Tensor:
    """r = [P]_+ / ([P]_+ + [S]_+), NaN where both are <= 0 (no PSE at all)."""
    p, s = promotion.clamp_min(0), suppression.clamp_min(0)
    total = p + s
    return torch.where(total > 0, p / total.clamp_min(torch.finfo(total.dtype).tiny), torch.nan)


def classify(r: Tensor, tau_s: float, tau_p: float) -> Tensor:
    """PSE type ids (see ``PSE_TYPES``): r < tau_s suppression, r > tau_p promotion,
    balanced in between, none where r is NaN. Long tensor shaped like r."""
    kind = torch.full(r.shape, BALANCED, dtype=torch.long, device=r.device)
    kind[r < tau_s] = SUPPRESSION
    kind[r > tau_p] = PROMOTION
    kind[torch.isnan(r)] = NONE
    return kind


def pse_type(
    delta_true: Tensor, delta_target: Tensor, tau_s: float, tau_p: float
) -> tuple[Tensor, Tensor]:
    """Image ratio r from the measured logit changes and its type: (r (N,), type (N,))."""
    r = pse_ratio(delta_target, -delta_true)
    return r, classify(r, tau_s, tau_p)


# -- tallies of one batch ------------------------------------------------------------------


def ratio_histogram(r: Tensor) -> Tensor:
    """Counts (HIST_BINS,) of the defined ratios r in equal bins of [0, 1]; r = 1 joins the
    last bin, NaN (type none) is left out."""
    r = r[~torch.isnan(r)].double()
    bins = (r * HIST_BINS).long().clamp(0, HIST_BINS - 1)
    return torch.bincount(bins, minlength=HIST_BINS)


def ratio_histogram_by_type(r: Tensor, kind: Tensor) -> Tensor:
    """Counts (HIST_BINS, 3) of the defined r in equal bins of [0, 1], split by the image's
    type (suppression, balanced, promotion): each column sums to that type's count, so a bar
    straddling a threshold is split, not coloured by its centre."""
    defined = ~torch.isnan(r)
    bins = (r[defined].double() * HIST_BINS).long().clamp(0, HIST_BINS - 1)
    out = torch.zeros(HIST_BINS, 3, dtype=torch.long, device=r.device)
    kind = kind[defined].to(r.device)
    return out.index_put_((bins, kind), torch.ones_like(kind), accumulate=True)


def sweep_counts(r: Tensor) -> Tensor:
    """Counts (len(SWEEP), 3) of suppression, balanced, promotion at tau_s = q, tau_p = 1 - q
    for each q of ``SWEEP``, over the images with a defined r."""
    r = r[~torch.isnan(r)].double()
    return torch.stack([torch.bincount(classify(r, q, 1.0 - q), minlength=3)[:3] for q in SWEEP])


def image_shares(totals: Tensor) -> Tensor:
    """Per-image shares (M, 3) over the M images with P + S > 0 (docs/METHODS.md §2.4).

    Columns: promotion P/(P+S), suppression S/(P+S) and the counter share
    (P' + S')/(P + S + P' + S') of the attribution that works against the attack.

    Args:
        totals: (N, 4) from :func:`attribution_totals`.
    """
    promotion, suppression, counter = totals[:, 0], totals[:, 1], totals[:, 2:].sum(1)
    gross = promotion + suppression
    has = gross > 0
    shares = torch.stack(
        [promotion / gross, suppression / gross, counter / (gross + counter)], dim=1
    )
    return shares[has]


# -- summaries of reduced tallies ----------------------------------------------------------


def share(count: Tensor, total: Tensor) -> Tensor:
    """``count / total`` in float64, NaN when ``total`` is 0: a share of nothing is
    unmeasured, not 0."""
    total = total.double()
    return torch.where(total > 0, count.double() / total.clamp_min(1), torch.nan)


def type_fractions(counts: Tensor, prefix: str = "frac_") -> dict[str, Tensor]:
    """Each type's share of ``counts`` (4,), keyed ``<prefix><type>``, summing to 1 (NaN
    when nothing was counted)."""
    counts = counts.double()
    return {f"{prefix}{name}": share(counts[i], counts.sum()) for i, name in enumerate(PSE_TYPES)}


def group_fractions(group_counts: Tensor) -> dict[str, Tensor]:
    """``group_frac_<type>`` over groups with a defined type and ``group_frac_active``,
    the share of groups that have one (docs/METHODS.md §2.5); NaN over no groups."""
    groups = group_counts.double()
    defined = groups[:NONE].sum()
    out = {
        f"group_frac_{name}": share(groups[i], defined) for i, name in enumerate(PSE_TYPES[:NONE])
    }
    out["group_frac_active"] = share(defined, groups.sum())
    return out


def mean_ratio(r_sum: Tensor, type_counts: Tensor) -> Tensor:
    """Mean r over the images with a defined r; NaN when there is none."""
    defined = type_counts.double()[:NONE].sum()
    if defined > 0:
        return r_sum.double() / defined
    return r_sum.new_tensor(math.nan, dtype=torch.float64)


def sweep_fractions(counts: Tensor) -> Tensor:
    """Rows of ``sweep_counts`` normalised to fractions of the images with a defined r."""
    counts = counts.double()
    return counts / counts.sum(dim=1, keepdim=True).clamp_min(1)


# -- class pairs ---------------------------------------------------------------------------


@dataclass
class PairBreakdown:
    """Image types per (true, target) class pair, pairs sorted by (label, target).

    Attributes:
        label, target: (G,) long, the pair.
        counts: (G, 4) long, images of each type (``PSE_TYPES`` order).
        mean_r: (G,) mean r over the pair's images with a defined r (NaN if none).
        n_defined: (G,) long, the pair's images with a defined r.
    """

    label: Tensor
    target: Tensor
    counts: Tensor
    mean_r: Tensor
    n_defined: Tensor

    def __len__(self) -> int:
        return len(self.label)


def pair_breakdown(label: Tensor, target: Tensor, kind: Tensor, r: Tensor) -> PairBreakdown:
    """Count the image types and average r per (true, target) pair (docs/METHODS.md §2.7).

    Args:
        label, target: (N,) long classes of each analysed image.
        kind: (N,) long type ids.
        r: (N,) PSE ratios, NaN for type none.
    """
    pairs, group = torch.unique(torch.stack([label, target], dim=1), dim=0, return_inverse=True)
    g = len(pairs)
    counts = torch.zeros(g, len(PSE_TYPES), dtype=torch.long)
    counts.index_put_((group.cpu(), kind.cpu()), torch.ones(len(kind), dtype=torch.long),
                      accumulate=True)  # fmt: skip
    defined = ~torch.isnan(r)
    n_defined = torch.bincount(group[defined], minlength=g).cpu()
    r_sum = torch.zeros(g, dtype=torch.float64).index_add_(
        0, group[defined].cpu(), r[defined].double().cpu()
    )
    mean_r = torch.where(n_defined > 0, r_sum / n_defined.clamp_min(1), torch.nan)
    return PairBreakdown(pairs[:, 0].cpu(), pairs[:, 1].cpu(), counts, mean_r, n_defined)


def eta_squared(
    values: Tensor, groups: Tensor, *, min_size: int = MIN_PAIR_IMAGES
) -> dict[str, Tensor]:
    """Share of the variance of ``values`` explained by ``groups`` (one-way ANOVA effect size).

    Over the finite values: eta^2 = SS_between / SS_total, with
    SS_between = sum_g n_g (mean_g - mean)^2 and SS_total = sum_i (v_i - mean)^2. Groups of
    one value explain it fully, so eta^2 is biased upwards: for values independent of the
    groups its expectation is (G - 1) / (n - 1) (exact for normal values, where eta^2 is
    Beta((G-1)/2, (n-G)/2)), reported as ``eta2_null``. epsilon^2 = (SS_between - (G - 1)
    MS_within) / SS_total, MS_within = SS_within / (n - G), removes that bias (about 0
    under independence, Okada 2013).

    Args:
        values: (N,) values, NaN ignored.
        groups: (N,) long group ids.
        min_size: groups with fewer finite values are counted in ``n_small``.

    Returns:
        ``eta2``, ``eta2_null``, ``epsilon2`` (float64 0-d, NaN where undefined: no
        spread, or n <= G), ``n`` (finite values), ``n_groups`` and ``n_small`` (long 0-d).
    """
    finite = torch.isfinite(values)
    v, g = values[finite].double().cpu(), groups[finite].cpu()
    _, group = torch.unique(g, return_inverse=True)
    n = len(v)
    n_groups = int(group.max()) + 1 if n else 0
    sizes = torch.bincount(group, minlength=n_groups).double()
    nan = torch.tensor(math.nan, dtype=torch.float64)
    out = {"eta2": nan, "eta2_null": nan, "epsilon2": nan}
    if n > n_groups >= 1:
        mean = v.mean()
        group_mean = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, group, v) / sizes
        ss_total = ((v - mean) ** 2).sum()
        ss_between = (sizes * (group_mean - mean) ** 2).sum()
        ms_within = (ss_total - ss_between) / (n - n_groups)
        out["eta2_null"] = torch.tensor((n_groups - 1) / (n - 1), dtype=torch.float64)
        if ss_total > 0:
            out["eta2"] = ss_between / ss_total
            out["epsilon2"] = (ss_between - (n_groups - 1) * ms_within) / ss_total
    out["n"] = torch.tensor(n)
    out["n_groups"] = torch.tensor(n_groups)
    out["n_small"] = (sizes < min_size).sum().long()
    return out


def pair_ids(label: Tensor, target: Tensor) -> Tensor:
    """One long id per (label, target) pair, the same for equal pairs."""
    return torch.unique(torch.stack([label, target], dim=1), dim=0, return_inverse=True)[1]
