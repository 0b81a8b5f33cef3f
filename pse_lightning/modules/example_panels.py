"""The per-example panel of the report and the map columns of the W&B examples table.

One row per kept adversarial example; each analysis that declares an
:class:`~pse_lightning.core.report.ExamplePanel` (``Analysis.example_panel``) draws its own
columns (the PSE analysis: x, x', δ and its maps; the CAM analysis: its maps on x and x').
Rows are joined by dataset index, which no analysis may do itself (none reads another's
result), so it lives with the report writer. Nothing here knows any analysis.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.figure import Figure
from torch import Tensor

from pse_lightning.core.report import ExamplePanel, ReportSection
from pse_lightning.reporting.figures import FONT_SIZE, class_name, new_figure, save

MAX_ROWS = 6
FILE = "example_panels.png"
INTRO = "One row per kept successful adversarial example (dataset index, true → target class): "


def _rows_by_index(panel: ExamplePanel) -> dict[int, int]:
    """{dataset index: row} of a panel's kept examples."""
    return {int(i): j for j, i in enumerate(panel.index.tolist())}


def example_map_columns(
    panels: Mapping[str, ExamplePanel], index: Tensor
) -> dict[str, list[Tensor | None]]:
    """The map columns of the W&B examples table, one entry per dataset index in ``index``:
    each declared map of that example, None where its analysis kept none; the columns of
    the analyses that ran, in their order."""
    out: dict[str, list[Tensor | None]] = {}
    rows = [int(i) for i in index.tolist()]
    for panel in panels.values():
        at = _rows_by_index(panel)
        for column, values in panel.maps.items():
            out[column] = [None if i not in at else values[at[i]] for i in rows]
    return out


def example_panels_section(
    panels: Mapping[str, ExamplePanel], out_dir: Path, class_names: Sequence[str]
) -> ReportSection | None:
    """The panel figure and its caption, or None when no leading analysis kept an example."""
    lead = next((p for p in panels.values() if p.leads and len(p)), None)
    if lead is None:
        return None
    others = [p for p in panels.values() if p is not lead]
    joined = [_rows_by_index(p) for p in others]
    # Examples every analysis kept come first.
    order = sorted(
        range(len(lead)),
        key=lambda j: (sum(int(lead.index[j]) not in at for at in joined), j),
    )
    path = save(draw_panels(lead, others, order[:MAX_ROWS], class_names), Path(out_dir) / FILE)
    caption = INTRO + "; ".join(p.caption for p in (lead, *others) if p.caption) + "."
    return ReportSection(title="Per-example panels", figures=[path],
                         captions={path.stem: caption})  # fmt: skip


def draw_panels(
    lead: ExamplePanel,
    others: Sequence[ExamplePanel],
    rows: Sequence[int],
    class_names: Sequence[str],
) -> Figure:
    """The panel's figure: per row (a position in ``lead``), the lead's columns, then each
    other analysis's columns for the same dataset index, or '<label> not kept'."""
    columns = lead.columns + sum(p.columns for p in others)
    fig, axes = new_figure(len(rows), columns, width=2.1 * columns, height=2.3 * len(rows))
    joined = [_rows_by_index(p) for p in others]
    name = lambda c: class_name(class_names, int(c))  # noqa: E731
    for r, j in enumerate(rows):
        row, index = axes[r], int(lead.index[j])
        lead.draw(row[: lead.columns], j, name)
        start = lead.columns
        for panel, at in zip(others, joined, strict=True):
            cells = row[start : start + panel.columns]
            start += panel.columns
            if index in at:
                panel.draw(cells, at[index], name)
                continue
            for ax in cells:
                ax.text(0.5, 0.5, f"{panel.label} not kept", ha="center", va="center",
                        fontsize=FONT_SIZE)  # fmt: skip
                ax.set_xticks([])
                ax.set_yticks([])
    return fig
