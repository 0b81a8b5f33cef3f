"""Wilson intervals, the exact McNemar test and Holm's adjustment: known answers and
calibration under a planted null (docs/METHODS.md §7)."""

from __future__ import annotations

import math

import pytest
import torch
from calibration import check_interval, check_two_sided, columns, one_thread
from scipy.stats import binom

from pse_lightning.core.proportions import (
    discordant_pairs,
    holm_adjust,
    mcnemar_exact,
    paired_difference_interval,
    wilson_interval,
)


def test_wilson_interval_equals_the_hand_computed_value() -> None:
    # 8 of 10, z = 1.96: centre (0.8 + 0.19208) / 1.38416 = 0.71674,
    # half 1.41602 * sqrt(0.016 + 0.009604) = 0.22658 -> [0.4902, 0.9433].
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4)
    assert high == pytest.approx(0.9433, abs=1e-4)
    # 0 of 10: the lower bound is 0 and the upper 2 * 0.13877 = 0.2775 (not 0 as a Wald
    # interval would say).
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(11, 10)


@pytest.mark.parametrize(("n", "p"), [(30, 0.2), (50, 0.9), (100, 0.5), (200, 0.97)])
def test_wilson_interval_has_close_to_nominal_exact_coverage(n: int, p: float) -> None:
    """Coverage summed exactly over the binomial distribution, no simulation noise."""
    coverage = sum(
        binom.pmf(x, n, p)
        for x in range(n + 1)
        if wilson_interval(x, n)[0] <= p <= wilson_interval(x, n)[1]
    )
    assert 0.93 <= coverage <= 0.98


def test_mcnemar_exact_known_answers() -> None:
    a = torch.tensor([True] * 5 + [True] * 1 + [False] * 9 + [False] * 3)
    b = torch.tensor([True] * 5 + [False] * 1 + [True] * 9 + [False] * 3)
    assert discordant_pairs(a, b) == (1, 9)
    # b ~ Binomial(10, 1/2): p = 2 * (C(10,0) + C(10,1)) / 2^10 = 22 / 1024.
    assert mcnemar_exact(a, b) == pytest.approx(22 / 1024, rel=1e-12)
    assert mcnemar_exact(b, a) == pytest.approx(22 / 1024, rel=1e-12)
    assert mcnemar_exact(a, a) == 1.0  # no discordant image
    # One-sided ("a is more accurate"): P(X >= 1) for a, 1 of the 10 discordant images its
    # way; P(X >= 9) = 11 / 1024 for b; "less" mirrors it.
    assert mcnemar_exact(a, b, "greater") == pytest.approx(1023 / 1024, rel=1e-12)
    assert mcnemar_exact(b, a, "greater") == pytest.approx(11 / 1024, rel=1e-12)
    assert mcnemar_exact(a, b, "less") == pytest.approx(11 / 1024, rel=1e-12)
    assert mcnemar_exact(a, a, "greater") == 1.0
    balanced = torch.tensor([True, False, True, False]), torch.tensor([False, True, False, True])
    assert mcnemar_exact(*balanced) == 1.0
    with pytest.raises(ValueError, match="same images"):
        mcnemar_exact(a, b[:-1])


