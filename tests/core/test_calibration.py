"""The acceptance rules of the calibration tests (tests/calibration.py): their operating
characteristics computed exactly from the binomial, and the checks failing for broken tests."""

from __future__ import annotations

import pytest
import torch
from calibration import (
    ALPHA,
    BAD_FPR,
    COVERAGE_BAD,
    FAIL,
    PASS,
    Region,
    check_interval,
    check_two_sided,
    coverage_region,
    fpr_region,
    min_sets,
    one_sided_mutant,
    power_floor,
    scaled,
    width_ratio,
)
from scipy.stats import binom, norm


def test_the_old_window_passes_tests_that_are_off_by_half() -> None:
    """[0.02, 0.08] over 200 nulls (the rule this module replaces) passes a test whose true
    FPR is 0.075 two times in three and one at 0.09 more than one time in three."""
    old = Region(200, 4, 16)
    assert old.pass_probability(0.075) > 0.6
    assert old.pass_probability(0.09) > 0.33


@pytest.mark.parametrize("n", [2000, 3000, 5000])
def test_fpr_region_keeps_both_promises_exactly(n: int) -> None:
    region = fpr_region(n)
    assert region.low == 0
    assert binom.cdf(region.high, n, ALPHA) >= PASS  # a correct test passes
    assert binom.cdf(region.high - 1, n, ALPHA) < PASS  # and the bound is the smallest
    assert 1 - region.pass_probability(BAD_FPR) >= FAIL  # a test at 0.075 fails
    assert region.pass_probability(ALPHA) == pytest.approx(binom.cdf(region.high, n, ALPHA))


def test_fpr_region_for_2000_sets_and_the_fewest_sets() -> None:
    region = fpr_region(2000)
    assert region.high == 126  # 0.063
    assert region.pass_probability(0.05) > 0.995
    assert region.pass_probability(0.075) < 0.025
    assert region.pass_probability(0.1) < 1e-8
    assert min_sets((0.05, 0.075)) == 1700
    with pytest.raises(ValueError, match="cannot tell a correct FPR"):
        fpr_region(200)
    smoke = fpr_region(200, bad=None)  # few sets: only the pass promise
    assert smoke.high == 19 and smoke.pass_probability(0.05) >= PASS


@pytest.mark.parametrize("n", [1000, 1200, 2000])
def test_coverage_region_keeps_both_promises_exactly(n: int) -> None:
    region = coverage_region(n)
    for coverage in (0.93, 0.95, 0.97):
        assert region.pass_probability(coverage) >= PASS, coverage
    for coverage in COVERAGE_BAD:
        assert 1 - region.pass_probability(coverage) >= FAIL, coverage
    # A normal interval widened 1.5x covers P(|Z| < 1.5 * 1.96) = 0.9967: it fails.
    wide = 2 * norm.cdf(1.5 * 1.96) - 1
    assert 1 - region.pass_probability(wide) > 0.999
    with pytest.raises(ValueError, match="cannot tell a correct coverage"):
        coverage_region(500)


def test_power_floor() -> None:
    assert power_floor(500).low == 400 and power_floor(500).accepts(500)
    assert not power_floor(200).accepts(159)


def test_width_ratio_is_one_for_a_normal_interval_and_scales() -> None:
    gen = torch.Generator().manual_seed(0)
    estimates = 0.3 + 0.2 * torch.randn(4000, generator=gen, dtype=torch.float64)
    low, high = estimates - 1.96 * 0.2, estimates + 1.96 * 0.2
    assert width_ratio(low, high, estimates) == pytest.approx(1.0, abs=0.03)
    assert width_ratio(*scaled(low, high, estimates, 1.5), estimates) == pytest.approx(
        1.5 * width_ratio(low, high, estimates)
    )


def _pvalues(n: int, fpr: float, gen: torch.Generator) -> torch.Tensor:
    """p-values of a test whose chance of p <= 0.05 is ``fpr``."""
    u = torch.rand(n, generator=gen, dtype=torch.float64)
    return torch.where(u < fpr, u / fpr * ALPHA, ALPHA + (u - fpr) / (1 - fpr) * (1 - ALPHA))


def _planted(n: int, sign: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Sets with a planted effect of ``sign``: 95% of them give p = 0.001."""
    p = torch.where(torch.rand(n, generator=gen) < 0.95, 1e-3, 0.5).double()
    return p, torch.full((n,), float(sign), dtype=torch.float64)


def test_two_sided_check_passes_a_correct_test_and_fails_broken_ones() -> None:
    gen = torch.Generator().manual_seed(1)
    up, down = _planted(500, 1, gen), _planted(500, -1, gen)
    rates = check_two_sided("ok", _pvalues(2000, 0.05, gen), up, down)
    assert rates["power_up"] > 0.9 and rates["power_down"] > 0.9
    with pytest.raises(AssertionError, match="FPR"):
        check_two_sided("inflated", _pvalues(2000, 0.075, gen), up, down)
    with pytest.raises(AssertionError, match="power down"):  # a one-sided test
        check_two_sided("one-sided", _pvalues(2000, 0.05, gen), up, (one_sided_mutant(*down),
                        down[1]))  # fmt: skip
    with pytest.raises(AssertionError, match="power up"):  # rejects, but the wrong way
        check_two_sided("sign", _pvalues(2000, 0.05, gen), (up[0], -up[1]), down)


def test_interval_check_fails_intervals_too_wide_or_too_narrow() -> None:
    gen = torch.Generator().manual_seed(2)
    estimates = 0.3 + 0.2 * torch.randn(1200, generator=gen, dtype=torch.float64)
    low, high = estimates - 1.96 * 0.2, estimates + 1.96 * 0.2
    rates = check_interval("normal", low, high, estimates, 0.3)
    assert rates["coverage"] == pytest.approx(0.95, abs=0.015)
    for factor in (1.5, 1 / 1.5, 1.3):
        with pytest.raises(AssertionError, match="normal"):
            check_interval("normal", *scaled(low, high, estimates, factor), estimates, 0.3)
    with pytest.raises(AssertionError, match="coverage"):  # right width, off centre
        check_interval("shifted", low + 0.2, high + 0.2, estimates, 0.3)
