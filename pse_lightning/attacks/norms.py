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


def exact_linf(x: Tensor, x_adv: Tensor, eps: float) -> Tensor:
    """``x_adv`` clamped so ``|x_adv - x| <= eps`` and the box hold exactly in x's dtype.

    ``x + eps`` rounds in float32 and far more in float16/bfloat16, so a clamp to
    ``[x - eps, x + eps]`` computed in the input dtype can end one rounding step outside
    the ball. The bounds are computed in float64 and rounded towards x (x itself is
    representable and inside the ball).
    """
    x64 = x.double()
    lo64, hi64 = (x64 - eps).clamp_min(0.0), (x64 + eps).clamp_max(1.0)
    lo, hi = lo64.to(x.dtype), hi64.to(x.dtype)
    lo = torch.where(lo.double() < lo64, torch.nextafter(lo, x), lo)
    hi = torch.where(hi.double() > hi64, torch.nextafter(hi, x), hi)
    return torch.minimum(torch.maximum(x_adv, lo), hi)


def _per_sample(v: Tensor, like: Tensor) -> Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


class LpBall:
    """The set {x': ||x' - x||_p <= eps} intersected with the box [0, 1]^d."""

    def __init__(self, norm: Norm, eps: float) -> None:
        self.norm = norm
        self.eps = eps

    def noise_size(self, d: int) -> int:
        """How many uniform numbers :meth:`sample` needs for an image of d coordinates."""
        return d if self.norm == "linf" else 2 * d + 1

    def sample(self, x: Tensor, noise: Tensor, support: Tensor | None = None) -> Tensor:
        """A uniformly random point of the ball (within ``support``), clipped to the box.

        Args:
            x: (N, C, H, W) centres.
            noise: (N, noise_size(d)) uniform [0, 1) numbers (counter-based, per sample).
            support: (N, 1 or C, H, W) bool, the coordinates the start may move; the L2
                start is uniform in the ball of the support's subspace.

        L2: a Gaussian direction (Box-Muller on two independent halves of the noise) and
        radius ``eps * U^(1/d)`` with d the support size, the radius law of a uniform point
        of a d-ball (P(r <= t eps) = t^d); a radius ``eps * U`` would crowd the centre.
        """
        n, d = len(x), x[0].numel()
        if self.norm == "linf":
            delta = ((2 * noise - 1) * self.eps).view_as(x)
        else:
            u1, u2 = noise[:, :d].clamp_min(1e-7), noise[:, d : 2 * d]
            gauss = (torch.sqrt(-2 * torch.log(u1)) * torch.cos(2 * torch.pi * u2)).view_as(x)
            dims = torch.full((n,), float(d), dtype=noise.dtype, device=x.device)
            if support is not None:
                gauss = gauss * support
                dims = support.expand_as(x).flatten(1).sum(dim=1).clamp_min(1).to(dims)
            direction = gauss / _per_sample(flat_norm(gauss, "l2"), gauss).clamp_min(_TINY)
            radius = self.eps * noise[:, 2 * d] ** (1.0 / dims)
            delta = direction * _per_sample(radius, direction)
        return (x + delta.view(n, *x.shape[1:])).clamp(0.0, 1.0)

    def ascend(self, x_adv: Tensor, grad: Tensor, step_size: float) -> Tensor:
        """One steepest-ascent step of length ``step_size`` in this norm's geometry."""
        if self.norm == "linf":
            return x_adv + step_size * grad.sign()
        g_norm = _per_sample(flat_norm(grad, "l2"), grad).clamp_min(_TINY)
        return x_adv + step_size * grad / g_norm

    def project(self, x: Tensor, x_adv: Tensor) -> Tensor:
        """Project onto the ball around ``x`` and then onto the box [0, 1].

        Clipping to the box after the ball projection keeps the budget (clipping only moves
        coordinates towards ``x``), so both constraints hold exactly afterwards. L-inf is
        :func:`exact_linf`, the base class's own enforcement, so an attack's projected
        iterate passes it bit-identically and keeps its logits.
        """
        if self.norm == "linf":
            return exact_linf(x, x_adv, self.eps)
        delta = x_adv - x
        d_norm = _per_sample(flat_norm(delta, "l2"), delta)
        delta = delta * torch.clamp(self.eps / d_norm.clamp_min(_TINY), max=1.0)
        return (x + delta).clamp(0.0, 1.0)
