"""Projected gradient descent in an L-inf or L2 ball (Madry et al., 2018)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from typing_extensions import Unpack

from pse_lightning.attacks.base import Attack, AttackBatch, AttackOptions, Perturbation
from pse_lightning.attacks.losses import ATTACK_LOSSES, is_success
from pse_lightning.attacks.norms import Norm
from pse_lightning.validation import require_at_least, require_choice, require_positive


class BestIterate:
    """Per sample, the most adversarial iterate scored so far: a successful one beats an
    unsuccessful one, then the higher objective wins. Iterates are scored by the forward
    pass of their own gradient step, so tracking costs no forward pass."""

    def __init__(self, x: Tensor) -> None:
        self.x = x.clone()
        self.logits: Tensor | None = None
        self.key = torch.full((len(x),), -torch.inf, device=x.device)
        self.success = torch.zeros(len(x), dtype=torch.bool, device=x.device)

    def update(self, x_it: Tensor, logits: Tensor, objective: Tensor, success: Tensor) -> None:
        # Successful iterates rank above every unsuccessful one, whatever the objective.
        key = torch.where(success, objective.float() + 1e30, objective.float())
        better = key > self.key
        if self.logits is None:
            self.logits = torch.full_like(logits, torch.nan)
        self.key = torch.where(better, key, self.key)
        self.success |= success
        self.x[better] = x_it[better]
        self.logits[better] = logits[better]

    def result(self, x_final: Tensor) -> Tensor | Perturbation:
        """The best successful iterate where one was seen (with its logits), else the final
        iterate (unscored: the base class forwards it only if its success is read)."""
        if self.logits is None:
            return x_final
        keep = self.success[:, None, None, None]
        logits = self.logits.masked_fill(~self.success[:, None], torch.nan)
        return Perturbation(torch.where(keep, self.x, x_final), logits)


class PGD(Attack):
    """Projected gradient ascent on the attack objective inside an Lp ball.

    Per sample it returns the most adversarial iterate: the successful iterate with the
    highest objective where any iterate of any restart succeeded, else the last iterate
    (whose success the base class checks). Each restart starts afresh from its own random
    point, keyed by (seed, dataset index, restart), so results do not depend on batching.
    The tracking reuses each step's forward pass: ``restarts * steps`` gradient evaluations
    and no other forward pass, so adversarial training (which reads only ``x_adv``) pays
    nothing for it.

    Args:
        norm: 'linf' (signed steps) or 'l2' (normalised-gradient steps).
        eps: the budget in [0, 1] pixel units.
        step_size: length of each ascent step, in the same units as eps.
        steps: gradient steps per restart (each one forward and one backward pass).
        random_start: start from a uniform point of the ball instead of x (restarts after
            the first always start at random: from x they would repeat the first).
        restarts: independent runs per sample.
        loss: 'ce', 'margin', or 'kl' (maximise KL(f(x) || f(x')): the TRADES inner problem).
        **common: targeted, target_rule, seed, compile: see :class:`~.base.Attack`.
    """

    def __init__(
        self,
        *,
        norm: Norm = "linf",
        eps: float = 0.03,
        step_size: float = 0.0075,
        steps: int = 10,
        random_start: bool = True,
        restarts: int = 1,
        loss: str = "ce",
        **common: Unpack[AttackOptions],
    ) -> None:
        super().__init__(norm=norm, eps=eps, **common)
        self.step_size = require_positive("attack.step_size", step_size)
        self.steps = require_at_least("attack.steps", steps, 1)
        self.random_start = bool(random_start)
        self.restarts = require_at_least("attack.restarts", restarts, 1)
        self.loss = require_choice("attack.loss", loss, ATTACK_LOSSES)

    def _perturb(self, model: nn.Module, batch: AttackBatch) -> Perturbation:
        x = batch.x
        reference = None
        if self.loss == "kl":
            with torch.no_grad():
                reference = torch.log_softmax(model(x), dim=1)
        best = BestIterate(x)
        for restart in range(self.restarts):
            start = self.random_start or restart > 0
            x_adv = self.sample_start(batch, restart) if start else x
            for _ in range(self.steps):
                x_next, logits, objective = self.ascent_step(
                    model, x_adv, batch, self.loss, self.step_size, reference
                )
                best.update(x_adv, logits, objective, self._hit(logits, batch))
                x_adv = x_next
        return best.result(x_adv)

    def _hit(self, logits: Tensor, batch: AttackBatch) -> Tensor:
        return is_success(logits, batch.y, batch.target, self.targeted)
