"""Calibration and power of the dissection statistics, on synthetic data with known truth.

Each test of docs/METHODS.md §7 is run on synthetic data sets with the acceptance rules of
tests/calibration.py: its false-positive rate at α = 0.05 over 2000 null sets must be one a
test at 0.075 fails with probability ≥ 0.95; a two-sided test must reject at least 80% of
the sets with a planted effect in each direction, a one-sided one must not reject the
reversed effect; a bootstrap interval must cover a known rho at close to its nominal 95%
and be as wide as the spread of the estimates over the sets calls for (not wider).
"""

from __future__ import annotations

import math

import pytest
import scipy.stats
import torch
from calibration import (
    check_interval,
    check_two_sided,
    columns,
    fpr_region,
    one_thread,
    power_floor,
    rejections,
)
from torch import Tensor

from pse_lightning.analysis.dissection.statistics import (
    enrichment,
    holm,
    hypergeom_sf,
    mann_whitney_u,
    partial_spearman,
    permutation_pvalue,
    rank_residuals,
    spearman,
    spearman_rows,
    unit_bootstrap_ci,
)

ALPHA, UNITS = 0.05, 40
NULLS, POWER_SETS, COVERAGE_SETS = 2000, 500, 1200


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


def _interpretable(units: int, count: int, gen: torch.Generator | None) -> Tensor:
    """``count`` of ``units`` flagged interpretable: at random, or the first ones."""
    flags = torch.zeros(units, dtype=torch.bool)
    flags[torch.randperm(units, generator=gen)[:count] if gen else slice(0, count)] = True
    return flags


def _two_sided_enrichment(s: Tensor, interpretable: Tensor) -> float:
    """A mutant: the enrichment test made two-sided (either tail of the hypergeometric)."""
    observed, _, upper = enrichment(s, interpretable, 0.1)
    lower = 1 - hypergeom_sf(observed + 1, len(s), int(interpretable.sum()), 20)
    return min(1.0, 2 * min(upper, lower))


def _null_pvalues(sets: int, gen: torch.Generator) -> dict[str, Tensor]:
    """x, y independent (plain and partial tests); z drives both x and y, but given z they
    are independent (partial test; the plain test on them is "naive"); equal groups
    (Mann–Whitney); random labels (enrichment, and the off-by-one tail P(X > observed) as a
    mutant); five independent nulls per family (Holm's smallest adjusted p, and the
    smallest unadjusted p as a mutant)."""
    names = ("spearman", "naive", "partial", "mannwhitney", "enrichment", "enrichment_gt")
    out: dict[str, list[float]] = {k: [] for k in (*names, "holm", "raw")}
    for _ in range(sets):
        x, y = torch.randn(2, UNITS, generator=gen, dtype=torch.float64)
        out["spearman"].append(float(permutation_pvalue(x, y, 200, gen)))
        z = torch.randn(UNITS, generator=gen, dtype=torch.float64)
        xz, yz = x + 1.5 * z, y + 1.5 * z
        out["naive"].append(float(permutation_pvalue(xz, yz, 200, gen)))
        out["partial"].append(float(partial_spearman(xz, yz, z, 200, gen)[1]))
        out["mannwhitney"].append(float(mann_whitney_u(x[:15], y[15:])[1]))
        s = torch.randn(200, generator=gen, dtype=torch.float64)
        interp = _interpretable(200, 60, gen)
        observed, _, p = enrichment(s, interp, 0.1)
        out["enrichment"].append(p)
        out["enrichment_gt"].append(hypergeom_sf(observed + 1, 200, 60, 20))
        nulls = {str(i): torch.rand((), generator=gen, dtype=torch.float64) for i in range(5)}
        out["holm"].append(min(float(v) for v in holm(nulls).values()))
        out["raw"].append(min(float(v) for v in nulls.values()))
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in out.items()}


