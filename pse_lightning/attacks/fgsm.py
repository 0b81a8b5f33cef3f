"""Fast gradient sign method (Goodfellow et al., 2015)."""

from __future__ import annotations

from torch import Tensor, nn

from pse_lightning.attacks.base import Attack, AttackBatch
from pse_lightning.validation import require_choice


class FGSM(Attack):
    """One signed-gradient step of size eps on the cross-entropy (L-inf threat model).

    Args:
        eps: L-inf budget in [0, 1] pixel units.
        loss: 'ce' (the original) or 'margin'.
        targeted, target_rule, seed, compile: see :class:`~pse_lightning.attacks.base.Attack`.
    """

    def __init__(
        self,
        *,
        eps: float = 0.03,
        loss: str = "ce",
        targeted: bool = False,
        target_rule: str = "random",
        seed: int = 0,
        compile: bool = False,
    ) -> None:
        super().__init__(
            norm="linf",
            eps=eps,
            targeted=targeted,
            target_rule=target_rule,
            seed=seed,
            compile=compile,
        )
        self.loss = require_choice("attack.loss", loss, ("ce", "margin"))

    def _perturb(self, model: nn.Module, batch: AttackBatch) -> Tensor:
        grad = self.objective_gradient(model, batch.x, batch, self.loss)
        return self.ball.ascend(batch.x, grad, self.eps)
