"""Projected gradient descent in an L-inf or L2 ball (Madry et al., 2018)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pse_lightning.attacks.base import Attack, AttackBatch
from pse_lightning.attacks.losses import ATTACK_LOSSES
from pse_lightning.attacks.norms import Norm
from pse_lightning.validation import require_at_least, require_choice, require_positive


class PGD(Attack):
    """Projected gradient ascent on the attack objective inside an Lp ball.

    Args:
        norm: 'linf' (signed steps) or 'l2' (normalised-gradient steps).
        eps: the budget in [0, 1] pixel units.
        step_size: length of each ascent step, in the same units as eps.
        steps: number of gradient steps (each costs one forward and one backward pass).
        random_start: start from a uniform point of the ball instead of x.
        loss: 'ce', 'margin', or 'kl' (maximise KL(f(x) || f(x')): the TRADES inner problem).
        targeted, target_rule, seed: see :class:`~pse_lightning.attacks.base.Attack`.
    """

    def __init__(
        self,
        *,
        norm: Norm = "linf",
        eps: float = 0.03,
        step_size: float = 0.0075,
        steps: int = 10,
        random_start: bool = True,
        loss: str = "ce",
        targeted: bool = False,
        target_rule: str = "random",
        seed: int = 0,
    ) -> None:
        super().__init__(norm=norm, eps=eps, targeted=targeted, target_rule=target_rule, seed=seed)
        self.step_size = require_positive("attack.step_size", step_size)
        self.steps = require_at_least("attack.steps", steps, 1)
        self.random_start = bool(random_start)
        self.loss = require_choice("attack.loss", loss, ATTACK_LOSSES)

    def _perturb(self, model: nn.Module, batch: AttackBatch) -> Tensor:
        x = batch.x
        reference = None
        if self.loss == "kl":
            with torch.no_grad():
                reference = torch.log_softmax(model(x), dim=1)
        x_adv = self.sample_start(batch) if self.random_start else x
        for _ in range(self.steps):
            grad = self.objective_gradient(model, x_adv, batch, self.loss, reference)
            x_adv = self.ball.project(x, self.ball.ascend(x_adv, grad, self.step_size))
        # The final iterate has no logits yet: the base class's one forward pass scores it.
        return x_adv
