"""Claim 1 (three PSE types) as the paper states it (docs/METHODS.md §2.6-§2.7, §7.13):
the modes of r, the cluster bootstrap over (true, target) class pairs across the threshold
sweep, and the by-type histogram."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from scipy.stats import binomtest
from torch import Tensor, nn

from pse_lightning.analysis.base import AdversarialBatch
from pse_lightning.analysis.pse import PSE
from pse_lightning.analysis.pse.clusters import (
    MIN_TYPE_SHARE,
    pair_slots,
    rarest_share_test,
    slot_tallies,
    sweep_key,
    within_pair_share,
)
from pse_lightning.analysis.pse.figures import histogram_bars
from pse_lightning.analysis.pse.findings import pse_findings
from pse_lightning.analysis.pse.mixture import (
    MixtureFit,
    bootstrap_lrt,
    fine_histogram,
    fit_mixture,
    lr_statistic,
    modes,
    sample_histograms,
)
from pse_lightning.analysis.pse.report import pse_section
from pse_lightning.analysis.pse.statistics import (
    HIST_BINS,
    SWEEP,
    classify,
    eta_squared,
    pair_ids,
    ratio_histogram_by_type,
)
from pse_lightning.core.findings import judge
from pse_lightning.glossary import unexplained

CLASSES = 6


def mixture_draws(weights, means, sds, n: int, gen: torch.Generator) -> Tensor:
    comp = torch.multinomial(torch.tensor(weights), n, replacement=True, generator=gen)
    x = torch.tensor(means)[comp] + torch.tensor(sds)[comp] * torch.randn(n, generator=gen)
    return x.clamp(0, 1)


ONE = ([1.0], [0.5], [0.15])
TWO = ([0.5, 0.5], [0.2, 0.75], [0.08, 0.08])
THREE = ([0.3, 0.4, 0.3], [0.15, 0.5, 0.85], [0.06, 0.06, 0.06])


def as_fit(weights, means, sds) -> MixtureFit:
    row = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    return MixtureFit(row(weights), row(means), row(sds), torch.zeros(1, dtype=torch.float64))


# -- mixture: known answers ----------------------------------------------------------------


def test_em_recovers_a_planted_two_component_mixture() -> None:
    r = mixture_draws(
        [0.3, 0.7], [0.25, 0.7], [0.05, 0.1], 20000, torch.Generator().manual_seed(0)
    )
    fit = fit_mixture(fine_histogram(r), 2)
    order = fit.means[0].argsort()
    torch.testing.assert_close(fit.means[0][order], torch.tensor([0.25, 0.7]).double(), atol=0.01,
                               rtol=0)  # fmt: skip
    torch.testing.assert_close(fit.sds[0][order], torch.tensor([0.05, 0.1]).double(), atol=0.01,
                               rtol=0)  # fmt: skip
    torch.testing.assert_close(fit.weights[0][order], torch.tensor([0.3, 0.7]).double(),
                               atol=0.02, rtol=0)  # fmt: skip


def test_bic_prefers_the_planted_number_of_components() -> None:
    gen = torch.Generator().manual_seed(1)
    for planted, params in ((1, ONE), (2, TWO), (3, THREE)):
        found = modes(fine_histogram(mixture_draws(*params, 500, gen)), replicates=0)
        assert found.k == planted, (planted, found.bic)
        assert torch.isfinite(found.bic).all()


def test_point_masses_at_the_ends_keep_the_likelihood_finite() -> None:
    # r = 0 (target did not rise) and r = 1 (true logit did not fall) are censored end bins
    r = torch.cat([torch.zeros(100), torch.ones(50), torch.rand(300, generator=torch.Generator())])
    found = modes(fine_histogram(r), replicates=0)
    assert torch.isfinite(found.bic).all() and 1 <= found.k <= 4


def test_too_few_images_fit_nothing() -> None:
    found = modes(fine_histogram(torch.rand(10)), replicates=5)
    assert found.k == 0 and found.fit is None and math.isnan(float(found.p[2]))


def test_more_components_never_fit_worse() -> None:
    h = fine_histogram(mixture_draws(*THREE, 400, torch.Generator().manual_seed(2)))
    fits = [fit_mixture(h, 1)]
    for k in (2, 3, 4):
        fits.append(fit_mixture(h, k, init=fits[-1]))
    logliks = [float(f.loglik) for f in fits]
    assert all(b >= a - 1e-6 for a, b in zip(logliks, logliks[1:], strict=False))


def test_bootstrap_lrt_rejects_two_components_for_a_planted_three() -> None:
    h = fine_histogram(mixture_draws(*THREE, 500, torch.Generator().manual_seed(3)))
    gen = torch.Generator().manual_seed(0)
    assert float(bootstrap_lrt(h, 2, 19, gen)) == pytest.approx(1 / 20)  # every T* below T
    assert float(bootstrap_lrt(h, 1, 19, gen)) == pytest.approx(1 / 20)


def test_sampled_histograms_follow_the_mixture() -> None:
    boot = sample_histograms(as_fit(*TWO), 1000, 200, torch.Generator().manual_seed(4))
    assert boot.shape == (200, 100) and (boot.sum(1) == 1000).all()
    mean_r = (boot * (torch.arange(100).double() + 0.5) / 100).sum(1) / 1000
    assert float(mean_r.mean()) == pytest.approx(0.475, abs=0.005)


def _warp_speed_rejections(params, k: int, nulls: int, n: int, seed: int) -> float:
    """Warp-speed bootstrap (Giacomini, Politis & White 2013): one bootstrap replicate per
    simulated data set, pooled into the null distribution of the LR statistic; returns the
    share of data sets whose statistic exceeds the pooled 95th percentile."""
    gen = torch.Generator().manual_seed(seed)
    data = torch.stack([fine_histogram(mixture_draws(*params, n, gen)) for _ in range(nulls)])
    stat, fits = lr_statistic(data.double(), k, gen)
    boot = torch.cat([
        sample_histograms(MixtureFit(fits.weights[i : i + 1], fits.means[i : i + 1],
                                     fits.sds[i : i + 1], fits.loglik[i : i + 1]), n, 1, gen)
        for i in range(nulls)
    ])  # fmt: skip
    stat_boot, _ = lr_statistic(boot, k, gen)
    critical = torch.quantile(stat_boot, 0.95)
    return float((stat > critical).double().mean())


@pytest.mark.slow
@pytest.mark.parametrize(("params", "k"), [(ONE, 1), (TWO, 2)])
def test_bootstrap_lrt_is_calibrated_under_the_null(params, k: int) -> None:
    # 2000 null data sets of 300 images: a true rate of 0.075 exceeds 0.063 with p >= 0.95
    rate = _warp_speed_rejections(params, k, 2000, 300, seed=10 + k)
    assert 0.037 <= rate <= 0.063, rate


@pytest.mark.slow
def test_bootstrap_lrt_has_power_against_a_planted_third_component() -> None:
    weaker = ([0.35, 0.3, 0.35], [0.2, 0.5, 0.8], [0.07, 0.07, 0.07])
    assert _warp_speed_rejections(weaker, 2, 300, 300, seed=20) >= 0.8


# -- cluster bootstrap over class pairs ----------------------------------------------------


def pair_sample(shares_by_pair: Tensor, sizes: Tensor, gen: torch.Generator):
    """Per pair g, sizes[g] images whose type is drawn with the pair's type shares (G, 3);
    returns (sweep, types) slot tallies, the type identical at every threshold."""
    g = len(sizes)
    kinds = [torch.multinomial(shares_by_pair[i], int(sizes[i]), replacement=True,
                               generator=gen) for i in range(g)]  # fmt: skip
    counts = torch.stack([torch.bincount(k, minlength=3) for k in kinds])
    sweep = counts[:, None, :].expand(g, len(SWEEP), 3)
    types = torch.cat([counts, torch.zeros(g, 1, dtype=torch.long)], 1)
    return sweep, types


def null_pairs(g: int, share: float, gen: torch.Generator, spread: float = 20.0) -> Tensor:
    """Pair-level promotion probabilities ~ Beta with mean ``share`` (clustered), the rest
    split evenly: the population's rarest share is ``share``."""
    beta = torch.distributions.Beta(
        torch.tensor(share * spread), torch.tensor((1 - share) * spread)
    )
    p = beta.sample((g,))
    return torch.stack([(1 - p) / 2, (1 - p) / 2, p], 1)


