"""Statistics relating unit sensitivity and interpretability (docs/METHODS.md §7).

Pure functions on reduced per-unit tensors: no state, no communication.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from pse_lightning.core.proportions import holm_adjust


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


# Resampling, partial correlation and multiple testing (issue 15) ---------------------------


def rank_rows(x: Tensor) -> Tensor:
    """Ranks 1..n along the last dimension, ties averaged (:func:`rankdata` per row).

    One sort per row: a tie group's first and last sorted positions come from running
    max / min scans, so thousands of bootstrap resamples rank in one call.
    """
    values, order = x.double().sort(dim=-1)
    n = values.shape[-1]
    pos = torch.arange(n, device=x.device).expand_as(values)
    starts = torch.ones_like(values, dtype=torch.bool)
    starts[..., 1:] = values[..., 1:] != values[..., :-1]
    ends = torch.ones_like(starts)
    ends[..., :-1] = starts[..., 1:]
    first = torch.where(starts, pos, 0).cummax(dim=-1).values
    last = torch.where(ends, pos, n - 1).flip(-1).cummin(dim=-1).values.flip(-1)
    average = (first + last).double() / 2.0 + 1.0
    return torch.empty_like(average).scatter_(-1, order, average)


def correlation_rows(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation along the last dimension (NaN where either row is constant)."""
    a = a - a.mean(dim=-1, keepdim=True)
    b = b - b.mean(dim=-1, keepdim=True)
    norm = a.norm(dim=-1) * b.norm(dim=-1)
    r = (a * b).sum(dim=-1) / norm.clamp_min(1e-300)
    return torch.where(norm > 1e-12, r.clamp(-1.0, 1.0), torch.full_like(r, math.nan))


def spearman_rows(x: Tensor, y: Tensor) -> Tensor:
    """Spearman's rho of each row pair of ``x``, ``y`` (..., n): vectorised resamples."""
    return correlation_rows(rank_rows(x), rank_rows(y))


