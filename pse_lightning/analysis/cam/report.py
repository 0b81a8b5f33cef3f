"""The CAM section of the report, from an :class:`AnalysisResult` alone (docs/METHODS.md §3)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torch import Tensor

from pse_lightning.analysis.base import AnalysisResult, ReportSection
from pse_lightning.analysis.cam.figures import example_figure
from pse_lightning.analysis.cam.result import EXAMPLE_COLUMNS, MASK_KINDS, CAMExamples

_TABLE_STATS = ("is", "random", "area", "lift", "pvalue", "significant")


def cam_section(
    result: AnalysisResult, out_dir: Path, class_names: Sequence[str], setting: str
) -> ReportSection:
    """Markdown summary, one figure per kept example and a W&B table of the examples.

    Args:
        result: what ``CAMAnalysis.compute`` returned.
        out_dir: folder for the figures.
        class_names: the dataset's class names, for titles and legends.
        setting: how the masks were made (for example "maps: cam, threshold 0.2").
    """
    s = result.scalars
    lines = [
        "| mask | IS | random sqrt(area) | area | lift IS^2/area | mean p | p <= 0.05 |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind in MASK_KINDS:
        cells = [_num(s.get(f"{stat}_{kind}")) for stat in _TABLE_STATS]
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    body = [
        f"Scored {int(s['scored'])} successful adversarial examples of "
        f"{int(s['evaluated'])} ({setting}).",
        "",
        *lines,
        "",
        "IS = ||B*delta||/||delta||; a random mask of the same area scores sqrt(area) on "
        "average (E[IS^2] = area), so lift > 1 means the perturbation concentrates in the "
        "CAM region; p compares IS with cyclic shifts of the same mask.",
    ]
    if "promotion_in_target" in s:
        body += [
            "",
            f"Share of first-order promotion inside B_target: "
            f"{_num(s['promotion_in_target'])}; share of suppression inside B_true: "
            f"{_num(s['suppression_in_true'])}.",
        ]
    examples: CAMExamples | None = result.details.get("examples")
    figures: list[Path] = []
    tables: dict[str, tuple[list[str], list[list[object]]]] = {}
    if examples is not None and len(examples):
        figures = [example_figure(examples, i, class_names, out_dir) for i in range(len(examples))]
        rows = [examples.row(i) for i in range(len(examples))]
        tables["cam_examples"] = (list(EXAMPLE_COLUMNS), rows)
    return ReportSection(title="cam", markdown="\n".join(body), figures=figures, tables=tables)


def _num(v: Tensor | float | None) -> str:
    return "n/a" if v is None else f"{float(v):.3g}"
