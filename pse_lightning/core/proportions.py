"""Statistics of binary outcomes: accuracies and paired comparisons of two classifiers.

Pure functions on counts, so any layer (defenses, sweep comparisons, findings) states an
accuracy and compares two variants on the same images the same way (docs/METHODS.md §7).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from scipy.stats import binomtest, norm
from torch import Tensor

Z95 = float(norm.ppf(0.975))  # 1.959963984540054


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (Wilson 1927).

    With p̂ = x/n and z the normal quantile, the interval is
    (p̂ + z²/2n ± z·sqrt(p̂(1−p̂)/n + z²/4n²)) / (1 + z²/n). Unlike p̂ ± z·s.e. it stays
    inside [0, 1] and keeps close to nominal coverage at accuracies near 0 or 1 and on small
    test sets, which is where defense curves live.

    Args:
        successes: number of correct images x, 0 <= x <= n.
        n: number of images; with n = 0 nothing is known and (0, 1) is returned.
        confidence: two-sided coverage.
    """
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, n={n}], got {successes}")
    if n == 0:
        return 0.0, 1.0
    z = Z95 if confidence == 0.95 else float(norm.ppf(0.5 + confidence / 2))
    p, z2 = successes / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def discordant_pairs(correct_a: Tensor, correct_b: Tensor) -> tuple[int, int]:
    """(b, c): images only ``a`` gets right, and images only ``b`` gets right.

    Args:
        correct_a, correct_b: (N,) bool per-image correctness on the same N images.
    """
    if correct_a.shape != correct_b.shape:
        raise ValueError(
            f"paired outcomes need the same images, got shapes {tuple(correct_a.shape)} "
            f"and {tuple(correct_b.shape)}"
        )
    a, b = correct_a.bool(), correct_b.bool()
    return int((a & ~b).sum()), int((~a & b).sum())


def mcnemar_exact(correct_a: Tensor, correct_b: Tensor, alternative: str = "two-sided") -> float:
    """Exact McNemar p-value for two classifiers scored on the same images.

    Only discordant images carry information: under H0 (equal accuracy) each of the
    b + c discordant images is equally likely to favour either classifier, so
    b ~ Binomial(b + c, 1/2) and the two-sided p = min(1, 2·P(X <= min(b, c))). Exact, so
    valid for the few discordant images of a small test set; conservative because the
    binomial is discrete. No discordant image: p = 1.

    Args:
        alternative: "two-sided" (the accuracies differ), "greater" (``a`` is more accurate:
            p = P(X >= b), the one-sided exact binomial) or "less" (p = P(X <= b)).
    """
    b, c = discordant_pairs(correct_a, correct_b)
    if b + c == 0:
        return 1.0
    return float(binomtest(b, b + c, 0.5, alternative=alternative).pvalue)


def holm_adjust(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error rate), in the input order.

    Sorted ascending p_(1) <= ... <= p_(m): adjusted p_(i) = max_{j<=i} min(1, (m−j+1)·p_(j)).
    Rejecting where the adjusted p <= α controls the chance of any false rejection at α.
    A NaN (a test that could not run) is left out of the family and stays NaN.
    """
    finite = [i for i, p in enumerate(pvalues) if math.isfinite(float(p))]
    m = len(finite)
    adjusted, running = [math.nan] * len(pvalues), 0.0
    for rank, i in enumerate(sorted(finite, key=lambda i: float(pvalues[i]))):
        running = max(running, min(1.0, (m - rank) * float(pvalues[i])))
        adjusted[i] = running
    return adjusted


def paired_difference_interval(
    correct_a: Tensor, correct_b: Tensor, confidence: float = 0.95
) -> tuple[float, float, float]:
    """Accuracy of ``a`` minus accuracy of ``b`` on the same images, with Newcombe's
    hybrid score interval for paired proportions (Newcombe 1998, method 10).

    The Wilson interval of each accuracy gives its distances below and above the estimate
    (l₁, u₁ for a; l₂, u₂ for b); they are combined like two standard errors whose
    correlation φ is the phi coefficient of the 2×2 table of outcomes:
    θ = p₁ − p₂, lower θ − sqrt(l₁² − 2φ·l₁·u₂ + u₂²), upper θ + sqrt(u₁² − 2φ·u₁·l₂ + l₂²).
    Positively correlated outcomes (two variants of one network on one test set) narrow it,
    which an interval for independent samples cannot do. φ = 0 when a margin is empty.

    Args:
        correct_a, correct_b: (N,) bool per-image correctness on the same N > 0 images.
        confidence: two-sided coverage.

    Returns:
        (θ, lower, upper), inside [−1, 1].
    """
    pos_a, pos_b = discordant_pairs(correct_a, correct_b)
    n = int(correct_a.numel())
    if n == 0:
        raise ValueError("a paired difference needs at least one image, got 0")
    both = int((correct_a.bool() & correct_b.bool()).sum())
    neither = n - both - pos_a - pos_b
    hits_a, hits_b = both + pos_a, both + pos_b
    p_a, p_b = hits_a / n, hits_b / n
    low_a, high_a = wilson_interval(hits_a, n, confidence)
    low_b, high_b = wilson_interval(hits_b, n, confidence)
    margins = hits_a * (n - hits_a) * hits_b * (n - hits_b)
    phi = (both * neither - pos_a * pos_b) / math.sqrt(margins) if margins else 0.0
    below = (p_a - low_a, high_b - p_b)  # how far θ can fall: a lower, b higher
    above = (high_a - p_a, p_b - low_b)
    theta = p_a - p_b
    delta = math.sqrt(max(0.0, below[0] ** 2 - 2 * phi * below[0] * below[1] + below[1] ** 2))
    eps = math.sqrt(max(0.0, above[0] ** 2 - 2 * phi * above[0] * above[1] + above[1] ** 2))
    return theta, max(-1.0, theta - delta), min(1.0, theta + eps)