def test_rarest_share_p_and_interval_known_answer() -> None:
    gen = torch.Generator().manual_seed(5)
    shares = torch.tensor([[0.4, 0.3, 0.3]]).expand(30, 3)
    sweep, types = pair_sample(shares, torch.full((30,), 20), gen)
    out = rarest_share_test(sweep, types, replicates=999)
    total = sweep[:, 0].sum(0).double()
    assert float(out["rarest"][0]) == pytest.approx(float(total.min() / total.sum()))
    assert float(out["p"][0]) == pytest.approx(1 / 1000)  # no replicate near 0.05
    assert out["low"][0] < out["rarest"][0] < out["high"][0]
    assert out["p"].dtype == torch.float64 and int(out["clusters"]) == 30


def test_a_rare_type_in_few_pairs_is_not_supported() -> None:
    # 500 images in 25 pairs of 20; the promotion images (8 %) sit in 2 pairs only. As
    # independent images (the old binomial test) 8 % of 500 is clearly > 5 %; resampling
    # pairs, a replicate often draws neither pair.
    g, size = 25, 20
    kinds = torch.zeros(g, size, dtype=torch.long)
    kinds[:, size // 2 :] = 1
    kinds[:2] = 2
    counts = torch.stack([torch.bincount(k, minlength=3) for k in kinds])
    sweep = counts[:, None, :].expand(g, len(SWEEP), 3)
    types = torch.cat([counts, torch.zeros(g, 1, dtype=torch.long)], 1)
    out = rarest_share_test(sweep, types, replicates=2000)
    assert float(out["rarest"][0]) == pytest.approx(0.08)
    assert float(out["p"][0]) > 0.2 and float(out["low"][0]) < 0.05


@pytest.mark.slow
def test_cluster_bootstrap_is_calibrated_and_powered() -> None:
    """2000 null data sets (rarest share 0.05, clustered by pair): P(p < 0.05) <= 0.063;
    planted 0.12: >= 0.8. The old test, an exact binomial over images, rejects too often."""
    gen = torch.Generator().manual_seed(6)
    sizes = torch.full((30,), 15)

    def rejects(share: float, sets: int) -> float:
        hits = 0
        for i in range(sets):
            sweep, types = pair_sample(null_pairs(30, share, gen), sizes, gen)
            hits += float(rarest_share_test(sweep[:, :1].expand(-1, len(SWEEP), -1), types,
                                            replicates=499, seed=i)["p"][0]) < 0.05  # fmt: skip
        return hits / sets

    fpr = rejects(MIN_TYPE_SHARE, 2000)
    assert fpr <= 0.063, fpr
    assert rejects(0.12, 200) >= 0.8
    # the old test (exact binomial over images as independent replicates) on the same nulls
    old = 0
    for _ in range(2000):
        _, types = pair_sample(null_pairs(30, MIN_TYPE_SHARE, gen), sizes, gen)
        c = types[:, :3].sum(0)
        test = binomtest(int(c[2]), int(c.sum()), MIN_TYPE_SHARE, alternative="greater")
        old += test.pvalue < 0.05
    assert old / 2000 > 0.075, old / 2000


def test_within_pair_share_equals_one_minus_eta_squared() -> None:
    gen = torch.Generator().manual_seed(7)
    label = torch.randint(CLASSES, (200,), generator=gen)
    target = (label + 1 + torch.randint(CLASSES - 1, (200,), generator=gen)) % CLASSES
    r = (0.1 * label + 0.05 * target + 0.1 * torch.rand(200, generator=gen)).clamp(0, 1)
    r[:5] = math.nan
    slot, hashed = pair_slots(label, target, 64)
    assert not hashed.any()
    _, _, moments = slot_tallies(r, slot, 1 / 3, 2 / 3, 64 * 64)
    eta2 = eta_squared(r, pair_ids(label, target))["eta2"]
    assert float(within_pair_share(moments)) == pytest.approx(1 - float(eta2), abs=1e-9)
    # hand example: pairs {0.1, 0.3} and {0.7, 0.9}: SS_W = 0.04, SS_T = 0.4
    m = torch.tensor([[2, 0.4, 0.1], [2, 1.6, 1.3]], dtype=torch.float64)
    assert float(within_pair_share(m)) == pytest.approx(0.1)


def test_large_class_counts_stay_bounded_and_are_flagged() -> None:
    label, target = torch.tensor([1, 900, 999]), torch.tensor([2, 3, 998])
    slot, hashed = pair_slots(label, target, 8)
    assert slot.max() < 64 and slot.min() >= 0
    assert hashed.tolist() == [False, True, True] and int(slot[0]) == 1 * 8 + 2


def test_slot_tallies_count_every_threshold() -> None:
    r = torch.tensor([0.05, 0.3, 0.5, 0.65, 0.95, math.nan])
    slot = torch.tensor([0, 0, 1, 1, 1, 1])
    sweep, types, _ = slot_tallies(r, slot, 1 / 3, 2 / 3, 4)
    for i, q in enumerate(SWEEP):
        kind = classify(r[:5], q, 1 - q)
        assert sweep[:, i].sum(0).tolist() == torch.bincount(kind, minlength=3).tolist()
    assert types.tolist()[:2] == [[2, 0, 0, 0], [0, 2, 1, 1]]


# -- the metric end to end -----------------------------------------------------------------


class Pick(nn.Module):
    """Logits are the first CLASSES pixels: every attribution (method grad) is exact."""

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1)[:, :CLASSES] * 1.0


