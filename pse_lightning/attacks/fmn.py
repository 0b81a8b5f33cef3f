"""Fast Minimum-Norm attack (Pintor et al., 2021) in L1, L2 and L-inf."""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn
from typing_extensions import Unpack

from pse_lightning.attacks.base import Attack, AttackBatch, AttackOptions, Perturbation
from pse_lightning.attacks.losses import margin
from pse_lightning.attacks.minnorm import (
    MIN_NORMS,
    Iterate,
    boundary_distance,
    cosine_anneal,
    descend,
    project_lp,
    unit_l2,
    worst_norm,
)
from pse_lightning.attacks.search import BestSoFar
from pse_lightning.validation import (
    require_at_least,
    require_choice,
    require_in_range,
    require_positive,
)


class FMN(Attack):
    """FMN: descend the logit margin inside an adaptive Lp ball around x.

    Each iteration moves delta by ``alpha_k`` along the unit-L2 gradient of the margin
    (own logit minus the best other, or the reverse towards a target), projects it onto
    the Lp ball of radius eps and clips x + delta to the box. eps adapts per sample: until
    the first adversarial iterate it is the first-order distance to the boundary,
    ||delta|| + |margin| / ||grad||_dual; afterwards it shrinks by (1 - gamma_k), never
    above the smallest adversarial norm found, while the iterate is adversarial, and grows
    by (1 + gamma_k) while it is not. alpha_k and gamma_k follow cosines from their initial
    to their final values. The smallest adversarial iterate seen is returned with its
    logits; a sample never found is returned unchanged and reported as a failure.

    Costs one forward and one input-gradient backward pass per step; every sample runs
    all steps (no early stop) and nothing is random, so results do not depend on the
    batch. A minimum-norm attack: there is no budget (``norm`` is the distance minimised).

    Args:
        norm: the distance minimised, 'l2', 'l1' or 'linf'.
        steps: iterations, i.e. gradient evaluations per image.
        init_step, final_step: alpha at the first and last step (final: init / 100 when
            null).
        gamma, final_gamma: the relative eps change at the first and last step.
        targeted, target_rule, seed, compile: see :class:`~pse_lightning.attacks.base.Attack`
            (``seed`` is unused: FMN is deterministic).
    """

    def __init__(
        self,
        *,
        norm: str = "l2",
        steps: int = 100,
        init_step: float = 1.0,
        final_step: float | None = None,
        gamma: float = 0.05,
        final_gamma: float = 0.001,
        **common: Unpack[AttackOptions],
    ) -> None:
        super().__init__(norm=None, eps=None, **common)
        # Not ``self.norm``: that names a budget ball, and FMN has none.
        self.distance = require_choice("attack.norm", norm, MIN_NORMS)
        self.steps = require_at_least("attack.steps", steps, 1)
        self.init_step = require_positive("attack.init_step", init_step)
        final = self.init_step / 100 if final_step is None else final_step
        self.final_step = require_positive("attack.final_step", final)
        self.gamma = require_in_range("attack.gamma", gamma, 0.0, 1.0, low_open=True)
        self.final_gamma = require_in_range(
            "attack.final_gamma", final_gamma, 0.0, 1.0, low_open=True
        )

    def _perturb(self, model: nn.Module, batch: AttackBatch) -> Perturbation:
        x, norm = batch.x, self.distance
        eps = torch.full((len(x),), float("inf"), device=x.device)
        found = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        cap = worst_norm(x, norm, batch.support)

        def update(it: Iterate, best: BestSoFar) -> Tensor:
            nonlocal eps, found
            alpha = cosine_anneal(it.step, self.steps, self.init_step, self.final_step)
            gamma = cosine_anneal(it.step, self.steps, self.gamma, self.final_gamma)
            found = found | it.adversarial
            # Past the first-order boundary by gamma: aiming exactly at it approaches it
            # from the clean side forever on a (near-)linear model.
            reach = it.size + (1 + gamma) * boundary_distance(it.margin, it.grad, norm)
            outside = torch.where(found, eps * (1 + gamma), reach)
            shrunk = torch.minimum(eps * (1 - gamma), best.score)
            eps = torch.minimum(torch.where(it.adversarial, shrunk, outside), cap)
            return project_lp(it.delta - alpha * unit_l2(it.grad), eps, norm)

        best = descend(
            model,
            batch,
            targeted=self.targeted,
            norm=norm,
            steps=self.steps,
            loss=partial(margin, targeted=self.targeted),
            update=update,
            gradients=self.gradients,
        )
        return best.result()
