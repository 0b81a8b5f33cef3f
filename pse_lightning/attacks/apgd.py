"""Auto-PGD (Croce & Hein, 2020): PGD with momentum and a step size that adapts itself.

The step size starts at 2 eps and is halved per sample at checkpoints when the loss stopped
rising, and the iterate then restarts from the best point found, so no step size needs
tuning. ``APGD`` is the attack; :func:`apgd_run` is one run on a batch, shared with
:class:`~pse_lightning.attacks.autoattack.AutoAttack`, which chains runs over the samples
still robust.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import Unpack

from pse_lightning.attacks.base import (
    STREAM_START,
    Attack,
    AttackBatch,
    AttackOptions,
    Perturbation,
)
from pse_lightning.attacks.compiled import EAGER, Gradients
from pse_lightning.attacks.losses import is_success, margin
from pse_lightning.attacks.norms import LpBall, Norm
from pse_lightning.core import randomness
from pse_lightning.validation import require_at_least, require_choice, require_in_range

APGD_LOSSES: tuple[str, ...] = ("ce", "dlr")
_TINY = 1e-12


def dlr_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Difference of logits ratio, -(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3), per sample.

    Invariant to shifting and scaling the logits, so a model cannot hide behind large or
    saturated logits as it can from cross-entropy (with fewer than 3 classes the lowest
    logit stands in for z_pi3).
    """
    top = logits.sort(dim=1, descending=True).values
    scale = top[:, 0] - top[:, min(2, top.shape[1] - 1)]
    return -margin(logits, y, targeted=False) / (scale + _TINY)


def targeted_dlr_loss(logits: Tensor, y: Tensor, target: Tensor) -> Tensor:
    """-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2), per sample (fewer classes: the lowest
    logits stand in for pi3 and pi4)."""
    top = logits.sort(dim=1, descending=True).values
    last = top.shape[1] - 1
    scale = top[:, 0] - (top[:, min(2, last)] + top[:, min(3, last)]) / 2
    own = logits.gather(1, y[:, None])[:, 0]
    aimed = logits.gather(1, target[:, None])[:, 0]
    return -(own - aimed) / (scale + _TINY)


def apgd_objective(logits: Tensor, y: Tensor, aim: Tensor | None, loss: str) -> Tensor:
    """The per-sample objective APGD maximises: CE on y or DLR (``aim`` None), else minus
    CE on ``aim`` or the targeted DLR towards it."""
    if loss == "ce":
        return F.cross_entropy(logits, y if aim is None else aim, reduction="none") * (
            1.0 if aim is None else -1.0
        )
    return dlr_loss(logits, y) if aim is None else targeted_dlr_loss(logits, y, aim)


def checkpoints(steps: int) -> dict[int, int]:
    """{iteration index: length of the period it closes} for ``steps`` iterations.

    The paper's p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), in
    the authors' integer arithmetic: periods of int(0.22 N) iterations, each the previous
    one less int(0.03 N), never below int(0.06 N) (all at least 1).
    """
    period = max(int(0.22 * steps), 1)
    shrink, least = max(int(0.03 * steps), 1), max(int(0.06 * steps), 1)
    out, at = {}, 0
    while at + period <= steps:
        at += period
        out[at - 1] = period
        period = max(period - shrink, least)
    return out


@dataclass
class Outcome:
    """Result of one APGD run on N samples.

    Attributes:
        x_adv: (N, C, H, W) the last adversarial iterate where one was found, else the
            iterate with the highest objective.
        logits: (N, K) logits of ``x_adv``.
        found: (N,) bool, an adversarial iterate was found.
        loss: (N,) the highest objective reached.
    """

    x_adv: Tensor
    logits: Tensor
    found: Tensor
    loss: Tensor


def _evaluate(
    model: nn.Module,
    x_adv: Tensor,
    batch: AttackBatch,
    aim: Tensor | None,
    loss: str,
    gradients: Gradients,
) -> tuple[Tensor, Tensor, Tensor]:
    """Logits, objective and its input gradient (zero outside the support) at ``x_adv``."""
    objective = partial(apgd_objective, loss=loss)
    grad, logits, value = gradients(model, objective, x_adv, batch.y, aim)
    return logits, value, batch.confine(grad)


