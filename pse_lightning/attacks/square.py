"""Square Attack (Andriushchenko et al., ECCV 2020): score-based black-box random search.

No gradients: each iteration changes the current best point on one random square window
(L-inf: every pixel of the window, per channel, to x +- eps; L2: mass moved between two
windows, :mod:`~pse_lightning.attacks.square_l2`) and keeps the change when the margin
loss decreases. It is the last stage of the standard AutoAttack, the one that catches
models whose gradients are masked (a random search cannot be fooled by a broken gradient).
:func:`square_run` is one run on a batch, shared with
:class:`~pse_lightning.attacks.autoattack.AutoAttack`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from typing_extensions import Unpack

from pse_lightning.attacks.apgd import Outcome, subset
from pse_lightning.attacks.base import Attack, AttackBatch, AttackOptions, Perturbation
from pse_lightning.attacks.losses import is_success, margin
from pse_lightning.attacks.norms import LpBall, Norm
from pse_lightning.attacks.square_l2 import corner, grid_start, l2_candidate, l2_side
from pse_lightning.core import randomness
from pse_lightning.validation import require_at_least, require_in_range

# The authors' schedule: p halves after each of these iterations (of a 10000-query run).
P_CHECKPOINTS: tuple[int, ...] = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
# Randomness streams: the stripes of the start, then one per iteration (disjoint from the
# base class's streams and APGD's restart streams, which are below 10**5).
STREAM_STRIPES = 100_000
STREAM_ITERATION = 100_001


def square_fraction(i: int, n_queries: int, p_init: float, rescale: bool = True) -> float:
    """p(i), the share of the image's pixels the square of iteration ``i`` covers.

    p_init halved after each of :data:`P_CHECKPOINTS` (iterations > 10, > 50, ..., > 8000).
    With ``rescale`` the checkpoints are stretched to ``n_queries`` (the authors' default
    for a standalone run); the standard AutoAttack runs 5000 queries without rescaling.
    """
    it = int(i / n_queries * 10000) if rescale else i
    return p_init / 2 ** sum(it > c for c in P_CHECKPOINTS)


def square_side(p: float, h: int, w: int) -> int:
    """The side s of a square covering about p h w pixels: round(sqrt(p h w)) in [1, min(h, w)]."""
    return min(max(int(round(math.sqrt(p * h * w))), 1), h, w)


def square_mask(noise: Tensor, side: int, h: int, w: int) -> Tensor:
    """(N, 1, h, w) bool: one side x side window per sample, its corner uniform over the
    (h - side + 1)(w - side + 1) positions from two uniform numbers per row."""
    top, left = corner(noise[:, 0], side, h), corner(noise[:, 1], side, w)
    rows = torch.arange(h, device=noise.device)
    cols = torch.arange(w, device=noise.device)
    in_rows = (rows >= top[:, None]) & (rows < top[:, None] + side)
    in_cols = (cols >= left[:, None]) & (cols < left[:, None] + side)
    return (in_rows[:, :, None] & in_cols[:, None, :])[:, None]


def signs(noise: Tensor) -> Tensor:
    """+-1 from uniform [0, 1) numbers (each sign with probability 1/2)."""
    return torch.where(noise < 0.5, -1.0, 1.0).to(noise.dtype)


def stripes(batch: AttackBatch, ball: LpBall, seed: int) -> Tensor:
    """The start: vertical stripes, x + eps * (a random sign per channel and column),
    in the ball, the box and the support."""
    x = batch.x
    n, c, _, w = x.shape
    noise = randomness.uniform(batch.index, (c, 1, w), seed, STREAM_STRIPES).to(x)
    return batch.restrict(ball.project(x, x + ball.eps * signs(noise)))


def candidate(batch: AttackBatch, best: Tensor, ball: LpBall, side: int, noise: Tensor) -> Tensor:
    """``best`` with one square window per sample set to x + eps * (a sign per channel)."""
    x = batch.x
    _, c, h, w = x.shape
    mask = square_mask(noise[:, :2], side, h, w)
    colour = signs(noise[:, 2 : 2 + c]).view(-1, c, 1, 1).to(x)
    moved = ball.project(x, x + ball.eps * colour.expand_as(x))
    return batch.restrict(torch.where(mask, moved, best))


class Search:
    """The per-sample state of one run: best point, its logits and loss, queries used."""

    def __init__(self, model: nn.Module, batch: AttackBatch, start: Tensor) -> None:
        self.model, self.batch = model, batch
        self.targeted = batch.target is not None
        self.best = start.clone()
        self.logits = model(start)
        self.loss = margin(self.logits, batch.label, self.targeted)
        self.found = self.success(self.logits, batch.y, batch.target)
        self.queries = torch.ones(len(start), dtype=torch.long, device=start.device)

    def success(self, logits: Tensor, y: Tensor, target: Tensor | None) -> Tensor:
        return is_success(logits, y, target, self.targeted)

    def offer(self, rows: Tensor, x_new: Tensor) -> None:
        """One query for each of ``rows``: keep ``x_new`` where the margin decreased or
        the sample is broken."""
        b = self.batch
        logits = self.model(x_new)
        loss = margin(logits, b.label[rows], self.targeted)
        hit = self.success(logits, b.y[rows], None if b.target is None else b.target[rows])
        keep = hit | (loss < self.loss[rows])
        idx = rows[keep]
        self.best[idx], self.logits[idx] = x_new[keep], logits[keep]
        self.loss[idx] = loss[keep]
        self.found[idx[hit[keep]]] = True
        self.queries[rows] += 1


def square_run(
    model: nn.Module,
    batch: AttackBatch,
    *,
    ball: LpBall,
    n_queries: int,
    p_init: float,
    seed: int,
    rescale: bool = True,
) -> tuple[Outcome, Tensor]:
    """One Square Attack run: at most ``n_queries`` forward passes per sample (the start
    included); a sample stops at its first adversarial point.

    Returns the outcome (best point, its logits, broken, the highest objective -margin)
    and (N,) the queries each sample used.
    """
    x = batch.x
    _, c, h, w = x.shape
    linf = ball.norm == "linf"
    start, propose = (stripes, candidate) if linf else (grid_start, l2_candidate)
    with torch.no_grad():
        search = Search(model, batch, start(batch, ball, seed))
        for i in range(n_queries - 1):
            rows = (~search.found).nonzero()[:, 0]
            if len(rows) == 0:
                break
            p = square_fraction(i, n_queries, p_init, rescale)
            side = square_side(p, h, w) if linf else l2_side(p, h, w)
            noise = randomness.uniform(batch.index[rows], (5 + c,), seed, STREAM_ITERATION + i)
            sub = subset(batch, rows)
            search.offer(rows, propose(sub, search.best[rows], ball, side, noise.to(x)))
    outcome = Outcome(search.best, search.logits, search.found, -search.loss)
    return outcome, search.queries


class Square(Attack):
    """Square Attack in an L-inf or L2 ball, untargeted or targeted, with the margin loss.

    L-inf: start from vertical stripes (each column and channel at x +- eps); iteration i
    draws a square of side round(sqrt(p(i) h w)) at a uniformly random position per sample
    and sets every pixel of it to x +- eps with one random sign per channel. L2: start from
    a grid of centred patterns; iteration i moves the perturbation of one random window
    into another (:func:`~pse_lightning.attacks.square_l2.l2_candidate`), then rescales it to
    norm eps. A proposal is accepted when the margin
    (untargeted: Z_y - max_{j != y} Z_j; targeted: max_{j != t} Z_j - Z_t) decreases. p
    starts at ``p_init`` and halves at the authors' checkpoints (:func:`square_fraction`).
    Locations and colours are keyed by (seed, dataset index, iteration), so a sample's
    result does not depend on its batch mates. A sample stops querying at its first
    adversarial point; the logits of the returned images are known (no scoring forward).

    Args:
        norm: 'linf' or 'l2'.
        eps: the budget in [0, 1] pixel units.
        n_queries: forward passes per sample, the start included (AutoAttack: 5000).
        p_init: initial share of the pixels the square covers (AutoAttack's value: 0.8).
        rescale: stretch the p schedule, defined for 10000 queries, to ``n_queries``.
        targeted, target_rule, seed: see :class:`~pse_lightning.attacks.base.Attack`.
        compile: accepted for a uniform config and ignored: the attack takes no gradients
            and its forward passes shrink as samples break, so there is no step to compile.

    ``AttackResult.extras``: ``{"queries": (N,) forward passes each sample used}``. Unlike
    the authors' targeted version (cross-entropy), the targeted loss is the margin too.
    """

    def __init__(
        self,
        *,
        norm: Norm = "linf",
        eps: float = 0.03,
        n_queries: int = 5000,
        p_init: float = 0.8,
        rescale: bool = True,
        **common: Unpack[AttackOptions],
    ) -> None:
        super().__init__(norm=norm, eps=eps, **common)
        self.n_queries = require_at_least("attack.n_queries", n_queries, 1)
        self.p_init = require_in_range("attack.p_init", p_init, 0.0, 1.0, low_open=True)
        if not isinstance(rescale, bool):
            raise ValueError(f"attack.rescale must be true or false, got {rescale!r}")
        self.rescale = rescale

    def _perturb(self, model: nn.Module, batch: AttackBatch) -> Perturbation:
        outcome, queries = square_run(model, batch, ball=self.ball, n_queries=self.n_queries,
                                      p_init=self.p_init, seed=self.seed,
                                      rescale=self.rescale)  # fmt: skip
        return Perturbation(outcome.x_adv, outcome.logits, {"queries": queries})
