"""The one figure style of the project and the helpers every figure uses.

Every figure of the report (the analyses', the defenses', the sweep's) is drawn through
these helpers, so they share one look: matplotlib's object API (no pyplot state, so jobs of a
multirun cannot leak figures into each other), class names instead of indices, colour bars
that name their unit, a perceptually uniform diverging map for signed quantities
(Crameri's ``berlin``) and a perceptually uniform sequential map for magnitudes and heat
maps (``magma``), and the amplification of any amplified perturbation written on the panel.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import IO

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from torch import Tensor

from pse_lightning.reporting.files import write_atomic
from pse_lightning.reporting.rendering import submit

SIGNED_CMAP = "berlin"  # diverging, perceptually uniform, zero at the centre
HEAT_CMAP = "magma"  # sequential, perceptually uniform: CAMs, energies, |δ|
DPI = 120
FONT_SIZE = 8
# One colour per PSE type (and other three-way splits), the same in every figure.
PALETTE = ("#4477AA", "#EE6677", "#228833", "#CCBB44", "#66CCEE", "#AA3377", "#BBBBBB")


def new_figure(
    rows: int = 1, cols: int = 1, *, width: float, height: float
) -> tuple[Figure, np.ndarray]:
    """A figure and its (rows, cols) array of axes, in the project style."""
    fig = Figure(figsize=(width, height), layout="constrained", dpi=DPI)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.tick_params(labelsize=FONT_SIZE - 1)
    return fig, axes


def save(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as PNG (creating the folder, atomically) and return the path; inside
    :func:`~pse_lightning.reporting.rendering.background_figures`, in the background."""
    path = Path(path)
    return submit(lambda: write_atomic(path, partial(_write_png, fig)), path)


def _write_png(fig: Figure, handle: IO[bytes]) -> None:
    fig.savefig(handle, format="png", dpi=DPI)


def class_name(names: Sequence[str], c: int) -> str:
    """The name of class ``c``; an index only when the dataset gives no names."""
    return str(names[c]) if 0 <= c < len(names) else f"class {c}"


def to_image(x: Tensor) -> np.ndarray:
    """(C, H, W) in [0, 1] -> (H, W, C) or (H, W) for ``imshow``."""
    array = x.detach().cpu().float().clamp(0, 1).permute(1, 2, 0).numpy()
    return array[..., 0] if array.shape[-1] == 1 else array[..., :3]


def show_image(ax: Axes, x: Tensor, title: str = "") -> None:
    """An image in [0, 1] (grey for one channel), without axes."""
    image = to_image(x)
    ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=1)
    _finish_panel(ax, title)


def amplification(delta: Tensor) -> float:
    """The factor that scales the largest |δ| to 0.5 (a full swing around grey)."""
    peak = float(delta.detach().abs().max())
    return 0.5 / peak if peak > 0 else 1.0


def show_perturbation(ax: Axes, delta: Tensor, title: str = "δ") -> float:
    """δ (C, H, W) drawn as grey + amplified δ, the factor written on the panel."""
    factor = amplification(delta)
    show_image(ax, 0.5 + factor * delta.detach().cpu().float(), f"{title} (×{factor:.3g})")
    return factor


def show_map(
    ax: Axes,
    values: Tensor,
    *,
    unit: str,
    title: str = "",
    signed: bool = False,
    background: Tensor | None = None,
) -> None:
    """A (H, W) map with a colour bar labelled ``unit``; signed maps are centred on zero.

    ``background`` (C, H, W) is shown in grey under a translucent map (CAM overlays).
    """
    array = values.detach().cpu().float().numpy()
    if background is not None:
        grey = background.detach().cpu().float().mean(dim=0).numpy()
        ax.imshow(grey, cmap="gray", vmin=0, vmax=1)
    if signed:
        bound = float(np.abs(array).max()) or 1.0
        kwargs = dict(cmap=SIGNED_CMAP, vmin=-bound, vmax=bound)
    else:
        kwargs = dict(cmap=HEAT_CMAP, vmin=0.0, vmax=float(array.max()) or 1.0)
    shown = ax.imshow(array, alpha=0.6 if background is not None else 1.0, **kwargs)
    bar = ax.figure.colorbar(shown, ax=ax, fraction=0.046, pad=0.02)
    bar.set_label(unit, fontsize=FONT_SIZE - 1)
    bar.ax.tick_params(labelsize=FONT_SIZE - 2)
    _finish_panel(ax, title)


