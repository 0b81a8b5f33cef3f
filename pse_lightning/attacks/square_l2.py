"""The L2 proposals of the Square Attack (Andriushchenko et al., 2020, section 3.2).

An L2 update moves mass between two s x s windows: the perturbation in window 2 is
removed, and window 1 gets a signed centred pattern (eta, concentric rectangles of
weight 1/(k+1)^2 with opposite signs in its two halves) added to its own normalised
content, scaled so that the image keeps all the budget the two windows held plus what was
unused; the whole perturbation is then rescaled to norm eps and clipped to the box.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from pse_lightning.attacks.base import AttackBatch
from pse_lightning.attacks.norms import LpBall
from pse_lightning.core import randomness

_TINY = 1e-12
STREAM_GRID = 100_000  # the start's randomness: the L-inf stripes use the same stream


def rectangles(rows: int, cols: int) -> Tensor:
    """(rows, cols): sum over k >= d of 1/(k+1)^2, d the Chebyshev distance to the centre
    cell (rows // 2, cols // 2), k < max(rows // 2, cols // 2) + 1; unit L2 norm."""
    if rows == 0:
        return torch.zeros(0, cols)
    levels = max(rows // 2, cols // 2) + 1
    weights = 1.0 / torch.arange(1, levels + 1, dtype=torch.float64) ** 2
    tail = weights.flip(0).cumsum(0).flip(0)  # tail[d] = sum_{k >= d} 1/(k+1)^2
    d_rows = (torch.arange(rows) - rows // 2).abs()
    d_cols = (torch.arange(cols) - cols // 2).abs()
    out = tail[torch.maximum(d_rows[:, None], d_cols[None, :])]
    return (out / out.norm()).float()


def eta(side: int) -> Tensor:
    """(side, side) unit-norm pattern: rectangles in the top half, minus rectangles in the
    bottom half."""
    top = side // 2
    out = torch.cat([rectangles(top, side), -rectangles(side - top, side)])
    return out / out.norm()


def corner(noise: Tensor, side: int, size: int) -> Tensor:
    """(N,) a window's first row (or column), uniform over the size - side + 1 positions."""
    return (noise * (size - side + 1)).long().clamp_max(size - side)


def window_index(top: Tensor, left: Tensor, side: int) -> tuple[Tensor, Tensor, Tensor]:
    """Advanced indices (N, 1, 1), (N, side, 1), (N, 1, side) of each sample's window."""
    steps = torch.arange(side, device=top.device)
    n = torch.arange(len(top), device=top.device)
    return n[:, None, None], (top[:, None] + steps)[:, :, None], (left[:, None] + steps)[:, None]


def window_mask(top: Tensor, left: Tensor, side: int, like: Tensor) -> Tensor:
    """(N, 1, h, w) bool, true on each sample's window."""
    mask = torch.zeros(len(like), 1, *like.shape[2:], dtype=torch.bool, device=like.device)
    n, rows, cols = window_index(top, left, side)
    mask[n, 0, rows, cols] = True
    return mask


def patterns(side: int, flip: Tensor, sign: Tensor) -> Tensor:
    """(N, C, side, side): eta, transposed where ``flip``, times a sign per channel."""
    base = eta(side).to(sign)
    pattern = torch.where(flip[:, None, None], base.T, base)
    return pattern[:, None] * sign[:, :, None, None]


def rescaled(x: Tensor, delta: Tensor, ball: LpBall) -> Tensor:
    """x + eps delta / ||delta||_2, projected on the ball and the box."""
    norm = delta.flatten(1).norm(dim=1).clamp_min(_TINY).view(-1, 1, 1, 1)
    return ball.project(x, x + ball.eps * delta / norm)


def grid_start(batch: AttackBatch, ball: LpBall, seed: int) -> Tensor:
    """The start: blocks of side h // 5 tiling the image's centre, each an eta pattern
    (randomly transposed) with a random sign per channel, rescaled to norm eps."""
    x = batch.x
    n, c, h, w = x.shape
    side = max(h // 5, 1)
    tops = range((h - 5 * side) // 2 if h >= 5 else 0, h - side + 1, side)
    lefts = range((w - 5 * side) // 2 if w >= 5 else 0, w - side + 1, side)
    blocks = [(t, lf) for t in tops for lf in lefts]
    noise = randomness.uniform(batch.index, (len(blocks), c + 1), seed, STREAM_GRID).to(x)
    delta = torch.zeros_like(x)
    for b, (t, lf) in enumerate(blocks):
        sign = torch.where(noise[:, b, :c] < 0.5, -1.0, 1.0).to(x)
        delta[:, :, t : t + side, lf : lf + side] = patterns(side, noise[:, b, c] < 0.5, sign)
    return batch.restrict(rescaled(x, batch.confine(delta), ball))


def l2_side(p: float, h: int, w: int) -> int:
    """The authors' L2 window side: round(sqrt(p h w)), at least 3, odd, at most min(h, w)."""
    side = max(int(round(math.sqrt(p * h * w))), 3)
    return min(side + 1 - side % 2, h, w)


def l2_candidate(
    batch: AttackBatch, best: Tensor, ball: LpBall, side: int, noise: Tensor
) -> Tensor:
    """One L2 proposal per sample from ``noise`` (N, 5 + C): corner 1, C signs, corner 2,
    a transposition flag."""
    x = batch.x
    _, c, h, w = x.shape
    delta = best - x
    top1, left1 = corner(noise[:, 0], side, h), corner(noise[:, 1], side, w)
    top2, left2 = corner(noise[:, 2 + c], side, h), corner(noise[:, 3 + c], side, w)
    n, rows, cols = window_index(top1, left1, side)
    old = delta[n, :, rows, cols].permute(0, 3, 1, 2)  # (N, C, side, side)
    mask2 = window_mask(top2, left2, side, x)
    both = window_mask(top1, left1, side, x) | mask2
    spare = (ball.eps**2 - delta.flatten(1).pow(2).sum(1)).clamp_min(0).view(-1, 1, 1, 1) / c
    held = (delta * both).pow(2).sum(dim=(2, 3), keepdim=True)
    sign = torch.where(noise[:, 2 : 2 + c] < 0.5, -1.0, 1.0).to(x)
    new = patterns(side, noise[:, 4 + c] < 0.5, sign)
    new = new + old / old.pow(2).sum(dim=(2, 3), keepdim=True).sqrt().add(_TINY)
    new = new / new.pow(2).sum(dim=(2, 3), keepdim=True).sqrt().add(_TINY)
    delta = delta.masked_fill(mask2, 0.0)
    delta[n, :, rows, cols] = (new * (spare + held).sqrt()).permute(0, 2, 3, 1)
    return batch.restrict(rescaled(x, batch.confine(delta), ball))
