"""Two training procedures compared over seeds (docs/METHODS.md §7.6): the t-test on the
per-seed paired differences, its known answers, its level under a planted seed-level null
with S = 3 seeds, its power, the seeds a 2-point difference needs, and the old per-seed
McNemar test shown to be no procedure test."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from calibration import (
    check_two_sided,
    columns,
    coverage_region,
    fpr_region,
    one_thread,
    power_floor,
    rejections,
)
from scipy.stats import nct, norm, t, ttest_1samp
from test_sweep import _seeded_sweep
from torch import Tensor

from pse_lightning.core.findings import INCONCLUSIVE, Finding, judge, verdict
from pse_lightning.core.proportions import mcnemar_exact
from pse_lightning.core.replicates import procedure_difference, seed_t_test
from pse_lightning.reporting.sweep import write_comparison
from pse_lightning.reporting.sweep_jobs import Job
from pse_lightning.reporting.sweep_stats import (
    PROCEDURE_GAIN,
    Comparison,
    comparison_findings,
    simultaneous,
)

# The study's size: 500 test images, robust accuracy about 0.8; two robust variants of the
# same seed disagree on about 8 % of the images (README, "Robust vs standard training").
IMAGES = 500
ACC = 0.8
# Image difficulty SD on the probit scale: with it two models get about 7.7 % of the
# images discordant at accuracy 0.8 (measured in test_the_simulated_models_look_like_the_study).
TAU = 4.0
DISCORDANT = 0.077


def _probit(acc: float, tau: float = TAU) -> tuple[float, float]:
    """(intercept, slope) of a procedure of accuracy ``acc`` (no seed or procedure-by-image
    effects): its latent intercept and the derivative of accuracy with respect to a latent
    shift there (turns sigma_seed on the accuracy scale into a latent SD)."""
    scale = math.sqrt(tau**2 + 1)
    return float(norm.ppf(acc)) * scale, float(norm.pdf(norm.ppf(acc))) / scale


def simulate(
    gen: torch.Generator,
    sets: int,
    seeds: int,
    *,
    sigma_seed: float,
    delta: float = 0.0,
    omega: float = 0.0,
    images: int = IMAGES,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-image outcomes of procedures A and B, (sets, seeds, images) bool each, and the
    true difference of their accuracies on each set's test images, (sets,).

    Probit model: image i is correct for the model of procedure V trained with seed s when
    c_V + z_i ± w_i / 2 + a_Vs + e_Vsi > 0. z_i ~ N(0, TAU²): image difficulty, shared by
    every model (the outcomes of the two variants are correlated through it, as real paired
    models are); a_Vs: the seed's model lands at its own accuracy, SD ``sigma_seed`` on the
    accuracy scale, independent between A and B; e ~ N(0, 1): which images a trained model
    happens to get right; w_i ~ N(0, ``omega``²): images one procedure protects better than
    the other (0 on average). Every seed is evaluated on the same test images. Over images
    and seeds, A's accuracy is ACC + ``delta`` and B's ACC.
    """
    sigma_a = sigma_seed / _probit(ACC)[1]
    scale = math.sqrt(TAU**2 + 1 + sigma_a**2 + omega**2 / 4)
    z = TAU * torch.randn(sets, 1, images, generator=gen, dtype=torch.float64)
    w = omega * torch.randn(sets, 1, images, generator=gen, dtype=torch.float64)
    out, truth = [], []
    for acc, sign in ((ACC + delta, 1.0), (ACC, -1.0)):
        a = sigma_a * torch.randn(sets, seeds, 1, generator=gen, dtype=torch.float64)
        e = torch.randn(sets, seeds, images, generator=gen, dtype=torch.float64)
        latent = float(norm.ppf(acc)) * scale + z + sign * w / 2
        out.append(latent + a + e > 0)
        # P(correct) of image i over the training seeds: Φ(latent / sqrt(1 + σ_a²)).
        truth.append(torch.special.ndtr(latent / math.sqrt(1 + sigma_a**2)).mean((-2, -1)))
    return out[0], out[1], truth[0] - truth[1]


