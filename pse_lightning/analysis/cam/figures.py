"""One figure per kept example of the CAM analysis, in the project's figure style.

Two rows (clean x with B_true, adversarial x' with B_target) of three panels: the image with
its prediction, the normalised CAM of the predicted class as a heat map over the grey image
(colour bar in units of the map's maximum), and the amplified perturbation with the outline
of the mask the Findings test (the top 20% of the class's map, ``FINDING_AREA``), the factor
and that mask's score written on the panel.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.lines import Line2D
from torch import Tensor

from pse_lightning.analysis.cam.result import FINDING_AREA, CAMExamples
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

MAP_UNIT = "CAM, min-max normalised per image"
_OUTLINE = PALETTE[4]  # cyan: readable over the grey perturbation panel


def example_figure(
    examples: CAMExamples, i: int, class_names: Sequence[str], out_dir: Path
) -> Path:
    """Draw example ``i`` and save it as ``cam_example_<dataset index>.png``."""
    fig, axes = new_figure(2, 3, width=9.5, height=6.0)
    name = lambda c: class_name(class_names, int(c))  # noqa: E731
    delta = examples.x_adv[i] - examples.x[i]
    share = f"top {FINDING_AREA:.0%}"
    rows = (
        ("clean", examples.x[i], examples.map_clean[i], examples.pred_clean[i],
         examples.mask_true[i], "B_true", f"true class {name(examples.y[i])} on x"),
        ("adversarial", examples.x_adv[i], examples.map_adv[i], examples.pred_adv[i],
         examples.mask_target[i], "B_target", f"target {name(examples.target[i])} on x'"),
    )  # fmt: skip
    scores = examples.region_scores(i)  # the IS in exactly the outlined masks
    for r, (label, image, cam_map, pred, mask, mask_name, of) in enumerate(rows):
        show_image(axes[r, 0], image, f"{label}: predicted {name(pred)}")
        show_map(axes[r, 1], cam_map, unit=MAP_UNIT, background=image,
                 title=f"CAM of the predicted class\n{name(pred)}")  # fmt: skip
        show_perturbation(axes[r, 2], delta,
                          f"IS in {share} {mask_name} = {scores[r]:.2f}\nδ")  # fmt: skip
        _outline(axes[r, 2], mask, f"{mask_name}: {share} of the CAM of the {of}")
    return save(fig, out_dir / f"cam_example_{int(examples.index[i])}.png")


def _outline(ax: Axes, mask: Tensor, label: str) -> None:
    """The mask's border over a panel, named in a legend (or the legend says it is empty/full)."""
    area = float(mask.float().mean())
    if 0 < area < 1:
        ax.contour(mask.float().numpy(), levels=[0.5], colors=_OUTLINE, linewidths=0.9)
    state = "" if 0 < area < 1 else (" (empty)" if area == 0 else " (whole image)")
    handle = Line2D([], [], color=_OUTLINE, linewidth=0.9, label=f"{label}{state}")
    ax.legend(handles=[handle], fontsize=FONT_SIZE - 2, loc="lower center",
              bbox_to_anchor=(0.5, -0.22), frameon=False)  # fmt: skip


def example_panel(examples: CAMExamples, limit: int) -> ExamplePanel:
    """The CAM's columns of the report's per-example panel: the map of the class predicted
    on x and on x' over the image; also the W&B examples table's ``cam_clean`` and
    ``cam_adv`` columns. ``limit``: the analysis keeps dataset indices below it."""

    def draw(row: Sequence[Axes], k: int, name: Callable[[int], str]) -> None:
        panels = (
            (examples.map_clean[k], examples.x[k], examples.pred_clean[k], "x"),
            (examples.map_adv[k], examples.x_adv[k], examples.pred_adv[k], "x'"),
        )
        for ax, (values, image, pred, on) in zip(row, panels, strict=True):
            show_map(ax, values, unit=MAP_UNIT, background=image,
                     title=f"CAM {name(int(pred))} on {on}")  # fmt: skip

    return ExamplePanel(
        label="CAM",
        index=examples.index,
        columns=2,
        draw=draw,
        caption=(
            "the CAM of the class predicted on x (the true class) and on x' (the adversarial "
            "class) over the grey image, min-max normalised per image. CAM panels read 'not "
            f"kept' for dataset indices at or above analysis.cam.examples ({limit})"
        ),
        maps={"cam_clean": examples.map_clean, "cam_adv": examples.map_adv},
    )