def _planted(sets: int, sign: int, gen: torch.Generator) -> dict[str, tuple[Tensor, Tensor]]:
    """(p, estimate) per test with an effect of ``sign``: rho = ±0.6 (plain; partial, with a
    control added to both), one group shifted by ±1 SD (Mann–Whitney; estimate U − n₁n₂/2),
    the 60 interpretable of 200 units shifted by ±1 SD in s (enrichment; estimate
    observed − expected; also the two-sided mutant's p)."""
    out: dict[str, list[tuple[float, float]]] = {
        k: [] for k in ("spearman", "partial", "mannwhitney", "enrichment", "enrichment2")
    }
    interp = _interpretable(200, 60, None)
    for _ in range(sets):
        x, y = correlated(UNITS, 0.6 * sign, gen)
        out["spearman"].append((float(permutation_pvalue(x, y, 200, gen)), float(spearman(x, y))))
        z = torch.randn(UNITS, generator=gen, dtype=torch.float64)
        rho, p = partial_spearman(x + z, y + z, z, 200, gen)
        out["partial"].append((float(p), float(rho)))
        group = torch.randn(40, generator=gen, dtype=torch.float64)
        group[:20] += sign * 1.0
        u, p = mann_whitney_u(group[:20], group[20:])
        out["mannwhitney"].append((float(p), float(u) - 200.0))
        s = torch.randn(200, generator=gen, dtype=torch.float64) + sign * interp.double()
        observed, expected, p = enrichment(s, interp, 0.1)
        out["enrichment"].append((p, observed - expected))
        out["enrichment2"].append((_two_sided_enrichment(s, interp), observed - expected))
    return {k: columns(v) for k, v in out.items()}


@pytest.mark.slow
def test_tests_hold_their_level_and_detect_effects_in_both_directions() -> None:
    """FPR over 2000 null sets and power over 500 sets per planted direction
    (tests/calibration.py; each check also shown to fail for an FPR-inflated and a one-sided
    mutant). The one-sided enrichment test must not reject the reversed effect (its
    two-sided mutant does); Holm holds the family-wise rate (no adjustment does not); the
    plain Spearman test rejects in most confounded nulls (what the partial test removes)."""
    with one_thread():
        null = _null_pvalues(NULLS, torch.Generator().manual_seed(1))
        up = _planted(POWER_SETS, 1, torch.Generator().manual_seed(2))
        down = _planted(POWER_SETS, -1, torch.Generator().manual_seed(3))
    for name in ("spearman", "partial", "mannwhitney"):
        check_two_sided(name, null[name], up[name], down[name])
    region = fpr_region(NULLS)
    for name in ("enrichment", "holm"):
        region.check(rejections(null[name]), f"{name} FPR")
    assert not region.accepts(rejections(null["holm"], alpha=0.075)), "FPR mutant passes"
    assert not region.accepts(rejections(null["raw"])), "no adjustment passes"
    # The hypergeometric p is discrete (0.035 of the nulls reject at 0.05 and at 0.075): its
    # mutant is the off-by-one tail P(X > observed).
    assert not region.accepts(rejections(null["enrichment_gt"])), "P(X > observed) passes"
    power_floor(POWER_SETS).check(rejections(*up["enrichment"], sign=1), "enrichment power")
    reversed_region = fpr_region(POWER_SETS, bad=None)
    reversed_region.check(rejections(down["enrichment"][0]), "enrichment on the reversed effect")
    assert not reversed_region.accepts(rejections(down["enrichment2"][0])), "two-sided mutant"
    assert rejections(null["naive"]) > 0.5 * NULLS  # the confound the partial test removes


def _unit_bootstrap_intervals(sets: int, r: float) -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(3)
    rows = []
    for _ in range(sets):
        s, iou = correlated(60, r, gen)
        rows.append((*unit_bootstrap_ci(s, iou, 300, gen), spearman(s, iou)))
    return columns(rows)  # low, high, estimate


