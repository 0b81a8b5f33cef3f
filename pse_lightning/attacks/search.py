"""Per-sample machinery shared by the minimum-norm attacks (CW-L2, EAD, StrAttack).

The three attacks differ only in their inner optimiser; around it they share, written once
here: the outer binary search over the constant c (Carlini & Wagner 2017, section V), the
best-so-far tracking of the smallest successful iterate, the per-sample early abort, and
the compaction of the batch to the samples still optimising. Every decision is a per-sample
mask (PITFALLS: whole-batch early stopping makes a sample's result depend on its batch
mates), so a sample gets the same result alone, in any batch and under any DDP split, up to
floating-point kernel differences.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from pse_lightning.attacks.base import Perturbation
from pse_lightning.attacks.losses import margin
from pse_lightning.validation import require_at_least, require_non_negative, require_positive

# Above this the upper bound counts as "not found yet" and c grows geometrically.
_UNBOUNDED = 1e9


class SearchSettings:
    """The validated settings every constant-searching attack shares (CW, EAD, StrAttack).

    A mixin for :class:`~pse_lightning.attacks.base.Attack` subclasses, so the keys and
    their checks exist once.
    """

    kappa: float
    steps: int
    binary_search_steps: int
    initial_const: float
    abort_early: bool

    def init_search(
        self,
        *,
        kappa: float,
        steps: int,
        binary_search_steps: int,
        initial_const: float,
        abort_early: bool,
    ) -> None:
        self.kappa = require_non_negative("attack.kappa", kappa)
        self.steps = require_at_least("attack.steps", steps, 1)
        self.binary_search_steps = require_at_least(
            "attack.binary_search_steps", binary_search_steps, 1
        )
        self.initial_const = require_positive("attack.initial_const", initial_const)
        self.abort_early = bool(abort_early)


def adversarial_margin(
    logits: Tensor, label: Tensor, targeted: bool, kappa: float
) -> tuple[Tensor, Tensor]:
    """The CW hinge and the strict success test from one set of logits.

    Returns:
        ``(f, success)``, both (N,): ``f = max(margin + kappa, 0)`` and ``success =
        margin + kappa < 0``. The inequality is strict, so an exact tie (margin 0 at
        kappa 0) counts as a failure: a tracked success then also means ``argmax == target``
        (targeted) or ``argmax != y`` (untargeted), the test the base class re-checks.
    """
    m = margin(logits, label, targeted) + kappa
    return m.clamp_min(0.0), m < 0


def weighted_hinge(
    logits: Tensor, label: Tensor, const: Tensor, *, targeted: bool, kappa: float
) -> Tensor:
    """``c * f_kappa`` per sample: the part of the CW, EAD and StrAttack objectives whose
    input gradient needs the model (the distance terms have closed-form gradients)."""
    return const * adversarial_margin(logits, label, targeted, kappa)[0]


class ConstantSearch:
    """Per-sample binary search over the constant c that weights the adversarial loss.

    After each outer step: success lowers the upper bound, c = (lo + hi) / 2; failure raises
    the lower bound, c = (lo + hi) / 2 once an upper bound is known, else c = grow * c
    (docs/METHODS.md §1.5).

    Args:
        initial: (N,) or scalar starting constants.
        n: batch size.
        grow: factor applied to c on failure while no success is known (10 for CW and EAD,
            5 for StrAttack).
    """

    def __init__(
        self, initial: float | Tensor, n: int, *, grow: float, device: torch.device
    ) -> None:
        self.const = torch.as_tensor(initial, dtype=torch.float32, device=device).expand(n)
        self.const = self.const.clone()
        self.lower = torch.zeros(n, device=device)
        self.upper = torch.full((n,), math.inf, device=device)
        self.grow = grow

    def update(self, found: Tensor) -> None:
        """Move each sample's c given whether it succeeded with the current one."""
        self.upper = torch.where(found, torch.minimum(self.upper, self.const), self.upper)
        self.lower = torch.where(found, self.lower, torch.maximum(self.lower, self.const))
        bisect = (self.lower + self.upper) / 2
        self.const = torch.where(self.upper < _UNBOUNDED, bisect, self.const * self.grow)


