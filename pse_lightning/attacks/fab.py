"""FAB: the Fast Adaptive Boundary attack (Croce & Hein, 2020), L-inf and L2.

FAB looks for the smallest perturbation that crosses the decision boundary. Each iteration
linearises the boundary between the true class and one other class at the current iterate
x_k (a hyperplane <w, z> = b with w the gradient of the logit gap), projects both x_k and
the clean image x onto that hyperplane intersected with the box [0, 1] (the minimal-norm
point, solved exactly by :func:`project_onto_hyperplane`), and moves to a convex mix of the
two projections, overshooting by ``eta``:

    x_{k+1} = clip((1 - alpha) (x_k + eta d_k) + alpha (x + eta d_0)),
    alpha = min(||d_k|| / (||d_k|| + ||d_0||), alpha_max).

The mix pulls the iterate back towards x, so the perturbation found shrinks. Where x_{k+1}
is adversarial, its norm is recorded if smaller than the best so far and the iterate steps
back towards x: x_{k+1} <- x + beta (x_{k+1} - x).

Which boundary: untargeted FAB linearises every class j != y and takes the one with the
smallest first-order distance |f_j - f_y| / ||grad (f_j - f_y)||_dual (K gradient passes per
iteration); FAB-T (AutoAttack's targeted version) linearises only f_t - f_y for a class t
(one gradient pass), run once for each of the classes with the highest clean logits, success
still meaning any misclassification. A targeted attack (success: the prediction equals t)
linearises f_t - max_{j != t} f_j.

For robustness evaluation a point counts only within ``eps``: a sample is broken when an
adversarial iterate lies in the eps ball, and with ``early_stop`` it stops there (FAB's
iterations are per sample, so the same samples break as without it).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from typing_extensions import Unpack

from pse_lightning.attacks.apgd import Outcome, Tally, restart_stream, subset
from pse_lightning.attacks.base import Attack, AttackBatch, AttackOptions, Perturbation
from pse_lightning.attacks.compiled import EAGER, Gradients
from pse_lightning.attacks.losses import is_success, other_max, runner_up_aims
from pse_lightning.attacks.minnorm import DUAL_NORM, per_sample
from pse_lightning.attacks.norms import LpBall, Norm, flat_norm
from pse_lightning.core import randomness
from pse_lightning.validation import require_at_least, require_in_range, require_positive

_TINY = 1e-12


def _level(weight: Tensor, limit: Tensor, need: Tensor) -> Tensor:
    """(M,) the lam >= 0 with sum_i weight_i min(lam, limit_i) = need per row.

    The left side is concave, piecewise linear and nondecreasing in lam with kinks at the
    limits: sorting them gives its value at every kink from two cumulative sums, the first
    kink where it reaches ``need`` brackets lam, and lam is exact inside that segment. Where
    ``need`` is out of reach the largest limit is returned (every coordinate saturated).

    Args:
        weight: (M, D) >= 0.
        limit: (M, D) >= 0.
        need: (M,) >= 0.
    """
    limits, order = limit.sort(dim=1)
    weights = weight.gather(1, order)
    saturated = (weights * limits).cumsum(dim=1)  # sum over j <= k of weight_j limit_j
    free_from = weights.flip(1).cumsum(dim=1).flip(1)  # sum over j >= k of weight_j
    free_after = free_from - weights
    reached = saturated + limits * free_after  # the left side at lam = limit_k
    k = (reached < need[:, None]).sum(dim=1)
    inside = k < limits.shape[1]
    at = k.clamp_max(limits.shape[1] - 1)[:, None]
    before = torch.where(k > 0, saturated.gather(1, (at - 1).clamp_min(0))[:, 0], 0.0)
    lam = (need - before) / free_from.gather(1, at)[:, 0].clamp_min(_TINY)
    low = torch.where(k > 0, limits.gather(1, (at - 1).clamp_min(0))[:, 0], 0.0)
    lam = torch.minimum(lam.clamp_min(0.0).maximum(low), limits.gather(1, at)[:, 0])
    return torch.where(inside, lam, limits[:, -1])


def project_onto_hyperplane(t: Tensor, w: Tensor, b: Tensor, norm: str) -> Tensor:
    """(M, D) the minimal-norm d with <w, t + d> = b and t + d in [0, 1]^D, per row.

    With c = b - <w, t> made >= 0 by flipping w's sign, coordinate i can move at most
    room_i (to 1 where w_i > 0, to 0 where w_i < 0) in the useful direction. The KKT
    conditions give, for a level lam >= 0,
    L2: d_i = clip(lam w_i, -t_i, 1 - t_i), so <w, d> = sum_i w_i^2 min(lam, room_i / |w_i|);
    L-inf: d_i = sign(w_i) min(lam, room_i), so <w, d> = sum_i |w_i| min(lam, room_i);
    both solved exactly for lam by :func:`_level`. Where the box makes the hyperplane
    unreachable, d is the box corner that gets closest to it (FAB's best effort). Computed
    in float64, returned in t's dtype.
    """
    t64, w64, b64 = t.double(), w.double(), b.double()
    gap = b64 - (w64 * t64).sum(dim=1)
    w64 = w64 * torch.where(gap >= 0, 1.0, -1.0)[:, None]
    room = torch.where(w64 > 0, 1 - t64, t64).masked_fill(w64 == 0, 0.0)
    scale = w64.abs() if norm == "l2" else (w64 != 0).to(w64.dtype)
    limit = torch.where(scale > 0, room / scale.clamp_min(_TINY), 0.0)
    lam = _level(w64.abs() * scale, limit, gap.abs())
    d = w64.sign() * torch.minimum(lam[:, None] * scale, room)  # t + d lands on 0 or 1 exactly
    return d.to(t.dtype)


def pair_gap(logits: Tensor, aim: Tensor, other: Tensor) -> Tensor:
    """f_aim - f_other per sample: < 0 on the other class's side of their boundary."""
    return (logits.gather(1, aim[:, None]) - logits.gather(1, other[:, None]))[:, 0]


def target_gap(logits: Tensor, aim: Tensor) -> Tensor:
    """f_aim - max_{j != aim} f_j per sample: >= 0 exactly where the prediction is aim."""
    return logits.gather(1, aim[:, None])[:, 0] - other_max(logits, aim)


def linearise(
    model: nn.Module,
    x_adv: Tensor,
    batch: AttackBatch,
    aim: Tensor | None,
    norm: str,
    gradients: Gradients,
) -> tuple[Tensor, Tensor]:
    """(gap, gradient) of the boundary FAB projects onto at ``x_adv``: (M,) and (M, D).

    A targeted batch: f_t - max_{j != t} f_j; an aim with an untargeted batch (FAB-T):
    f_aim - f_y; neither: the class j != y whose linearised boundary is nearest in the
    norm's geometry (one gradient pass per class).
    """
    if batch.target is not None:
        grad, _, gap = gradients(model, target_gap, x_adv, batch.target)
        return gap, batch.confine(grad).flatten(1)
    if aim is not None:
        grad, _, gap = gradients(model, pair_gap, x_adv, aim, batch.y)
        return gap, batch.confine(grad).flatten(1)
    k = torch.zeros_like(batch.y)
    grad, logits, gap = gradients(model, pair_gap, x_adv, k, batch.y)
    best_gap, best_grad, nearest = gap, grad, torch.full_like(gap, math.inf)
    for j in range(logits.shape[1]):
        if j > 0:
            grad, _, gap = gradients(model, pair_gap, x_adv, k + j, batch.y)
        grad = batch.confine(grad).flatten(1)
        distance = gap.abs() / (flat_norm(grad, DUAL_NORM[norm]) + _TINY)
        closer = (distance < nearest) & (batch.y != j)
        best_gap = torch.where(closer, gap, best_gap)
        best_grad = torch.where(closer[:, None], grad, best_grad.flatten(1))
        nearest = torch.where(closer, distance, nearest)
    return best_gap, best_grad


def fab_run(
    model: nn.Module,
    batch: AttackBatch,
    start: Tensor,
    *,
    ball: LpBall,
    steps: int,
    aim: Tensor | None = None,
    alpha_max: float = 0.1,
    eta: float = 1.05,
    beta: float = 0.9,
    early_stop: bool = True,
    gradients: Gradients = EAGER,
) -> tuple[Outcome, Tensor]:
    """One FAB run from ``start``: per iteration one linearisation (1 gradient pass, K
    untargeted) and one forward pass to test the new iterate.

    Success is judged against ``batch`` (its target if it has one, else y); ``aim`` (N,)
    picks the boundary of FAB-T. A sample is broken when an adversarial iterate lies
    within the ball (its norm is at most eps, as the authors count it); with
    ``early_stop`` it stops iterating there, otherwise it goes on shrinking the
    perturbation.

    Returns:
        The outcome (the smallest adversarial iterate and its logits where one was found
        in the ball, else x; ``loss`` is minus the smallest adversarial norm found, -inf
        where none) and (N,) that norm (inf where no adversarial iterate was found).
    """
    x = batch.x
    n = len(x)
    targeted = batch.target is not None
    x_flat = x.flatten(1)
    x_cur = start.clone()
    best = torch.full((n,), math.inf, dtype=x.dtype, device=x.device)
    found = torch.zeros(n, dtype=torch.bool, device=x.device)
    x_best = x.clone()
    logits_best: Tensor | None = None
    for _ in range(steps):
        rows = (~found).nonzero()[:, 0] if early_stop else torch.arange(n, device=x.device)
        if len(rows) == 0:
            break
        sub = subset(batch, rows)
        here = x_cur[rows]
        gap, w = linearise(model, here, sub, None if aim is None else aim[rows],
                           ball.norm, gradients)  # fmt: skip
        with torch.no_grad():
            w = w.to(x.dtype)
            here_flat, clean_flat = here.flatten(1), x_flat[rows]
            b = (w * here_flat).sum(dim=1) - gap
            d = project_onto_hyperplane(torch.cat([here_flat, clean_flat]), torch.cat([w, w]),
                                        torch.cat([b, b]), ball.norm)  # fmt: skip
            d_here, d_clean = d[: len(rows)], d[len(rows) :]
            size_here = flat_norm(d_here, ball.norm).clamp_min(1e-8)
            size_clean = flat_norm(d_clean, ball.norm).clamp_min(1e-8)
            alpha = (size_here / (size_here + size_clean)).clamp(0.0, alpha_max)[:, None]
            moved = (1 - alpha) * (here_flat + eta * d_here) + alpha * (clean_flat + eta * d_clean)
            x_new = sub.restrict(moved.clamp(0.0, 1.0).view_as(here))
            logits = model(x_new)
            if logits_best is None:
                logits_best = logits.new_full((n, logits.shape[1]), math.nan)
            adv = is_success(logits, sub.y, sub.target, targeted)
            size = flat_norm(x_new - sub.x, ball.norm)
            better = adv & (size < best[rows])
            keep = rows[better]
            best[keep] = size[better]
            x_best[keep], logits_best[keep] = x_new[better], logits[better]
            found[rows[adv & (size <= ball.eps)]] = True
            back = sub.x + beta * (x_new - sub.x)
            x_cur[rows] = torch.where(per_sample(adv, x_new), back, x_new)
    if logits_best is None:
        with torch.no_grad():
            logits_best = model(x)
    x_out = torch.where(per_sample(found, x), x_best, x)
    logits_out = torch.where(found[:, None], logits_best, math.nan)
    return Outcome(x_out, logits_out, found, -best), best


def fab_stage(
    model: nn.Module,
    tally: Tally,
    clean: Tensor,
    *,
    target_classes: int,
    steps: int,
    restarts: int = 1,
    stage: int = 0,
    stream_stage: int = 0,
    early_stop: bool = True,
    gradients: Gradients = EAGER,
    **settings: float,
) -> Tensor:
    """FAB runs on the samples of ``tally`` still robust, merged into it.

    ``target_classes`` 0: untargeted FAB (or targeted, if the batch has targets); k >= 1:
    FAB-T, one run per class ranked 2..k+1 by the ``clean`` logits (AutoAttack's order).
    Restart 0 starts at x, later restarts at a random point of the ball of radius eps / 2
    (keyed by seed, dataset index and run). Returns (N,) the smallest adversarial norm
    found by any run (inf where none).
    """
    batch, ball = tally.batch, tally.ball
    smallest = torch.full((len(batch.x),), math.inf, dtype=batch.x.dtype, device=batch.x.device)
    aims = [(None, 0)] if target_classes == 0 else runner_up_aims(clean, target_classes)
    for aim, rank in aims:
        for restart in range(restarts):
            rows = tally.robust_rows()
            if len(rows) == 0:
                return smallest
            sub = subset(batch, rows)
            start = sub.x
            if restart > 0:
                half = LpBall(ball.norm, ball.eps / 2)
                stream = restart_stream(stream_stage, 100 * rank + restart)
                noise = randomness.uniform(sub.index, (half.noise_size(sub.x[0].numel()),),
                                           tally.seed, stream)  # fmt: skip
                start = sub.restrict(half.sample(sub.x, noise.to(sub.x.dtype), sub.support))
            outcome, size = fab_run(model, sub, start, ball=ball, steps=steps,
                                    aim=None if aim is None else aim[rows],
                                    early_stop=early_stop, gradients=gradients,
                                    **settings)  # fmt: skip
            smallest[rows] = torch.minimum(smallest[rows], size)
            tally.merge(rows, outcome, stage, comparable=False)
    return smallest


class FAB(Attack):
    """The Fast Adaptive Boundary attack (Croce & Hein, 2020) in an L-inf or L2 ball.

    Untargeted (``target_classes`` 0): each iteration projects onto the nearest linearised
    boundary among all classes (K gradient passes). ``target_classes`` k >= 1: FAB-T as in
    AutoAttack, one run towards each of the classes ranked 2..k+1 by clean logit (one
    gradient pass per iteration), success meaning any misclassification. Targeted (a target
    per sample): the boundary of the target against its strongest rival; success means the
    prediction equals the target. Each run has ``steps`` iterations; runs after the first
    start from random points of the eps / 2 ball and attack only the samples still robust.
    A sample counts as broken only by an adversarial point within ``eps``; one that is not
    broken returns x unchanged. The logits of broken samples are known (no scoring
    forward).

    Args:
        norm: 'linf' or 'l2'.
        eps: the budget in [0, 1] pixel units.
        steps: iterations per run (AutoAttack: 100).
        target_classes: 0 for untargeted FAB, k for FAB-T over k classes (AutoAttack: 9).
        restarts: runs per target class (AutoAttack's standard FAB-T: 1).
        alpha_max: the largest weight of the projection of x in the step (0.1).
        eta: overshoot of the projections (1.05).
        beta: backward step towards x after an adversarial iterate (0.9).
        early_stop: a sample stops at its first adversarial iterate in the ball (the same
            samples break); false: it goes on shrinking its perturbation, as the authors'
            code does (``extras["norm"]`` is then FAB's minimal norm).
        **common: targeted, target_rule, seed, compile: see :class:`~.base.Attack`.

    ``AttackResult.extras``: ``{"norm": (N,) the smallest adversarial norm FAB found (inf
    where none, also beyond eps)}``.
    """

    def __init__(
        self,
        *,
        norm: Norm = "linf",
        eps: float = 0.03,
        steps: int = 100,
        target_classes: int = 0,
        restarts: int = 1,
        alpha_max: float = 0.1,
        eta: float = 1.05,
        beta: float = 0.9,
        early_stop: bool = True,
        **common: Unpack[AttackOptions],
    ) -> None:
        super().__init__(norm=norm, eps=eps, **common)
        self.steps = require_at_least("attack.steps", steps, 1)
        self.target_classes = require_at_least("attack.target_classes", target_classes, 0)
        self.restarts = require_at_least("attack.restarts", restarts, 1)
        self.alpha_max = require_in_range("attack.alpha_max", alpha_max, 0.0, 1.0)
        self.eta = require_positive("attack.eta", eta)
        self.beta = require_in_range("attack.beta", beta, 0.0, 1.0, low_open=True)
        self.early_stop = bool(early_stop)

    def _perturb(self, model: nn.Module, batch: AttackBatch) -> Perturbation:
        tally = Tally(batch, ball=self.ball, steps=self.steps, rho=0.75, seed=self.seed)
        clean = None
        if self.target_classes and batch.target is None:
            with torch.no_grad():
                clean = model(batch.x)
        norms = fab_stage(model, tally, clean, target_classes=0 if batch.target is not None
                          else self.target_classes, steps=self.steps, restarts=self.restarts,
                          early_stop=self.early_stop, gradients=self.gradients,
                          **self.settings())  # fmt: skip
        return tally.result({"norm": norms})

    def settings(self) -> dict[str, float]:
        """The step settings every run uses."""
        return {"alpha_max": self.alpha_max, "eta": self.eta, "beta": self.beta}