def _finish_panel(ax: Axes, title: str) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=FONT_SIZE)


def bar_chart(
    ax: Axes,
    groups: Sequence[str],
    series: dict[str, Sequence[float | None]],
    *,
    ylabel: str,
    errors: dict[str, Sequence[float | None]] | None = None,
    ylim: tuple[float, float] | None = (0.0, 1.1),
) -> None:
    """Grouped bars (one colour per series, legend with every series), optional error bars."""
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        heights = [np.nan if v is None else float(v) for v in values]
        err = None
        if errors and name in errors:
            err = [np.nan if e is None else float(e) for e in errors[name]]
        bars = ax.bar(xs, heights, width, yerr=err, capsize=2, label=name,
                      color=PALETTE[i % len(PALETTE)])  # fmt: skip
        ax.bar_label(bars, fmt="%.2f", fontsize=FONT_SIZE - 2)
    ax.set_xticks(range(len(groups)), list(groups), fontsize=FONT_SIZE - 1)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_ylabel(ylabel, fontsize=FONT_SIZE)
    ax.legend(fontsize=FONT_SIZE - 1, ncols=min(4, len(series)), loc="best")


# -- report-level figures -------------------------------------------------------------------


def adversarial_examples_figure(
    examples: dict[str, Tensor], class_names: Sequence[str], path: str | Path
) -> Path:
    """Columns of (clean, adversarial, amplified perturbation) with labels and predictions."""
    n = len(examples["index"])
    fig, axes = new_figure(3, n, width=1.7 * n + 0.8, height=5.6)
    for j in range(n):
        x, x_adv = examples["x"][j], examples["x_adv"][j]
        y, p_clean, p_adv = (int(examples[k][j]) for k in ("y", "pred_clean", "pred_adv"))
        delta = x_adv - x
        index = int(examples["index"][j])
        l2, linf = float(delta.norm()), float(delta.abs().max())
        show_image(
            axes[0, j],
            x,
            f"#{index} {class_name(class_names, y)}\npred {class_name(class_names, p_clean)}",
        )
        show_image(axes[1, j], x_adv, f"adv pred\n{class_name(class_names, p_adv)}")
        if p_adv != y:
            axes[1, j].title.set_color("#CC3311")
        show_perturbation(axes[2, j], delta, f"L2 {l2:.2f} L∞ {linf:.3f}\nδ")
    for i, label in enumerate(("clean", "adversarial", "perturbation")):
        axes[i, 0].set_ylabel(label, fontsize=FONT_SIZE)
    return save(fig, path)


def summary_bar_figure(scalars: dict[str, float], path: str | Path) -> Path:
    """Clean accuracy, robust accuracy and success rate as one bar chart."""
    keys = [
        ("test/clean_acc", "clean acc"),
        ("test/robust_acc", "robust acc"),
        ("test/success_rate", "attack success"),
    ]
    fig, axes = new_figure(width=4.4, height=3.0)
    values = {"this run": [scalars.get(k) for k, _ in keys]}
    bar_chart(axes[0, 0], [label for _, label in keys], values, ylabel="share of test images")
    return save(fig, path)


def grouped_bar_figure(
    groups: list[str], series: dict[str, list[float | None]], path: str | Path, *, ylabel: str
) -> Path:
    """Bars per group (x axis), one colour per series; missing values are left out."""
    fig, axes = new_figure(width=1.6 + 1.3 * len(groups), height=3.3)
    bar_chart(axes[0, 0], groups, series, ylabel=ylabel)
    return save(fig, path)


