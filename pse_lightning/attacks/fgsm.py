"""Fast gradient sign method (Goodfellow et al., 2015)."""

from __future__ import annotations

from torch import Tensor, nn
from typing_extensions import Unpack

from pse_lightning.attacks.base import Attack, AttackBatch, AttackOptions
from pse_lightning.validation import require_choice


class FGSM(Attack):
    """One signed-gradient step of size eps on the cross-entropy (L-inf threat model).

    Args:
        eps: L-inf budget in [0, 1] pixel units.
        loss: 'ce' (the original) or 'margin'.
        **common: targeted, target_rule, seed, compile: see :class:`~.base.Attack`.
    """

    def __init__(
        self,
        *,
        eps: float = 0.03,
        loss: str = "ce",
        **common: Unpack[AttackOptions],
    ) -> None:
        super().__init__(norm="linf", eps=eps, **common)
        self.loss = require_choice("attack.loss", loss, ("ce", "margin"))

    def _perturb(self, model: nn.Module, batch: AttackBatch) -> Tensor:
        grad = self.objective_gradient(model, batch.x, batch, self.loss)
        return self.ball.ascend(batch.x, grad, self.eps)
