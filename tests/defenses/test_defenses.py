"""The defense contract as the pipeline uses it, and neuron masking end to end."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from pse_lightning import pipeline
from pse_lightning.core.proportions import holm_adjust
from pse_lightning.defenses.base import Defense
from pse_lightning.defenses.curve_report import curve_markdown
from pse_lightning.defenses.curve_stats import (
    METRICS,
    MaskChoice,
    accuracy_rows,
    paired_comparisons,
    random_spread,
)
from pse_lightning.defenses.figures import accuracy_vs_k_figure
from pse_lightning.glossary import unexplained
from pse_lightning.reporting.tables import markdown_table


class Halve(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) / 2


class CountingDefense(Defense):
    """Calibration counts the images it is shown; the defended model halves the logits."""

    name = "counting"

    def calibrate(self, model: nn.Module, attack: object, loader: list) -> int:
        return sum(len(batch[0]) for batch in loader)

    def apply(self, model: nn.Module, calibration: int) -> nn.Module:
        return Halve(model)

    def describe(self, calibration: int) -> str:
        return f"halves the logits (calibrated on {calibration} images)"


def _parts(analyses: dict) -> SimpleNamespace:
    val = [(torch.zeros(3, 1), torch.zeros(3), torch.arange(3))] * 2
    datamodule = SimpleNamespace(val_dataloader=lambda: val)
    model = nn.Linear(1, 2)
    return SimpleNamespace(
        defense=CountingDefense(), model=model, attack=None, datamodule=datamodule,
        analyses=analyses,
    )  # fmt: skip


def test_defend_uses_only_the_defense_interface() -> None:
    parts = _parts({})
    defended, extra = pipeline.defend(parts)
    assert isinstance(defended, Halve) and defended.model is parts.model
    assert extra == {}  # no evaluation curve: nothing added to the test pass
    assert parts.defense.calibrate(None, None, parts.datamodule.val_dataloader()) == 6
    with pytest.raises(ValueError, match="analysis.counting"):
        pipeline.defend(_parts({"counting": object()}))


def test_markdown_table_known_output() -> None:
    table = markdown_table(["k", "acc"], [[0, 0.5], [2, float("nan")]])
    assert table == "| k | acc |\n|---|---|\n| 0 | 0.500 |\n| 2 | n/a |"
    with pytest.raises(ValueError, match="2 cells"):
        markdown_table(["k", "acc"], [[0]])


@pytest.mark.slow
def test_neuron_mask_end_to_end(make_cfg, tmp_path: Path) -> None:
    """The deployed defense and the curve's top-k mask are one model evaluated twice: the
    shared loop's accuracies equal the curve's; the report carries intervals and tests."""
    cfg = make_cfg(
        "defense=neuron_mask", "defense.k=2", "defense.sweep=[0,2]", "defense.draws=2",
        "dataset.eval_samples=32",
    )  # fmt: skip
    results = pipeline.run(cfg)
    assert results["test/neuron_mask/clean_acc"] == pytest.approx(results["test/clean_acc"])
    assert results["test/neuron_mask/adaptive_acc"] == pytest.approx(results["test/robust_acc"])
    assert 0.0 <= results["test/neuron_mask/mcnemar_p_adaptive"] <= 1.0
    run_dir = tmp_path / "run"
    metrics = json.loads((run_dir / "metrics.json").read_text())["metrics"]
    assert metrics["test/neuron_mask/k"] == 2
    report = (run_dir / "report.md").read_text()
    assert "## Neuron masking (defense)" in report and "random (2 draw(s))" in report
    assert "### Neuron masking (defense)" in report and "most sensitive units" in report
    assert unexplained(metrics) == [], "metrics without a glossary entry"
    assert "Wilson 95%" in report and "McNemar" in report and "Holm" in report
    assert (run_dir / "figures" / "neuron_mask_vs_k.png").stat().st_size > 0


def test_curve_statistics_and_report_from_planted_outcomes(tmp_path: Path) -> None:
    """Ten images; three random draws right on 5, 6 and 7 of them: mean 0.6, sd 0.1."""
    choices = [
        MaskChoice(2, "top", 0, (0, 1)),
        *(MaskChoice(2, "random", d, (d + 2, d + 3)) for d in range(3)),
        MaskChoice(2, "bottom", 0, (8, 9)),
    ]
    hits = [9, 5, 6, 7, 2]  # correct images per choice (the first ``hits`` of ten)
    column = [torch.arange(10) < h for h in hits]
    outcomes = {m: torch.stack(column, dim=1) for m in METRICS}
    undefended = {"clean": torch.arange(10) < 9, "robust": torch.arange(10) < 1}
    rows = accuracy_rows(choices, outcomes)
    assert [r["adaptive_acc"] for r in rows] == [0.9, 0.5, 0.6, 0.7, 0.2]
    (spread,) = random_spread(rows)
    assert spread["draws"] == 3 and spread["clean_mean"] == pytest.approx(0.6)
    assert spread["clean_sd"] == pytest.approx(0.1)
    tests = paired_comparisons(choices, outcomes, undefended)
    by = {(t["metric"], t["versus"]): t for t in tests}
    assert by[("clean", "undefended")]["p"] == 1.0  # same nine images right
    # adaptive: the top mask gets images 1..8 right that the undefended model misses.
    assert (
        by[("adaptive", "undefended")]["only_top"],
        by[("adaptive", "undefended")]["only_other"],
    ) == (8, 0)
    assert by[("adaptive", "undefended")]["p"] == pytest.approx(2 / 2**8)
    assert [t["p_holm"] for t in tests] == holm_adjust([t["p"] for t in tests])
    details = {"rows": rows, "spread": [spread], "tests": tests}
    markdown = curve_markdown("two units", details)
    assert "0.600 ± 0.100 (0.500–0.700)" in markdown and "0.900 [0.596, 0.982]" in markdown
    figure = accuracy_vs_k_figure(rows, [spread], tmp_path / "curve.png")
    assert figure.stat().st_size > 0
