"""The single-run report: section order, key numbers and their sentence, captions under every
figure, setup as key=value, the glossary (one source, complete) and the per-run figures."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import ROOT

from pse_lightning.analysis.base import AnalysisResult
from pse_lightning.analysis.cam import CAMAnalysis
from pse_lightning.analysis.cam.figures import example_panel as cam_panel
from pse_lightning.analysis.cam.result import CAMExamples
from pse_lightning.analysis.dissection.figures import sensitive_units_figure
from pse_lightning.analysis.dissection.sensitive import KeptActivations, sensitive_units
from pse_lightning.analysis.pse import PSE
from pse_lightning.analysis.pse.figures import example_panel as pse_panel
from pse_lightning.analysis.pse.report import meaning as pse_meaning
from pse_lightning.analysis.pse.samples import ExampleMaps
from pse_lightning.core.report import ReportSection
from pse_lightning.glossary import all_terms, document, explain, unexplained
from pse_lightning.modules.attack_metrics import AttackMetrics
from pse_lightning.modules.example_panels import draw_panels, example_panels_section
from pse_lightning.reporting.figures import draw_norm_distribution
from pse_lightning.reporting.glossary import terms_for
from pse_lightning.reporting.report import (
    MISSING_CAPTION,
    attack_meaning,
    flatten_params,
    significant,
    write_report,
)

SCALARS = {
    "test/samples": 10.0,
    "test/clean_acc": 0.8,
    "test/robust_acc": 0.2,
    "test/success_rate": 0.75,
    "test/clean_misclassified": 2.0,
    "test/l2_mean": 0.5,
    "test/l2_median": 0.41234,
    "test/linf_mean": 0.05,
    "test/linf_median": 0.031,
    "test/pse/n_images": 6.0,
    "test/pse/frac_none": 0.0,
}


def headings(report: str, level: str = "## ") -> list[str]:
    return [line[len(level) :] for line in report.splitlines() if line.startswith(level)]


def check_figures_captioned(run_dir: Path) -> list[Path]:
    """Every embedded image exists and the next line is its numbered, non-empty caption."""
    lines = (run_dir / "report.md").read_text().splitlines()
    figures = []
    for i, line in enumerate(lines):
        found = re.fullmatch(r"!\[[^\]]*\]\(([^)]+)\)", line)
        if found:
            figures.append(run_dir / found.group(1))
            caption = lines[i + 1]
            assert re.match(rf"\*Figure {len(figures)}\. \S", caption), caption
            assert MISSING_CAPTION not in caption, f"{found.group(1)} has no caption"
    assert all(f.is_file() for f in figures)
    return figures


def check_report_layout(run_dir: Path, middle: list[str]) -> None:
    """Findings, key numbers, setup, the parts in order, glossary, the raw dump last."""
    report = (run_dir / "report.md").read_text()
    assert headings(report) == ["Findings", "Key numbers", "Setup", *middle, "Glossary",
                                "All metrics"]  # fmt: skip
    assert report.rstrip().splitlines()[-1].startswith("| `test/")  # the dump ends the file


def section(title: str, figure: Path, caption: str | None) -> ReportSection:
    return ReportSection(
        title=title,
        markdown="body",
        figures=[figure],
        captions={} if caption is None else {figure.stem: caption},
        key_numbers={"n_images": 6.0, "frac_none": 0.0},
        meaning="A sentence.",
        prefix="pse",
    )


def test_report_sections_key_numbers_setup_and_captions(tmp_path: Path) -> None:
    figure = draw_norm_distribution({"l2": torch.tensor([0.1, 0.2])})
    extra_png = tmp_path / "figures" / "extra.png"
    extra_png.parent.mkdir(parents=True)
    figure.savefig(extra_png)
    norms = {"l2": torch.tensor([0.1, 0.3, 0.2]), "linf": torch.tensor([0.01, 0.03, 0.02])}
    examples = {
        "index": torch.tensor([0]),
        "x": torch.rand(1, 3, 8, 8),
        "x_adv": torch.rand(1, 3, 8, 8),
        "y": torch.tensor([0]),
        "pred_clean": torch.tensor([0]),
        "pred_adv": torch.tensor([1]),
    }
    write_report(tmp_path, title="t", setup={"attack": "cw", "attack.steps": "30"},
                 scalars=SCALARS, examples=examples, class_names=["cat", "dog"],
                 sections=[section("Promotion-suppression effect (PSE)", extra_png, "Extra.")],
                 norms=norms, glossary=[t.under("pse") for t in PSE.glossary()])  # fmt: skip
    check_report_layout(tmp_path, ["Attack", "Promotion-suppression effect (PSE)"])
    report = (tmp_path / "report.md").read_text()
    assert headings(report, "### ") == ["Attack", "Promotion-suppression effect (PSE)"]
    assert "```\nattack=cw\nattack.steps=30\n```" in report
    assert "| `l2_median` | 0.412 |" in report  # 3 significant digits
    assert "| `pse/n_images` | 6 |" in report  # prefixed key, whole numbers as integers
    assert "A sentence." in report
    figures = check_figures_captioned(tmp_path)
    assert [f.name for f in figures] == ["summary.png", "adversarial_examples.png",
                                         "perturbation_norms.png", "extra.png"]  # fmt: skip
    glossary = report.split("## Glossary")[1].split("## All metrics")[0]
    assert "| none (PSE type) |" in glossary and "| counter-effects |" in glossary
    assert "`l2_mean, l2_median`" in glossary
    assert "cam/" not in glossary, "terms of an analysis that did not run are left out"
    assert "Not in the glossary" not in glossary  # every key of SCALARS has an entry


def test_keys_no_analysis_explains_are_listed_apart(tmp_path: Path) -> None:
    """The report's glossary holds what the run's analyses declare: keys of an analysis
    that declared nothing (here, every analysis key: none declared) are listed apart."""
    scalars = {**SCALARS, "test/mean_abs/value": 0.5}
    write_report(tmp_path, title="t", setup={}, scalars=scalars, examples={}, class_names=[])
    report = (tmp_path / "report.md").read_text()
    assert "Not in the glossary (defined by the analysis that logs them): " in report
    assert "`test/mean_abs/value`, `test/pse/frac_none`, `test/pse/n_images`." in report


def test_a_figure_without_caption_is_marked(tmp_path: Path) -> None:
    png = tmp_path / "figures" / "bare.png"
    png.parent.mkdir(parents=True)
    draw_norm_distribution({"l2": torch.tensor([0.1])}).savefig(png)
    write_report(tmp_path, title="t", setup={}, scalars=SCALARS, examples={}, class_names=[],
                 sections=[section("S", png, None)])  # fmt: skip
    with pytest.raises(AssertionError, match="bare.png has no caption"):
        check_figures_captioned(tmp_path)


def test_sentences_follow_the_numbers() -> None:
    text = attack_meaning(SCALARS)
    assert "succeeded on 75% of the 8 correctly classified" in text
    assert "from 80% to 20%" in text and "L2 norm 0.412" in text
    assert "nothing was attacked" in attack_meaning({"test/samples": 4.0, "test/clean_acc": 0.0})
    base = {"n_images": 10, "pair_eta2": 0.2, "pair_eta2_null": 0.5}
    shares = {"frac_suppression": 0.6, "frac_balanced": 0.1, "frac_promotion": 0.3,
              "frac_none": 0.0}  # fmt: skip
    first = pse_meaning({k: torch.tensor(float(v)) for k, v in {**base, **shares}.items()})
    assert "suppression-dominated perturbations are the commonest (60% of images)" in first
    assert "no more than the 0.5 expected" in first
    shares["frac_promotion"], shares["frac_suppression"] = 0.6, 0.3
    second = pse_meaning({k: torch.tensor(float(v)) for k, v in {**base, **shares}.items()})
    assert "promotion-dominated perturbations are the commonest" in second


def test_significant_digits_and_setup_lines() -> None:
    assert [significant(v) for v in (0.123456, 1234.5, 3.0, float("nan"), None)] == [
        "0.123", "1.23e+03", "3", "n/a", "n/a"
    ]  # fmt: skip
    flat = flatten_params("attack", {"_target_": "x.CWL2", "steps": 30, "box": {"lo": None}})
    assert flat == {"attack.steps": "30", "attack.box.lo": "null"}


# -- glossary ---------------------------------------------------------------------------------


def test_docs_glossary_is_generated_from_the_one_source() -> None:
    path = ROOT / "docs" / "GLOSSARY.md"
    assert path.read_text() == document(), (
        "docs/GLOSSARY.md is stale: python -m pse_lightning.glossary docs/GLOSSARY.md"
    )


def test_glossary_patterns_explain_families_and_nothing_else() -> None:
    assert explain("test/dissection/layer4.1.conv2/spearman_ci_units_low") is not None
    assert explain("test/dissection/net.features.2/colour/mean_s_interpretable") is not None
    assert explain("test/cam/specific_target_top30_p") is not None
    assert unexplained(["test/clean_acc", "test/pse/new_metric", "test/cam/is_nowhere"]) == [
        "test/cam/is_nowhere", "test/pse/new_metric"
    ]  # fmt: skip
    names = [t.name for t in terms_for(["test/pse/frac_none"], all_terms())]
    assert "none (PSE type)" in names and "`pse/frac_<type>`" in names


# -- per-run figures --------------------------------------------------------------------------


def test_norm_distribution_marks_the_median_and_budget() -> None:
    norms = {"l2": torch.tensor([0.1, 0.4, 0.2]), "linf": torch.tensor([0.01, 0.03, 0.02])}
    fig = draw_norm_distribution(norms, budget=("linf", 0.03))
    hist_axes = [ax for ax in fig.axes if ax.get_legend() is not None]
    assert len(hist_axes) == 2
    l2_ax, linf_ax = hist_axes
    assert "‖δ‖₂" in l2_ax.get_xlabel() and "pixels in [0, 1]" in l2_ax.get_xlabel()
    assert l2_ax.get_ylabel() == "successful adversarial examples"
    labels = [t.get_text() for t in l2_ax.get_legend().get_texts()]
    assert labels == ["images (n = 3)", "median = 0.2", "empirical CDF"]
    linf_labels = [t.get_text() for t in linf_ax.get_legend().get_texts()]
    assert "budget ε = 0.03" in linf_labels


def test_attack_metrics_keep_successful_norms_in_index_order() -> None:
    metrics = AttackMetrics()
    x = torch.zeros(3, 1, 2, 2)
    delta = torch.tensor([3.0, 1.0, 2.0]).view(3, 1, 1, 1) * torch.tensor([[1.0, 0], [0, 0]])
    logits = torch.tensor([[5.0, 0.0]]).repeat(3, 1)
    y = torch.zeros(3, dtype=torch.long)
    # dataset indices 7, 2, 5; the sample at index 5 fails
    metrics.update(x, x + delta, y, logits, logits.flip(1), torch.tensor([True, True, False]),
                   torch.tensor([7, 2, 5]))  # fmt: skip
    norms = metrics.successful_norms()
    assert norms["l2"].tolist() == [1.0, 3.0]  # index 2, then 7; index 5 left out
    assert norms["linf"].tolist() == [1.0, 3.0]


def _pse_examples(index: list[int]) -> ExampleMaps:
    n = len(index)
    zeros = torch.zeros(n, dtype=torch.long)
    return ExampleMaps(index=torch.tensor(index), label=zeros, type=zeros,
                       target=torch.ones(n, dtype=torch.long),
                       r=torch.full((n,), 0.1), x=torch.rand(n, 3, 8, 8),
                       delta=0.01 * torch.randn(n, 3, 8, 8), promotion=torch.rand(n, 8, 8),
                       suppression=torch.rand(n, 8, 8), net=torch.randn(n, 8, 8))  # fmt: skip


def _cam_examples(index: list[int]) -> CAMExamples:
    n = len(index)
    long = lambda v: torch.full((n,), v, dtype=torch.long)  # noqa: E731
    return CAMExamples(index=torch.tensor(index), y=long(0), target=long(1), pred_clean=long(0),
                       pred_adv=long(1), success=torch.ones(n, dtype=torch.bool),
                       score=torch.rand(n, 3), area=torch.rand(n, 3), pvalue=torch.rand(n, 3),
                       x=torch.rand(n, 3, 8, 8), x_adv=torch.rand(n, 3, 8, 8),
                       map_clean=torch.rand(n, 8, 8), map_adv=torch.rand(n, 8, 8),
                       mask_true=torch.rand(n, 8, 8) > 0.5,
                       mask_target=torch.rand(n, 8, 8) > 0.5)  # fmt: skip


def test_example_panel_has_every_column_and_joins_by_index(tmp_path: Path) -> None:
    pse, cam = pse_panel(_pse_examples([3, 5])), cam_panel(_cam_examples([5]), 6)
    fig = draw_panels(pse, [cam], [1, 0], ["cat", "dog"])
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    row_with_cam, row_without = titles[:7], titles[7:]
    assert row_with_cam[0] == "#5: cat → dog" and row_with_cam[1].startswith("x' (suppression")
    assert row_with_cam[2].startswith("δ (×")  # amplification stated
    assert row_with_cam[3:] == ["promotion Σ[a^t]₊", "suppression Σ[−a^t0]₊", "CAM cat on x",
                                "CAM dog on x'"]  # fmt: skip
    assert row_without[0] == "#3: cat → dog" and len(row_without) == 5
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert texts == ["CAM not kept", "CAM not kept"]
    results = {
        "pse": AnalysisResult({}, {"examples": _pse_examples([3, 5])}),
        "cam": AnalysisResult({"lift_true": torch.tensor(1.0)}, {"examples": _cam_examples([5])}),
    }
    analyses = {"pse": PSE(), "cam": CAMAnalysis()}
    panels = {n: analyses[n].example_panel(r) for n, r in results.items()}
    made = example_panels_section(panels, tmp_path, ["cat", "dog"])
    assert made is not None and made.figures[0].is_file()
    caption = made.captions[made.figures[0].stem]
    assert caption.startswith("One row per kept") and "CAM panels read 'not kept'" in caption
    assert example_panels_section({"cam": panels["cam"]}, tmp_path, []) is None


def test_sensitive_units_pick_the_largest_s_and_threshold_each_image(tmp_path: Path) -> None:
    """Two units, s = (0.1, 0.9): unit 1 comes first; its mask is where the activation
    reaches T = 0.5 on x (one cell) and on x' (two cells); images kept only below the limit
    and sorted by dataset index."""

    kept = KeptActivations(layers=1, limit=2)
    acts = torch.zeros(4, 2, 2, 2)  # rows: x of images (index 5, 1), then their x'
    acts[1, 1, 0, 0] = 1.0  # index 1, clean: unit 1 fires at the top-left cell
    acts[3, 1, 0, :] = 1.0  # index 1, adversarial: the whole top row
    kept.update(torch.tensor([5, 1]), torch.rand(2, 3, 2, 2), torch.rand(2, 3, 2, 2), [acts])
    gathered = kept.gathered()
    assert gathered["index"].tolist() == [1] and gathered["acts"][0].shape == (1, 2, 2, 2, 2)
    layer = SimpleNamespace(
        thresholds=torch.tensor([0.5, 0.5]),
        floors=torch.zeros(2),
        best_concept=torch.tensor([1, 2]),
        best_iou=torch.tensor([0.1, 0.2]),
    )
    probe = SimpleNamespace(layers={"conv": layer}, table=SimpleNamespace(
        name_of=lambda c: f"concept{c}", category_of=lambda c: "colour"))  # fmt: skip
    units = {"conv": SimpleNamespace(s=torch.tensor([0.1, 0.9]))}
    found = sensitive_units(gathered, probe, units, top_units=1)
    (item,) = found
    assert (item.unit, item.concept, item.iou) == (1, "concept2", pytest.approx(0.2))
    assert item.mask_clean[0].tolist() == [[True, False], [False, False]]
    assert item.mask_adv[0].tolist() == [[True, True], [False, False]]
    # The heat map is the activation itself (2 x 2 cells at 2 x 2 pixels: no interpolation).
    assert item.act_clean[0].tolist() == [[1.0, 0.0], [0.0, 0.0]]
    assert item.act_adv[0].tolist() == [[1.0, 1.0], [0.0, 0.0]]
    assert item.threshold == pytest.approx(0.5)
    assert sensitive_units_figure(found, tmp_path / "s.png").stat().st_size > 1000