def _paired_outcomes(
    gen: torch.Generator, sets: int, n: int, acc_a: float, acc_b: float, copy: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sets, n): two classifiers on the same n images per set; b copies a's outcome with
    probability ``copy`` (correlated like two variants of one network) and is otherwise
    drawn so that its accuracy is ``acc_b``."""
    a = torch.rand(sets, n, generator=gen) < acc_a
    own = torch.rand(sets, n, generator=gen) < (acc_b - copy * acc_a) / (1 - copy)
    return a, torch.where(torch.rand(sets, n, generator=gen) < copy, a, own)


def _mcnemar(sets: int, acc_a: float, acc_b: float, seed: int) -> tuple[torch.Tensor, ...]:
    """(p, a's accuracy minus b's) of the exact McNemar test over ``sets`` sets of 300
    images, half the outcomes shared."""
    a, b = _paired_outcomes(torch.Generator().manual_seed(seed), sets, 300, acc_a, acc_b, 0.5)
    with one_thread():
        rows = [(mcnemar_exact(x, y), (x.double() - y.double()).mean()) for x, y in zip(a, b)]  # noqa: B905
    return columns(rows)


@pytest.mark.parametrize("sets", [200, pytest.param(2000, marks=pytest.mark.slow)])
def test_mcnemar_holds_its_level_and_detects_differences_in_both_directions(sets: int) -> None:
    """Equal accuracies (0.7) over 2000 sets (200 in the fast smoke version) of 300
    correlated paired outcomes: the false-positive rate passes tests/calibration.py (an
    FPR-inflated or one-sided mutant fails); 0.7 against 0.6 and 0.6 against 0.7: rejected
    with the right sign in >= 80% of 500 sets each (50 in the smoke version). The exact test
    is conservative (0.06 of the nulls at p <= 0.075), so the FPR mutant reports the
    one-sided p (rejects at p <= 0.1)."""
    null_p, _ = _mcnemar(sets, 0.7, 0.7, seed=0)
    up, down = _mcnemar(sets // 4, 0.7, 0.6, 1), _mcnemar(sets // 4, 0.6, 0.7, 2)
    check_two_sided("McNemar", null_p, up, down, strict=sets >= 2000, fpr_mutant=0.1)


def test_holm_adjustment_known_answer() -> None:
    # sorted 0.005, 0.01, 0.03, 0.04 -> 4*0.005, 3*0.01, 2*0.03, max(1*0.04, 0.06).
    assert holm_adjust([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm_adjust([0.5, 0.9]) == [1.0, 1.0]
    assert holm_adjust([]) == []
    # A test that could not run (NaN) is not in the family: the others see m = 2.
    adjusted = holm_adjust([0.01, float("nan"), 0.04])
    assert adjusted[0] == pytest.approx(0.02) and adjusted[2] == pytest.approx(0.04)
    assert math.isnan(adjusted[1])


def test_paired_difference_interval_equals_the_hand_computed_value() -> None:
    """10 images: 5 both right, 3 only a, 1 only b, 1 neither; p_a 0.8, p_b 0.6.
    Wilson: a [0.4902, 0.9433], b [0.3127, 0.8318]; φ = (5·1 − 3·1)/sqrt(8·2·6·4) = 0.10206.
    Lower 0.2 − sqrt(0.3098² − 2φ·0.3098·0.2318 + 0.2318²) = −0.1675;
    upper 0.2 + sqrt(0.1433² − 2φ·0.1433·0.2873 + 0.2873²) = 0.5077 (Newcombe 1998, method 10).
    """
    a = torch.tensor([True] * 8 + [False] * 2)
    b = torch.tensor([True] * 5 + [False] * 3 + [True, False])
    theta, low, high = paired_difference_interval(a, b)
    assert theta == pytest.approx(0.2)
    assert low == pytest.approx(-0.1675, abs=2e-4)
    assert high == pytest.approx(0.5077, abs=2e-4)
    # Identical outcomes: a narrow interval around 0 (Wilson's asymmetry, not zero width).
    assert paired_difference_interval(a, a)[0] == 0.0
    x = torch.arange(400) < 240
    _, low_same, high_same = paired_difference_interval(x, x)
    assert -0.01 < low_same < 0 < high_same < 0.01
    with pytest.raises(ValueError, match="at least one image"):
        paired_difference_interval(a[:0], b[:0])


@pytest.mark.parametrize(("acc_b", "copy"), [(0.7, 0.5), (0.6, 0.8)])
def test_paired_difference_interval_covers_the_true_difference(acc_b: float, copy: float) -> None:
    """Over 1200 sets of 300 correlated paired outcomes the 95% interval covers the true
    difference 0.7 − acc_b at close to its nominal rate and is as wide as the spread of the
    estimates calls for (tests/calibration.py: 1.5× wider or narrower fails)."""
    a, b = _paired_outcomes(torch.Generator().manual_seed(2), 1200, 300, 0.7, acc_b, copy)
    with one_thread():
        rows = [paired_difference_interval(*pair) for pair in zip(a, b)]  # noqa: B905
    theta, low, high = columns(rows)
    check_interval("Newcombe", low, high, theta, 0.7 - acc_b)
