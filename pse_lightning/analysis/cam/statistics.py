"""The statistics of the image-level analysis: pure functions on tensors (docs/METHODS.md §3).

The interpretability score of a perturbation against a mask, its random-mask baseline, the
cyclic-shift p-value and the share of an attribution inside a mask, plus the means the
metric reports from its reduced sums. Tensors in, tensors out: no model, no state, every
image scored on its own, so a sample's numbers never depend on its batch or process.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Ties between a shifted and the original score are decided with this slack on IS^2 (a
# number in [0, 1]), far above the float64 FFT round-off (~1e-15) and far below any
# meaningful difference.
_TIE_SLACK = 1e-9


def pixel_energy(delta: Tensor) -> Tensor:
    """Squared perturbation per pixel, summed over channels: (N, C, H, W) -> (N, H, W)."""
    return delta.pow(2).sum(dim=1)


def interpretability_score(delta: Tensor, mask: Tensor) -> Tensor:
    """IS(delta, B) = ||B * delta||_2 / ||delta||_2, B broadcast over channels.

    Args:
        delta: (N, C, H, W) perturbation.
        mask: (N, H, W) bool or {0, 1} mask.

    Returns:
        (N,) scores in [0, 1]; 0 where delta is zero (no perturbation has no location).
    """
    energy = pixel_energy(delta.double())
    inside = (energy * mask.to(energy.dtype)).flatten(1).sum(dim=1)
    total = energy.flatten(1).sum(dim=1)
    score = torch.where(total > 0, inside / total.clamp_min(torch.finfo(total.dtype).tiny), 0.0)
    return score.sqrt().to(delta.dtype)


def shifted_scores(energy: Tensor, mask: Tensor) -> Tensor:
    """IS^2 of the perturbation for every cyclic shift of the mask, by FFT.

    Entry [n, i, j] is sum_p e(p) B(p - (i, j)) / sum_p e(p), i.e. the score against
    ``torch.roll(B, (i, j), dims=(-2, -1))``; [n, 0, 0] is the unshifted score. A cyclic
    shift keeps the mask's shape and area, so it is a baseline that respects the blob
    structure a pixelwise random mask destroys. Cross-correlation by FFT costs
    O(H W log(H W)) per image for all H W shifts at once; float64 keeps it exact to ~1e-15.

    Args:
        energy: (N, H, W) per-pixel squared perturbation (:func:`pixel_energy`).
        mask: (N, H, W) bool mask.

    Returns:
        (N, H, W) float64; rows of a zero perturbation are all zero.
    """
    h, w = energy.shape[-2:]
    e = energy.double()
    b = mask.double()
    corr = torch.fft.irfft2(torch.fft.rfft2(e) * torch.fft.rfft2(b).conj(), s=(h, w))
    total = e.flatten(1).sum(dim=1).view(-1, 1, 1)
    return torch.where(total > 0, corr / total.clamp_min(torch.finfo(e.dtype).tiny), 0.0)


def choose_shifts(height: int, width: int, count: int | None, seed: int) -> Tensor:
    """``count`` distinct nonzero cyclic shifts of an H x W grid as flat indices i * W + j.

    The same shifts serve every image (drawn once from ``seed`` on the CPU), so a sample's
    p-value never depends on its batch or process. ``count=None`` (or more than there are)
    takes every nonzero shift.
    """
    nonzero = height * width - 1
    if count is None or count >= nonzero:
        return torch.arange(1, nonzero + 1)
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(nonzero, generator=gen)[:count] + 1


def cyclic_shift_pvalue(energy: Tensor, mask: Tensor, shifts: Tensor) -> Tensor:
    """Empirical p = (1 + #{r: IS_r >= IS}) / (R + 1) over R cyclic shifts of the mask.

    Small p means the perturbation concentrates in the mask more than in a mask of the same
    shape placed elsewhere. Ties count against the mask (conservative).

    Args:
        energy: (N, H, W) per-pixel squared perturbation.
        mask: (N, H, W) bool.
        shifts: (R,) flat shift indices from :func:`choose_shifts`.

    Returns:
        (N,) float64 p-values in [1 / (R + 1), 1] (float64 whatever ``energy``'s dtype: a
        p-value is never stored in a type it could underflow or round in).
    """
    scores = shifted_scores(energy, mask).flatten(1)
    observed = scores[:, :1]
    shifted = scores[:, shifts.to(scores.device)]
    exceed = (shifted >= observed - _TIE_SLACK).sum(dim=1)
    return (1 + exceed).double() / (len(shifts) + 1)


def top_count_mask(maps: Tensor, counts: Tensor) -> Tensor:
    """Per image the ``counts[i]`` highest-scoring pixels of map i (an area matched per image).

    The CAM-vs-object test (docs/METHODS.md §3.8) compares the true class's CAM region with
    the ground-truth object mask at the same area: k_i = the object's pixel count, so both
    masks of an image hold exactly the same number of pixels. Ties are broken by pixel order.

    Args:
        maps: (N, H, W) scores.
        counts: (N,) integer pixel counts in [0, H W].

    Returns:
        (N, H, W) bool masks with exactly ``counts[i]`` pixels set.
    """
    n, h, w = maps.shape
    order = maps.flatten(1).argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(h * w, device=maps.device).expand(n, -1).contiguous()
    )
    return (rank < counts.to(maps.device).long()[:, None]).view(n, h, w)


def masked_share(attribution: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Share of a non-negative attribution that falls inside a mask.

    Args:
        attribution: (N, C, H, W) non-negative per-coordinate mass (promotion or
            suppression).
        mask: (N, H, W) bool, broadcast over channels.

    Returns:
        (share, valid): (N,) share in [0, 1] (0 where the total is 0) and (N,) bool, True
        where the total is positive.
    """
    per_pixel = attribution.double().sum(dim=1)
    total = per_pixel.flatten(1).sum(dim=1)
    inside = (per_pixel * mask.double()).flatten(1).sum(dim=1)
    valid = total > 0
    share = torch.where(valid, inside / total.clamp_min(torch.finfo(total.dtype).tiny), 0.0)
    return share.to(attribution.dtype), valid


def mean_or_nan(total: Tensor, count: Tensor) -> Tensor:
    """total / count elementwise, NaN where nothing was counted (no silent zero)."""
    nan = torch.full_like(total, float("nan"))
    return torch.where(count > 0, total / count.clamp_min(1e-300), nan)


def walsh_order_statistic(d: Tensor, k: int, direct_limit: int = 2048) -> Tensor:
    """The k-th smallest (1-based) Walsh average (d_i + d_j) / 2, i <= j.

    There are n (n + 1) / 2 Walsh averages. Up to ``direct_limit`` differences they are
    formed and selected; beyond, counting those <= t takes one sorted search (O(n log n)),
    so the order statistic is found by bisection on t and snapped to the Walsh average
    itself, in O(n) memory for any n (exact unless two averages lie within 1e-12 of the
    range of d, where either is returned).
    """
    s = d.double().sort().values
    n = len(s)
    first = torch.arange(n, device=s.device)
    if n <= direct_limit:
        i, j = torch.triu_indices(n, n, device=s.device)
        return ((s[i] + s[j]) / 2).kthvalue(k).values

    def count_at_most(t: Tensor) -> Tensor:
        # pairs i <= j with s_i + s_j <= 2 t: for each i, the j in [i, n) with s_j <= 2t - s_i
        last = torch.searchsorted(s, 2 * t - s, right=True)
        return (last - first).clamp_min(0).sum()

    lo, hi = s[0] - 1, s[-1].clone()  # count(lo) = 0 < k <= count(hi)
    tolerance = 1e-12 * float(s[-1] - s[0] + 1)
    while float(hi - lo) > tolerance:
        mid = (lo + hi) / 2
        if count_at_most(mid) >= k:
            hi = mid
        else:
            lo = mid
    # Snap to the Walsh average itself: the smallest one above lo.
    j = torch.maximum(torch.searchsorted(s, 2 * lo - s, right=True), first)
    above = (s + s[j.clamp_max(n - 1)]) / 2
    return torch.where(j < n, above, torch.inf).min()


def signed_rank_summary(d: Tensor, confidence: float = 0.95) -> dict[str, Tensor]:
    """Wilcoxon signed-rank test of d against 0 with the Hodges-Lehmann effect and its CI.

    docs/METHODS.md §7: the effect is the pseudo-median of d (the median of the Walsh
    averages, the estimate that inverts the signed-rank test); its CI is the pair of Walsh
    order statistics at the signed-rank critical count (normal approximation, Hollander &
    Wolfe), and p is scipy's two-sided Wilcoxon p (zeros dropped; exact for small n).

    Args:
        d: (n,) paired differences, one per image.
        confidence: coverage of the interval.

    Returns:
        ``effect``, ``low``, ``high``, ``p`` as float64 0-d tensors (NaN when n < 2 or every
        difference is zero).
    """
    from scipy.stats import norm, wilcoxon  # scipy is slow to import; only compute() needs it

    d = d.double().flatten().cpu()
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    n = len(d)
    if n < 2 or bool((d == 0).all()):
        return {"effect": nan, "low": nan, "high": nan, "p": nan}
    pairs = n * (n + 1) // 2
    z = float(norm.ppf(0.5 + confidence / 2))
    k = int(pairs / 2 - z * math.sqrt(n * (n + 1) * (2 * n + 1) / 24))
    k = max(k, 0)
    effect = (walsh_order_statistic(d, (pairs + 1) // 2)
              + walsh_order_statistic(d, pairs // 2 + 1)) / 2  # fmt: skip
    p = float(wilcoxon(d.numpy(), alternative="two-sided").pvalue)
    return {
        "effect": effect,
        "low": walsh_order_statistic(d, k + 1) if k + 1 <= pairs else nan,
        "high": walsh_order_statistic(d, pairs - k) if pairs - k >= 1 else nan,
        "p": torch.tensor(p, dtype=torch.float64),
    }