def typed_batch(r: Tensor, label: Tensor, target: Tensor, start: int = 0) -> AdversarialBatch:
    """Images whose measured logit changes give exactly the ratios r."""
    n = len(r)
    x = torch.full((n, 1, 4, 4), 0.5)
    flat = x.view(n, -1)
    flat[torch.arange(n), label] = 0.9
    x_adv = x.clone()
    adv = x_adv.view(n, -1)
    adv[torch.arange(n), target] += 0.45 * r
    adv[torch.arange(n), label] -= 0.45 * (1 - r)
    model = Pick()
    return AdversarialBatch(x=x, y=label, index=torch.arange(start, start + n),
                            logits_clean=model(x), x_adv=x_adv, logits_adv=model(x_adv),
                            target=target, success=torch.ones(n, dtype=torch.bool),
                            targeted=False)  # fmt: skip


def clustered_run(
    promotion_pairs: int, seed: int = 8, high: float = 0.85, **kw
) -> tuple[PSE, dict]:
    """500 images in the 30 ordered pairs of 6 classes; each pair has one r level (tight
    noise), so the pair decides the type: low r, balanced, or (``promotion_pairs`` pairs)
    r near ``high``."""
    gen = torch.Generator().manual_seed(seed)
    pairs = torch.tensor([(a, b) for a in range(CLASSES) for b in range(CLASSES) if a != b])
    level = torch.where(torch.arange(30) % 2 == 0, 0.15, 0.5)
    level[:promotion_pairs] = high
    pick = torch.randint(30, (500,), generator=gen)
    r = (level[pick] + 0.03 * torch.randn(500, generator=gen)).clamp(0, 1)
    metric = PSE(method="grad", max_rows=0, max_figures=0, **kw)
    for chunk in torch.arange(500).split(125):
        metric.update(Pick(), typed_batch(r[chunk], pairs[pick[chunk], 0],
                                          pairs[pick[chunk], 1], int(chunk[0])))  # fmt: skip
    return metric, metric.compute()


