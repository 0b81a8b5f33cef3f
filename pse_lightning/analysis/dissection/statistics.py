"""Statistics relating unit sensitivity and interpretability (docs/METHODS.md §7).

Pure functions on reduced per-unit tensors: no state, no communication.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def rankdata(x: Tensor) -> Tensor:
    """Ranks 1..n of a 1-D tensor, ties averaged (scipy.stats.rankdata 'average')."""
    values, order = x.sort(stable=True)
    _, inverse, counts = torch.unique_consecutive(values, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    average = ends - (counts.double() - 1.0) / 2.0
    ranks = torch.empty(len(x), dtype=torch.float64, device=x.device)
    ranks[order] = average[inverse]
    return ranks


def _centred_unit(r: Tensor) -> Tensor | None:
    r = r - r.mean()
    norm = r.norm()
    return None if float(norm) == 0.0 else r / norm


def spearman(x: Tensor, y: Tensor) -> Tensor:
    """Spearman's rank correlation of two 1-D tensors (NaN if either is constant)."""
    rx, ry = _centred_unit(rankdata(x)), _centred_unit(rankdata(y))
    if rx is None or ry is None or len(x) < 2:
        return torch.tensor(float("nan"), dtype=torch.float64)
    return (rx * ry).sum().clamp(-1.0, 1.0)


def permutation_pvalue(
    x: Tensor, y: Tensor, permutations: int, generator: torch.Generator, chunk: int = 1000
) -> Tensor:
    """Two-sided permutation p-value of Spearman's rho: (1 + #{|rho_perm| >= |rho|})/(R + 1).

    Permuting the ranks of y R times gives the null distribution of rho with x and y
    unrelated; the +1 keeps p > 0 (Phipson and Smyth, 2010).
    """
    rx, ry = _centred_unit(rankdata(x)), _centred_unit(rankdata(y))
    if rx is None or ry is None or permutations < 1:
        return torch.tensor(float("nan"), dtype=torch.float64)
    rho = (rx * ry).sum().abs() - 1e-12
    hits, done = 0, 0
    while done < permutations:
        r = min(chunk, permutations - done)
        perm = torch.rand(r, len(ry), generator=generator).argsort(dim=1).to(ry.device)
        hits += int(((ry[perm] * rx).sum(dim=1).abs() >= rho).sum())
        done += r
    return torch.tensor((1 + hits) / (permutations + 1), dtype=torch.float64)


def mann_whitney_u(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Mann–Whitney U of x against y and its two-sided asymptotic p-value.

    Normal approximation with tie and continuity corrections, as
    ``scipy.stats.mannwhitneyu(x, y, method="asymptotic")``. NaN when a group is empty.
    """
    n1, n2 = len(x), len(y)
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    if n1 == 0 or n2 == 0:
        return nan, nan
    ranks = rankdata(torch.cat([x, y]).double())
    u1 = ranks[:n1].sum() - n1 * (n1 + 1) / 2.0
    n = n1 + n2
    _, ties = torch.unique(ranks, return_counts=True)
    tie_term = float((ties.double() ** 3 - ties.double()).sum()) / (n * (n - 1)) if n > 1 else 0
    sigma = math.sqrt(n1 * n2 / 12.0 * ((n + 1) - tie_term))
    if sigma == 0.0:
        return u1, torch.tensor(1.0, dtype=torch.float64)
    u = max(float(u1), n1 * n2 - float(u1))
    z = (u - n1 * n2 / 2.0 - 0.5) / sigma
    p = min(1.0, math.erfc(z / math.sqrt(2.0)))
    return u1, torch.tensor(p, dtype=torch.float64)


def hypergeom_sf(observed: int, population: int, successes: int, draws: int) -> float:
    """P(X >= observed) for X ~ Hypergeometric(population, successes, draws).

    The enrichment p-value of interpretable units among the most sensitive ones.
    """

    def log_choose(a: int, b: int) -> float:
        return math.lgamma(a + 1) - math.lgamma(b + 1) - math.lgamma(a - b + 1)

    top = min(draws, successes)
    low = max(observed, 0, draws - (population - successes))
    if low > top:
        return 0.0
    log_total = log_choose(population, draws)
    terms = [
        log_choose(successes, i) + log_choose(population - successes, draws - i) - log_total
        for i in range(low, top + 1)
    ]
    peak = max(terms)
    return min(1.0, math.exp(peak) * sum(math.exp(t - peak) for t in terms))


def percentile_ci(
    replicates: Tensor, low: float = 0.025, high: float = 0.975
) -> tuple[Tensor, Tensor]:
    """Percentile interval [q_low, q_high] of the finite bootstrap replicates (the 95%
    interval by default); NaN, NaN when no replicate is finite."""
    finite = replicates[torch.isfinite(replicates)]
    if not len(finite):
        nan = torch.tensor(math.nan, dtype=torch.float64)
        return nan, nan.clone()
    return torch.quantile(finite, low), torch.quantile(finite, high)


def enrichment(s: Tensor, interpretable: Tensor, top_fraction: float) -> tuple[int, float, float]:
    """Interpretable units among the m = round(top_fraction K) most sensitive ones.

    Returns:
        (observed count, expected count m * frac_interpretable, hypergeometric p-value
        P(X >= observed)); ties in s are broken by the lower unit index.
    """
    units = len(s)
    m = max(1, round(top_fraction * units))
    most = sorted(range(units), key=lambda k: (-float(s[k]), k))[:m]
    observed = int(interpretable[most].sum())
    expected = m * float(interpretable.double().mean())
    p = hypergeom_sf(observed, units, int(interpretable.sum()), m)
    return observed, expected, p