@pytest.mark.slow
@pytest.mark.parametrize("r", [0.0, 0.5])
def test_unit_bootstrap_covers_the_true_rho(r: float) -> None:
    """Population Spearman rho of a bivariate normal: (6 / π) asin(r / 2); 1200 sets of 60
    units, coverage and width checked (tests/calibration.py)."""
    truth = 6.0 / math.pi * math.asin(r / 2.0)
    with one_thread():
        low, high, estimate = _unit_bootstrap_intervals(COVERAGE_SETS, r)
    check_interval(f"unit bootstrap r={r}", low, high, estimate, truth)


def _two_way_intervals(sets: int) -> dict[str, Tensor]:
    """Sets of 60 units whose (true sensitivity, IoU) are bivariate normal (r = 0.4), s
    measured as the mean over 40 evaluation images of per-image values (noise SD 1.5 per
    image, 0.24 on the mean) and 200 Poisson-bootstrap replicates over those images (the
    weights of the evaluation pass). Per set: the two-way interval, the images-only
    interval (percentiles of the replicates' rho, units fixed) and the estimate."""
    from pse_lightning.analysis.dissection.sensitivity import poisson_weights

    gen = torch.Generator().manual_seed(4)
    rows = []
    for rep in range(sets):
        s_true, iou = correlated(60, 0.4, gen)
        per_image = s_true + 1.5 * torch.randn(40, 60, generator=gen, dtype=torch.float64)
        weights = poisson_weights(torch.arange(40), 200, seed=rep)[:, 1:].T  # (200, 40)
        replicates = weights @ per_image / weights.sum(dim=1, keepdim=True)
        s = per_image.mean(dim=0)
        low, high = unit_bootstrap_ci(s, iou, 0, gen, s_images=replicates)
        rho = spearman_rows(replicates, iou.expand(200, -1))
        rows.append((low, high, rho.quantile(0.025), rho.quantile(0.975), spearman(s, iou)))
    names = ("low", "high", "images_low", "images_high", "estimate")
    return dict(zip(names, columns(rows), strict=True))


@pytest.mark.parametrize("sets", [200, pytest.param(COVERAGE_SETS, marks=pytest.mark.slow)])
def test_two_way_bootstrap_is_wider_than_images_alone_and_covers(sets: int) -> None:
    """s_k measured on a sample of images (a real sampling process, resampled by the
    Poisson bootstrap the evaluation pass uses): fixing the units (images only) ignores the
    units' sampling error and misses the true rho of (true sensitivity, IoU) far more often;
    the two-way interval covers it at close to 95% and is not too wide."""
    truth = 6.0 / math.pi * math.asin(0.4 / 2.0)
    with one_thread():
        out = _two_way_intervals(sets)
    check_interval("two-way", out["low"], out["high"], out["estimate"], truth, sets >= 1000)
    images_only = (out["images_low"] <= truth) & (truth <= out["images_high"])
    assert images_only.double().mean() < 0.5


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
    (s, the unit's concept coverage) at close to 95% over 500 sets, is as wide as the spread
    of the estimates calls for (a 1.5× wider one fails), and widens the units-only
    interval."""
    sets, truth = 500, 6.0 / math.pi * math.asin(0.4 / 2.0)
    gen = torch.Generator().manual_seed(5)
    rows = []
    with one_thread():
        for rep in range(sets):
            s, z = correlated(60, 0.4, gen)
            iou, boot_iou = _probe_iou((0.45 + 0.12 * z).clamp(0.05, 0.95), gen, seed=rep)
            low, high = unit_bootstrap_ci(s, iou, 0, gen, iou_probe=boot_iou)
            units_low, units_high = unit_bootstrap_ci(s, iou, 200, gen)
            rows.append((low, high, spearman(s, iou), units_high - units_low))
    low, high, estimate, units_width = columns(rows)
    check_interval("probe two-way", low, high, estimate, truth, strict=False)
    assert ((high - low) > units_width).double().mean() >= 0.8
