"""The dissection figures, drawn with the project's figure helpers.

Concepts and categories are named (never bare ids), every legend lists every mark drawn,
and the top-image panels name the unit, its concept and IoU. No figure here has a colour
map (categories are discrete colours, masks are outlines), so none needs a colour bar.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from matplotlib.axes import Axes
from matplotlib.lines import Line2D
from torch import Tensor
from torch.nn import functional as F

from pse_lightning.analysis.dissection.probe import ConceptTable
from pse_lightning.analysis.dissection.sensitive import SensitiveUnit
from pse_lightning.analysis.dissection.showcase import Showcase
from pse_lightning.analysis.dissection.summary import LayerUnits
from pse_lightning.reporting.figures import (
    FONT_SIZE,
    HEAT_CMAP,
    PALETTE,
    bar_chart,
    new_figure,
    save,
    show_image,
)

NOT_INTERPRETABLE = "#BBBBBB"  # grey: the last colour of PALETTE, kept for "no concept"


def _category_colour(g: int) -> str:
    return PALETTE[g % (len(PALETTE) - 1)]  # the grey is reserved for uninterpretable units


def iou_vs_sensitivity_figure(
    units: dict[str, LayerUnits],
    scalars: dict[str, Tensor],
    table: ConceptTable,
    iou_threshold: float,
    path: Path,
) -> Path:
    """One scatter per layer: best IoU against s_k, interpretable units coloured by the
    category of their concept, with Spearman's rho and its permutation p in the title."""
    fig, axes = new_figure(1, len(units), width=4.2 * len(units), height=3.6)
    for ax, (name, layer) in zip(axes[0], units.items(), strict=True):
        s, iou, interp = layer.s.double(), layer.iou.double(), layer.interpretable
        category = table.concept_category[layer.concept]
        ax.scatter(s[~interp], iou[~interp], s=12, c=NOT_INTERPRETABLE, label="not interpretable")
        for g, cat in enumerate(table.categories):
            chosen = interp & (category == g)
            if bool(chosen.any()):
                ax.scatter(s[chosen], iou[chosen], s=14, c=_category_colour(g), label=cat)
        ax.axhline(iou_threshold, color="k", lw=0.8, ls="--", label=f"IoU = {iou_threshold}")
        rho, p = scalars[f"{name}/spearman_rho"], scalars[f"{name}/spearman_p"]
        ax.set_title(f"{name}\nρ = {float(rho):.2f}, p = {float(p):.2g}", fontsize=FONT_SIZE)
        ax.set_xlabel(r"sensitivity $s_k = E|\Delta_k| / \sigma_k$ (unitless)", fontsize=FONT_SIZE)
        ax.set_ylabel("best IoU with a concept", fontsize=FONT_SIZE)
        ax.legend(fontsize=FONT_SIZE - 2, loc="best")
    return save(fig, path)


def interpretable_units_figure(
    scalars: dict[str, Tensor], layers: list[str], categories: list[str], path: Path
) -> Path:
    """Grouped bars: number of interpretable units per layer and concept category."""
    fig, axes = new_figure(width=1.6 + 1.4 * len(layers), height=3.4)
    groups = [f"{n}\n({int(float(scalars[n + '/units']))} units)" for n in layers]
    series = {
        cat: [float(scalars[f"{n}/{cat}/interpretable"]) for n in layers] for cat in categories
    }
    bar_chart(axes[0, 0], groups, series, ylabel="interpretable units", ylim=None)
    return save(fig, path)


def _image_at(images: Tensor, c: int, size: tuple[int, int]) -> Tensor:
    """Image ``c`` at the concept masks' resolution (the probe labels may be larger)."""
    image = images[c : c + 1]
    if tuple(image.shape[-2:]) != size:
        image = F.interpolate(image, size=size, mode="bilinear", align_corners=False)
    return image[0]


def _outline(ax: Axes, mask: Tensor, colour: str, style: str) -> None:
    if bool(mask.any()):
        ax.contour(
            mask.float().numpy(), levels=[0.5], colors=colour, linewidths=1.0, linestyles=style
        )


