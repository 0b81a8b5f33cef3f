"""Calibration and power of the dissection statistics, on synthetic data with known truth.

Each test of docs/METHODS.md §7 is run on at least 200 synthetic data sets: under a null
its false-positive rate at α = 0.05 must lie in [0.02, 0.08]; with a planted effect it must
reject at least 80% of the time; the bootstrap intervals must cover a known rho at close to
their nominal 95%. Sizes are small and the resamples vectorised, so this stays fast.
"""

from __future__ import annotations

import math

import pytest
import scipy.stats
import torch
from torch import Tensor

from pse_lightning.analysis.dissection.statistics import (
    enrichment,
    holm,
    mann_whitney_u,
    partial_spearman,
    permutation_pvalue,
    rank_residuals,
    spearman,
    spearman_rows,
    unit_bootstrap_ci,
)

REPS, ALPHA, UNITS = 200, 0.05, 40


def correlated(n: int, r: float, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """n pairs from a bivariate normal with Pearson correlation r."""
    a = torch.randn(n, generator=gen, dtype=torch.float64)
    b = torch.randn(n, generator=gen, dtype=torch.float64)
    return a, r * a + math.sqrt(1 - r * r) * b


def rate(rejections: list[bool]) -> float:
    return sum(rejections) / len(rejections)


def test_vectorised_spearman_and_residuals_match_references() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 6, (4, 30), generator=gen).double()  # ties
    y = torch.randn(4, 30, generator=gen, dtype=torch.float64)
    for i in range(4):
        assert float(spearman_rows(x, y)[i]) == pytest.approx(float(spearman(x[i], y[i])))
    # Residuals of ranks on a control the values are a monotone function of: all zero.
    z = torch.randn(30, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(rank_residuals(z.exp(), z), torch.zeros(30, dtype=torch.float64))


def test_holm_adjusts_by_hand() -> None:
    p = {k: torch.tensor(v, dtype=torch.float64) for k, v in
         {"a": 0.01, "b": 0.04, "c": 0.03, "d": math.nan, "e": 0.5}.items()}  # fmt: skip
    adjusted = {k: float(v) for k, v in holm(p).items()}
    # sorted 0.01, 0.03, 0.04, 0.5 (m = 4): 0.04, max(0.04, 0.09), max(0.09, 0.08), 0.5
    assert adjusted["a"] == pytest.approx(0.04)
    assert adjusted["c"] == pytest.approx(0.09)
    assert adjusted["b"] == pytest.approx(0.09)
    assert adjusted["e"] == pytest.approx(0.5)
    assert math.isnan(adjusted["d"])


@pytest.mark.slow
def test_null_false_positive_rates_are_nominal() -> None:
    """x, y independent (plain and partial tests); z drives both x and y, but given z they
    are independent (partial test); equal groups (Mann–Whitney); random labels (enrichment);
    five independent nulls per family (Holm's family-wise rate)."""
    gen = torch.Generator().manual_seed(1)
    plain, partial, naive, mwu, enrich, family = [], [], [], [], [], []
    for _ in range(REPS):
        x, y = torch.randn(2, UNITS, generator=gen, dtype=torch.float64)
        plain.append(float(permutation_pvalue(x, y, 200, gen)) <= ALPHA)
        z = torch.randn(UNITS, generator=gen, dtype=torch.float64)
        xz, yz = x + 1.5 * z, y + 1.5 * z
        naive.append(float(permutation_pvalue(xz, yz, 200, gen)) <= ALPHA)
        partial.append(float(partial_spearman(xz, yz, z, 200, gen)[1]) <= ALPHA)
        mwu.append(float(mann_whitney_u(x[:15], y[15:])[1]) <= ALPHA)
        s = torch.randn(200, generator=gen, dtype=torch.float64)
        interp = torch.zeros(200, dtype=torch.bool)
        interp[torch.randperm(200, generator=gen)[:60]] = True
        enrich.append(enrichment(s, interp, 0.1)[2] <= ALPHA)
        nulls = {str(i): torch.rand((), generator=gen, dtype=torch.float64) for i in range(5)}
        family.append(any(float(v) <= ALPHA for v in holm(nulls).values()))
    for name, rejections in [("spearman", plain), ("partial", partial), ("mannwhitney", mwu),
                             ("enrichment", enrich), ("holm", family)]:  # fmt: skip
        assert 0.02 <= rate(rejections) <= 0.08, (name, rate(rejections))
    assert rate(naive) > 0.5  # the confound the partial test removes is real


@pytest.mark.slow
def test_planted_effects_are_detected() -> None:
    gen = torch.Generator().manual_seed(2)
    plain, partial, mwu, enrich = [], [], [], []
    for _ in range(REPS):
        x, y = correlated(UNITS, 0.6, gen)
        plain.append(float(permutation_pvalue(x, y, 200, gen)) <= ALPHA)
        z = torch.randn(UNITS, generator=gen, dtype=torch.float64)
        partial.append(float(partial_spearman(x + z, y + z, z, 200, gen)[1]) <= ALPHA)
        group = torch.randn(40, generator=gen, dtype=torch.float64)
        group[:20] += 1.0
        mwu.append(float(mann_whitney_u(group[:20], group[20:])[1]) <= ALPHA)
        # Interpretable units are the more sensitive ones: 60 of 200, s shifted by 1 SD.
        interp = torch.zeros(200, dtype=torch.bool)
        interp[:60] = True
        s = torch.randn(200, generator=gen, dtype=torch.float64) + interp.double()
        enrich.append(enrichment(s, interp, 0.1)[2] <= ALPHA)
    for name, rejections in [("spearman", plain), ("partial", partial), ("mannwhitney", mwu),
                             ("enrichment", enrich)]:  # fmt: skip
        assert rate(rejections) >= 0.8, (name, rate(rejections))


@pytest.mark.slow
@pytest.mark.parametrize("r", [0.0, 0.5])
def test_unit_bootstrap_covers_the_true_rho(r: float) -> None:
    """Population Spearman rho of a bivariate normal: (6 / π) asin(r / 2)."""
    truth = 6.0 / math.pi * math.asin(r / 2.0)
    gen = torch.Generator().manual_seed(3)
    covered = []
    for _ in range(REPS):
        s, iou = correlated(60, r, gen)
        low, high = unit_bootstrap_ci(s, iou, 300, gen)
        covered.append(float(low) <= truth <= float(high))
    assert 0.88 <= rate(covered) <= 0.99, rate(covered)


def test_two_way_bootstrap_is_wider_than_images_alone_and_covers() -> None:
    """s_k measured with noise: B image replicates jitter s around the per-unit estimate.
    Fixing the units (the previous interval) ignores the units' sampling error and misses
    the true rho far more often; the two-way interval covers it at close to 95%."""
    truth = 6.0 / math.pi * math.asin(0.4 / 2.0)
    gen = torch.Generator().manual_seed(4)
    two_way, images_only = [], []
    for _ in range(REPS):
        s, iou = correlated(60, 0.4, gen)
        replicates = s + 0.05 * torch.randn(200, 60, generator=gen, dtype=torch.float64)
        low, high = unit_bootstrap_ci(s, iou, 0, gen, s_images=replicates)
        two_way.append(float(low) <= truth <= float(high))
        rho = spearman_rows(replicates, iou.expand(200, -1))
        images_only.append(float(rho.quantile(0.025)) <= truth <= float(rho.quantile(0.975)))
    assert 0.88 <= rate(two_way) <= 0.99, rate(two_way)
    assert rate(images_only) < 0.5, rate(images_only)


def test_partial_spearman_matches_pingouin_style_reference() -> None:
    """Partial Spearman = Pearson correlation of rank residuals (checked with numpy)."""
    gen = torch.Generator().manual_seed(5)
    x, y, z = torch.randn(3, 50, generator=gen, dtype=torch.float64)
    x, y = x + z, y - z
    rho, _ = partial_spearman(x, y, z, 0, gen)
    rx, ry, rz = (torch.tensor(scipy.stats.rankdata(v.numpy())) for v in (x, y, z))
    design = torch.stack([torch.ones(50, dtype=torch.float64), rz], dim=1)
    res = [
        v - design @ torch.linalg.lstsq(design, v.view(-1, 1)).solution.view(-1) for v in (rx, ry)
    ]
    assert float(rho) == pytest.approx(float(torch.corrcoef(torch.stack(res))[0, 1]), abs=1e-12)


def _probe_iou(a: Tensor, gen: torch.Generator, seed: int, images: int = 40, side: int = 6):
    """Best IoUs of units whose masks cover a concept's pixels with probability a_k times
    a per-(image, unit) log-normal factor (mean 1), and 5% of the other pixels, on a probe
    set of ``images`` random label maps; with 200 Poisson replicates over probe images,
    tallied by the streaming code the probe pass uses."""
    from pse_lightning.analysis.dissection.sensitivity import PROBE_POISSON_STREAM, poisson_weights
    from pse_lightning.analysis.dissection.tally import (
        add_replicate_labels,
        add_sparse_tally,
        best_concepts,
        empty_replicates,
        empty_tally,
        iou_from_tally,
        label_area,
        replicate_best_iou,
    )

    units, category = len(a), torch.tensor([-1, 0])
    labels = (torch.rand(images, 1, side, side, generator=gen) < 0.25).long()
    factor = torch.exp(0.8 * torch.randn(images, units, 1, 1, generator=gen, dtype=torch.float64)
                       - 0.32)  # fmt: skip
    u = torch.rand(images, units, side, side, generator=gen, dtype=torch.float64)
    masks = torch.where(labels.bool(), u < (a.view(1, -1, 1, 1) * factor).clamp(0, 1), u < 0.05)
    tally = empty_tally(units, 1, 1, torch.device("cpu"))
    reps = empty_replicates(200, tally)
    weights = poisson_weights(torch.arange(images), 200, seed, PROBE_POISSON_STREAM)[:, 1:]
    half = torch.full((units,), 0.5)
    add_sparse_tally(tally, masks.float(), half, half, labels, (reps, weights))
    tally.label_area += label_area(labels, 1)
    add_replicate_labels(reps, labels, weights)
    return best_concepts(iou_from_tally(tally, category))[0], replicate_best_iou(reps, category)


@pytest.mark.slow
def test_two_way_bootstrap_over_probe_images_covers_the_true_rho() -> None:
    """IoU measured on a finite probe set (each unit's coverage of the concept varies from
    image to image): resampling probe images with the units covers the population rho of
    (s, the unit's concept coverage) at close to 95%, and widens the units-only interval."""
    truth = 6.0 / math.pi * math.asin(0.4 / 2.0)
    gen = torch.Generator().manual_seed(5)
    covered, wider = [], []
    for rep in range(REPS):
        s, z = correlated(60, 0.4, gen)
        iou, boot_iou = _probe_iou((0.45 + 0.12 * z).clamp(0.05, 0.95), gen, seed=rep)
        low, high = unit_bootstrap_ci(s, iou, 0, gen, iou_probe=boot_iou)
        covered.append(float(low) <= truth <= float(high))
        units_low, units_high = unit_bootstrap_ci(s, iou, 200, gen)
        wider.append(float(high - low) > float(units_high - units_low))
    assert 0.9 <= rate(covered) <= 0.99, rate(covered)
    assert rate(wider) >= 0.8, rate(wider)
