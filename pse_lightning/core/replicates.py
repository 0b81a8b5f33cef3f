"""Two training procedures compared over training seeds: a t-test on per-seed differences.

A claim such as "PSE-informed adversarial training is more robust than PGD-AT" is about two
training *procedures*. Each procedure is trained once per seed; seed s of procedure A is
paired with seed s of procedure B (the same data, the same test images), and the unit that is
resampled is the seed. Per seed, the paired difference of accuracies on the test images

    d_s = acc(A, seed s) − acc(B, seed s)

already averages the images, so the spread of d_1, …, d_S over seeds holds both the
training noise (each seed's model lands at its own accuracy) and the within-seed image noise
(which images the two models happen to get right). The procedure difference is the mean of
the d_s, with the one-sample t interval and t-test on S − 1 degrees of freedom
(docs/METHODS.md §7.6): p and interval come from the same t distribution, so p < 0.05
exactly when the 95 % interval excludes 0. It holds its level for S = 3 (tested under a
planted seed-level null, tests/reporting/test_sweep_procedure.py). A bootstrap over 3 to 5
seeds would not: 3 seeds have 10 distinct resamples (5 seeds 126), and a percentile
interval from them is too narrow (its spread is the plug-in SD, biased low by
√((S − 1)/S), with normal rather than t quantiles).

The test images are held fixed when every seed evaluates the same images: the claim then
generalises over training seeds on this test set. With a different test set per seed
(dataset seeded by the run's seed) the image sampling is inside the d_s as well.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from scipy.special import stdtr, stdtrit
from torch import Tensor

#: A seed-to-seed SD at or below this is 0 (differences of accuracies equal up to rounding).
DEGENERATE_SD = 1e-12


def seed_t_test(
    differences: Tensor, confidence: float = 0.95, alternative: str = "two-sided"
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One-sample t-test and interval of the mean of per-seed differences, batched.

    Args:
        differences: (..., S) per-seed differences d_s, S >= 2 seeds in the last dimension.
        confidence: two-sided coverage of the interval.
        alternative: "two-sided" (mean ≠ 0), "greater" (mean > 0: p = P(T >= t)) or "less"
            (p = P(T <= t)), T Student's t on S − 1 df.

    Returns:
        (mean, sd, low, high, p), each (...) float64: the mean difference, the seed-to-seed
        SD (n − 1), the two-sided t interval mean ± t_{S−1} · sd / √S and the t-test p of
        mean = 0 against ``alternative``. With sd = 0 (every seed gives the same
        difference, up to rounding: sd <= ``DEGENERATE_SD``) the t statistic is 0/0 or ±∞
        and says nothing about the seed-to-seed spread, which an S-seed sample has failed
        to show: p is 1 (no evidence, whatever ``alternative``) and the interval is the
        point 0 when every difference is 0 (what two identical procedures give), else
        unbounded, (−∞, ∞), the limit of the t interval as the unknown SD grows
        (docs/METHODS.md §7.6).

    Raises:
        ValueError: fewer than 2 seeds.
    """
    seeds = differences.shape[-1]
    if seeds < 2:
        raise ValueError(f"a t-test over seeds needs at least 2 seeds, got {seeds}")
    d = differences.double()
    mean, sd = d.mean(-1), d.std(-1)
    se = sd / math.sqrt(seeds)
    df = seeds - 1
    half = float(stdtrit(df, 0.5 + confidence / 2)) * se
    if alternative == "two-sided":
        p = torch.as_tensor(2 * stdtr(df, -(mean.abs() / se).numpy()), dtype=mean.dtype)
    elif alternative in ("greater", "less"):
        sign = 1.0 if alternative == "greater" else -1.0
        p = torch.as_tensor(stdtr(df, -(sign * mean / se).numpy()), dtype=mean.dtype)
    else:
        raise ValueError(f"alternative must be two-sided, greater or less, got {alternative!r}")
    degenerate = sd <= DEGENERATE_SD
    zero = degenerate & (mean.abs() <= DEGENERATE_SD)
    p = torch.where(degenerate, torch.ones_like(p), p)
    unbounded = torch.full_like(mean, math.inf)
    low = torch.where(
        zero, torch.zeros_like(mean), torch.where(degenerate, -unbounded, mean - half)
    )
    high = torch.where(
        zero, torch.zeros_like(mean), torch.where(degenerate, unbounded, mean + half)
    )
    return mean, sd, low, high, p


def procedure_difference(
    pairs: Sequence[tuple[Tensor, Tensor]], alternative: str = "two-sided"
) -> dict[str, object]:
    """Two procedures compared over seeds, from each seed's paired per-image outcomes.

    Args:
        pairs: one (correct_a, correct_b) per seed, (N_s,) bool each, aligned image by image
            (procedure A's and B's models of that seed on the same test images).
        alternative: of the t-test (:func:`seed_t_test`): one-sided for a directional claim.

    Returns:
        ``acc_variant`` and ``acc_baseline`` (per-seed accuracies), ``differences`` (d_s),
        ``difference`` (their mean), ``sd_difference`` (seed-to-seed SD), ``ci_low``,
        ``ci_high`` (95 %), ``p`` (against ``alternative``, t on S − 1 df), ``seeds`` (S),
        ``n`` (images per seed, the smallest) and ``degenerate`` (every seed gave the same
        difference: see :func:`seed_t_test`).

    Raises:
        ValueError: fewer than 2 seeds.
    """
    acc_a = [float(a.double().mean()) for a, _ in pairs]
    acc_b = [float(b.double().mean()) for _, b in pairs]
    diffs = [x - y for x, y in zip(acc_a, acc_b, strict=True)]
    mean, sd, low, high, p = seed_t_test(
        torch.tensor(diffs, dtype=torch.float64), alternative=alternative
    )
    return {
        "acc_variant": acc_a,
        "acc_baseline": acc_b,
        "differences": diffs,
        "difference": float(mean),
        "sd_difference": float(sd),
        "ci_low": float(low),
        "ci_high": float(high),
        "p": float(p),
        "seeds": len(pairs),
        "n": min(int(a.numel()) for a, _ in pairs),
        "degenerate": bool(sd <= DEGENERATE_SD),
    }
