"""What the CAM analysis hands from ``compute()`` to ``report()``: names and kept examples.

It sits apart from the metric so that the report and the figures can read a result without
importing the metric (and the model code behind it).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from torch import Tensor

# The masks every example is scored against; tensors with a "kind" axis follow this order.
MASK_KINDS: tuple[str, ...] = ("true", "target", "union")
# Columns of the W&B table of kept examples.
EXAMPLE_COLUMNS: tuple[str, ...] = (
    "index", "y", "target", "pred_clean", "pred_adv", "success",
    "is_true", "is_target", "area_true", "area_target", "pvalue_true", "pvalue_target",
)  # fmt: skip


@dataclass  # not frozen: torchmetrics maps over the tensors of what compute() returns
class CAMExamples:
    """The kept examples (dataset index < ``examples``), sorted by dataset index, on the CPU.

    Attributes:
        index, y, target, pred_clean, pred_adv: (n,) long.
        success: (n,) bool attack success.
        score: (n, len(MASK_KINDS)) IS of the perturbation against each mask kind.
        area: (n, len(MASK_KINDS)) mask area share in [0, 1].
        pvalue: (n, len(MASK_KINDS)) cyclic-shift p-value.
        x, x_adv: (n, C, H, W) clean and adversarial images.
        map_clean, map_adv: (n, H, W) normalised maps of the predicted class on x and x'.
        mask_true, mask_target: (n, H, W) bool B_true (on x) and B_target (on x').
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

    def row(self, i: int) -> list[int | bool | float]:
        """Example ``i`` as a row of the table with columns ``EXAMPLE_COLUMNS``."""
        true, target = MASK_KINDS.index("true"), MASK_KINDS.index("target")
        ints = [int(t[i]) for t in (self.index, self.y, self.target, self.pred_clean,
                                    self.pred_adv)]  # fmt: skip
        floats = [float(t[i, k]) for t in (self.score, self.area, self.pvalue)
                  for k in (true, target)]  # fmt: skip
        return [*ints, bool(self.success[i]), *(round(v, 4) for v in floats)]