def test_metric_cluster_bootstrap_and_modes_end_to_end(tmp_path: Path) -> None:
    metric, result = clustered_run(2, mixture_bootstrap=0)
    s = result.values()
    hist = result.details["r_hist"]
    assert hist.shape == (HIST_BINS, 3)
    for k, name in enumerate(("suppression", "balanced", "promotion")):
        assert int(hist[:, k].sum()) == round(s[f"frac_{name}"] * s["n_images"])
        assert s[f"frac_{name}_low"] <= s[f"frac_{name}"] <= s[f"frac_{name}_high"]
    assert s["n_pair_clusters"] == 30 and s["n_pairs_hashed"] == 0
    assert s["pair_within_share"] == pytest.approx(1 - s["pair_eta2"], abs=1e-9)
    assert s["mixture_k"] == 3 and math.isnan(s["mixture_p_2v3"])
    # promotion (~7 % of images) lives in 2 of 30 pairs: not enough to claim > 5 %
    found = judge(metric.findings(result))[0]
    assert found.verdict != "supported" and found.p > 0.05
    assert "not at q" in found.effect and "BIC prefers k = 3" in found.effect
    assert unexplained(f"pse/{key}" for key in s) == [], "keys without a glossary entry"
    section = metric.report(result, tmp_path, [str(c) for c in range(CLASSES)])
    assert "rarest [95% CI]" in section.markdown and "BIC prefers k = 3" in section.markdown


