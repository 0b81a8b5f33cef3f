"""Atomic file writes of the report (see :mod:`pse_lightning.core.atomic`) and JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pse_lightning.core.atomic import (  # noqa: F401 (the report's writers, in one place)
    file_mode,
    write_atomic,
    write_files_atomic,
    write_text_atomic,
)


def json_text(data: Any) -> str:
    """JSON with sorted keys; NaN and ±inf (an unbounded interval) are written as null so
    any JSON reader accepts them."""
    return json.dumps(_json_safe(data), indent=2, sort_keys=True) + "\n"


def write_json_atomic(path: str | Path, data: Any) -> Path:
    """:func:`json_text` of ``data``, written atomically."""
    return write_text_atomic(path, json_text(data))


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value
