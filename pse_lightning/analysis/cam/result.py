"""What the CAM analysis hands from ``compute()`` to ``report()``: names and kept examples.

It sits apart from the metric so that the report and the figures can read a result without
importing the metric (and the model code behind it).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from torch import Tensor

from pse_lightning.analysis.cam.statistics import interpretability_score

# The masks every example is scored against; tensors with a "kind" axis follow this order.
MASK_KINDS: tuple[str, ...] = ("true", "target", "union")
# The fixed area of the mask Claim 2's Findings test (top 20% of the map); the example
# figures outline this mask, so a figure shows what the verdict is about.
FINDING_AREA = 0.2
FINDING_TAG = f"top{round(100 * FINDING_AREA)}"
# Columns of the W&B table of kept examples: the threshold masks' IS, area and per-image
# cyclic-shift p (uncalibrated, docs/METHODS.md §3.4), then the IS in the outlined masks.
EXAMPLE_COLUMNS: tuple[str, ...] = (
    "index", "y", "target", "pred_clean", "pred_adv", "success",
    "is_true", "is_target", "area_true", "area_target",
    "shift_p_true_uncalibrated", "shift_p_target_uncalibrated",
    f"is_true_{FINDING_TAG}", f"is_target_{FINDING_TAG}",
)  # fmt: skip


@dataclass  # not frozen: torchmetrics maps over the tensors of what compute() returns
class CAMExamples:
    """The kept examples (dataset index < ``examples``), sorted by dataset index, on the CPU.

    Attributes:
        index, y, target, pred_clean, pred_adv: (n,) long.
        success: (n,) bool attack success.
        score: (n, len(MASK_KINDS)) IS of the perturbation against each threshold (or
            ``top_area``) mask kind.
        area: (n, len(MASK_KINDS)) that mask's area share in [0, 1].
        pvalue: (n, len(MASK_KINDS)) float64 cyclic-shift p-value (uncalibrated, §3.4).
        x, x_adv: (n, C, H, W) clean and adversarial images.
        map_clean, map_adv: (n, H, W) normalised maps of the predicted class on x and x'.
        mask_true, mask_target: (n, H, W) bool top ``FINDING_AREA`` of the true class's map
            on x and of the target class's map on x': the masks the Findings test.
    """

    index: Tensor
    y: Tensor
    target: Tensor
    pred_clean: Tensor
    pred_adv: Tensor
    success: Tensor
    score: Tensor
    area: Tensor
    pvalue: Tensor
    x: Tensor
    x_adv: Tensor
    map_clean: Tensor
    map_adv: Tensor
    mask_true: Tensor
    mask_target: Tensor

    def __len__(self) -> int:
        return len(self.index)

    def sorted_cpu(self) -> CAMExamples:
        """The same examples ordered by dataset index, on the CPU (1 and N processes agree)."""
        order = self.index.argsort()
        return CAMExamples(**{f.name: getattr(self, f.name)[order].cpu() for f in fields(self)})

    def region_scores(self, i: int) -> tuple[float, float]:
        """IS of example ``i``'s perturbation in ``mask_true`` and in ``mask_target``,
        computed from the outlined masks themselves."""
        delta = (self.x_adv[i] - self.x[i])[None]
        masks = (self.mask_true[i][None], self.mask_target[i][None])
        return tuple(float(interpretability_score(delta.double(), m)[0]) for m in masks)

    def row(self, i: int) -> list[int | bool | float]:
        """Example ``i`` as a row of the table with columns ``EXAMPLE_COLUMNS``."""
        true, target = MASK_KINDS.index("true"), MASK_KINDS.index("target")
        ints = [int(t[i]) for t in (self.index, self.y, self.target, self.pred_clean,
                                    self.pred_adv)]  # fmt: skip
        floats = [float(t[i, k]) for t in (self.score, self.area, self.pvalue)
                  for k in (true, target)]  # fmt: skip
        floats += self.region_scores(i)
        return [*ints, bool(self.success[i]), *(round(v, 4) for v in floats)]
