"""Per-image outcomes of a run, ``outcomes.json`` beside ``metrics.json``.

A sweep's comparison pairs two variants image by image (docs/METHODS.md §7.6); the
accuracies in ``metrics.json`` alone only allow an unpaired comparison. The file is written
atomically before ``metrics.json``, so a completed run always has both.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from pse_lightning.reporting.files import write_json_atomic

OUTCOMES_FILE = "outcomes.json"
FIELDS = ("index", "clean_correct", "adv_correct")


def write_outcomes(run_dir: str | Path, outcomes: dict[str, Tensor]) -> Path:
    """Write the (N,) ``index``, ``clean_correct`` and ``adv_correct`` columns as lists."""
    lengths = {len(outcomes[k]) for k in FIELDS}
    if len(lengths) != 1:
        raise ValueError(f"per-image outcomes need columns of one length, got {lengths}")
    columns = {k: [int(v) for v in outcomes[k].tolist()] for k in FIELDS}
    return write_json_atomic(Path(run_dir) / OUTCOMES_FILE, columns)


def read_outcomes(run_dir: str | Path) -> dict[str, Tensor] | None:
    """The run's outcomes as tensors, or None for a run written before they were kept."""
    path = Path(run_dir) / OUTCOMES_FILE
    if not path.exists():
        return None
    columns = json.loads(path.read_text())
    index = torch.tensor(columns["index"], dtype=torch.long)
    order = index.argsort()  # aligned() matches runs by sorted index
    return {
        k: torch.tensor(columns[k], dtype=torch.long if k == "index" else torch.bool)[order]
        for k in FIELDS
    }


def aligned(a: dict[str, Tensor], b: dict[str, Tensor], key: str) -> tuple[Tensor, Tensor]:
    """``key`` outcomes of two runs on the images both evaluated, matched by dataset index."""
    common, pos_a, pos_b = _intersect(a["index"], b["index"])
    if common == 0:
        raise ValueError("the two runs share no evaluated image: they cannot be paired")
    return a[key][pos_a], b[key][pos_b]


def _intersect(index_a: Tensor, index_b: Tensor) -> tuple[int, Tensor, Tensor]:
    shared = index_a[torch.isin(index_a, index_b)]
    pos_a = torch.searchsorted(index_a, shared)
    pos_b = torch.searchsorted(index_b, shared)
    return len(shared), pos_a, pos_b