def top_images_figure(showcase: list[Showcase], path: Path) -> Path:
    """Rows of units, columns of their top-activating probe images: the activation mask
    outlined in white, the unit's concept mask dashed cyan."""
    cols = max(len(item.index) for item in showcase)
    fig, axes = new_figure(
        len(showcase), cols, width=1.5 * cols + 1.2, height=1.6 * len(showcase) + 0.5
    )
    for r, item in enumerate(showcase):
        for c in range(cols):
            ax = axes[r, c]
            ax.axis("off")
            if c >= len(item.index):
                continue
            size = tuple(item.concept_masks[c].shape)
            show_image(ax, _image_at(item.images, c, size), f"probe #{item.index[c]}")
            _outline(ax, item.concept_masks[c], "cyan", "--")
            _outline(ax, item.activation_masks[c], "white", "-")
        _row_label(
            axes[r, 0],
            f"{item.layer}:{item.unit}\n{item.concept}\n({item.category})\nIoU {item.iou:.2f}",
        )
    _mask_legend(fig, [("white", "-", "unit mask $S_k \\geq T_k$"),
                       ("cyan", "--", "the unit's best concept")])  # fmt: skip
    return save(fig, path)


def _row_label(ax: Axes, text: str) -> None:
    """The unit's name and numbers left of its row."""
    ax.text(-0.08, 0.5, text, transform=ax.transAxes, ha="right", va="center",
            fontsize=FONT_SIZE - 2)  # fmt: skip


def _mask_legend(fig: Any, lines: list[tuple[str, str, str]]) -> None:
    """One legend above the panels naming every outline drawn: (colour, style, label)."""
    handles = [Line2D([], [], color=c, lw=1.0, ls=style, label=label) for c, style, label in lines]
    legend = fig.legend(handles=handles, loc="outside upper center", ncols=len(lines),
                        fontsize=FONT_SIZE)  # fmt: skip
    legend.get_frame().set_facecolor("0.35")


ADV_COLOUR = "magenta"


def _activation_overlay(ax: Axes, values: Tensor, low: float, high: float) -> None:
    """The unit's upsampled activation as a translucent heat map over the image."""
    ax.imshow(values.float().numpy(), cmap=HEAT_CMAP, vmin=low, vmax=high, alpha=0.55,
              interpolation="nearest")  # fmt: skip


def sensitive_units_figure(items: list[SensitiveUnit], path: Path) -> Path:
    """Rows of the most sensitive units, column pairs of kept images: the unit's activation
    as a heat map (one scale per row, from its lowest value to at least its threshold) with
    its activation mask outlined on the clean image (white) and on the adversarial image
    (magenta, with the clean mask dashed white for comparison)."""
    k = len(items[0].index)
    fig, axes = new_figure(
        len(items), 2 * k, width=1.4 * 2 * k + 1.3, height=1.5 * len(items) + 0.5
    )
    for r, item in enumerate(items):
        low = float(torch.minimum(item.act_clean.min(), item.act_adv.min()))
        high = max(float(torch.maximum(item.act_clean.max(), item.act_adv.max())),
                   item.threshold, low + 1e-12)  # fmt: skip
        for j in range(k):
            clean, adv = axes[r, 2 * j], axes[r, 2 * j + 1]
            show_image(clean, item.x[j], f"#{int(item.index[j])} x")
            _activation_overlay(clean, item.act_clean[j], low, high)
            _outline(clean, item.mask_clean[j], "white", "-")
            show_image(adv, item.x_adv[j], f"#{int(item.index[j])} x'")
            _activation_overlay(adv, item.act_adv[j], low, high)
            _outline(adv, item.mask_clean[j], "white", "--")
            _outline(adv, item.mask_adv[j], ADV_COLOUR, "-")
            for ax, mask in ((clean, item.mask_clean[j]), (adv, item.mask_adv[j])):
                if not bool(mask.any()):  # below T_k everywhere: say so, not an empty panel
                    ax.text(0.5, 0.06, "no mask", transform=ax.transAxes, ha="center",
                            fontsize=FONT_SIZE - 2, color="white",
                            bbox={"facecolor": "0.2", "alpha": 0.7, "lw": 0})  # fmt: skip
        _row_label(
            axes[r, 0],
            f"{item.layer}:{item.unit}\ns = {item.s:.2f}\n{item.concept}\nIoU {item.iou:.2f}",
        )
    _mask_legend(fig, [("white", "-", "unit mask on x ($S_k \\geq T_k$)"),
                       (ADV_COLOUR, "-", "unit mask on x'"),
                       ("white", "--", "unit mask on x, drawn on x'")])  # fmt: skip
    return save(fig, path)