def unit_bootstrap_ci(
    s: Tensor,
    iou: Tensor,
    replicates: int,
    generator: torch.Generator,
    s_images: Tensor | None = None,
    iou_probe: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """95% percentile CI of Spearman's rho(s, IoU) resampling UNITS with replacement.

    The units are the sample the correlation is computed over, so resampling them is what
    measures rho's sampling error (docs/METHODS.md §7.3). With ``s_images`` (B, K), the
    sensitivities of B Poisson-bootstrap replicates over evaluation images, replicate b
    also uses ``s_images[b]``; with ``iou_probe`` (B', K), the best IoUs of Poisson-
    bootstrap replicates over probe images, it also uses ``iou_probe[b]``. The interval
    then includes the noise of s_k's and of IoU_k's estimates as well.

    Args:
        s, iou: (K,) sensitivity and best IoU.
        replicates: B (ignored when image replicates are given: the fewest rows set it).
        generator: the source of the unit resamples.
    """
    units = len(s)
    given = [len(r) for r in (s_images, iou_probe) if r is not None]
    b = min(given) if given else replicates
    if b < 1 or units < 3:
        nan = torch.tensor(math.nan, dtype=torch.float64)
        return nan, nan.clone()
    pick = torch.randint(units, (b, units), generator=generator)
    x = s.double()[pick] if s_images is None else s_images[:b].double().gather(1, pick)
    y = iou.double()[pick] if iou_probe is None else iou_probe[:b].double().gather(1, pick)
    return percentile_ci(spearman_rows(x, y))


def rank_residuals(values: Tensor, control: Tensor) -> Tensor:
    """Ranks of ``values`` (n,) minus their least-squares line on the ranks of ``control``
    (n,): the part of the ranks the control does not explain linearly."""
    design = torch.stack([torch.ones(len(values), dtype=torch.float64), rankdata(control)], 1)
    ranks = rankdata(values).view(-1, 1)
    coef = torch.linalg.lstsq(design, ranks).solution
    return (ranks - design @ coef).view(-1)


def block_permutations(
    control: Tensor, permutations: int, block: int, generator: torch.Generator
) -> Tensor:
    """(R, n) permutations that move each unit only among the ``block`` units nearest to it
    in ``control`` (consecutive blocks of the control's order; the last may be smaller)."""
    n = len(control)
    order = control.argsort(stable=True)
    block_id = (torch.arange(n) // block).double()
    within = (torch.rand(permutations, n, generator=generator).double() + block_id).argsort(1)
    perm = torch.empty(permutations, n, dtype=torch.long)
    perm[:, order] = order[within]
    return perm


def partial_spearman(
    x: Tensor,
    y: Tensor,
    control: Tensor,
    permutations: int,
    generator: torch.Generator,
    block: int = 8,
) -> tuple[Tensor, Tensor]:
    """Partial Spearman correlation of x and y given ``control`` (all (n,)), and its p-value.

    rho_partial = corr(e_x, e_y), e the rank residuals (:func:`rank_residuals`). The
    two-sided p-value permutes e_y only within blocks of ``block`` units adjacent in the
    control (:func:`block_permutations`): (1 + #{|corr(e_x, e_y perm)| >= |rho_partial|}) /
    (R + 1). A free permutation of the residuals (Kennedy, 1995) rejects about 10% of
    true nulls when the control drives both variables (the residuals' spread then varies
    with the control in both alike); within-block permutation keeps that structure and
    holds the nominal rate (tests/analysis/test_dissection_statistics.py).
    """
    ex, ey = rank_residuals(x, control), rank_residuals(y, control)
    rho = correlation_rows(ex, ey)
    if not bool(torch.isfinite(rho)) or permutations < 1:
        return rho, torch.tensor(math.nan, dtype=torch.float64)
    perm = block_permutations(control, permutations, block, generator)
    null = correlation_rows(ex.expand(permutations, -1), ey[perm])
    hits = int((null.abs() >= rho.abs() - 1e-12).sum())
    return rho, torch.tensor((1 + hits) / (permutations + 1), dtype=torch.float64)


def holm(pvalues: dict[str, Tensor]) -> dict[str, Tensor]:
    """:func:`~pse_lightning.core.proportions.holm_adjust` over a named family of p-values
    (NaNs left out of the family), as float64 tensors under the same names."""
    adjusted = holm_adjust([float(v) for v in pvalues.values()])
    return {
        k: torch.tensor(p, dtype=torch.float64) for k, p in zip(pvalues, adjusted, strict=True)
    }


# Trained against random weights (issue 21) ------------------------------------------------


def partial_spearman_rows(x: Tensor, y: Tensor, z: Tensor) -> Tensor:
    """Partial Spearman ρ(x, y | z) of each row of (..., n) tensors.

    (ρ_xy − ρ_xz ρ_yz) / sqrt((1 − ρ_xz²)(1 − ρ_yz²)) on tie-averaged ranks: the same value
    as the correlation of the rank residuals of :func:`partial_spearman`, for many
    resamples at once. NaN where x or y is constant or z explains x or y entirely; a
    constant z gives the plain ρ.
    """
    rx, ry, rz = rank_rows(x), rank_rows(y), rank_rows(z)
    xy = correlation_rows(rx, ry)
    # A constant control explains nothing: the partial rho is then the plain one.
    xz = correlation_rows(rx, rz).nan_to_num(nan=0.0)
    yz = correlation_rows(ry, rz).nan_to_num(nan=0.0)
    denominator = ((1.0 - xz * xz) * (1.0 - yz * yz)).sqrt()
    ok = denominator > 1e-12
    out = (xy - xz * yz) / torch.where(ok, denominator, torch.ones_like(denominator))
    return torch.where(ok, out.clamp(-1.0, 1.0), torch.full_like(out, math.nan))


@dataclass(frozen=True)
class RankSample:
    """One network's units for ρ(x, y) or the partial ρ(x, y | z), with resampling rows.

    Attributes:
        x, y: (K,) the point values (unit sensitivity s_k and best IoU_k).
        z: (K,) the control of a partial ρ, or None for the plain Spearman ρ.
        x_rows, y_rows, z_rows: (R_v, K) the values in R_v bootstrap replicates over images
            (s over evaluation images, IoU over probe images), or None: the point values
            stand in every replicate. Replicate r uses row r mod R_v.
    """

    x: Tensor
    y: Tensor
    z: Tensor | None = None
    x_rows: Tensor | None = None
    y_rows: Tensor | None = None
    z_rows: Tensor | None = None

    @property
    def units(self) -> int:
        return len(self.x)

    def rho(self) -> Tensor:
        """ρ of the point values (a 0-d float64 tensor)."""
        return self._rho(self.x.view(1, -1), self.y.view(1, -1), self._point_z())[0]

    def _point_z(self) -> Tensor | None:
        return None if self.z is None else self.z.view(1, -1)

    def resampled(self, replicates: Tensor, pick: Tensor) -> Tensor:
        """ρ in replicates ``replicates`` (R,) with units ``pick`` (R, K) -> (R,)."""
        x, y = _rows(self.x, self.x_rows, replicates), _rows(self.y, self.y_rows, replicates)
        x, y = x.gather(1, pick), y.gather(1, pick)
        z = None if self.z is None else _rows(self.z, self.z_rows, replicates).gather(1, pick)
        return self._rho(x, y, z)

    @staticmethod
    def _rho(x: Tensor, y: Tensor, z: Tensor | None) -> Tensor:
        return spearman_rows(x, y) if z is None else partial_spearman_rows(x, y, z)


def _rows(point: Tensor, rows: Tensor | None, replicates: Tensor) -> Tensor:
    if rows is None or not len(rows):
        return point.double().view(1, -1).expand(len(replicates), -1)
    return rows.double()[replicates % len(rows)]


def rho_difference(
    a: RankSample, b: RankSample, replicates: int, generator: torch.Generator, chunk: int = 500
) -> dict[str, Tensor]:
    """Δρ = ρ_a − ρ_b of two networks' units, with its interval and p from one bootstrap.

    Replicate r resamples the units of each network with replacement (independently: the
    units of two networks are not paired) and uses image replicate r mod R of both, the same
    Poisson weights over evaluation and probe images for the two networks, so the noise they
    share cancels in the difference. Over the R finite replicates d_r:

    - interval: the 2.5 % and 97.5 % quantiles of d_r (percentile);
    - p: two-sided bootstrap p of the sign, min(1, 2 min(1 + #{d_r ≤ 0}, 1 + #{d_r ≥ 0}) /
      (R + 1)); it rejects at α exactly when the (1 − α) percentile interval excludes 0, up
      to the +1.

    Returns:
        ``delta_rho``, ``delta_rho_ci_low``, ``delta_rho_ci_high``, ``delta_rho_p``: 0-d
        float64 tensors (NaN when either ρ is undefined or a network has < 3 units).
    """
    nan = torch.tensor(math.nan, dtype=torch.float64)
    delta = a.rho() - b.rho()
    keys = ("delta_rho", "delta_rho_ci_low", "delta_rho_ci_high", "delta_rho_p")
    if not bool(torch.isfinite(delta)) or min(a.units, b.units) < 3 or replicates < 1:
        return dict(zip(keys, (delta, nan, nan.clone(), nan.clone()), strict=True))
    parts = []
    for start in range(0, replicates, chunk):
        r = torch.arange(start, min(start + chunk, replicates))
        pick_a = torch.randint(a.units, (len(r), a.units), generator=generator)
        pick_b = torch.randint(b.units, (len(r), b.units), generator=generator)
        parts.append(a.resampled(r, pick_a) - b.resampled(r, pick_b))
    d = torch.cat(parts)
    d = d[torch.isfinite(d)]
    low, high = percentile_ci(d)
    below, above = int((d <= 0).sum()), int((d >= 0).sum())
    p = min(1.0, 2.0 * min(1 + below, 1 + above) / (len(d) + 1))
    return dict(zip(keys, (delta, low, high, torch.tensor(p, dtype=torch.float64)), strict=True))