def procedure_p(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(p, estimate, low, high) of the procedure test on every set."""
    differences = a.double().mean(-1) - b.double().mean(-1)  # (sets, seeds)
    mean, _, low, high, p = seed_t_test(differences)
    return p, mean, low, high


# Known answers ---------------------------------------------------------------------------


def test_seed_t_test_is_the_one_sample_t_test_and_interval() -> None:
    d = torch.tensor([[0.01, -0.02, 0.035], [0.03, 0.05, 0.04]], dtype=torch.float64)
    mean, sd, low, high, p = seed_t_test(d)
    for i in range(2):
        ref = ttest_1samp(d[i].numpy(), 0.0)
        lo, hi = ref.confidence_interval(0.95)
        assert float(p[i]) == pytest.approx(ref.pvalue, rel=1e-10)
        assert (float(low[i]), float(high[i])) == pytest.approx((lo, hi), rel=1e-10)
        assert float(sd[i]) == pytest.approx(float(d[i].std()), rel=1e-12)
    # By hand, seeds 0.03, 0.05, 0.04: mean 0.04, sd 0.01, t = 0.04 / (0.01 / √3) = 6.93.
    assert float(mean[1]) == pytest.approx(0.04)
    assert float(high[1] - mean[1]) == pytest.approx(t.ppf(0.975, 2) * 0.01 / math.sqrt(3))
    assert float(p[1]) == pytest.approx(2 * t.sf(0.04 / (0.01 / math.sqrt(3)), 2))
    assert p.dtype == torch.float64
    # One-sided: scipy's "greater" and "less"; row 0 has a positive mean (p < 0.5 for
    # greater), and the two one-sided p add up to 1.
    for alternative in ("greater", "less"):
        one = seed_t_test(d, alternative=alternative)[4]
        for i in range(2):
            ref = ttest_1samp(d[i].numpy(), 0.0, alternative=alternative).pvalue
            assert float(one[i]) == pytest.approx(ref, rel=1e-10)
    assert float(seed_t_test(d, alternative="greater")[4][1]) == pytest.approx(float(p[1]) / 2)
    with pytest.raises(ValueError, match="alternative"):
        seed_t_test(d, alternative="bigger")
    with pytest.raises(ValueError, match="at least 2 seeds"):
        seed_t_test(torch.tensor([0.1]))
    # No spread and a one-sided alternative: still p = 1 (no evidence), either side.
    flat = torch.tensor([[0.0, 0.0], [0.02, 0.02], [-0.02, -0.02]], dtype=torch.float64)
    assert seed_t_test(flat, alternative="greater")[4].tolist() == [1.0, 1.0, 1.0]


def test_no_seed_to_seed_spread_gives_a_defined_honest_result() -> None:
    """Every seed gives the same difference (SD 0, also up to the rounding of differences of
    accuracies): p is 1, never 0; the interval is the point 0 for a zero difference (two
    identical procedures) and unbounded otherwise, so the verdict is not "supported" on a
    spread the seeds never showed. No NaN, no warning."""
    import warnings

    same = [0.3 - 0.1, 0.5 - 0.3, 0.7 - 0.5]  # 0.2 each, unequal in the last bits
    assert len(set(same)) > 1
    d = torch.tensor([[0.0, 0.0, 0.0], [0.004, 0.004, 0.004], same, [-0.01, -0.01, -0.01]],
                     dtype=torch.float64)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mean, sd, low, high, p = seed_t_test(d)
    assert p.tolist() == [1.0, 1.0, 1.0, 1.0] and p.dtype == torch.float64
    assert (float(low[0]), float(high[0])) == (0.0, 0.0)
    assert low[1:].tolist() == [-math.inf] * 3 and high[1:].tolist() == [math.inf] * 3
    assert float(mean[3]) == pytest.approx(-0.01) and float(sd[3]) == 0.0
    # a tiny but real spread is an ordinary t-test
    _, _, low, high, p = seed_t_test(torch.tensor([0.004, 0.004, 0.006], dtype=torch.float64))
    assert 0 < float(p) < 1 and math.isfinite(float(low)) and math.isfinite(float(high))
    # one procedure ahead by the same 3 images in 500 on every seed: inconclusive, flagged
    a = torch.zeros(500, dtype=torch.bool)
    a[:3] = True
    stats = procedure_difference([(a, torch.zeros(500, dtype=torch.bool))] * 3)
    assert stats["degenerate"] and stats["p"] == 1.0 and stats["ci_low"] == -math.inf
    finding = Finding(
        "k", "c", "e", "t", estimate=stats["difference"], low=stats["ci_low"],
        high=stats["ci_high"], p=stats["p"], direction="greater", size=0.02,
    )  # fmt: skip
    assert verdict(finding, 1.0) == INCONCLUSIVE


def test_procedure_difference_pairs_seed_s_with_seed_s() -> None:
    """Seed 0: A 3/4 against B 1/4; seed 1: A 2/4 against B 2/4. The per-seed accuracies
    and differences are the paired seeds', not a pooled mean."""
    a0, b0 = torch.tensor([1, 1, 1, 0]).bool(), torch.tensor([1, 0, 0, 0]).bool()
    a1, b1 = torch.tensor([1, 1, 0, 0]).bool(), torch.tensor([0, 0, 1, 1]).bool()
    stats = procedure_difference([(a0, b0), (a1, b1)])
    assert stats["acc_variant"] == [0.75, 0.5] and stats["acc_baseline"] == [0.25, 0.5]
    assert stats["differences"] == [0.5, 0.0]
    assert stats["difference"] == pytest.approx(0.25)
    assert stats["sd_difference"] == pytest.approx(math.sqrt(0.125))
    # df = 1: t = 0.25 / (0.3536 / √2) = 1, a Cauchy's two-sided tail at 1 is 0.5.
    assert stats["p"] == pytest.approx(0.5)
    assert (stats["seeds"], stats["n"]) == (2, 4)


# The simulation ---------------------------------------------------------------------------


def test_the_simulated_models_look_like_the_study() -> None:
    """Accuracy about 0.8, about 7.7 % of the images discordant between two models of the
    same seed, and each procedure's per-seed accuracy spread by sigma_seed."""
    gen = torch.Generator().manual_seed(0)
    a, b, truth = simulate(gen, 400, 5, sigma_seed=0.02)
    assert float(a.double().mean()) == pytest.approx(ACC, abs=0.01)
    assert float((a != b).double().mean()) == pytest.approx(DISCORDANT, abs=0.005)
    # Seed-to-seed SD of one procedure's accuracy: sigma_seed and the binomial image noise
    # of that model (e: about 0.012 at 500 images, from its own seed-by-image draws).
    spread = a.double().mean(-1).std(-1).pow(2).mean().sqrt()
    assert float(spread) == pytest.approx(math.sqrt(0.02**2 + 0.012**2), rel=0.1)
    assert float(truth.abs().max()) < 1e-12  # delta = 0: the same procedure


# Calibration and power -----------------------------------------------------------------

SIGMAS = (0.005, 0.01, 0.02)
# (seeds, sigma_seed) -> the difference planted for the power checks.
PLANTED = {(3, 0.005): 0.08, (3, 0.01): 0.08, (3, 0.02): 0.12, (5, 0.01): 0.05}


def _null_and_planted(
    sets: int, seeds: int, sigma: float, delta: float, seed: int
) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...], tuple[Tensor, ...]]:
    gen = torch.Generator().manual_seed(seed)
    null = procedure_p(*simulate(gen, sets, seeds, sigma_seed=sigma)[:2])
    up = procedure_p(*simulate(gen, sets // 4, seeds, sigma_seed=sigma, delta=delta)[:2])
    down = procedure_p(*simulate(gen, sets // 4, seeds, sigma_seed=sigma, delta=-delta)[:2])
    return null, up, down


def test_procedure_test_holds_its_level_with_three_seeds_fast() -> None:
    """Smoke version of the slow check: 200 null sets of 3 seeds (sigma_seed 0.01), power on
    +/-0.08 (3 seeds) in 50 sets each."""
    null, up, down = _null_and_planted(200, 3, 0.01, 0.08, seed=1)
    check_two_sided("procedure t", null[0], up[:2], down[:2], strict=False)


@pytest.mark.slow
@pytest.mark.parametrize(("seeds", "sigma"), [(3, s) for s in SIGMAS] + [(5, 0.01)])
def test_procedure_test_holds_its_level_under_a_seed_null(seeds: int, sigma: float) -> None:
    """2000 null sets (each procedure's seeds land at their own accuracy, SD sigma; images
    correlated between the variants): FPR within tests/calibration.py's bound, and the
    same test rejecting at p <= 0.075 outside it; power >= 0.8 on a planted difference in
    each direction (PLANTED: large enough for power well above 0.8; the power of a 2-point
    difference is test_the_seed_table_holds_in_simulation's). The 95 % interval covers
    each set's true difference (on its test images) in a share coverage_region accepts
    (calibration.check_interval's width ratio does not apply: on 2 df the t interval is by
    design about twice the width of a normal interval from the true SD)."""
    delta = PLANTED[seeds, sigma]
    null, up, down = _null_and_planted(2000, seeds, sigma, delta, seed=2)
    rates = check_two_sided("procedure t", null[0], up[:2], down[:2])
    gen = torch.Generator().manual_seed(3)
    a, b, truth = simulate(gen, 1200, seeds, sigma_seed=sigma, delta=0.03)
    _, _, low, high = procedure_p(a, b)
    covered = int(((low <= truth) & (truth <= high)).sum())
    coverage_region(1200).check(covered, "procedure t interval coverage")
    print(f"S={seeds} sigma={sigma}: {rates}, coverage {covered / 1200:.4f}")


@pytest.mark.slow
def test_the_test_is_about_the_test_set_when_procedures_favour_different_images() -> None:
    """Procedures equal on average over images, but each protecting its own images better
    (omega = 2: w_i ~ N(0, 4) on the probit scale), every seed on the same test images: the
    interval covers the test set's true difference (what it claims) in a share
    coverage_region accepts, while "the procedures differ over the image population" is
    rejected in more than a level-0.05 test may show (the rate is in docs/METHODS.md
    §7.12: the cost of holding the test images fixed)."""
    gen = torch.Generator().manual_seed(9)
    a, b, truth = simulate(gen, 2000, 3, sigma_seed=0.01, omega=2.0)
    p, _, low, high = procedure_p(a, b)
    covered = int(((low <= truth) & (truth <= high)).sum())
    coverage_region(2000).check(covered, "coverage of the test set's difference")
    population = rejections(p)
    assert not fpr_region(2000).accepts(population), population
    print(f"omega=2: coverage {covered / 2000:.4f}, population FPR {population / 2000:.4f}")


def _bootstrap_over_seeds(differences: Tensor, gen: torch.Generator, reps: int = 1000) -> Tensor:
    """Two-sided percentile-bootstrap p over seeds (the scheme rejected in §7.6): twice the
    smaller share of resampled means on either side of 0."""
    sets, seeds = differences.shape
    idx = torch.randint(seeds, (sets, reps, seeds), generator=gen)
    means = torch.gather(differences[:, None, :].expand(-1, reps, -1), 2, idx).mean(-1)
    below = (means <= 0).double().mean(-1)
    return (2 * torch.minimum(below, 1 - below)).clamp(max=1.0)


def test_a_bootstrap_over_three_seeds_does_not_hold_its_level() -> None:
    """The alternative scheme, for the record: a percentile bootstrap over 3 seeds has 10
    distinct resamples and rejects far more than 5 % of null sets (a t with z quantiles,
    the large-sample shortcut, too)."""
    gen = torch.Generator().manual_seed(4)
    a, b, _ = simulate(gen, 400, 3, sigma_seed=0.01)
    differences = a.double().mean(-1) - b.double().mean(-1)
    boot = rejections(_bootstrap_over_seeds(differences, gen))
    z = differences.mean(-1).abs() / (differences.std(-1) / math.sqrt(3))
    normal = rejections(2 * torch.special.ndtr(-z))
    region = fpr_region(400, bad=None)
    assert not region.accepts(boot) and not region.accepts(normal), (boot, normal)
    region.check(rejections(procedure_p(a, b)[0]), "t over seeds")


# The old test, read as a procedure test ---------------------------------------------------


def _mcnemar_as_procedure_test(a: Tensor, b: Tensor) -> Tensor:
    """Seed 0's exact McNemar p on every set (the per-seed row, read as a verdict on the
    procedures)."""
    return torch.tensor([mcnemar_exact(x[0], y[0]) for x, y in zip(a, b, strict=True)])


def test_the_per_seed_mcnemar_is_no_procedure_test() -> None:
    """Under a seed null (sigma_seed 0.01: the procedures are equal, their trained models
    are not), McNemar on one seed's two models rejects in about 14 % of the sets: it tests
    the two models, and the training noise between them is a real difference between those
    models. The procedure test on the same sets holds its level."""
    gen = torch.Generator().manual_seed(5)
    with one_thread():
        a, b, _ = simulate(gen, 300, 3, sigma_seed=0.01)
        mcnemar = rejections(_mcnemar_as_procedure_test(a, b))
    region = fpr_region(300, bad=None)
    assert mcnemar / 300 > 0.12 and not region.accepts(mcnemar), mcnemar
    region.check(rejections(procedure_p(a, b)[0]), "t over seeds")


@pytest.mark.slow
def test_the_per_seed_mcnemar_rejects_the_seed_null_at_every_spread() -> None:
    """2000 null sets per sigma_seed: the per-seed McNemar's rate of "the procedures
    differ" (numbers in docs/METHODS.md §7.12): beyond the bound of a level-0.05 test from
    sigma_seed 0.01 on (at 0.005 the training noise is small beside the image noise, and
    the exact test, conservative on its own null, lands near 0.05)."""
    for sigma in SIGMAS:
        gen = torch.Generator().manual_seed(6)
        with one_thread():
            a, b, _ = simulate(gen, 2000, 1, sigma_seed=sigma)
            rate = rejections(_mcnemar_as_procedure_test(a, b))
        if sigma >= 0.01:
            assert not fpr_region(2000).accepts(rate), (sigma, rate)
        print(f"McNemar as a procedure test, sigma={sigma}: {rate / 2000:.4f}")


# Through the sweep's Findings ----------------------------------------------------------


def _verdicts(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """(p, estimate) per set of the sweep's procedure claim "pse_at is more robust than
    pgd_at", p = 0 where it is supported and 1 otherwise."""
    index = torch.arange(a.shape[-1])
    rows = []
    for x, y in zip(a, b, strict=True):
        jobs = [
            Job(dir=f"{v}{s}", overrides={}, attack_choice="pgd", attack="pgd", variant=v,
                seed=str(s), outcomes={"index": index, "clean_correct": torch.ones_like(o[s]),
                                       "adv_correct": o[s]})
            for v, o in (("pse_at", x), ("pgd_at", y))
            for s in range(a.shape[1])
        ]  # fmt: skip
        plan = [Comparison("pse_at", "pgd_at", "robust", "pgd", True, str(s), True)
                for s in range(a.shape[1])]  # fmt: skip
        found = comparison_findings(jobs, plan)[0][0]
        assert found.key == "robust/pse_at_vs_pgd_at/pgd" and found.size == PROCEDURE_GAIN
        rows.append((found.verdict != "supported", found.estimate))
    return columns(rows)


def test_the_sweep_claim_over_seeds_holds_its_level_and_finds_a_gain() -> None:
    """The sweep's verdict on the procedure claim, 3 seeds, sigma_seed 0.01: "supported" in
    no more null sets than a level-0.05 test may show, and in >= 80 % with a gain of 0.08;
    never for a loss of 0.08 (a one-sided claim)."""
    gen = torch.Generator().manual_seed(7)
    with one_thread():
        null = _verdicts(*simulate(gen, 100, 3, sigma_seed=0.01)[:2])
        gain = _verdicts(*simulate(gen, 50, 3, sigma_seed=0.01, delta=0.08)[:2])
        loss = _verdicts(*simulate(gen, 50, 3, sigma_seed=0.01, delta=-0.08)[:2])
    fpr_region(100, bad=None).check(rejections(null[0]), "supported under the null")
    power_floor(50).check(rejections(*gain, sign=1), "supported with a gain")
    assert rejections(loss[0]) == 0


# How many seeds -----------------------------------------------------------------------


def seeds_for(delta: float, sigma: float, power: float = 0.8, images: int = IMAGES) -> int:
    """The fewest seeds whose t-test over seeds (two-sided, 0.05, one claim, no Holm)
    detects ``delta`` with ``power``: the per-seed difference has variance 2 sigma² (two
    independently trained models) + DISCORDANT / images (which images they get right)."""
    sd = math.sqrt(2 * sigma**2 + DISCORDANT / images)
    for seeds in range(2, 200):
        df, ncp = seeds - 1, delta / (sd / math.sqrt(seeds))
        crit = t.ppf(0.975, df)
        if nct.sf(crit, df, ncp) + nct.cdf(-crit, df, ncp) >= power:
            return seeds
    raise ValueError(f"more than 200 seeds for {delta} at sigma {sigma}")


SEEDS_FOR_TWO_POINTS = {0.005: 7, 0.01: 10, 0.02: 21}


def test_seeds_for_a_two_point_difference() -> None:
    """The table of docs/METHODS.md §7.6 and the README (noncentral t)."""
    assert {s: seeds_for(0.02, s) for s in SIGMAS} == SEEDS_FOR_TWO_POINTS


@pytest.mark.slow
@pytest.mark.parametrize("sigma", SIGMAS)
def test_the_seed_table_holds_in_simulation(sigma: float) -> None:
    """With the table's number of seeds the simulated study detects a planted 2-point
    difference (supported: p < 0.05 with the estimate above 0) in >= 0.8 of 1000 sets less
    a binomial allowance (the table is at the edge of 0.8 by construction); with 3 seeds
    it does not."""
    seeds = SEEDS_FOR_TWO_POINTS[sigma]
    gen = torch.Generator().manual_seed(8)
    p, estimate, _, _ = procedure_p(*simulate(gen, 1000, seeds, sigma_seed=sigma, delta=0.02)[:2])
    power = rejections(p, estimate, sign=1) / 1000
    p3, estimate3, _, _ = procedure_p(*simulate(gen, 1000, 3, sigma_seed=sigma, delta=0.02)[:2])
    power3 = rejections(p3, estimate3, sign=1) / 1000
    print(f"sigma={sigma}: {seeds} seeds power {power:.3f}; 3 seeds {power3:.3f}")
    assert power >= 0.77 and power3 < 0.6


# A seeded sweep on disk ----------------------------------------------------------------

# seed -> training -> the first k of 400 images survive PGD; pse_at − pgd_at = 0.10, 0.12,
# 0.11 (mean 0.11, seed-to-seed SD 0.01).
THREE_SEEDS = {
    "0": {"standard": 8, "pgd_at": 200, "pse_at": 240},
    "1": {"standard": 12, "pgd_at": 210, "pse_at": 258},
    "2": {"standard": 10, "pgd_at": 190, "pse_at": 234},
}


@pytest.fixture
def three_seeds(tmp_path: Path) -> Path:
    return _seeded_sweep(tmp_path, THREE_SEEDS)


def test_a_three_seed_sweep_opens_with_the_procedure_finding(three_seeds: Path) -> None:
    """Old main: the row over seeds was untestable and the report opened with the per-seed
    McNemar tests, all in one Holm family with the clean comparisons."""
    text = write_comparison(three_seeds).read_text()
    result = json.loads((three_seeds / "comparison.json").read_text())
    rows = {r["key"]: r for r in result["comparisons"]}
    row = rows["robust/pse_at_vs_pgd_at/pgd"]
    ref = ttest_1samp([0.10, 0.12, 0.11], 0.0)
    # "more robust": the one-sided t p (half the two-sided p here: the mean is above 0).
    one_sided = ttest_1samp([0.10, 0.12, 0.11], 0.0, alternative="greater").pvalue
    assert row["p"] == pytest.approx(one_sided, rel=1e-9)
    assert row["p"] == pytest.approx(ref.pvalue / 2, rel=1e-9)
    assert (row["ci_low"], row["ci_high"]) == pytest.approx(ref.confidence_interval(0.95))
    assert row["sd_difference"] == pytest.approx(0.01)
    assert row["acc_variant"] == pytest.approx([0.6, 0.645, 0.585])
    assert row["acc_baseline"] == pytest.approx([0.5, 0.525, 0.475])
    # Holm over the 3 procedure claims only: this one has the largest p (rank 3, x1).
    assert row["p_holm"] == pytest.approx(row["p"])
    assert result["verdicts"]["robust/pse_at_vs_pgd_at/pgd"] == "supported"
    assert row["size"] == PROCEDURE_GAIN
    # "Not supported" reads the simultaneous interval of the 3-claim family: the t interval
    # at 1 − 0.05/3.
    simultaneous_ci = ref.confidence_interval(1 - 0.05 / 3)
    assert (row["simultaneous_low"], row["simultaneous_high"]) == pytest.approx(simultaneous_ci)
    assert row["simultaneous_confidence"] == pytest.approx(1 - 0.05 / 3)
    first = text.index("\n## ")
    assert text[first:].startswith("\n## Findings: training procedures (seeds as replicates)")
    assert (
        "| pse_at is more robust than pgd_at under pgd | +0.110 [+0.085, +0.135], "
        "seed-to-seed SD 0.010 over 3 seeds: 0.600 − 0.500 (seed 0), 0.645 − 0.525 (seed 1), "
        "0.585 − 0.475 (seed 2); simultaneous 98.3 % interval [+0.066, +0.154] | "
        "t-test over training seeds" in text
    )


def test_a_seed_without_outcomes_is_left_out_of_the_procedure_test(three_seeds: Path) -> None:
    for job in ("6", "7", "8"):  # seed 2's outcomes missing
        (three_seeds / job / "outcomes.json").unlink()
    write_comparison(three_seeds)
    result = json.loads((three_seeds / "comparison.json").read_text())
    row = next(r for r in result["comparisons"] if r["key"] == "robust/pse_at_vs_pgd_at/pgd")
    assert row["n_seeds"] == 2 and row["differences"] == pytest.approx([0.10, 0.12])
    assert result["verdicts"]["robust/pse_at_vs_pgd_at/pgd/seed=2"] == "not measured"
    text = (three_seeds / "comparison.md").read_text()
    assert "seed(s) 2 without per-image outcomes left out" in text


# "Not supported" across a family of settings (docs/METHODS.md §7.6) ----------------------


def simulate_family(
    gen: torch.Generator,
    sets: int,
    seeds: int,
    settings: int,
    *,
    sigma_seed: float,
    delta: float,
    images: int = IMAGES,
) -> Tensor:
    """Per-seed differences d_s of ``settings`` procedures against one shared baseline,
    (sets, settings, seeds): :func:`simulate`'s model (image difficulty shared by every
    model, each seed's model at its own accuracy, per-model image noise) with every setting
    ACC + ``delta`` and the baseline ACC, all on the same test images; the settings share
    the baseline's models, so their claims are correlated as in the ablation."""
    sigma_a = sigma_seed / _probit(ACC)[1]
    scale = math.sqrt(TAU**2 + 1 + sigma_a**2)
    z = TAU * torch.randn(sets, 1, 1, images, generator=gen, dtype=torch.float64)

    def accuracy(acc: float, k: int) -> Tensor:
        a = sigma_a * torch.randn(sets, k, seeds, 1, generator=gen, dtype=torch.float64)
        e = torch.randn(sets, k, seeds, images, generator=gen, dtype=torch.float64)
        return (float(norm.ppf(acc)) * scale + z + a + e > 0).double().mean(-1)

    return accuracy(ACC + delta, settings) - accuracy(ACC, 1)


def _family_verdicts(differences: Tensor, family_wise: bool = True) -> list[list[str]]:
    """The sweep's verdicts on "setting k is more robust than the baseline" for each set of
    (sets, settings, seeds) per-seed differences: one Holm family per set, judged by
    sweep_stats.simultaneous and core.findings.judge (old main: the 95 % interval,
    ``family_wise=False``)."""
    mean, _, low, high, p = seed_t_test(differences, alternative="greater")
    out = []
    for s in range(differences.shape[0]):
        built = []
        for k in range(differences.shape[1]):
            finding = Finding(
                f"robust/s{k}_vs_pgd_at", "more robust", "", "t over seeds",
                estimate=float(mean[s, k]), low=float(low[s, k]), high=float(high[s, k]),
                p=float(p[s, k]), direction="greater", size=PROCEDURE_GAIN,
            )  # fmt: skip

            def widen(confidence: float, d: Tensor = differences[s, k]) -> tuple[float, float]:
                _, _, lo, hi, _ = seed_t_test(d, confidence)
                return float(lo), float(hi)

            built.append((finding, {}, widen if family_wise else None))
        members = simultaneous(built)
        judged = judge([f for f, _, _ in members], [w for _, _, w in members])
        out.append([f.verdict for f in judged])
    return out


def _any_not_supported(verdicts: list[list[str]]) -> int:
    return sum(any(v == "not supported" for v in row) for row in verdicts)


def test_not_supported_is_judged_from_simultaneous_intervals() -> None:
    """Known answer: 10 claims, seeds 0.00, 0.005, 0.0025 (mean 0.0025, SD 0.0025): the 95 %
    t interval's upper limit 0.0087 is below the 2-point size (old main: not supported); the
    simultaneous interval at 1 − 0.05/10 reaches 0.0228 (t_{0.9975, 2} = 14.09): not
    excluded, inconclusive. With one claim in the family the two coincide."""
    d = torch.tensor([0.0, 0.005, 0.0025], dtype=torch.float64)
    family = d.expand(1, 10, 3)
    assert _family_verdicts(family, family_wise=False)[0] == ["not supported"] * 10
    assert _family_verdicts(family)[0] == ["inconclusive"] * 10
    assert _family_verdicts(family[:, :1])[0] == ["not supported"]
    hi = 0.0025 + t.ppf(1 - 0.05 / 20, 2) * 0.0025 / math.sqrt(3)
    assert hi == pytest.approx(0.0228, abs=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("sigma", [0.01, 0.02])
def test_a_family_of_settings_at_the_claimed_gain_is_rarely_called_not_supported(
    sigma: float,
) -> None:
    """2000 simulated ablations of 10 settings, each with a real +0.02 gain over the shared
    baseline (the claimed size), 3 seeds: the share of ablations with at least one "not
    supported" is within tests/calibration.py's bound for a level-0.05 test; judged from
    the 95 % intervals (old main) it is far beyond it. Power: with a true −0.05 effect a
    setting is still called not supported in the share printed and stated in
    docs/METHODS.md §7.12 (at least a tenth of the settings at sigma_seed 0.01)."""
    gen = torch.Generator().manual_seed(11)
    with one_thread():
        at_size = simulate_family(gen, 2000, 3, 10, sigma_seed=sigma, delta=PROCEDURE_GAIN)
        new, old = _family_verdicts(at_size), _family_verdicts(at_size, family_wise=False)
        loss = _family_verdicts(simulate_family(gen, 200, 3, 10, sigma_seed=sigma, delta=-0.05))
        loss_old = _family_verdicts(
            simulate_family(gen, 200, 3, 10, sigma_seed=sigma, delta=-0.05), family_wise=False
        )
    fwer, fwer_old = _any_not_supported(new), _any_not_supported(old)
    power = sum(v == "not supported" for row in loss for v in row) / 2000
    power_old = sum(v == "not supported" for row in loss_old for v in row) / 2000
    print(
        f"sigma={sigma}: any 'not supported' at +0.02 in {fwer / 2000:.4f} (95 % intervals "
        f"{fwer_old / 2000:.4f}); a -0.05 setting called not supported {power:.3f} "
        f"(95 % intervals {power_old:.3f})"
    )
    fpr_region(2000).check(fwer, "family-wise 'not supported' at the claimed size")
    assert not fpr_region(2000).accepts(fwer_old), fwer_old
    if sigma == 0.01:
        assert power >= 0.1, power
