"""The CAM section of the report, from an :class:`AnalysisResult` alone (docs/METHODS.md §3)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torch import Tensor

from pse_lightning.analysis.base import AnalysisResult, ReportSection
from pse_lightning.analysis.cam.figures import example_figure
from pse_lightning.analysis.cam.result import EXAMPLE_COLUMNS, MASK_KINDS, CAMExamples

_TABLE_STATS = ("is", "random", "area", "lift", "significant")


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
        "| mask | IS | random sqrt(area) | area | lift IS^2/area | shift p <= 0.05 |",
        "|---|---|---|---|---|---|",
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
        "CAM region; the shift p compares IS with cyclic shifts of the same mask and is "
        "calibrated only when the perturbation's energy is spread evenly over the image.",
        "",
        *_area_table(s),
        *_test_table(s),
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


def _test_table(s: dict[str, Tensor]) -> list[str]:
    """One row per dataset-level signed-rank test that the result holds."""
    names = sorted({k[: -len("_p")] for k in s if k.endswith("_p")}, key=_test_order)
    if not names:
        return []
    lines = [
        "Dataset-level tests (Wilcoxon signed-rank over images, two-sided, uncorrected; "
        "effect = Hodges-Lehmann pseudo-median of d with its 95% CI). excess: d = IS^2 - area "
        "(against a random mask; biased by uneven spatial spread). specific: d = IS^2(top A% "
        "of the class's map) - IS^2(top A% of another class's map on the same image), the "
        "null that respects uneven spread. specific_same: the same with the class's map on "
        "another image of the true class, which also respects a class's own typical spread. "
        "object: the ground-truth object mask, a reference.",
        "",
        "| test | effect | 95% CI | p |",
        "|---|---|---|---|",
    ]
    for name in names:
        ci = f"[{_num(s.get(name + '_low'))}, {_num(s.get(name + '_high'))}]"
        lines.append(f"| {name} | {_num(s.get(name))} | {ci} | {_num(s.get(name + '_p'))} |")
    return lines


def _area_table(s: dict[str, Tensor]) -> list[str]:
    """Fixed-area masks and the object mask: mean IS, the null's IS and the lift."""
    tags = [k[len("lift_") :] for k in s if k.startswith("lift_") and "_top" in k]
    lines = [
        "| mask (fixed area) | IS | IS of another class's mask | IS of the class's mask on "
        "another image | lift IS^2/area |",
        "|---|---|---|---|---|",
    ]
    for tag in tags:
        cells = [_num(s.get(f"{stat}_{tag}")) for stat in ("is", "null_is", "same_is", "lift")]
        lines.append(f"| {tag} | " + " | ".join(cells) + " |")
    if "lift_object" in s:
        lines.append(f"| ground-truth object (area {_num(s['area_object'])}) | "
                     f"{_num(s['is_object'])} | - | - | {_num(s['lift_object'])} |")  # fmt: skip
    return [*lines, ""] if len(lines) > 2 else []


def _test_order(name: str) -> tuple[int, str]:
    return (0 if name.startswith("specific") else 1 if "object" in name else 2, name)


def _num(v: Tensor | float | None) -> str:
    return "n/a" if v is None else f"{float(v):.3g}"