def _evaluate_rows(
    model: nn.Module,
    x_adv: Tensor,
    batch: AttackBatch,
    aim: Tensor | None,
    loss: str,
    gradients: Gradients,
    active: Tensor | None,
    previous: tuple[Tensor, Tensor, Tensor],
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`_evaluate` on the ``active`` rows only (None: every row); the other rows keep
    ``previous`` (their iterate is not used again), so a finished sample costs no model
    pass."""
    if active is None or bool(active.all()):
        return _evaluate(model, x_adv, batch, aim, loss, gradients)
    rows = active.nonzero()[:, 0]
    part = _evaluate(model, x_adv[rows], subset(batch, rows), None if aim is None else aim[rows],
                     loss, gradients)  # fmt: skip
    out = tuple(t.clone() for t in previous)
    for full, new in zip(out, part, strict=True):
        full[rows] = new
    return out  # type: ignore[return-value]


def apgd_run(
    model: nn.Module,
    batch: AttackBatch,
    start: Tensor,
    *,
    ball: LpBall,
    steps: int,
    loss: str,
    aim: Tensor | None = None,
    rho: float = 0.75,
    momentum: float = 0.75,
    stop_at_success: bool = False,
    gradients: Gradients = EAGER,
) -> Outcome:
    """One APGD run from ``start``: steps + 1 gradient evaluations per sample.

    With ``stop_at_success`` a sample leaves the run at its first adversarial iterate (which
    it keeps): the same samples are broken as without it (every sample's schedule is its
    own), at a fraction of the cost on a model that breaks quickly; without it, a broken
    sample keeps iterating and keeps its last adversarial iterate, as the authors' code does.

    Success is judged against ``batch`` (its target if it has one, else y); the objective
    aims at ``aim`` (None: untargeted), so the untargeted APGD-T of AutoAttack passes an
    untargeted batch and a target to aim at. At each checkpoint a sample halves its step
    and restarts from its best point when fewer than ``rho`` of the period's steps raised
    the objective, or when its step was not halved last time and its best objective has not
    risen since.
    """
    x = batch.x
    x_adv = start
    logits, obj, grad = _evaluate(model, x_adv, batch, aim, loss, gradients)
    found = is_success(logits, batch.y, batch.target, batch.target is not None)
    x_out, logits_out = x_adv.clone(), logits.clone()
    x_best, grad_best, best, logits_best = x_adv.clone(), grad.clone(), obj, logits.clone()
    step = torch.full((len(x), *([1] * (x.dim() - 1))), 2 * ball.eps, device=x.device)
    x_prev, last, rises = x_adv, obj, torch.zeros_like(obj)
    best_at_check, halved_at_check = best.clone(), torch.ones_like(found)
    marks = checkpoints(steps)
    everyone = torch.ones_like(found)
    for i in range(steps):
        # Without early stop nothing here waits on the device (no host sync per step).
        active = ~found if stop_at_success else everyone
        if stop_at_success and not bool(active.any()):
            break
        a = 1.0 if i == 0 else momentum
        with torch.no_grad():
            z = ball.project(x, ball.ascend(x_adv, grad, step))
            x_next = ball.project(x, x_adv + a * (z - x_adv) + (1 - a) * (x_adv - x_prev))
        x_prev, x_adv = x_adv, x_next
        logits, obj, grad = _evaluate_rows(model, x_adv, batch, aim, loss, gradients,
                                           active if stop_at_success else None,
                                           (logits, obj, grad))  # fmt: skip
        with torch.no_grad():
            adv = active & is_success(logits, batch.y, batch.target, batch.target is not None)
            x_out[adv], logits_out[adv] = x_adv[adv], logits[adv]
            found |= adv
            rises += (active & (obj > last)).to(rises.dtype)
            last = obj
            better = active & (obj > best)
            x_best[better], grad_best[better] = x_adv[better], grad[better]
            best = torch.where(better, obj, best)
            logits_best[better] = logits[better]
            if i not in marks:
                continue
            halve = rises <= rho * marks[i]
            halve |= ~halved_at_check & (best_at_check >= best)
            halved_at_check, best_at_check, rises = halve, best.clone(), torch.zeros_like(rises)
            step[halve] /= 2
            x_adv[halve], grad[halve] = x_best[halve], grad_best[halve]
    x_out = torch.where(found[:, None, None, None], x_out, x_best)
    logits_out = torch.where(found[:, None], logits_out, logits_best)
    return Outcome(x_out, logits_out, found, best)


def subset(batch: AttackBatch, rows: Tensor) -> AttackBatch:
    """The rows ``rows`` of ``batch``, for a run on the samples still robust."""

    def pick(t: Tensor | None) -> Tensor | None:
        return None if t is None else t[rows]

    return AttackBatch(batch.x[rows], batch.y[rows], pick(batch.target), batch.index[rows],
                       pick(batch.support))  # fmt: skip


class Tally:
    """The per-sample result of a chain of APGD runs: a sample broken by one run keeps
    that run's adversarial image; an unbroken sample keeps its highest-objective point.

    Each run attacks only the samples still robust (as AutoAttack does), and each run's
    random start is keyed by (seed, dataset index, stream), so a sample's result does not
    depend on its batch mates.
    """

    def __init__(
        self,
        batch: AttackBatch,
        *,
        ball: LpBall,
        steps: int,
        rho: float,
        seed: int,
        early_stop: bool = False,
        gradients: Gradients = EAGER,
    ) -> None:
        self.batch, self.ball, self.steps, self.rho, self.seed = batch, ball, steps, rho, seed
        self.early_stop, self.gradients = early_stop, gradients
        self.x_adv = batch.x.clone()
        self.logits: Tensor | None = None
        self.found = torch.zeros(len(batch.x), dtype=torch.bool, device=batch.x.device)
        self.loss = torch.full((len(batch.x),), -math.inf, device=batch.x.device)
        self.broken_by = torch.full((len(batch.x),), -1, dtype=torch.long, device=batch.x.device)

    def robust_rows(self) -> Tensor:
        return (~self.found).nonzero()[:, 0]

    def merge(self, rows: Tensor, outcome: Outcome, stage: int, comparable: bool) -> None:
        """Write a run on ``rows`` back: its adversarial images, and its highest-objective
        points where they beat the earlier runs' (only when ``comparable``: the same loss
        and aim; otherwise an unbroken sample keeps the point of the first run)."""
        if self.logits is None:
            self.logits = outcome.logits.new_full((len(self.found), outcome.logits.shape[1]),
                                                  math.nan)  # fmt: skip
        keep = outcome.found | (comparable & (outcome.loss > self.loss[rows]))
        idx = rows[keep]
        self.x_adv[idx], self.logits[idx] = outcome.x_adv[keep], outcome.logits[keep]
        self.loss[idx] = outcome.loss[keep]
        self.found[rows[outcome.found]] = True
        self.broken_by[rows[outcome.found]] = stage

    def run(
        self,
        model: nn.Module,
        *,
        stream: int,
        loss: str,
        aim: Tensor | None = None,
        stage: int = 0,
        comparable: bool = True,
    ) -> None:
        """One APGD run on the samples still robust; ``aim`` is (N,) over the full batch."""
        rows = self.robust_rows()
        if len(rows) == 0:
            return
        sub = subset(self.batch, rows)
        size = self.ball.noise_size(sub.x[0].numel())
        noise = randomness.uniform(sub.index, (size,), self.seed, stream)
        start = sub.restrict(self.ball.sample(sub.x, noise.to(sub.x.dtype), sub.support))
        outcome = apgd_run(model, sub, start, ball=self.ball, steps=self.steps, loss=loss,
                           aim=None if aim is None else aim[rows], rho=self.rho,
                           stop_at_success=self.early_stop, gradients=self.gradients)  # fmt: skip
        self.merge(rows, outcome, stage, comparable)

    def result(self, extras: dict[str, Tensor]) -> Perturbation:
        """The strongest point of each sample with its logits, and ``extras``."""
        return Perturbation(self.x_adv, self.logits, extras)


def restart_stream(stage: int, restart: int) -> int:
    """The randomness stream of a run: restart 0 of stage 0 uses the base class's start
    stream (as PGD does); every other (stage, restart) gets its own."""
    return STREAM_START if stage == restart == 0 else 1000 * (stage + 1) + restart


class APGD(Attack):
    """Auto-PGD in an L-inf or L2 ball, with CE or DLR loss, targeted or not.

    Per sample: momentum 0.75 after the first step, step size 2 eps halved at the
    checkpoints of :func:`checkpoints` when the objective stalls (then a restart from the
    best point), the last adversarial iterate kept (or the highest-objective point where
    none was found, so a robust sample still returns its strongest perturbation).
    ``restarts`` further runs from new random starts attack only the samples still robust.
    Targeted: CE towards the target, or the targeted DLR loss. Costs ``steps + 1``
    gradient evaluations per sample and restart; the logits of the returned images are
    known, so the base class pays no scoring forward pass.

    Args:
        norm: 'linf' or 'l2'.
        eps: the budget in [0, 1] pixel units.
        steps: iterations per run (the paper's N_iter, 100).
        loss: 'ce' or 'dlr'.
        restarts: runs from different random starts (1: the paper's single run).
        rho: share of rising steps below which a checkpoint halves the step (0.75).
        early_stop: a sample leaves a run at its first adversarial iterate (the same samples
            break; false: it iterates on and keeps its last one, as the authors' code).
        **common: targeted, target_rule, seed, compile: see :class:`~.base.Attack`.

    ``AttackResult.extras``: ``{"restart": (N,) the run that broke the sample, -1 where
    none did}``.
    """

    def __init__(
        self,
        *,
        norm: Norm = "linf",
        eps: float = 0.03,
        steps: int = 100,
        loss: str = "ce",
        restarts: int = 1,
        rho: float = 0.75,
        early_stop: bool = True,
        **common: Unpack[AttackOptions],
    ) -> None:
        super().__init__(norm=norm, eps=eps, **common)
        self.steps = require_at_least("attack.steps", steps, 1)
        self.loss = require_choice("attack.loss", loss, APGD_LOSSES)
        self.restarts = require_at_least("attack.restarts", restarts, 1)
        self.rho = require_in_range("attack.rho", rho, 0.0, 1.0)
        self.early_stop = bool(early_stop)

    def _perturb(self, model: nn.Module, batch: AttackBatch) -> Perturbation:
        tally = Tally(batch, ball=self.ball, steps=self.steps, rho=self.rho, seed=self.seed,
                      early_stop=self.early_stop, gradients=self.gradients)  # fmt: skip
        for restart in range(self.restarts):
            tally.run(model, stream=restart_stream(0, restart), loss=self.loss,
                      aim=batch.target, stage=restart)  # fmt: skip
        return tally.result({"restart": tally.broken_by})
