"""Statistics of a masking curve: pure functions on per-image outcomes reduced over processes.

Every accuracy gets a Wilson 95% interval; the random-units control is summarised over its
draws (mean ± sd and range); variants are compared on the same images with the exact McNemar
test, Holm-adjusted over every comparison the report shows (docs/METHODS.md §7).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from pse_lightning.core.proportions import (
    discordant_pairs,
    holm_adjust,
    mcnemar_exact,
    wilson_interval,
)

# Accuracies of a masked model: on clean images, on examples crafted on the unmasked model
# (transferred) and on examples crafted on the masked model itself (adaptive).
METRICS: tuple[str, ...] = ("clean", "transfer", "adaptive")
# The undefended outcome each metric is compared with: its clean accuracy, and its robust
# accuracy (the transferred examples are the attack on the undefended model itself).
REFERENCE = {"clean": "clean", "transfer": "robust", "adaptive": "robust"}


@dataclass(frozen=True)
class MaskChoice:
    """One evaluated set of masked units.

    Attributes:
        k: number of masked units.
        selection: 'top' (the defense), 'random' or 'bottom' (the controls).
        draw: index of the random draw (0 for 'top' and 'bottom').
        units: the masked unit indices.
    """

    k: int
    selection: str
    draw: int
    units: tuple[int, ...]

    @property
    def key(self) -> tuple[int, ...]:
        """The set of units, as a sorted tuple: choices with equal keys are one model."""
        return tuple(sorted(self.units))


def accuracy_rows(choices: Sequence[MaskChoice], outcomes: dict[str, Tensor]) -> list[dict]:
    """One row per choice: its accuracies with Wilson 95% intervals.

    Args:
        choices: the C evaluated choices.
        outcomes: metric -> (N, C) bool per-image correctness, columns in ``choices`` order.

    Returns:
        Rows with k, selection, draw, units, n and ``<metric>_acc``, ``<metric>_lo``,
        ``<metric>_hi`` for every metric.
    """
    n = int(outcomes["clean"].shape[0])
    rows = []
    for j, choice in enumerate(choices):
        row: dict[str, Any] = {
            "k": choice.k,
            "selection": choice.selection,
            "draw": choice.draw,
            "units": list(choice.units),
            "n": n,
        }
        for metric in METRICS:
            hits = int(outcomes[metric][:, j].sum())
            low, high = wilson_interval(hits, n)
            row[f"{metric}_acc"] = hits / n if n else math.nan
            row[f"{metric}_lo"], row[f"{metric}_hi"] = low, high
        rows.append(row)
    return rows


def random_spread(rows: Sequence[dict]) -> list[dict]:
    """Per k, the random-units control over its draws: mean, sd (n−1), min and max."""
    by_k: dict[int, list[dict]] = {}
    for row in rows:
        if row["selection"] == "random":
            by_k.setdefault(row["k"], []).append(row)
    spread = []
    for k, draws in sorted(by_k.items()):
        entry: dict[str, Any] = {"k": k, "draws": len(draws)}
        for metric in METRICS:
            values = [r[f"{metric}_acc"] for r in draws]
            entry[f"{metric}_mean"] = statistics.fmean(values)
            entry[f"{metric}_sd"] = statistics.stdev(values) if len(values) > 1 else math.nan
            entry[f"{metric}_min"], entry[f"{metric}_max"] = min(values), max(values)
        spread.append(entry)
    return spread


def paired_comparisons(
    choices: Sequence[MaskChoice], outcomes: dict[str, Tensor], undefended: dict[str, Tensor]
) -> list[dict]:
    """Exact McNemar tests of the top-k mask against the undefended model and the bottom-k
    mask, per k and metric, on the same images; p-values Holm-adjusted over all of them.

    Pairs of identical models (k = 0, or top and bottom with the same units) carry no
    information and are left out rather than diluting the correction.

    Args:
        choices, outcomes: as for :func:`accuracy_rows`.
        undefended: 'clean' and 'robust' -> (N,) bool correctness of the unmasked model.
    """
    bottom = {c.k: j for j, c in enumerate(choices) if c.selection == "bottom"}
    tests = []
    for j, choice in enumerate(choices):
        if choice.selection != "top":
            continue
        others = []
        if choice.k > 0:
            others.append(("undefended", lambda m: undefended[REFERENCE[m]]))
        b = bottom.get(choice.k)
        if b is not None and choices[b].key != choice.key:
            others.append(("bottom", lambda m, b=b: outcomes[m][:, b]))
        for versus, other in others:
            for metric in METRICS:
                tests.append(
                    _mcnemar_row(choice.k, metric, versus, outcomes[metric][:, j], other(metric))
                )
    for test, adjusted in zip(tests, holm_adjust([t["p"] for t in tests]), strict=True):
        test["p_holm"] = adjusted
    return tests


def _mcnemar_row(k: int, metric: str, versus: str, defended: Tensor, other: Tensor) -> dict:
    only_defended, only_other = discordant_pairs(defended, other)
    n = max(int(defended.numel()), 1)
    return {
        "k": k,
        "metric": metric,
        "versus": versus,
        "acc": float(defended.sum()) / n,
        "acc_other": float(other.sum()) / n,
        "only_top": only_defended,
        "only_other": only_other,
        "p": mcnemar_exact(defended, other),
    }


def deployed_scalars(
    rows: Sequence[dict], tests: Sequence[dict], undefended: dict[str, Tensor], k: int
) -> dict[str, float]:
    """The logged numbers of the deployed defense (top ``k``) against the undefended model."""
    top = next(r for r in rows if r["selection"] == "top" and r["k"] == k)
    n = max(int(undefended["clean"].numel()), 1)

    def p_value(metric: str) -> float:
        found = [
            t["p"]
            for t in tests
            if (t["k"], t["metric"], t["versus"]) == (k, metric, "undefended")
        ]
        return found[0] if found else 1.0  # k = 0: the defense is the undefended model

    return {
        "k": float(k),
        "clean_acc": top["clean_acc"],
        "transfer_acc": top["transfer_acc"],
        "adaptive_acc": top["adaptive_acc"],
        "undefended_clean_acc": float(undefended["clean"].sum()) / n,
        "undefended_robust_acc": float(undefended["robust"].sum()) / n,
        "mcnemar_p_clean": p_value("clean"),
        "mcnemar_p_adaptive": p_value("adaptive"),
    }
