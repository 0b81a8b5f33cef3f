"""Claim 3 (issue 21): trained − random Δρ, class-controlled variants, untestable layers,
Holm families of the dissection section, and the calibration of the difference test."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from test_dissection import ToyNet, coloured_squares, fake_adversarial_batches

from pse_lightning.analysis.dissection import Dissection
from pse_lightning.analysis.dissection.findings import MIN_TIGHT_RHO, dissection_findings
from pse_lightning.analysis.dissection.probe import ConceptTable, LayerDissection, concept_table
from pse_lightning.analysis.dissection.report import meaning
from pse_lightning.analysis.dissection.sensitivity import class_target_share
from pse_lightning.analysis.dissection.statistics import (
    RankSample,
    partial_spearman,
    partial_spearman_rows,
    rho_difference,
    spearman,
)
from pse_lightning.analysis.dissection.summary import (
    LayerUnits,
    category_scalars,
    holm_families,
    non_class_iou,
)
from pse_lightning.core.findings import judge
from pse_lightning.data.shapes import ShapesDataModule

# -- the difference test --------------------------------------------------------------------


def correlated(
    gen: torch.Generator, units: int, rho: float, noise: float = 0.0, rows: int = 0
) -> RankSample:
    """Units with population Spearman-ish correlation ``rho`` between s and IoU; s observed
    with Gaussian ``noise`` and ``rows`` image replicates of that noise."""
    z = torch.randn(units, 2, generator=gen, dtype=torch.float64)
    iou = rho * z[:, 0] + math.sqrt(1 - rho * rho) * z[:, 1]
    s = z[:, 0] + noise * torch.randn(units, generator=gen, dtype=torch.float64)
    s_rows = s + noise * torch.randn(rows, units, generator=gen, dtype=torch.float64)
    return RankSample(s, iou, x_rows=s_rows if rows else None)


def test_partial_spearman_rows_equals_the_rank_residual_correlation() -> None:
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, generator=gen), torch.randn(40, generator=gen)
    z = (x + y + torch.randn(40, generator=gen)).round()  # ties in the control
    expected, _ = partial_spearman(x, y, z, 0, gen)
    assert float(partial_spearman_rows(x, y, z)) == pytest.approx(float(expected), abs=1e-12)
    # A constant control explains nothing: the plain rho.
    plain = partial_spearman_rows(x, y, torch.ones(40))
    assert float(plain) == pytest.approx(float(spearman(x, y)), abs=1e-12)


def test_rho_difference_is_trained_minus_random_with_one_scheme() -> None:
    gen = torch.Generator().manual_seed(1)
    strong, flat = correlated(gen, 120, 0.8, rows=50), correlated(gen, 120, 0.0, rows=50)
    up = rho_difference(strong, flat, 2000, torch.Generator().manual_seed(2))
    down = rho_difference(flat, strong, 2000, torch.Generator().manual_seed(2))
    assert float(up["delta_rho"]) == pytest.approx(float(strong.rho() - flat.rho()))
    assert float(up["delta_rho_ci_low"]) > 0.3 and float(down["delta_rho_ci_high"]) < -0.3
    assert float(up["delta_rho_p"]) == pytest.approx(2 / 2001)  # no replicate crosses 0
    assert all(v.dtype == torch.float64 for v in (*up.values(), *down.values()))
    # The same network twice: Δρ = 0, an interval around 0 and a large p.
    same = rho_difference(strong, strong, 2000, torch.Generator().manual_seed(3))
    assert float(same["delta_rho"]) == 0.0
    assert float(same["delta_rho_ci_low"]) < 0 < float(same["delta_rho_ci_high"])
    assert float(same["delta_rho_p"]) > 0.5


def test_rho_difference_p_and_interval_agree() -> None:
    """p < 0.05 exactly when the 95% interval excludes 0 (one set of replicates)."""
    gen = torch.Generator().manual_seed(4)
    for planted in (0.0, 0.15, 0.3, 0.45):
        a, b = correlated(gen, 60, planted, 0.3, 20), correlated(gen, 60, 0.0, 0.3, 20)
        out = {k: float(v) for k, v in rho_difference(a, b, 1999, gen).items()}
        excludes = out["delta_rho_ci_low"] > 0 or out["delta_rho_ci_high"] < 0
        assert (out["delta_rho_p"] < 0.05) == excludes, (planted, out)


def test_partial_target_difference_removes_the_class_traffic() -> None:
    """s and IoU both follow the target share f in the trained net (class-selective units
    of attacked classes), not in the random one: Δρ is large, Δ partial ρ given f is not."""
    gen = torch.Generator().manual_seed(5)
    units = 128
    f = torch.rand(units, generator=gen, dtype=torch.float64)
    trained = RankSample(
        f + 0.2 * torch.randn(units, generator=gen, dtype=torch.float64),
        f + 0.2 * torch.randn(units, generator=gen, dtype=torch.float64),
        f,
    )
    random = RankSample(
        torch.randn(units, generator=gen, dtype=torch.float64),
        torch.randn(units, generator=gen, dtype=torch.float64),
        f,
    )
    plain = rho_difference(
        RankSample(trained.x, trained.y), RankSample(random.x, random.y), 1000, gen
    )
    partial = rho_difference(trained, random, 1000, gen)
    assert float(plain["delta_rho_ci_low"]) > MIN_TIGHT_RHO
    assert abs(float(partial["delta_rho"])) < 0.2 and float(partial["delta_rho_p"]) > 0.05


def test_class_target_share_picks_the_preferred_class() -> None:
    class_clean = torch.tensor([[1.0, 9.0, 0.0], [6.0, 3.0, 0.0], [0.0, 0.0, 0.0]])
    class_images = torch.tensor([2.0, 3.0, 0.0])  # class means: [0.5, 4.5, 0], [2, 1, 0]
    targets = torch.tensor([[1.0, 3.0, 1.0], [0.0, 4.0, 0.0]])
    count = torch.tensor([5.0, 4.0])
    preferred, share = class_target_share(class_clean, class_images, targets, count)
    assert preferred.tolist() == [1, 0, 0]  # unit 2: all-zero means, empty class skipped
    assert share.tolist() == [[0.6, 0.2, 0.2], [1.0, 0.0, 0.0]]


# -- findings -------------------------------------------------------------------------------


def layer_scalars(
    trained_n: float,
    random_n: float,
    delta: float,
    low: float,
    high: float,
    p: float,
    layer: str = "features.2",
) -> dict[str, float]:
    """The scalars dissection_findings reads for one layer (all three variants alike)."""
    out = {
        f"{layer}/spearman_rho": -0.1,
        f"{layer}/random/spearman_rho": -0.43,
        f"{layer}/non_class/spearman_rho": 0.0,
        f"{layer}/random/non_class/spearman_rho": 0.1,
        f"{layer}/partial_target_rho": 0.0,
        f"{layer}/random/partial_target_rho": 0.1,
    }
    for prefix in ("", "non_class/"):
        out[f"{layer}/{prefix}interpretable"] = trained_n
        out[f"{layer}/random/{prefix}interpretable"] = random_n
    for prefix in ("", "non_class/", "partial_target/"):
        out.update(
            {
                f"{layer}/{prefix}delta_rho": delta,
                f"{layer}/{prefix}delta_rho_ci_low": low,
                f"{layer}/{prefix}delta_rho_ci_high": high,
                f"{layer}/{prefix}delta_rho_p": p,
            }
        )
    return out


def test_findings_judge_the_trained_minus_random_difference() -> None:
    """The reviewer's features.2: ρ = −0.1 [CI across 0] against 0 but the random ρ is
    −0.43; the claim is judged on Δρ = 0.33 [0.15, 0.5] (p = 0.001), supported."""
    found = {
        f.key: f
        for f in judge(dissection_findings(layer_scalars(108, 96, 0.33, 0.15, 0.5, 0.001)))
    }
    assert set(found) == {
        "sensitivity_interpretability/features.2",
        "sensitivity_interpretability/features.2/non_class",
        "sensitivity_interpretability/features.2/partial_target",
    }
    main = found["sensitivity_interpretability/features.2"]
    assert (main.estimate, main.low, main.high, main.p) == (0.33, 0.15, 0.5, 0.001)
    assert main.null == 0.0 and main.size == MIN_TIGHT_RHO and main.direction == "two-sided"
    assert main.verdict == "supported" and "random" in main.test
    assert "108" in main.note and "96" in main.note
    inside = judge(dissection_findings(layer_scalars(108, 96, 0.02, -0.1, 0.12, 0.7)))
    assert {f.verdict for f in inside} == {"not supported"}


def test_a_layer_not_above_the_random_baseline_is_untestable() -> None:
    """features.1: 8 interpretable units trained against 10 at random weights."""
    found = judge(dissection_findings(layer_scalars(8, 10, 0.5, 0.3, 0.7, 0.001, "features.1")))
    assert found and all(f.verdict == "untestable" and math.isnan(f.p_holm) for f in found)
    assert all("8 interpretable" in f.note and "10 at random" in f.note for f in found)
    assert all(
        f.status == "untestable"
        for f in dissection_findings(layer_scalars(10, 10, 0.5, 0.3, 0.7, 0.001))
    )


def test_the_plain_rho_of_a_layer_of_class_detectors_is_untestable() -> None:
    """The main job's features.2: 110 interpretable units, none for a non-class concept; the
    plain Δρ measures class traffic, so only the class-controlled rows carry a verdict."""
    scalars = layer_scalars(110, 9, 0.6, 0.19, 0.93, 0.004)
    scalars["features.2/non_class/interpretable"] = 0.0
    scalars["features.2/target_share_rho"] = 0.76
    found = {f.key.rsplit("features.2", 1)[1]: f for f in judge(dissection_findings(scalars))}
    assert found[""].verdict == "untestable"
    assert "110 of 110" in found[""].note and "0.76" in found[""].note
    assert found["/non_class"].verdict == "untestable"  # 0 non-class units against 9
    assert found["/partial_target"].verdict == "supported"  # judged, not gated
    # trained partial ρ 0.0 in layer_scalars: no sign caveat; a negative one gets it
    assert "other sign" not in found["/partial_target"].note
    scalars["features.2/partial_target_rho"] = -0.15
    caveat = {f.key: f for f in dissection_findings(scalars)}
    assert "other sign" in caveat["sensitivity_interpretability/features.2/partial_target"].note
    # Half or more of the interpretable units with a non-class concept: the plain row counts.
    scalars["features.2/non_class/interpretable"] = 56.0
    plain = judge(dissection_findings(scalars))[0]
    assert plain.verdict == "supported"


def test_without_the_baseline_claim_3_is_untestable() -> None:
    scalars = {"features.2/spearman_rho": 0.4, "features.2/interpretable": 50.0}
    found = dissection_findings(scalars)
    assert [f.status for f in found] == ["untestable", "untestable"]
    assert "random_baseline" in found[0].note


# -- the section's Holm families and its sentence --------------------------------------------


def test_holm_families_keep_the_baseline_and_the_differences_out() -> None:
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    scalars = {
        "L/spearman_p": t(0.01),
        "L/mannwhitney_p": t(0.02),
        "L/random/spearman_p": t(0.01),
        "L/random/x_p": t(0.5),
        "L/delta_rho_p": t(0.001),
        "L/non_class/delta_rho_p": t(0.2),
    }
    out = holm_families(scalars)
    assert set(out) == {
        "L/spearman_p_holm",
        "L/mannwhitney_p_holm",
        "L/random/spearman_p_holm",
        "L/random/x_p_holm",
    }
    assert float(out["L/spearman_p_holm"]) == pytest.approx(0.02)  # a family of 2
    assert float(out["L/mannwhitney_p_holm"]) == pytest.approx(0.02)
    assert float(out["L/random/spearman_p_holm"]) == pytest.approx(0.02)  # its own 2
    assert all(v.dtype == torch.float64 for v in out.values())


def test_a_category_holding_every_interpretable_unit_is_not_tested_twice() -> None:
    units = 30
    gen = torch.Generator().manual_seed(0)
    interpretable = torch.arange(units) < 12
    unit = LayerUnits(
        *(torch.zeros(units) for _ in range(3)),
        interpretable,
        torch.rand(units, generator=gen),
        *(torch.zeros(units) for _ in range(5)),
        {},
        torch.zeros(units),
        torch.zeros(units, dtype=torch.long),
        torch.zeros(units),
    )
    unit.concept = torch.ones(units, dtype=torch.long)  # every unit: concept 1, "object"
    table = ConceptTable(["square", "red"], ["object", "colour"], torch.tensor([-1, 0, 1]))
    out = category_scalars(unit, table, 10)
    assert float(out["object/interpretable"]) == 12
    assert "object/mannwhitney_p" not in out  # it would equal the layer's mannwhitney_p


def test_the_summary_sentence_follows_the_sections_corrected_tests() -> None:
    """The reviewer's case: the ρ interval crosses 0 but Mann–Whitney and the partial ρ
    given the mean reject after Holm: the sentence must name them, not say 'no tie'."""
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    scalars = {
        "f2/spearman_rho": t(-0.1),
        "f2/spearman_ci_low": t(-0.3),
        "f2/spearman_ci_high": t(0.1),
        "f2/spearman_p_holm": t(0.79),
        "f2/mannwhitney_p_holm": t(0.033),
        "f2/partial_mean_p_holm": t(0.022),
        "f2/interpretable": t(108.0),
        "f2/random/interpretable": t(96.0),
        "f1/interpretable": t(8.0),
        "f1/random/interpretable": t(10.0),
        "f1/spearman_rho": t(0.1),
    }
    text = meaning(scalars, ["f1", "f2"])
    assert "no tie" not in text
    assert "Mann–Whitney" in text and "partial ρ given the mean" in text
    assert "untestable" in text.split("; in f2")[0]  # f1: 8 against 10


def test_shapes_part_concepts_count_as_non_class() -> None:
    """On shapes only the object category is the class labels: a unit whose best non-object
    concept is a part (corner, an edge) has that part's IoU as its non-class IoU."""
    table = concept_table(ShapesDataModule())
    assert table.categories[-1] == "part" and table.class_categories == ["object"]
    ids = {(table.category_of(i), table.names[i - 1]): i for i in range(1, 1 + len(table.names))}
    iou = torch.zeros(3, len(table.names) + 1, dtype=torch.float64)
    iou[0, ids["object", "star"]], iou[0, ids["part", "corner"]] = 0.5, 0.1
    iou[1, ids["part", "edge_90"]], iou[1, ids["colour", "red"]] = 0.2, 0.05
    iou[2, ids["object", "circle"]] = 0.3
    best, concept = iou.max(dim=1)
    zeros = torch.zeros(3)
    layer = LayerDissection("L", zeros, zeros, None, iou, best, concept, zeros, zeros)
    assert non_class_iou(layer, table)[0].tolist() == [0.1, 0.2, 0.0]