class BestSoFar:
    """The successful iterate with the smallest score, per sample, and its logits.

    Starts from the clean images (returned for samples that never succeed, for which the
    base class then reports failure) and an infinite score. The logits are those of the
    forward pass that found the iterate, so the base class needs no forward pass for the
    found rows; rows never found keep NaN logits (the base class forwards them).

    Args:
        x: (N, C, H, W) clean images.
    """

    def __init__(self, x: Tensor) -> None:
        self.x_best = x.detach().clone()
        self.score = torch.full((len(x),), math.inf, device=x.device)
        self.const = torch.full((len(x),), math.nan, device=x.device)
        self.logits: Tensor | None = None

    @property
    def found(self) -> Tensor:
        """(N,) bool: a successful iterate is known."""
        return torch.isfinite(self.score)

    def update(
        self,
        rows: Tensor,
        x_cand: Tensor,
        score: Tensor,
        success: Tensor,
        const: Tensor,
        logits: Tensor,
    ) -> None:
        """Keep ``x_cand[i]`` for batch row ``rows[i]`` where it succeeds with a lower score.

        Args:
            rows: (M,) batch rows of the candidates (the active subset).
            x_cand: (M, C, H, W) candidates, exactly the tensors whose logits gave success.
            score: (M,) distance of each candidate (smaller is better).
            success: (M,) bool.
            const: (M,) the constant the candidate was found with (reported in extras).
            logits: (M, K) the logits of ``x_cand``.
        """
        best_logits = self._logits_like(logits)
        better = success & (score < self.score[rows])
        idx = rows[better]
        self.score[idx] = score[better]
        self.x_best[idx] = x_cand[better].detach()
        self.const[idx] = const[better]
        best_logits[idx] = logits[better].detach()

    def _logits_like(self, logits: Tensor) -> Tensor:
        """The (N, K) logits of the best iterates, allocated as NaN (unknown) on first use."""
        if self.logits is None:
            self.logits = logits.new_full((len(self.score), logits.shape[1]), math.nan)
        return self.logits

    def result(self, extras: dict[str, Tensor] | None = None) -> Perturbation:
        """What ``_perturb`` returns: the best images with their logits (NaN rows where
        nothing was found), and the attack's ``extras``."""
        return Perturbation(self.x_best, self.logits, dict(extras or {}))

    def select(self, idx: Tensor) -> BestSoFar:
        """A tracker over the rows ``idx`` (copies), to continue a search on a subset."""
        sub = BestSoFar(self.x_best[idx])
        sub.score, sub.const = self.score[idx], self.const[idx]
        sub.logits = None if self.logits is None else self.logits[idx]
        return sub

    def assign(self, idx: Tensor, sub: BestSoFar) -> None:
        """Write a subset tracker from :meth:`select` back into rows ``idx``."""
        self.x_best[idx], self.score[idx], self.const[idx] = sub.x_best, sub.score, sub.const
        if sub.logits is not None:
            self._logits_like(sub.logits)[idx] = sub.logits


class EarlyAbort:
    """Per-sample early abort: stop a sample whose loss has not fallen by ``tolerance``
    (relative) since the previous check; checks happen every ceil(steps / 10) steps.

    The state follows the active subset: ``keep`` returns a mask over the current rows and
    drops the aborted ones from its own memory, so the caller compacts its tensors with the
    same mask.
    """

    def __init__(
        self,
        n: int,
        steps: int,
        *,
        enabled: bool,
        device: torch.device,
        tolerance: float = 1e-4,
    ) -> None:
        self.enabled = enabled
        self.every = max(1, math.ceil(steps / 10))
        self.factor = 1.0 - tolerance
        self.previous = torch.full((n,), math.inf, device=device)

    def keep(self, step: int, loss: Tensor) -> Tensor | None:
        """(M,) bool mask of the rows that go on, or None when this step checks nothing."""
        if not self.enabled or step % self.every:
            return None
        keep = loss <= self.factor * self.previous
        self.previous = loss[keep].detach()
        return keep


