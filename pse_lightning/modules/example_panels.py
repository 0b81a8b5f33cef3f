"""The per-example panel of the report: one row per kept adversarial example with the
clean and adversarial images, the amplified perturbation, the promotion and suppression
maps (PSE) and the CAM of the true class on x and of the adversarial class on x' (CAM).

It joins two analyses' kept examples by dataset index, which no analysis may do itself
(none reads another's result), so it lives with the report writer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from torch import Tensor

from pse_lightning.analysis.base import AnalysisResult
from pse_lightning.analysis.cam.figures import MAP_UNIT
from pse_lightning.analysis.cam.result import CAMExamples
from pse_lightning.analysis.pse.figures import ATTRIBUTION_UNIT, share_scale
from pse_lightning.analysis.pse.samples import ExampleMaps
from pse_lightning.analysis.pse.statistics import PSE_TYPES
from pse_lightning.core.report import ReportSection
from pse_lightning.reporting.figures import (
    FONT_SIZE,
    class_name,
    new_figure,
    save,
    show_image,
    show_map,
    show_perturbation,
)
from pse_lightning.reporting.wandb_run import MAP_COLUMNS

COLUMNS = 7  # x, x', δ, promotion, suppression, CAM on x, CAM on x'
MAX_ROWS = 6
FILE = "example_panels.png"


def _find(results: Mapping[str, AnalysisResult], kind: type) -> object | None:
    """The kept examples of the first analysis whose examples are of ``kind`` (possibly
    none kept), or None when no such analysis ran."""
    for result in results.values():
        found = result.details.get("examples")
        if isinstance(found, kind):
            return found
    return None


def _rows_by_index(kept: Any) -> dict[int, int]:
    """{dataset index: row} of an analysis's kept examples (empty for None)."""
    return {} if kept is None else {int(i): j for j, i in enumerate(kept.index.tolist())}


def example_map_columns(
    results: Mapping[str, AnalysisResult], index: Tensor
) -> dict[str, list[Tensor | None]]:
    """The map columns of the W&B examples table (``MAP_COLUMNS``), one entry per dataset
    index in ``index``: the PSE analysis's promotion and suppression maps and the CAM
    analysis's maps on x and x' of that example, None where the analysis kept none; only
    the columns of the analyses that ran."""
    pse, cam = _find(results, ExampleMaps), _find(results, CAMExamples)
    out: dict[str, list[Tensor | None]] = {}
    rows = [int(i) for i in index.tolist()]
    for kept, names, fields in (
        (pse, MAP_COLUMNS[:2], ("promotion", "suppression")),
        (cam, MAP_COLUMNS[2:], ("map_clean", "map_adv")),
    ):
        if kept is None:
            continue
        at = _rows_by_index(kept)
        for name, field in zip(names, fields, strict=True):
            values = getattr(kept, field)
            out[name] = [None if i not in at else values[at[i]] for i in rows]
    return out


def example_panels_section(
    results: Mapping[str, AnalysisResult], out_dir: Path, class_names: Sequence[str]
) -> ReportSection | None:
    """The panel figure and its caption, or None when the PSE analysis kept no example."""
    pse = _find(results, ExampleMaps)
    if pse is None or not len(pse):
        return None
    ran = any(isinstance(r.details.get("examples"), CAMExamples) or "lift_true" in r.scalars
              for r in results.values())  # fmt: skip
    cam = _find(results, CAMExamples)
    cam_rows = _rows_by_index(cam)
    order = sorted(range(len(pse)), key=lambda j: (int(pse.index[j]) not in cam_rows, j))
    rows = order[:MAX_ROWS]
    note = "CAM not kept" if ran else "CAM not run"
    path = panels_figure(pse, cam, cam_rows, rows, class_names, Path(out_dir) / FILE, note)
    missing = "" if ran else " The CAM analysis did not run (analysis=all adds it)."
    caption = (
        "One row per kept successful adversarial example (dataset index, true → target "
        "class): the clean and adversarial images; δ = x' − x shown as grey + a·δ with the "
        "amplification a written on the panel; the promotion map Σ[a^t]₊ and suppression "
        "map Σ[−a^t0]₊ on one colour scale per row (logit change per pixel); the CAM of the "
        "class predicted on x (the true class) and on x' (the adversarial class) over the "
        "grey image, min-max normalised per image. CAM panels read 'not kept' for dataset "
        "indices at or above analysis.cam.examples." + missing
    )
    return ReportSection(title="Per-example panels", figures=[path],
                         captions={path.stem: caption})  # fmt: skip


def panels_figure(
    pse: ExampleMaps,
    cam: CAMExamples | None,
    cam_rows: dict[int, int],
    rows: Sequence[int],
    class_names: Sequence[str],
    path: Path,
    note: str = "CAM not kept",
) -> Path:
    """Draw the rows (positions in ``pse``) of the panel; see :func:`example_panels_section`."""
    return save(draw_panels(pse, cam, cam_rows, rows, class_names, note), path)


def draw_panels(
    pse: ExampleMaps,
    cam: CAMExamples | None,
    cam_rows: dict[int, int],
    rows: Sequence[int],
    class_names: Sequence[str],
    note: str,
) -> Figure:
    """The figure of :func:`panels_figure`, unsaved."""
    fig, axes = new_figure(len(rows), COLUMNS, width=2.1 * COLUMNS, height=2.3 * len(rows))
    name = lambda c: class_name(class_names, int(c))  # noqa: E731
    for r, j in enumerate(rows):
        row, index = axes[r], int(pse.index[j])
        x, delta = pse.x[j], pse.delta[j]
        show_image(row[0], x, f"#{index}: {name(pse.label[j])} → {name(pse.target[j])}")
        show_image(row[1], (x + delta).clamp(0, 1), f"x' ({PSE_TYPES[int(pse.type[j])]})")
        show_perturbation(row[2], delta, "δ")
        show_map(row[3], pse.promotion[j], unit=ATTRIBUTION_UNIT, title="promotion Σ[a^t]₊")
        show_map(row[4], pse.suppression[j], unit=ATTRIBUTION_UNIT, title="suppression Σ[−a^t0]₊")
        top = max(float(pse.promotion[j].max()), float(pse.suppression[j].max()), 1e-12)
        share_scale(row[3:5], top)
        _cam_panels(row[5:7], cam, cam_rows.get(index), name, note)
    return fig


def _cam_panels(
    axes: Sequence[Axes], cam: CAMExamples | None, k: int | None, name: Any, note: str
) -> None:
    """The CAM of the predicted class on x and on x', or ``note`` saying why there is none."""
    if cam is None or k is None:
        for ax in axes:
            ax.text(0.5, 0.5, note, ha="center", va="center", fontsize=FONT_SIZE)
            ax.set_xticks([])
            ax.set_yticks([])
        return
    panels: tuple[tuple[Tensor, Tensor, Tensor, str], ...] = (
        (cam.map_clean[k], cam.x[k], cam.pred_clean[k], "x"),
        (cam.map_adv[k], cam.x_adv[k], cam.pred_adv[k], "x'"),
    )
    for ax, (values, image, pred, on) in zip(axes, panels, strict=True):
        show_map(ax, values, unit=MAP_UNIT, background=image, title=f"CAM {name(pred)} on {on}")
