"""Norm balls: sampling a random start, taking a steepest-ascent step and projecting.

Shared by every attack with an explicit budget, so the projection logic exists once.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Norm = Literal["linf", "l2"]
NORMS: tuple[str, ...] = ("linf", "l2")
_TINY = 1e-12


def flat_norm(v: Tensor, norm: str) -> Tensor:
    """Per-sample norm of a (N, ...) tensor: 'linf', 'l2', 'l1' or 'l0'."""
    flat = v.flatten(1)
    if norm == "linf":
        return flat.abs().amax(dim=1)
    if norm == "l2":
        return flat.norm(p=2, dim=1)
    if norm == "l1":
        return flat.abs().sum(dim=1)
    if norm == "l0":
        return (flat != 0).sum(dim=1).to(v.dtype)
    raise ValueError(f"unknown norm {norm!r}; choose one of linf, l2, l1, l0")


def _per_sample(v: Tensor, like: Tensor) -> Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


class LpBall:
    """The set {x': ||x' - x||_p <= eps} intersected with the box [0, 1]^d."""

    def __init__(self, norm: Norm, eps: float) -> None:
        self.norm = norm
        self.eps = eps

    def sample(self, x: Tensor, noise: Tensor) -> Tensor:
        """A random start inside the ball from uniform [0, 1) ``noise`` shaped like ``x``."""
        if self.norm == "linf":
            delta = (2 * noise - 1) * self.eps
        else:
            # A uniform direction scaled to a uniform radius; Gaussian via Box-Muller on the
            # same counter-based noise keeps the start independent of the batch.
            half = noise.flatten(1)
            n = half.shape[1]
            u1 = half.clamp_min(1e-7)
            u2 = half.roll(shifts=n // 2 + 1, dims=1)
            gauss = torch.sqrt(-2 * torch.log(u1)) * torch.cos(2 * torch.pi * u2)
            direction = gauss / gauss.norm(dim=1, keepdim=True).clamp_min(_TINY)
            radius = half[:, :1] * self.eps
            delta = (direction * radius).view_as(x)
        return (x + delta).clamp(0.0, 1.0)

    def ascend(self, x_adv: Tensor, grad: Tensor, step_size: float) -> Tensor:
        """One steepest-ascent step of length ``step_size`` in this norm's geometry."""
        if self.norm == "linf":
            return x_adv + step_size * grad.sign()
        g_norm = _per_sample(flat_norm(grad, "l2"), grad).clamp_min(_TINY)
        return x_adv + step_size * grad / g_norm

    def project(self, x: Tensor, x_adv: Tensor) -> Tensor:
        """Project onto the ball around ``x`` and then onto the box [0, 1].

        Clipping to the box after the ball projection keeps the budget (clipping only moves
        coordinates towards ``x``), so both constraints hold exactly afterwards.
        """
        delta = x_adv - x
        if self.norm == "linf":
            delta = delta.clamp(-self.eps, self.eps)
        else:
            d_norm = _per_sample(flat_norm(delta, "l2"), delta)
            delta = delta * torch.clamp(self.eps / d_norm.clamp_min(_TINY), max=1.0)
        return (x + delta).clamp(0.0, 1.0)
