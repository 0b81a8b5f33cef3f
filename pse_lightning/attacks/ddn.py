"""Decoupled Direction and Norm (Rony et al., 2019): a fast minimum-L2 attack."""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn
from typing_extensions import Unpack

from pse_lightning.attacks.base import Attack, AttackBatch, AttackOptions, Perturbation
from pse_lightning.attacks.losses import ascent_objective
from pse_lightning.attacks.minnorm import (
    Iterate,
    cosine_anneal,
    descend,
    scale_to_l2,
    unit_l2,
    worst_norm,
)
from pse_lightning.attacks.search import BestSoFar
from pse_lightning.validation import require_at_least, require_in_range, require_positive


def ce_descent(logits: Tensor, label: Tensor, *, targeted: bool) -> Tensor:
    """What DDN decreases: the cross-entropy on the target (targeted), else minus the
    cross-entropy on the true label."""
    return -ascent_objective(logits, label, targeted, "ce")


class DDN(Attack):
    """DDN: steps along the normalised cross-entropy gradient, with the norm decoupled.

    Each iteration moves delta by ``alpha_k`` along the unit-L2 gradient of the
    cross-entropy (away from y, or towards the target), then rescales delta onto the
    sphere of radius eps, and clips x + delta to the box. eps shrinks by (1 - gamma) while
    the iterate is adversarial and grows by (1 + gamma) (capped at the largest distance the
    box allows) while it is not, so the iterate oscillates around the boundary ever closer
    to x; alpha follows a cosine from ``init_step`` to ``final_step``. The smallest
    adversarial iterate seen is returned with its logits (no scoring forward pass); a
    sample never found is returned unchanged and reported as a failure.

    Costs one forward and one input-gradient backward pass per step; every sample runs
    all steps (no early stop), and nothing is random, so results do not depend on the
    batch. A minimum-norm attack: there is no budget.

    Args:
        steps: iterations, i.e. gradient evaluations per image.
        init_norm: eps of the first step (L2, [0, 1] pixel units).
        gamma: relative change of eps per step.
        init_step, final_step: the step length alpha at the first and the last step.
        targeted, target_rule, seed, compile: see :class:`~pse_lightning.attacks.base.Attack`
            (``seed`` is unused: DDN is deterministic).
    """

    def __init__(
        self,
        *,
        steps: int = 100,
        init_norm: float = 1.0,
        gamma: float = 0.05,
        init_step: float = 1.0,
        final_step: float = 0.01,
        **common: Unpack[AttackOptions],
    ) -> None:
        super().__init__(norm=None, eps=None, **common)
        self.steps = require_at_least("attack.steps", steps, 1)
        self.init_norm = require_positive("attack.init_norm", init_norm)
        self.gamma = require_in_range("attack.gamma", gamma, 0.0, 1.0, low_open=True)
        self.init_step = require_positive("attack.init_step", init_step)
        self.final_step = require_positive("attack.final_step", final_step)

    def _perturb(self, model: nn.Module, batch: AttackBatch) -> Perturbation:
        x = batch.x
        eps = torch.full((len(x),), self.init_norm, device=x.device)
        cap = worst_norm(x, "l2", batch.support)

        def update(it: Iterate, best: BestSoFar) -> Tensor:
            nonlocal eps
            alpha = cosine_anneal(it.step, self.steps, self.init_step, self.final_step)
            grown = torch.minimum(eps * (1 + self.gamma), cap)
            eps = torch.where(it.adversarial, eps * (1 - self.gamma), grown)
            return scale_to_l2(it.delta - alpha * unit_l2(it.grad), eps)

        best = descend(
            model,
            batch,
            targeted=self.targeted,
            norm="l2",
            steps=self.steps,
            loss=partial(ce_descent, targeted=self.targeted),
            update=update,
            gradients=self.gradients,
        )
        return best.result()
