"""Figures of the main report (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from torch import Tensor  # noqa: E402


def to_image(x: Tensor) -> np.ndarray:
    """(C, H, W) in [0, 1] -> (H, W, C) or (H, W) numpy for imshow."""
    array = x.detach().cpu().float().clamp(0, 1).permute(1, 2, 0).numpy()
    return array[..., 0] if array.shape[-1] == 1 else array


def perturbation_image(delta: Tensor) -> np.ndarray:
    """A perturbation scaled to fill [0, 1] around grey 0.5 (signs visible)."""
    scale = float(delta.abs().max()) or 1.0
    return to_image(0.5 + 0.5 * delta / scale)


def adversarial_examples_figure(
    examples: dict[str, Tensor], class_names: Sequence[str], path: str | Path
) -> Path:
    """Columns of (clean, adversarial, amplified perturbation) with labels and predictions."""
    n = len(examples["index"])
    fig, axes = plt.subplots(3, n, figsize=(1.6 * n + 0.6, 5.2), squeeze=False)
    cmap = "gray" if examples["x"].shape[1] == 1 else None
    for j in range(n):
        x, x_adv = examples["x"][j], examples["x_adv"][j]
        y, p_clean, p_adv = (int(examples[k][j]) for k in ("y", "pred_clean", "pred_adv"))
        delta = x_adv - x
        index = int(examples["index"][j])
        l2, linf = float(delta.norm()), float(delta.abs().max())
        panels = [
            (to_image(x), f"#{index} {class_names[y]}\npred {class_names[p_clean]}"),
            (to_image(x_adv), f"adv pred\n{class_names[p_adv]}"),
            (perturbation_image(delta), f"δ  L2 {l2:.2f}\nL∞ {linf:.3f}"),
        ]
        for i, (image, title) in enumerate(panels):
            ax = axes[i, j]
            ax.imshow(image, cmap=cmap if i < 2 else (cmap or None), vmin=0, vmax=1)
            ax.set_title(title, fontsize=7, color="red" if i == 1 and p_adv != y else "black")
            ax.axis("off")
    for i, label in enumerate(("clean", "adversarial", "perturbation")):
        axes[i, 0].text(
            -0.15,
            0.5,
            label,
            transform=axes[i, 0].transAxes,
            rotation=90,
            va="center",
            ha="right",
            fontsize=8,
        )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def summary_bar_figure(scalars: dict[str, float], path: str | Path) -> Path:
    """Clean accuracy, robust accuracy and success rate as one bar chart."""
    keys = [
        ("test/clean_acc", "clean acc"),
        ("test/robust_acc", "robust acc"),
        ("test/success_rate", "attack success"),
    ]
    values = [scalars.get(k, float("nan")) for k, _ in keys]
    fig, ax = plt.subplots(figsize=(4.2, 2.8))
    bars = ax.bar([label for _, label in keys], values, color=["#4c72b0", "#dd8452", "#c44e52"])
    ax.bar_label(bars, fmt="%.3f", fontsize=8)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("fraction of test samples")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def grouped_bar_figure(
    groups: list[str], series: dict[str, list[float | None]], path: str | Path, *, ylabel: str
) -> Path:
    """Bars per group (x axis), one colour per series; missing values are left out."""
    fig, ax = plt.subplots(figsize=(1.4 + 1.3 * len(groups), 3.2))
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        heights = [np.nan if v is None else v for v in values]
        bars = ax.bar(xs, heights, width, label=name)
        ax.bar_label(bars, fmt="%.2f", fontsize=6)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7, ncols=min(4, len(series)), loc="upper center")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def stacked_fraction_figure(
    bars: list[str], parts: dict[str, list[float | None]], path: str | Path, *, ylabel: str
) -> Path:
    """One bar per entry of ``bars``, split into ``parts`` (fractions that sum to at most 1)."""
    fig, ax = plt.subplots(figsize=(1.6 + 0.9 * len(bars), 3.4))
    bottom = np.zeros(len(bars))
    for name, values in parts.items():
        heights = np.array([0.0 if v is None else float(v) for v in values])
        ax.bar(range(len(bars)), heights, 0.7, bottom=bottom, label=name)
        bottom += heights
    ax.set_xticks(range(len(bars)), bars, rotation=30, ha="right", fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7, ncols=min(4, len(parts)), loc="upper center", bbox_to_anchor=(0.5, 1.18))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
