"""AutoAttack, standard version without FAB-T (Croce & Hein, 2020).

Robust accuracy under AutoAttack is the number reviewers accept: per sample, the worst case
over a fixed sequence of parameter-free attacks, each run only on the samples that every
earlier one left robust. By default this is the white-box core of the standard version:
APGD-CE, then APGD-T (targeted DLR towards each of the 9 classes with the highest clean
logits in turn). ``square=True`` adds the black-box Square Attack (5000 queries) as the last
stage, which gives the standard version minus FAB-T; it is off by default because its 5000
forward passes per robust image are far too many for CPU runs. FAB-T is not implemented; on
models without gradient masking FAB-T and Square rarely break a sample the two APGD stages
left robust (Croce & Hein 2020, table 2), but a model suspected of masking gradients needs
Square (and FAB-T, from the authors' package).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from typing_extensions import Unpack

from pse_lightning.attacks.apgd import Tally, restart_stream, subset
from pse_lightning.attacks.base import Attack, AttackBatch, AttackOptions, Perturbation
from pse_lightning.attacks.norms import Norm
from pse_lightning.attacks.square import square_run
from pse_lightning.validation import require_at_least

STAGES: tuple[str, ...] = ("clean", "apgd-ce", "apgd-t", "square")


class AutoAttack(Attack):
    """APGD-CE then APGD-T (then, with ``square``, the Square Attack) on the samples still
    robust; a sample survives only if every stage fails.

    Samples misclassified already are returned unchanged (they count as broken, as in the
    authors' evaluation). Untargeted: APGD-CE (one run), then for rank r = 2, ..., 1 +
    ``target_classes`` an APGD run with the targeted DLR loss towards the class with the
    r-th highest clean logit, success meaning any misclassification. Targeted (a given
    target): APGD with CE towards the target, then with the targeted DLR towards it.
    Every run has ``steps`` iterations, one random start keyed by (seed, dataset index,
    stage) and the authors' schedule (see :class:`~pse_lightning.attacks.apgd.APGD`). The
    logits of every returned image are known, so the base class pays no scoring forward.

    Cost per sample: one clean forward, then ``steps + 1`` gradient evaluations for each
    run it takes part in: at most (1 + ``target_classes``) (steps + 1); with
    ``early_stop`` a sample APGD-CE breaks at iteration i costs only i + 2. ``square`` adds
    up to ``square_queries`` gradient-free forward passes per sample still robust.

    Args:
        norm: 'linf' or 'l2'.
        eps: the budget in [0, 1] pixel units.
        steps: APGD iterations per run (the standard version: 100).
        target_classes: APGD-T targets per sample (the standard version: 9; capped at the
            number of classes - 1).
        early_stop: a sample leaves each run at its first adversarial iterate: the same
            robust accuracy as without it (each sample's schedule is its own) for a
            fraction of the cost where samples break early; false: the authors' trajectory
            (a broken sample iterates on and keeps its last adversarial iterate).
        square: run the Square Attack (:class:`~pse_lightning.attacks.Square`, p_init 0.8,
            the authors' unscaled p schedule) on the survivors as the last stage: the
            standard version minus FAB-T.
        square_queries: its queries per sample (the standard version: 5000).
        **common: targeted, target_rule, seed, compile: see :class:`~.base.Attack`.

    ``AttackResult.extras``: ``{"stage": (N,) index into ``STAGES`` of the stage that
    broke the sample (0: misclassified already), -1 where it survived}``.
    """

    def __init__(
        self,
        *,
        norm: Norm = "linf",
        eps: float = 0.03,
        steps: int = 100,
        target_classes: int = 9,
        early_stop: bool = True,
        square: bool = False,
        square_queries: int = 5000,
        **common: Unpack[AttackOptions],
    ) -> None:
        super().__init__(norm=norm, eps=eps, **common)
        self.steps = require_at_least("attack.steps", steps, 1)
        self.target_classes = require_at_least("attack.target_classes", target_classes, 1)
        self.early_stop = bool(early_stop)
        if not isinstance(square, bool):
            raise ValueError(f"attack.square must be true or false, got {square!r}")
        self.square = square
        self.square_queries = require_at_least("attack.square_queries", square_queries, 1)

    def _perturb(self, model: nn.Module, batch: AttackBatch) -> Perturbation:
        with torch.no_grad():
            clean = model(batch.x)
        tally = Tally(batch, ball=self.ball, steps=self.steps, rho=0.75, seed=self.seed,
                      early_stop=self.early_stop, gradients=self.gradients)  # fmt: skip
        wrong = (clean.argmax(1) == batch.target) if self.targeted else clean.argmax(1) != batch.y
        tally.found |= wrong
        tally.logits = clean.clone()
        tally.broken_by[wrong] = 0
        # APGD-CE's strongest point is what a sample that survives everything returns.
        tally.run(model, stream=restart_stream(1, 0), loss="ce", aim=batch.target, stage=1)
        for aim, r in self._aims(clean, batch):
            tally.run(model, stream=restart_stream(2, r), loss="dlr", aim=aim, stage=2,
                      comparable=False)  # fmt: skip
        if self.square:
            self._square(model, tally)
        return tally.result({"stage": tally.broken_by})

    def _square(self, model: nn.Module, tally: Tally) -> None:
        """The Square Attack on the samples still robust (stage 3); an unbroken sample keeps
        the point of APGD-CE."""
        rows = tally.robust_rows()
        if len(rows) == 0:
            return
        outcome, _ = square_run(model, subset(tally.batch, rows), ball=self.ball,
                                n_queries=self.square_queries, p_init=0.8, seed=self.seed,
                                rescale=False)  # fmt: skip
        tally.merge(rows, outcome, stage=3, comparable=False)

    def _aims(self, clean: Tensor, batch: AttackBatch) -> list[tuple[Tensor, int]]:
        """(aim, rank) of each APGD-T run: the given target, or the classes ranked
        2..1 + target_classes by clean logit."""
        if self.targeted:
            return [(batch.target, 0)]
        ranked = clean.argsort(dim=1, descending=True)
        last = min(self.target_classes, clean.shape[1] - 1)
        return [(ranked[:, r], r) for r in range(1, last + 1)]
