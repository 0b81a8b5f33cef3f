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
KEY_NUMBERS = ("scored", "is_true", "lift_true", "lift_target", "specific_true_top20",
               "specific_true_top20_p")  # fmt: skip
EXAMPLE_CAPTION = (
    "Top row: the clean image x with its prediction, the CAM of the predicted (true) class "
    "over the grey image (min-max normalised per image) and δ = x' − x as grey + a·δ "
    "(amplification a on the panel) with the outline of B_true. Bottom row: the same for "
    "the adversarial image x' and the CAM region B_target of its predicted class. IS: the "
    "share of δ's L2 norm inside the outlined region."
)


def meaning(s: dict[str, Tensor]) -> str:
    """One sentence from the numbers: the lift in the true-class region and whether the
    other-class test separates it from a region of the same area."""
    if not float(s.get("scored", 0)) > 0:
        return "No successful adversarial example was scored, so nothing is measured."
    lift = float(s["lift_true"])
    where = "more" if lift > 1 else "less"
    text = (
        f"The perturbation puts {lift:.3g}× the energy a random mask of the same area gets "
        f"into the true class's CAM region ({where} than chance)"
    )
    effect = s.get("specific_true_top20")
    if effect is not None and float(effect) == float(effect):
        low, high = float(s["specific_true_top20_low"]), float(s["specific_true_top20_high"])
        verdict = (
            "more than" if low > 0 else "less than" if high < 0 else "not distinguishably from"
        )
        text += (
            f"; in the top 20% of the map it gathers energy {verdict} another class's region "
            f"of the same area (IS² difference {float(effect):.3g}, 95% CI "
            f"[{low:.3g}, {high:.3g}])"
        )
    return text + "."


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
