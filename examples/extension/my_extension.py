"""A toy attack and a toy analysis, registered the documented way (README, "Extending").

``tests/cli/test_extending.py`` runs both through the real pipeline, so this example cannot rot.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from typing_extensions import Unpack

from pse_lightning.analysis.base import AdversarialBatch, Analysis, AnalysisResult
from pse_lightning.attacks import Attack, AttackBatch, AttackOptions
from pse_lightning.core.contract import Term, metric


class BrightnessShift(Attack):
    """Brighten every pixel by eps: the weakest L-inf attack there is, as a template.

    ``_perturb`` is the only method an attack writes; the base class validates the batch,
    freezes the model, resolves targets, clips to the box and the budget, and scores the
    result. The keywords every attack takes (``targeted``, ``target_rule``, ``seed``,
    ``compile``) arrive in ``**common`` and go to the base class unchanged.
    """

    def __init__(self, *, eps: float = 0.03, **common: Unpack[AttackOptions]) -> None:
        super().__init__(norm="linf", eps=eps, **common)

    def _perturb(self, model: nn.Module, batch: AttackBatch) -> Tensor:
        return batch.x + self.eps


class MeanAbsPerturbation(Analysis):
    """Mean |x_adv - x| over every pixel of every evaluated image.

    Fixed-size ``sum`` states reduce exactly across processes, so DDP gives the numbers of
    one process. What the report, W&B and a sweep say about its keys is declared here, with
    the keys as ``compute`` returns them (logged as ``test/mean_abs/<key>``).
    """

    name = "mean_abs"
    key_results = ("value",)  # W&B run summary: results/mean_abs_value

    @classmethod
    def glossary(cls) -> tuple[Term, ...]:
        return (metric("value", r"value", "Mean |x_adv − x| over every pixel of every "
                       "evaluated image, pixels in [0, 1].", ""),)  # fmt: skip

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, model: nn.Module, batch: AdversarialBatch) -> None:
        delta = (batch.x_adv - batch.x).abs().double()
        self.total += delta.sum()
        self.count += delta.numel()

    def compute(self) -> AnalysisResult:
        return AnalysisResult(scalars={"value": self.total / self.count.clamp_min(1)})