def compact(keep: Tensor | None, *tensors: Any) -> tuple[Any, ...]:
    """Index every (M, ...) tensor by the row mask ``keep`` (no-op when None or all True).

    Entries that are not tensors (an absent support mask, a Python-scalar box bound) are
    the same for every row and pass through unchanged.
    """
    if keep is None or bool(keep.all()):
        return tensors
    return tuple(t[keep] if isinstance(t, Tensor) else t for t in tensors)


InnerLoop = Callable[[Tensor, BestSoFar], Tensor]


def binary_search(
    best: BestSoFar,
    inner: InnerLoop,
    *,
    initial_const: float | Tensor,
    search_steps: int,
    grow: float,
    repeat_last: bool = False,
) -> ConstantSearch:
    """Run ``inner`` once per outer step with each sample's current constant.

    Args:
        best: the tracker the inner loop records successful iterates in.
        inner: ``inner(const, best) -> found``: optimises every sample with its (N,)
            constant from a fresh start, updates ``best``, returns (N,) bool: whether the
            sample succeeded at some iterate with this constant.
        initial_const: c of the first outer step (scalar or (N,)).
        search_steps: number of outer steps.
        grow: see :class:`ConstantSearch`.
        repeat_last: Carlini's final rule (his ``repeat``): the last outer step runs with
            each sample's smallest constant known to succeed (its upper bound) instead of
            the untried midpoint, so the last run re-optimises at a constant that works;
            samples without an upper bound keep their grown constant.

    Returns:
        The final search state (its bounds say which constants worked).
    """
    n = len(best.score)
    search = ConstantSearch(initial_const, n, grow=grow, device=best.score.device)
    for step in range(search_steps):
        if repeat_last and step == search_steps - 1 and step > 0:
            search.const = torch.where(search.upper < _UNBOUNDED, search.upper, search.const)
        found = inner(search.const, best)
        search.update(found)
    return search


def squared_l2(delta: Tensor) -> Tensor:
    """(N,) per-sample squared L2 norm."""
    return delta.flatten(1).pow(2).sum(dim=1)


class BatchedAdam:
    """Adam (Kingma & Ba, 2015) on an (M, ...) tensor, with torch.optim.Adam's defaults.

    Adam's moments are per coordinate and the step count is shared by samples that started
    together, so optimising the batch as one tensor is exactly per-sample Adam; the moments
    are compacted with the rows (``select``) when samples abort.
    """

    def __init__(
        self,
        param: Tensor,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        self.lr = lr
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.m = torch.zeros_like(param)
        self.v = torch.zeros_like(param)
        self.t = 0

    def select(self, keep: Tensor | None) -> None:
        self.m, self.v = compact(keep, self.m, self.v)

    def step(self, param: Tensor, grad: Tensor) -> Tensor:
        """Return the updated parameter (descent on ``grad``)."""
        self.t += 1
        self.m.mul_(self.beta1).add_(grad, alpha=1 - self.beta1)
        self.v.mul_(self.beta2).addcmul_(grad, grad, value=1 - self.beta2)
        bias1 = 1 - self.beta1**self.t
        bias2 = 1 - self.beta2**self.t
        denom = (self.v / bias2).sqrt_().add_(self.eps)
        return param.addcdiv(self.m, denom, value=-self.lr / bias1)


__all__ = [
    "BatchedAdam",
    "BestSoFar",
    "ConstantSearch",
    "EarlyAbort",
    "adversarial_margin",
    "binary_search",
    "compact",
    "squared_l2",
]
