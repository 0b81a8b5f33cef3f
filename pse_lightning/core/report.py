"""The unit of the on-disk report and of W&B: what one part of a run contributes.

It sits at the bottom of the package because analyses, defenses and the report writer
all produce or consume it, and none of them may import the others.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class ReportSection:
    """What one analysis contributes to ``report.md`` and to W&B.

    Attributes:
        title: section heading.
        markdown: body text (tables in markdown, short interpretation).
        figures: PNG files written into the run directory, embedded in the report and
            logged to W&B as images under ``report/<title>/<file stem>``.
        tables: W&B tables, name -> (columns, rows).
        captions: figure file stem -> its caption (what it shows, units, amplification);
            the report prints one under every figure.
        key_numbers: the few numbers a reader needs first, metric key (as in
            ``AnalysisResult.scalars``) -> value; shown at the top of the report.
        meaning: one sentence, generated from those numbers, saying what they mean.
        prefix: the metric prefix of the keys (the analysis's log name), set by the writer.
    """

    title: str
    markdown: str = ""
    figures: list[Path] = field(default_factory=list)
    tables: dict[str, tuple[list[str], list[list[Any]]]] = field(default_factory=dict)
    captions: dict[str, str] = field(default_factory=dict)
    key_numbers: dict[str, float] = field(default_factory=dict)
    meaning: str = ""
    prefix: str = ""


@dataclass
class ExamplePanel:
    """One analysis's columns of the report's per-example panel and of the W&B examples
    table, for the examples it kept (rows joined across analyses by dataset index).

    Attributes:
        label: the analysis as the panel names it ("CAM not kept").
        index: (E,) dataset indices of the kept examples, in row order.
        columns: axes the analysis draws per row.
        draw: ``draw(axes, j, class_name)`` draws kept example ``j`` into ``columns`` axes;
            ``class_name(label) -> str`` names a class.
        caption: the analysis's clause of the panel's caption.
        leads: its rows make the panel (it draws the images, x, x' and δ): the panel shows
            the examples the first leading analysis kept, the others join them by index.
        maps: W&B examples-table column name -> (E, H, W) maps aligned with ``index``.
    """

    label: str
    index: Any
    columns: int
    draw: Callable[[Sequence[Any], int, Callable[[int], str]], None]
    caption: str = ""
    leads: bool = False
    maps: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.index)