# -- the whole metric ------------------------------------------------------------------------


def test_compute_logs_the_differences_as_float64_and_toy_net_is_untestable() -> None:
    """ToyNet has no weights: the random baseline is the same network, so its layers have no
    more interpretable units than chance (untestable) and Δρ = 0 exactly."""
    model = ToyNet().eval()
    data = coloured_squares(12)
    data.class_categories = ("object",)
    dissection = Dissection(permutations=50, bootstrap=10)
    dissection.prepare(model, data)
    for batch in fake_adversarial_batches(model, n=12):  # ToyNet has 3 classes
        dissection.update(
            model, dataclasses.replace(batch, y=batch.y % 3, target=batch.target % 3)
        )
    out = dissection.compute().scalars
    for prefix in ("", "non_class/", "partial_target/"):
        assert float(out[f"detect/{prefix}delta_rho"]) == 0.0
        assert f"detect/{prefix}delta_rho_p_holm" not in out
    p_keys = [k for k in out if k.endswith("_p") or k.endswith("_holm")]
    assert p_keys and all(out[k].dtype == torch.float64 for k in p_keys)
    # Unit 1 detects the object (the class label); units 0 and 2 red and green.
    assert float(out["detect/non_class/interpretable"]) <= float(out["detect/interpretable"])
    found = dissection_findings({k: float(v) for k, v in out.items()})
    assert found and all(f.status == "untestable" for f in found)


