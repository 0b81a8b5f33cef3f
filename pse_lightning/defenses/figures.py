"""The accuracy-vs-k figure of neuron masking, drawn with the project's figure helpers."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes

from pse_lightning.defenses.curve_stats import METRICS
from pse_lightning.reporting.figures import FONT_SIZE, PALETTE, new_figure, save

TITLES = {
    "clean": "clean images",
    "transfer": "transferred attack (crafted unmasked)",
    "adaptive": "adaptive attack (crafted masked)",
}


def _interval_line(
    ax: Axes, rows: Sequence[dict[str, Any]], metric: str, colour: str, label: str
) -> None:
    """Accuracy against k with its Wilson 95% band."""
    rows = sorted(rows, key=lambda r: r["k"])
    ks = [r["k"] for r in rows]
    ax.fill_between(ks, [r[f"{metric}_lo"] for r in rows], [r[f"{metric}_hi"] for r in rows],
                    color=colour, alpha=0.18, linewidth=0)  # fmt: skip
    ax.plot(ks, [r[f"{metric}_acc"] for r in rows], "-o", color=colour, ms=3, label=label)


def _spread_line(ax: Axes, spread: Sequence[dict[str, Any]], metric: str, colour: str) -> None:
    """The random control's mean against k, with a ± 1 sd band over draws."""
    if not spread:
        return
    ks = [e["k"] for e in spread]
    mean = [e[f"{metric}_mean"] for e in spread]
    sd = [0.0 if e[f"{metric}_sd"] != e[f"{metric}_sd"] else e[f"{metric}_sd"] for e in spread]
    ax.fill_between(ks, [m - s for m, s in zip(mean, sd, strict=True)],
                    [m + s for m, s in zip(mean, sd, strict=True)],
                    color=colour, alpha=0.18, linewidth=0)  # fmt: skip
    draws = spread[0]["draws"]
    ax.plot(
        ks, mean, "--s", color=colour, ms=3, label=f"random units: mean ± sd over {draws} draw(s)"
    )


def accuracy_vs_k_figure(
    rows: Sequence[dict[str, Any]], spread: Sequence[dict[str, Any]], path: str | Path
) -> Path:
    """Clean, transferred and adaptive accuracy against k: the top-k mask and the
    bottom-k control with Wilson 95% bands, the random control with its spread over draws."""
    fig, axes = new_figure(1, len(METRICS), width=11.5, height=3.6)
    for ax, metric in zip(axes[0], METRICS, strict=True):
        top = [r for r in rows if r["selection"] == "top"]
        bottom = [r for r in rows if r["selection"] == "bottom"]
        _interval_line(ax, top, metric, PALETTE[1], "most sensitive units (95% Wilson)")
        _spread_line(ax, spread, metric, PALETTE[0])
        _interval_line(ax, bottom, metric, PALETTE[2], "least sensitive units (95% Wilson)")
        ax.set_title(TITLES[metric], fontsize=FONT_SIZE)
        ax.set_xlabel("masked units k", fontsize=FONT_SIZE)
        ax.set_ylim(0.0, 1.02)
        ax.set_xscale("symlog", linthresh=1.0)  # k = 0, 1, 2, 4, ... evenly spaced
    axes[0, 0].set_ylabel("accuracy (share of test images)", fontsize=FONT_SIZE)
    axes[0, 0].legend(fontsize=FONT_SIZE - 1, loc="best")
    return save(fig, path)
