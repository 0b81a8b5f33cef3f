"""Markdown tables for report sections, built from the same rows as the W&B tables."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def format_cell(value: Any, digits: int = 3) -> str:
    """Floats to ``digits`` decimals (NaN as 'n/a'); anything else as ``str``."""
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 3) -> str:
    """A GitHub markdown table: one header row, then one line per row of cells."""
    if any(len(row) != len(columns) for row in rows):
        raise ValueError(f"every row needs {len(columns)} cells, one per column {list(columns)}")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(format_cell(v, digits) for v in row) + " |" for row in rows]
    return "\n".join(lines)
