"""The PSE section of the run report, built from ``PSE.compute``'s result alone."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from torch import Tensor

from pse_lightning.analysis.base import AnalysisResult, ReportSection
from pse_lightning.analysis.pse import figures
from pse_lightning.analysis.pse.statistics import PSE_TYPES, SWEEP, sweep_fractions

TITLE = "Promotion-suppression effect (PSE)"
_DETAILS = ("rows", "examples", "r_hist", "sweep_counts")


def pse_section(
    result: AnalysisResult,
    out_dir: Path,
    class_names: Sequence[str],
    *,
    settings: str,
    tau_s: float,
    tau_p: float,
) -> ReportSection:
    """Figures (examples, histogram of r, promotion vs suppression), text and image table.

    Args:
        result: what ``PSE.compute`` returned.
        out_dir: folder for the PNG files.
        class_names: the dataset's class names (figures never show bare indices).
        settings: the sentence describing the method and thresholds.
        tau_s, tau_p: the type thresholds drawn on the figures.

    Raises:
        ValueError: ``result`` is not a PSE ``compute`` result.
    """
    missing = [key for key in _DETAILS if key not in result.details]
    if missing:
        raise ValueError(
            f"PSE.report needs the result of PSE.compute(), whose details hold {list(_DETAILS)}; "
            f"missing {missing}"
        )
    details = result.details
    rows, examples = details["rows"], details["examples"]
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    if len(examples):
        paths.append(figures.examples_figure(examples, class_names, out_dir / "pse_examples.png"))
    paths.append(
        figures.ratio_histogram_figure(
            details["r_hist"], tau_s, tau_p, out_dir / "pse_ratio_hist.png"
        )
    )
    if len(rows):
        paths.append(figures.scatter_figure(rows, tau_s, tau_p, out_dir / "pse_scatter.png"))
    return ReportSection(
        title=TITLE,
        markdown=markdown(result.scalars, details["sweep_counts"], settings),
        figures=paths,
        tables={"pse_images": rows.table()},
    )


def markdown(scalars: Mapping[str, Tensor], sweep_counts: Tensor, settings: str) -> str:
    """The type fractions, shares, completeness and the threshold sweep as text."""

    def num(key: str) -> float:
        return float(scalars[key])

    lines = [
        settings,
        "",
        "| type | fraction |",
        "|---|---|",
        *[f"| {name} | {num('frac_' + name):.3f} |" for name in PSE_TYPES],
        "",
        f"Mean promotion share {num('promotion_share'):.3f}, suppression share "
        f"{num('suppression_share'):.3f}, counter-effects {num('counter_share'):.3f}; "
        f"completeness residual mean {num('residual_mean'):.2e}, "
        f"max {num('residual_max'):.2e}.",
        "",
        "Threshold sweep (tau_s = q, tau_p = 1 - q; fractions of images with a defined r):",
        "",
        "| q | suppression | balanced | promotion |",
        "|---|---|---|---|",
    ]
    for q, fractions in zip(SWEEP, sweep_fractions(sweep_counts), strict=True):
        lines.append(f"| {q:.3g} | " + " | ".join(f"{v:.3f}" for v in fractions.tolist()) + " |")
    return "\n".join(lines)