# -- calibration (slow) ----------------------------------------------------------------------


def rejection_rate(sets: int, planted: tuple[float, float], seed: int) -> float:
    """Share of synthetic layer pairs (trained ρ, random ρ) whose Δρ test rejects at 0.05:
    100 units each, s observed with noise 0.3 and 50 image replicates of it."""
    gen = torch.Generator().manual_seed(seed)
    rejected = 0
    for _ in range(sets):
        a, b = (correlated(gen, 100, rho, 0.3, 50) for rho in planted)
        rejected += float(rho_difference(a, b, 400, gen)["delta_rho_p"]) < 0.05
    return rejected / sets


@pytest.mark.slow
def test_rho_difference_holds_its_level_under_a_planted_null() -> None:
    """Trained and random ρ equal (0.3 both): FPR ≤ 0.063 over 2000 sets (a true rate of
    0.075 exceeds that bound with probability ≥ 0.95)."""
    assert rejection_rate(2000, (0.3, 0.3), seed=10) <= 0.063


@pytest.mark.slow
@pytest.mark.parametrize("planted", [(0.5, 0.0), (0.0, 0.5)])
def test_rho_difference_has_power_in_both_directions(planted: tuple[float, float]) -> None:
    assert rejection_rate(200, planted, seed=11) >= 0.8