def stacked_fraction_figure(
    bars: list[str], parts: dict[str, list[float | None]], path: str | Path, *, ylabel: str
) -> Path:
    """One bar per entry of ``bars``, split into ``parts`` (fractions that sum to at most 1)."""
    fig, axes = new_figure(width=1.8 + 0.9 * len(bars), height=3.6)
    ax = axes[0, 0]
    bottom = np.zeros(len(bars))
    for i, (name, values) in enumerate(parts.items()):
        heights = np.array([0.0 if v is None else float(v) for v in values])
        ax.bar(range(len(bars)), heights, 0.7, bottom=bottom, label=name,
               color=PALETTE[i % len(PALETTE)])  # fmt: skip
        bottom += heights
    ax.set_xticks(range(len(bars)), bars, rotation=30, ha="right", fontsize=FONT_SIZE - 1)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(ylabel, fontsize=FONT_SIZE)
    ax.legend(fontsize=FONT_SIZE - 1, ncols=min(4, len(parts)), loc="upper center",
              bbox_to_anchor=(0.5, 1.2))  # fmt: skip
    return save(fig, path)


NORM_LABELS = {"l2": "‖δ‖₂", "linf": "‖δ‖∞"}


def norm_distribution_figure(
    norms: dict[str, Tensor], path: str | Path, *, budget: tuple[str, float] | None = None
) -> Path:
    """Per norm (L2, L∞): histogram of the successful examples' perturbation norms with their
    empirical CDF on a second axis and the median marked; a fixed budget ε as a line.

    Args:
        norms: ``l2`` and ``linf`` -> (n,) per-image norms (pixels in [0, 1]), n >= 1.
        path: the PNG file.
        budget: (norm, ε) of a budgeted attack, drawn on that norm's panel; None for
            minimum-norm attacks.
    """
    return save(draw_norm_distribution(norms, budget=budget), path)


def draw_norm_distribution(
    norms: dict[str, Tensor], *, budget: tuple[str, float] | None = None
) -> Figure:
    """The figure of :func:`norm_distribution_figure`, unsaved."""
    fig, axes = new_figure(1, len(norms), width=5.0 * len(norms), height=3.2)
    for ax, (name, values) in zip(axes[0], norms.items(), strict=True):
        data = np.sort(values.detach().cpu().double().numpy())
        ax.hist(data, bins=min(30, max(5, len(data) // 2)), color=PALETTE[0], alpha=0.7,
                label=f"images (n = {len(data)})")  # fmt: skip
        ecdf = ax.twinx()
        ecdf.step(data, np.arange(1, len(data) + 1) / len(data), where="post",
                  color=PALETTE[1], label="empirical CDF")  # fmt: skip
        ecdf.set_ylim(0, 1.02)
        ecdf.set_ylabel("share of successful examples ≤ norm", fontsize=FONT_SIZE)
        ecdf.tick_params(labelsize=FONT_SIZE - 1)
        median = float(values.median())
        ax.axvline(median, color="k", linestyle="--", linewidth=1, label=f"median = {median:.3g}")
        if budget is not None and budget[0] == name:
            ax.axvline(budget[1], color=PALETTE[2], linestyle=":", linewidth=1.2,
                       label=f"budget ε = {budget[1]:.3g}")  # fmt: skip
        ax.set_xlabel(f"{NORM_LABELS.get(name, name)} of δ = x' − x (pixels in [0, 1])",
                      fontsize=FONT_SIZE)  # fmt: skip
        ax.set_ylabel("successful adversarial examples", fontsize=FONT_SIZE)
        handles = ax.get_legend_handles_labels()
        more = ecdf.get_legend_handles_labels()
        ax.legend(handles[0] + more[0], handles[1] + more[1], fontsize=FONT_SIZE - 1,
                  loc="center right")  # fmt: skip
    return fig
