"""PSE figures, drawn through :mod:`pse_lightning.reporting.figures` (one project style).

Class names instead of indices, colour bars with units (attributions are in logit units),
signed maps on the diverging map, the perturbation's amplification written on its panel,
and a legend entry for everything drawn.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from matplotlib.axes import Axes
from torch import Tensor

from pse_lightning.analysis.pse.mixture import Modes
from pse_lightning.analysis.pse.samples import ExampleMaps, ImageRows
from pse_lightning.analysis.pse.statistics import HIST_BINS, PSE_TYPES, SWEEP, sweep_fractions
from pse_lightning.core.report import ExamplePanel
from pse_lightning.reporting.figures import (
    FONT_SIZE,
    PALETTE,
    class_name,
    new_figure,
    save,
    show_image,
    show_map,
    show_perturbation,
)

ATTRIBUTION_UNIT = "logit change per pixel"
RATIO_LABEL = "PSE ratio r = [Δ_t]₊ / ([Δ_t]₊ + [−Δ_t0]₊)"


def examples_figure(examples: ExampleMaps, class_names: Sequence[str], path: Path) -> Path:
    """Per example: image, amplified perturbation, promotion, suppression, signed net map.

    Promotion and suppression share one colour scale per example, so their areas compare;
    the net map a^t - a^t0 (the pixel's share of the change of Z_t - Z_t0) is signed.
    """
    fig, axes = new_figure(len(examples), 5, width=12.5, height=2.5 * len(examples))
    for j, row in enumerate(axes):
        label, target = int(examples.label[j]), int(examples.target[j])
        show_image(
            row[0],
            examples.x[j],
            f"#{int(examples.index[j])}: {class_name(class_names, label)}"
            f" → {class_name(class_names, target)}",
        )
        show_perturbation(row[1], examples.delta[j], "δ = x_adv − x")
        r = float(examples.r[j])
        kind = PSE_TYPES[int(examples.type[j])]
        ratio = "undefined" if math.isnan(r) else f"{r:.2f}"
        show_map(row[2], examples.promotion[j], unit=ATTRIBUTION_UNIT,
                 title=f"promotion Σ[a^t]₊\n({kind}, r = {ratio})")  # fmt: skip
        show_map(row[3], examples.suppression[j], unit=ATTRIBUTION_UNIT,
                 title="suppression Σ[−a^t0]₊")  # fmt: skip
        share_scale(row[2:4], max(float(examples.promotion[j].max()),
                                  float(examples.suppression[j].max()), 1e-12))  # fmt: skip
        show_map(row[4], examples.net[j], unit=ATTRIBUTION_UNIT, signed=True,
                 title="net Σ(a^t − a^t0)")  # fmt: skip
    return save(fig, path)


def share_scale(axes: Sequence[Axes], vmax: float) -> None:
    """Put the last image of each axis (and its colour bar) on the scale [0, vmax]."""
    for ax in axes:
        ax.images[-1].set_clim(0.0, vmax)


def histogram_bars(hist: Tensor) -> list[tuple[int, Tensor, Tensor, Tensor]]:
    """Stacked bars of the by-type histogram (HIST_BINS, 3): per type k, (k, left edges,
    heights, bottoms) of its non-empty bars. The heights of type k sum to its image count,
    so a bin straddling a threshold shows both of its types."""
    edges = torch.linspace(0, 1, HIST_BINS + 1)[:-1]
    bottoms = torch.zeros(HIST_BINS, dtype=torch.float64)
    bars = []
    for k in range(3):
        heights = hist[:, k].double()
        mask = heights > 0
        if mask.any():
            bars.append((k, edges[mask], heights[mask], bottoms[mask].clone()))
        bottoms += heights
    return bars


def ratio_histogram_figure(
    hist: Tensor, tau_s: float, tau_p: float, path: Path, modes: Modes | None = None
) -> Path:
    """Histogram of r with the two thresholds, bars stacked by each image's type, and the
    Gaussian mixture preferred by BIC (scaled to image counts per bin) when fitted."""
    fig, axes = new_figure(width=5.0, height=4.0)
    ax = axes[0, 0]
    if float(hist.sum()) == 0:  # say so, rather than draw empty axes
        ax.text(0.5, 0.5, "no analysed image with a defined r\n(no successful attack)",
                ha="center", va="center", transform=ax.transAxes, fontsize=FONT_SIZE)  # fmt: skip
    for k, lefts, heights, bottoms in histogram_bars(hist):
        ax.bar(lefts.numpy(), heights.numpy(), width=1 / HIST_BINS, bottom=bottoms.numpy(),
               align="edge", color=PALETTE[k], edgecolor="k", linewidth=0.4,
               label=f"{PSE_TYPES[k]} (at these τ)")  # fmt: skip
    if modes is not None and modes.fit is not None:
        x = torch.linspace(0, 1, 401, dtype=torch.float64)
        y = modes.fit.density(x)[0] * float(hist.sum()) / HIST_BINS
        p = float(modes.p[2])
        test = "" if math.isnan(p) else f"; LRT 2 vs 3 p = {p:.2g}"
        ax.plot(x.numpy(), y.numpy(), color="k", linewidth=1.2,
                label=f"Gaussian mixture, k = {modes.k} (BIC){test}")  # fmt: skip
    for tau, name, style in ((tau_s, "τ_s", "--"), (tau_p, "τ_p", ":")):
        ax.axvline(tau, color="k", linestyle=style, linewidth=1, label=f"{name} = {tau:.3g}")
    ax.set_xlabel(RATIO_LABEL, fontsize=FONT_SIZE)
    ax.set_ylabel("images", fontsize=FONT_SIZE)
    ax.set_xlim(0, 1)
    ax.set_ylim(bottom=0)
    # Below the axes, so it never hides a bar or the fitted mixture.
    ax.legend(fontsize=FONT_SIZE - 1, loc="upper center", bbox_to_anchor=(0.5, -0.16),
              ncol=2, frameon=False)  # fmt: skip
    return save(fig, path)


def scatter_figure(rows: ImageRows, tau_s: float, tau_p: float, path: Path) -> Path:
    """Left: measured suppression -Δ_t0 vs promotion Δ_t, with the threshold rays.
    Right: gross pixel attributions S vs P. Both coloured by the image type."""
    fig, axes = new_figure(1, 2, width=10.0, height=4.0)
    left, right = axes[0]
    panels = (
        (left, -rows.delta_true, rows.delta_target, "measured logit changes",
         "suppression −Δ_t0 (logits)", "promotion Δ_t (logits)"),
        (right, rows.suppression, rows.promotion, "gross pixel attributions",
         "suppression S = Σ[−a^t0]₊ (logits)", "promotion P = Σ[a^t]₊ (logits)"),
    )  # fmt: skip
    for ax, xs, ys, title, xlabel, ylabel in panels:
        for k, name in enumerate(PSE_TYPES):
            m = rows.type == k
            if m.any():
                ax.scatter(xs[m].numpy(), ys[m].numpy(), s=10, color=PALETTE[k], label=name)
        ax.set_title(title, fontsize=FONT_SIZE)
        ax.set_xlabel(xlabel, fontsize=FONT_SIZE)
        ax.set_ylabel(ylabel, fontsize=FONT_SIZE)
    _threshold_rays(left, rows, tau_s, tau_p)
    for ax in (left, right):
        ax.legend(fontsize=FONT_SIZE - 1)
    return save(fig, path)


def _threshold_rays(ax: Axes, rows: ImageRows, tau_s: float, tau_p: float) -> None:
    """r = tau is the ray promotion = tau / (1 - tau) x suppression, drawn inside the data."""
    x_top = float(max(rows.delta_true.neg().max(), 1e-12))
    y_top = float(max(rows.delta_target.max(), 1e-12))
    for tau, style in ((tau_s, "--"), (tau_p, ":")):
        if 0 < tau < 1:
            slope = tau / (1 - tau)
            end = min(x_top, y_top / slope)
            ax.plot([0, end], [0, slope * end], color="k", linestyle=style, linewidth=0.8,
                    label=f"r = {tau:.3g}")  # fmt: skip


def sweep_figure(sweep_counts: Tensor, tau_s: float, tau_p: float, path: Path) -> Path:
    """Share of each type against the symmetric threshold q (tau_s = q, tau_p = 1 - q)."""
    fig, axes = new_figure(width=5.0, height=3.2)
    ax = axes[0, 0]
    qs = list(SWEEP)
    fractions = sweep_fractions(sweep_counts)
    for k in range(3):
        ax.plot(qs, fractions[:, k].numpy(), marker="o", color=PALETTE[k], label=PSE_TYPES[k])
    ax.axvline(tau_s, color="k", linestyle="--", linewidth=1,
               label=f"configured τ_s = {tau_s:.3g} (τ_p = {tau_p:.3g})")  # fmt: skip
    ax.set_xlabel("q (τ_s = q, τ_p = 1 − q)", fontsize=FONT_SIZE)
    ax.set_ylabel("share of images with a defined r", fontsize=FONT_SIZE)
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=FONT_SIZE - 1)
    return save(fig, path)


PANEL_CAPTION = (
    "the clean and adversarial images; δ = x' − x shown as grey + a·δ with the amplification "
    "a written on the panel; the promotion map Σ[a^t]₊ and suppression map Σ[−a^t0]₊ on one "
    "colour scale per row (logit change per pixel)"
)


def example_panel(examples: ExampleMaps) -> ExamplePanel:
    """The PSE's columns of the report's per-example panel: x, x', δ, promotion, suppression
    (it leads: its kept examples are the panel's rows); promotion and suppression are also
    the W&B examples table's map columns."""

    def draw(row: Sequence[Axes], j: int, name: Callable[[int], str]) -> None:
        x, delta = examples.x[j], examples.delta[j]
        index, label = int(examples.index[j]), int(examples.label[j])
        show_image(row[0], x, f"#{index}: {name(label)} → {name(int(examples.target[j]))}")
        show_image(row[1], (x + delta).clamp(0, 1), f"x' ({PSE_TYPES[int(examples.type[j])]})")
        show_perturbation(row[2], delta, "δ")
        show_map(row[3], examples.promotion[j], unit=ATTRIBUTION_UNIT, title="promotion Σ[a^t]₊")
        show_map(row[4], examples.suppression[j], unit=ATTRIBUTION_UNIT,
                 title="suppression Σ[−a^t0]₊")  # fmt: skip
        top = max(float(examples.promotion[j].max()), float(examples.suppression[j].max()))
        share_scale(row[3:5], max(top, 1e-12))

    return ExamplePanel(
        label="PSE",
        index=examples.index,
        columns=5,
        draw=draw,
        caption=PANEL_CAPTION,
        leads=True,
        maps={"promotion": examples.promotion, "suppression": examples.suppression},
    )