def test_claim_holds_only_where_every_central_threshold_holds() -> None:
    # a third of the pairs at r ~ 0.85: every type is common at every central q
    metric, result = clustered_run(10, mixture_bootstrap=0, bootstrap=999)
    s = result.values()
    found = judge(metric.findings(result))[0]
    central = [sweep_key(q) for q in (0.25, 0.3, 1 / 3, 0.4)]
    assert found.p == max(s[f"rarest_{t}_p"] for t in central)
    assert found.verdict == "supported"
    # promotion pairs at r ~ 0.70: promotion-dominated for tau_p = 2/3 (q = 1/3) and 0.6,
    # but balanced for tau_p = 0.75 (q = 0.25): the claim holds at some central q only
    metric, result = clustered_run(10, high=0.70, mixture_bootstrap=0, bootstrap=999)
    s = result.values()
    assert s["rarest_q333_p"] < 0.05 and s["rarest_q250_p"] > 0.5
    found = judge(metric.findings(result))[0]
    assert found.p == s["rarest_q250_p"] and found.verdict == "inconclusive"
    assert "depends on the threshold" in found.note
    assert found.estimate == s["rarest_q250"] and found.low == s["rarest_q250_low"]
    # The interval is the envelope of the central q's: "not supported" needs the claim to
    # fail at every central threshold, not at the one chosen.
    assert found.high == max(s[f"rarest_{t}_high"] for t in central) > 0.05
    holds, fails = found.effect.split("not at q ∈")
    assert "0.333" in holds.split("at q ∈")[-1] and "0.4" in holds.split("at q ∈")[-1]
    assert "0.25" in fails.split("}")[0]


def test_a_type_rare_at_every_central_threshold_is_not_supported() -> None:
    # no promotion pair at all: promotion-dominated images never occur, whatever q
    metric, result = clustered_run(0, mixture_bootstrap=0, bootstrap=999)
    found = judge(metric.findings(result))[0]
    assert found.high < 0.05 and found.verdict == "not supported"


def test_findings_without_cluster_scalars_are_not_measured() -> None:
    found = pse_findings({"n_images": 10.0, "frac_suppression": 0.5})
    assert found[0].status == "not measured"


# -- the histogram figure ------------------------------------------------------------------


def test_histogram_bars_split_a_bin_that_straddles_a_threshold() -> None:
    r = torch.tensor([0.31, 0.34, 0.60, 0.66, 0.70, 0.02, math.nan])
    kind = classify(r, 1 / 3, 2 / 3)
    hist = ratio_histogram_by_type(r, kind)
    assert hist.sum(0).tolist() == [2, 3, 1]  # the type counts, NaN left out
    bars = histogram_bars(hist)
    per_type = {k: float(h.sum()) for k, _, h, _ in bars}
    assert per_type == {0: 2.0, 1: 3.0, 2: 1.0}
    # bin [0.30, 0.35) holds a suppression (0.31) and a balanced (0.34) image: two bars
    at_030 = {k for k, left, _, _ in bars if torch.isclose(left, torch.tensor(0.3)).any()}
    assert at_030 == {0, 1}
    # stacked: the balanced bar at 0.30 sits on the suppression bar
    for k, left, heights, bottoms in bars:
        if k == 1:
            i = int(torch.isclose(left, torch.tensor(0.3)).nonzero())
            assert float(bottoms[i]) == 1.0 and float(heights[i]) == 1.0


def test_report_draws_the_mixture_on_the_histogram(tmp_path: Path) -> None:
    metric, result = clustered_run(2, mixture_bootstrap=0)
    section = pse_section(result, tmp_path, [str(c) for c in range(CLASSES)], settings="s",
                          tau_s=1 / 3, tau_p=2 / 3, tol=0.01)  # fmt: skip
    assert (tmp_path / "pse_ratio_hist.png").exists()
    assert "mixture" in section.captions["pse_ratio_hist"]


def test_pair_table_size_is_bounded() -> None:
    with pytest.raises(ValueError, match="analysis.pse.pair_classes"):
        PSE(pair_classes=1000)


def test_an_empty_ratio_histogram_says_so_instead_of_drawing_empty_axes(tmp_path) -> None:
    """The smoke run of issue 23: no successful attack gave an empty plot with a negative y
    axis; the figure now says why it is empty and keeps y at 0."""
    import matplotlib.pyplot as plt

    from pse_lightning.analysis.pse import figures

    shown = []
    real_save = figures.save
    figures.save = lambda fig, path: shown.append(fig) or real_save(fig, path)
    try:
        figures.ratio_histogram_figure(torch.zeros(figures.HIST_BINS, 3), 1 / 3, 2 / 3,
                                       tmp_path / "h.png")  # fmt: skip
    finally:
        figures.save = real_save
    ax = shown[0].axes[0]
    assert any("no analysed image" in t.get_text() for t in ax.texts)
    assert ax.get_ylim()[0] == 0
    plt.close("all")
