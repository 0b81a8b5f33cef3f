"""The CAM section of the report, from an :class:`AnalysisResult` alone (docs/METHODS.md §3)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torch import Tensor

from pse_lightning.analysis.base import AnalysisResult, ReportSection
from pse_lightning.analysis.cam.figures import example_figure
from pse_lightning.analysis.cam.result import (
    EXAMPLE_COLUMNS,
    FINDING_AREA,
    FINDING_TAG,
    MASK_KINDS,
    CAMExamples,
)

UNCALIBRATED = "not calibrated for a verdict"

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
        "| mask | IS | random sqrt(area) | area | lift IS^2/area (not calibrated for a "
        "verdict) | share with shift p <= 0.05 (uncalibrated) |",
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
        "average (E[IS^2] = area). The lift IS^2/area and the per-image cyclic-shift p are "
        f"descriptive and {UNCALIBRATED}: a perturbation and a map that are both "
        "centre-biased give lift > 1 and small shift p with no link between them "
        "(docs/METHODS.md §7.12). The verdicts are the Findings': the same-class null and "
        "the comparison with the object mask below.",
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
    return ReportSection(
        title=TITLE,
        markdown="\n".join(body),
        figures=figures,
        tables=tables,
        captions={Path(f).stem: EXAMPLE_CAPTION for f in figures},
        key_numbers={k: float(s[k]) for k in KEY_NUMBERS if k in s},
        meaning=meaning(s),
    )


TITLE = "Class activation maps (CAM)"
KEY_NUMBERS = ("scored", "is_true", f"specific_same_true_{FINDING_TAG}",
               f"specific_same_true_{FINDING_TAG}_p", "cam_vs_object",
               "cam_vs_object_p")  # fmt: skip
EXAMPLE_CAPTION = (
    "Top row: the clean image x with its prediction, the CAM of the predicted (true) class "
    "over the grey image (min-max normalised per image) and δ = x' − x as grey + a·δ "
    "(amplification a on the panel) with the outline of B_true, the top "
    f"{FINDING_AREA:.0%} of the true class's map (the mask the Findings test). Bottom row: "
    "the same for the adversarial image x' and B_target, the top "
    f"{FINDING_AREA:.0%} of the target class's map on x'. IS: the share of δ's L2 norm "
    "inside the outlined region."
)


def meaning(s: dict[str, Tensor]) -> str:
    """One sentence from the numbers: what the same-class null and the object comparison
    allow (their 95% intervals), with the uncalibrated lift as context only."""
    if not float(s.get("scored", 0)) > 0:
        return "No successful adversarial example was scored, so nothing is measured."
    share = f"top {FINDING_AREA:.0%}"
    parts = []
    same = f"specific_same_true_{FINDING_TAG}"
    if _finite(s.get(same)):
        parts.append(
            f"In the {share} of the true class's map the perturbation gathers "
            f"{_compared(s, same)} the same class's region on another image of that class "
            f"(IS² difference {_interval(s, same)})"
        )
    if _finite(s.get("cam_vs_object")):
        parts.append(
            f"the true class's CAM region gathers {_compared(s, 'cam_vs_object')} the "
            f"ground-truth object mask of the same area (IS² difference "
            f"{_interval(s, 'cam_vs_object')})"
        )
    if not parts:
        parts.append("The same-class null was not measured (no labels of the evaluation "
                     "split), so no calibrated test of the CAM region ran")  # fmt: skip
    lift = s.get("lift_true")
    if _finite(lift):
        parts.append(f"its lift over a random mask of the same area, {float(lift):.3g}, is "
                     f"{UNCALIBRATED}")  # fmt: skip
    text = "; ".join(parts)
    return text[0].upper() + text[1:] + "."


def _finite(v: Tensor | float | None) -> bool:
    return v is not None and float(v) == float(v)


def _compared(s: dict[str, Tensor], name: str) -> str:
    """'more energy than', 'less energy than' or 'not distinguishably from' by the 95% CI."""
    low, high = float(s[name + "_low"]), float(s[name + "_high"])
    return (
        "more energy than"
        if low > 0
        else "less energy than"
        if high < 0
        else ("energy not distinguishably from")
    )


def _interval(s: dict[str, Tensor], name: str) -> str:
    return (f"{float(s[name]):.3g}, 95% CI [{float(s[name + '_low']):.3g}, "
            f"{float(s[name + '_high']):.3g}]")  # fmt: skip


def _test_table(s: dict[str, Tensor]) -> list[str]:
    """One row per dataset-level signed-rank test that the result holds, the calibrated
    ones first, each marked with whether its null is calibrated for a verdict."""
    names = sorted({k[: -len("_p")] for k in s if k.endswith("_p")}, key=_test_order)
    if not names:
        return []
    lines = [
        "Dataset-level tests (Wilcoxon signed-rank over images, two-sided, uncorrected; "
        "effect = Hodges-Lehmann pseudo-median of d with its 95% CI). specific_same: d = "
        "IS^2(top A% of the class's map) - IS^2(top A% of the same class's map on another "
        "image of the true class), the null calibrated where a class's maps sit differently "
        "from other classes' (Claim 2's Finding at A = 20). cam_vs_object: d = IS^2(the true "
        "class's CAM region) - IS^2(ground-truth object mask), at the object's area on each "
        "image (the second Finding). specific: the same with another class's map on the same "
        "image; excess: d = IS^2 - area, against a random mask. Those two are context, "
        f"{UNCALIBRATED}: their nulls reject without any effect when the class's maps, or "
        "the map and the perturbation, share a spatial bias (docs/METHODS.md §7.12).",
        "",
        "| test | effect | 95% CI | p | calibrated null |",
        "|---|---|---|---|---|",
    ]
    for name in names:
        ci = f"[{_num(s.get(name + '_low'))}, {_num(s.get(name + '_high'))}]"
        calibrated = "yes" if _test_order(name)[0] < 2 else f"no: {UNCALIBRATED}"
        lines.append(f"| {name} | {_num(s.get(name))} | {ci} | {_num(s.get(name + '_p'))} "
                     f"| {calibrated} |")  # fmt: skip
    return lines


def _area_table(s: dict[str, Tensor]) -> list[str]:
    """Fixed-area masks and the object mask: mean IS, the nulls' IS and the lift."""
    tags = [k[len("lift_") :] for k in s if k.startswith("lift_") and "_top" in k]
    lines = [
        "| mask (fixed area) | IS | IS of the class's mask on another image | IS of another "
        "class's mask | lift IS^2/area |",
        "|---|---|---|---|---|",
    ]
    for tag in tags:
        cells = [_num(s.get(f"{stat}_{tag}")) for stat in ("is", "same_is", "null_is", "lift")]
        lines.append(f"| {tag} | " + " | ".join(cells) + " |")
    if "lift_object" in s:
        lines.append(f"| ground-truth object (area {_num(s['area_object'])}) | "
                     f"{_num(s['is_object'])} | - | - | {_num(s['lift_object'])} |")  # fmt: skip
    if "is_true_object_area" in s:
        lines.append(f"| true-class CAM region at the object's area | "
                     f"{_num(s['is_true_object_area'])} | - | - | - |")  # fmt: skip
    return [*lines, ""] if len(lines) > 2 else []


def _test_order(name: str) -> tuple[int, str]:
    """Calibrated tests first (0: the same-class null, 1: CAM against the object), then the
    context (2: other-class null, 3: against a random mask)."""
    if name.startswith("specific_same"):
        return (0, name)
    if name.startswith("cam_vs_object"):
        return (1, name)
    return (2 if name.startswith("specific") else 3, name)


def _num(v: Tensor | float | None) -> str:
    return "n/a" if v is None else f"{float(v):.3g}"
