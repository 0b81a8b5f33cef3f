"""AutoAttack (Croce & Hein, 2020): the standard version by default, a cheaper one on demand.

Robust accuracy under AutoAttack is the number reviewers accept: per sample, the worst case
over a fixed sequence of parameter-free attacks, each run only on the samples that every
earlier one left robust. ``version='standard'`` is the authors' standard version: APGD-CE,
APGD-T (targeted DLR towards each of the 9 classes with the highest clean logits in turn),
FAB-T (the same 9 classes) and the black-box Square Attack (5000 queries), with the authors'
settings. ``version='fast'`` runs only the two APGD stages: on models without gradient
masking FAB-T and Square rarely break a sample the APGD stages left robust (Croce & Hein
2020, table 2), and Square's 5000 forward passes per robust image dominate a CPU run, but it
is not the standard version, and a number from it must say so. ``fab`` and ``square`` add or
drop those stages whatever the version.
"""

from __future__ import annotations

import torch
from torch import nn
from typing_extensions import Unpack

from pse_lightning.attacks.apgd import Tally, restart_stream, subset
from pse_lightning.attacks.base import Attack, AttackBatch, AttackOptions, Perturbation
from pse_lightning.attacks.fab import fab_stage
from pse_lightning.attacks.losses import runner_up_aims
from pse_lightning.attacks.norms import Norm
from pse_lightning.attacks.square import square_run
from pse_lightning.validation import require_at_least, require_choice

STAGES: tuple[str, ...] = ("clean", "apgd-ce", "apgd-t", "fab-t", "square")
VERSIONS: tuple[str, ...] = ("standard", "fast")


class AutoAttack(Attack):
    """APGD-CE, APGD-T, FAB-T and Square (``version='standard'``) or APGD-CE and APGD-T
    (``'fast'``) on the samples still robust; a sample survives only if every stage fails.

    Samples misclassified already are returned unchanged (they count as broken, as in the
    authors' evaluation). Untargeted: APGD-CE (one run), then for rank r = 2, ..., 1 +
    ``target_classes`` an APGD run with the targeted DLR loss towards the class with the
    r-th highest clean logit, then FAB-T towards the same classes in the same order
    (:class:`~pse_lightning.attacks.FAB`, one run each, from x), then the Square Attack;
    success always means any misclassification within eps. Targeted (a given target):
    APGD with CE towards the target, APGD with the targeted DLR, targeted FAB and targeted
    Square towards it. Every APGD run has ``steps`` iterations, one random start keyed by
    (seed, dataset index, stage) and the authors' schedule (see
    :class:`~pse_lightning.attacks.apgd.APGD`); every FAB run ``steps`` iterations. The
    logits of every returned image are known, so the base class pays no scoring forward.

    Cost per sample: one clean forward, then ``steps + 1`` gradient evaluations for each
    APGD run it takes part in (at most (1 + ``target_classes``) (steps + 1)), about one
    gradient evaluation and one forward per FAB-T iteration (at most ``target_classes``
    ``steps`` of each), and up to ``square_queries`` forward passes; with ``early_stop`` a
    sample leaves each run at its first adversarial point.

    Args:
        norm: 'linf' or 'l2'.
        eps: the budget in [0, 1] pixel units.
        version: 'standard' (APGD-CE, APGD-T, FAB-T, Square: the authors' standard
            version) or 'fast' (APGD-CE, APGD-T only: cheaper, not the standard version).
        steps: APGD and FAB iterations per run (the standard version: 100).
        target_classes: APGD-T and FAB-T targets per sample (the standard version: 9;
            capped at the number of classes - 1).
        early_stop: a sample leaves each run at its first adversarial point: the same
            robust accuracy as without it (each sample's schedule is its own) for a
            fraction of the cost where samples break early; false: the authors' trajectory
            (a broken sample iterates on and keeps its last adversarial iterate).
        fab: run FAB-T; None: as ``version`` says.
        square: run the Square Attack (:class:`~pse_lightning.attacks.Square`, p_init 0.8,
            the authors' unscaled p schedule) as the last stage; None: as ``version`` says.
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
        version: str = "standard",
        steps: int = 100,
        target_classes: int = 9,
        early_stop: bool = True,
        fab: bool | None = None,
        square: bool | None = None,
        square_queries: int = 5000,
        **common: Unpack[AttackOptions],
    ) -> None:
        super().__init__(norm=norm, eps=eps, **common)
        self.version = require_choice("attack.version", version, VERSIONS)
        self.steps = require_at_least("attack.steps", steps, 1)
        self.target_classes = require_at_least("attack.target_classes", target_classes, 1)
        self.early_stop = bool(early_stop)
        standard = version == "standard"
        self.fab = standard if fab is None else _flag("fab", fab)
        self.square = standard if square is None else _flag("square", square)
        self.square_queries = require_at_least("attack.square_queries", square_queries, 1)

    @property
    def stages(self) -> tuple[str, ...]:
        """The stages this configuration runs, in order."""
        return tuple(s for s, on in zip(STAGES[1:], (True, True, self.fab, self.square),
                                        strict=True) if on)  # fmt: skip

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
        aims = [(batch.target, 0)] if self.targeted else runner_up_aims(clean, self.target_classes)
        for aim, r in aims:
            tally.run(model, stream=restart_stream(2, r), loss="dlr", aim=aim, stage=2,
                      comparable=False)  # fmt: skip
        if self.fab:
            fab_stage(model, tally, clean, target_classes=0 if self.targeted
                      else self.target_classes, steps=self.steps, stage=STAGES.index("fab-t"),
                      stream_stage=STAGES.index("fab-t"), early_stop=self.early_stop,
                      gradients=self.gradients)  # fmt: skip
        if self.square:
            self._square(model, tally)
        return tally.result({"stage": tally.broken_by})

    def _square(self, model: nn.Module, tally: Tally) -> None:
        """The Square Attack on the samples still robust (the last stage); an unbroken
        sample keeps the point of APGD-CE."""
        rows = tally.robust_rows()
        if len(rows) == 0:
            return
        outcome, _ = square_run(model, subset(tally.batch, rows), ball=self.ball,
                                n_queries=self.square_queries, p_init=0.8, seed=self.seed,
                                rescale=False)  # fmt: skip
        tally.merge(rows, outcome, stage=STAGES.index("square"), comparable=False)


def _flag(key: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"attack.{key} must be true, false or null, got {value!r}")
    return value
