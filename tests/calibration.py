"""The acceptance rules of the calibration tests (docs/METHODS.md §7.12), stated once.

A calibration test counts, over n synthetic data sets with known truth, how often a test
rejects or an interval covers. The count is binomial, so each acceptance region is computed
from the binomial distribution with two promises:

- a correct procedure passes with probability >= ``PASS`` (0.995): a test whose true
  false-positive rate (FPR) is alpha, an interval whose true coverage is in ``COVERAGE_OK``;
- a broken one fails with probability >= ``FAIL`` (0.95): a test whose true FPR is
  ``BAD_FPR`` (0.075, 1.5 alpha), an interval whose coverage is ``COVERAGE_BAD`` (0.88, too
  narrow; 0.99, too wide: a 1.5× wider normal interval covers 0.997).

A region built for too few sets to keep the second promise raises ``ValueError`` naming the
number needed (:func:`min_sets`); a fast smoke test passes ``bad=None`` to keep only the
first. Fixed seeds make each run one draw from these probabilities. Coverage alone needs
about a thousand sets to see an interval that is too wide, so :func:`width_ratio` also
compares the mean width with the width the sets' own spread of estimates calls for.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from scipy.stats import binom, norm
from torch import Tensor

ALPHA = 0.05
BAD_FPR = 0.075
PASS = 0.995
FAIL = 0.95
COVERAGE_OK = (0.93, 0.97)  # a 95% interval that is right up to a small-sample bias
COVERAGE_BAD = (0.88, 0.99)
WIDTH_OK = (0.8, 1.25)  # mean width / (2 z SD of the estimates over the sets)
POWER = 0.8


@dataclass(frozen=True)
class Region:
    """Accepted counts ``low <= count <= high`` out of ``n`` sets."""

    n: int
    low: int
    high: int

    def accepts(self, count: int | Tensor) -> bool:
        return self.low <= int(count) <= self.high

    def pass_probability(self, rate: float) -> float:
        """Exact P(low <= X <= high) for X ~ Binomial(n, rate)."""
        return float(binom.cdf(self.high, self.n, rate) - binom.cdf(self.low - 1, self.n, rate))

    def check(self, count: int | Tensor, what: str) -> None:
        """Assert the count is accepted, naming the rate and the region on failure."""
        rate = int(count) / self.n
        assert self.accepts(count), f"{what}: {int(count)}/{self.n} = {rate:.4f}, {self}"

    def __str__(self) -> str:
        return f"accepted [{self.low / self.n:.4f}, {self.high / self.n:.4f}] of {self.n} sets"


def _require_discrimination(region: Region, bad: tuple[float, ...], fail: float, what: str):
    for rate in bad:
        if region.pass_probability(rate) > 1 - fail:
            raise ValueError(
                f"{region.n} sets cannot tell a correct {what} from one at {rate}: it would "
                f"pass with probability {region.pass_probability(rate):.3f} > {1 - fail:.3f}; "
                f"use more sets (tests/calibration.py min_sets)"
            )
    return region


def fpr_region(
    n: int,
    alpha: float = ALPHA,
    bad: float | None = BAD_FPR,
    pass_prob: float = PASS,
    fail: float = FAIL,
) -> Region:
    """Rejection counts a test at level ``alpha`` may show over ``n`` null sets.

    high = the smallest count c with P(X <= c | alpha) >= ``pass_prob``; no lower bound (a
    conservative test is valid; the power checks catch one that never rejects). Raises
    ``ValueError`` when a test with true FPR ``bad`` would pass with probability
    > 1 - ``fail`` (``bad=None``: no such promise, for smoke tests).
    """
    region = Region(n, 0, int(binom.ppf(pass_prob, n, alpha)))
    return _require_discrimination(region, () if bad is None else (bad,), fail, "FPR")


def coverage_region(
    n: int,
    ok: tuple[float, float] = COVERAGE_OK,
    bad: tuple[float, float] | None = COVERAGE_BAD,
    pass_prob: float = PASS,
    fail: float = FAIL,
) -> Region:
    """Covering counts a 95% interval may show over ``n`` sets: an interval whose coverage
    is anywhere in ``ok`` passes with probability >= ``pass_prob`` (half the shortfall in
    each tail); raises ``ValueError`` when one at either ``bad`` coverage would pass with
    probability > 1 - ``fail``."""
    tail = (1 - pass_prob) / 2
    region = Region(n, int(binom.ppf(tail, n, ok[0])), int(binom.ppf(1 - tail, n, ok[1])))
    return _require_discrimination(region, () if bad is None else bad, fail, "coverage")


def power_floor(n: int, power: float = POWER) -> Region:
    """Rejection counts of a test that reaches ``power`` on a planted effect: at least
    ceil(power n) of n sets (the planted effects are sized so the true power is well above,
    and a test that misses one direction rejects in at most about alpha)."""
    return Region(n, math.ceil(power * n - 1e-9), n)


def min_sets(rates: tuple[float, float], kind: str = "fpr") -> int:
    """The fewest sets (to the next 100) whose region keeps both promises, for an FPR test
    (``rates`` = (alpha, bad FPR)) or a coverage test (``rates`` = bad coverages)."""
    for n in range(100, 100_001, 100):
        try:
            if kind == "fpr":
                fpr_region(n, rates[0], rates[1])
            else:
                coverage_region(n, bad=rates)
            return n
        except ValueError:
            continue
    raise ValueError(f"no n up to 100000 separates {rates}")


def width_ratio(low: Tensor, high: Tensor, estimates: Tensor, confidence: float = 0.95) -> float:
    """Mean interval width over the sets divided by 2 z SD(estimates), the width of a normal
    interval built from the estimator's true sampling SD (here measured as the spread of the
    point estimates over the independent sets). About 1 for a correct interval; 1.5 for one
    widened 1.5×. ``WIDTH_OK`` bounds it."""
    z = float(norm.ppf(0.5 + confidence / 2))
    return float((high - low).double().mean() / (2 * z * estimates.double().std()))


def check_width(low: Tensor, high: Tensor, estimates: Tensor, what: str) -> None:
    ratio = width_ratio(low, high, estimates)
    assert WIDTH_OK[0] <= ratio <= WIDTH_OK[1], f"{what}: width ratio {ratio:.3f}, not {WIDTH_OK}"


def scaled(low: Tensor, high: Tensor, estimates: Tensor, factor: float) -> tuple[Tensor, Tensor]:
    """The interval widened (factor > 1) or narrowed about the point estimate: a mutant."""
    return estimates - factor * (estimates - low), estimates + factor * (high - estimates)


def rejections(
    p: Tensor, estimate: Tensor | None = None, *, sign: int = 0, alpha: float = ALPHA
) -> int:
    """How many sets reject at ``alpha``; with ``sign`` = ±1, only those whose ``estimate``
    points that way (power in one direction)."""
    hit = p <= alpha
    if sign:
        hit = hit & (torch.sign(estimate) == sign)
    return int(hit.sum())


def one_sided_mutant(p: Tensor, estimate: Tensor) -> Tensor:
    """The "greater" one-sided p of a symmetric two-sided test: a two-sided test made
    one-sided (a mutant the power check in the other direction must catch)."""
    return torch.where(estimate > 0, p / 2, 1 - p / 2)


def check_two_sided(
    what: str,
    null_p: Tensor,
    up: tuple[Tensor, Tensor],
    down: tuple[Tensor, Tensor],
    strict: bool = True,
    fpr_mutant: float = BAD_FPR,
) -> dict[str, float]:
    """A two-sided test's calibration: its FPR over the null sets in :func:`fpr_region`,
    its power >= ``POWER`` on the planted effect in each direction (rejecting with the
    estimate on the planted side). The power check is shown to fail for the test's one-sided
    version and, with ``strict`` (enough null sets), the FPR check for the same test
    rejecting at p <= ``fpr_mutant``. Returns the rates for the docs.

    ``fpr_mutant`` is ``BAD_FPR`` for a test whose p is close to uniform under the null (its
    true rate at p <= 0.075 is then 0.075). A conservative test (a discrete exact test:
    true rate at p <= 0.075 below 0.075) passes 2 alpha instead: the mutant that reports a
    one-sided p as two-sided.

    Args:
        null_p: (n,) p-values under the null.
        up, down: (p, estimate) of the sets with a positive and a negative planted effect.
    """
    n = len(null_p)
    region = fpr_region(n, bad=BAD_FPR if strict else None)
    region.check(rejections(null_p), f"{what} FPR")
    power = {}
    for name, (p, estimate), sign in (("up", up, 1), ("down", down, -1)):
        power[name] = rejections(p, estimate=estimate, sign=sign)
        power_floor(len(p)).check(power[name], f"{what} power {name}")
    mutant = rejections(one_sided_mutant(*down), estimate=down[1], sign=-1)
    assert not power_floor(len(down[0])).accepts(mutant), f"{what}: one-sided mutant passes"
    if strict:
        mutant = rejections(null_p, alpha=fpr_mutant)
        assert not region.accepts(mutant), f"{what}: FPR mutant passes ({mutant}/{n})"
    return {
        "fpr": rejections(null_p) / n,
        "power_up": power["up"] / len(up[0]),
        "power_down": power["down"] / len(down[0]),
    }


def check_interval(
    what: str, low: Tensor, high: Tensor, estimates: Tensor, truth: float, strict: bool = True
) -> dict[str, float]:
    """An interval's calibration over independent sets: coverage of ``truth`` in
    :func:`coverage_region` and the width ratio in ``WIDTH_OK``; the same checks fail for
    the interval widened or narrowed 1.5× about the estimate. With ``strict`` False (a
    smoke test on few sets) the coverage region only keeps its pass promise."""
    n = len(low)
    region = coverage_region(n, bad=COVERAGE_BAD if strict else None)
    covered = int(((low <= truth) & (truth <= high)).sum())
    region.check(covered, f"{what} coverage")
    check_width(low, high, estimates, what)
    for factor in (1.5, 1 / 1.5):
        lo, hi = scaled(low, high, estimates, factor)
        hits = int(((lo <= truth) & (truth <= hi)).sum())
        ratio = width_ratio(lo, hi, estimates)
        passes = region.accepts(hits) and WIDTH_OK[0] <= ratio <= WIDTH_OK[1]
        assert not passes, f"{what}: interval scaled {factor:.2f}x passes"
    return {"coverage": covered / n, "width_ratio": width_ratio(low, high, estimates)}


@contextmanager
def one_thread() -> Iterator[None]:
    """Run many tiny tensor operations on one thread (10× faster than two fighting)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def columns(rows: list[tuple]) -> tuple[Tensor, ...]:
    """Per-set tuples of numbers or 0-d tensors as one float64 tensor per position."""
    return tuple(
        torch.tensor([float(row[i]) for row in rows], dtype=torch.float64)
        for i in range(len(rows[0]))
    )
