"""The loop and the geometry shared by the fast minimum-norm attacks (DDN, FMN).

Both attacks (Rony et al. 2019; Pintor et al. 2021) walk a perturbation along normalised
gradients while an adaptive radius eps_k decides how far from x it may be: eps shrinks
while the iterate is adversarial and grows while it is not. They differ only in the loss
they descend and in how eps is updated, so the iteration (one forward and one
input-gradient backward pass, scoring, best-so-far tracking, box clipping), the cosine
schedules and the Lp projections live here once.

Every decision is a per-sample mask and no sample ever stops early, so a sample gets the
same result in any batch; nothing is random, so the result is a function of the sample.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pse_lightning.attacks.base import AttackBatch
from pse_lightning.attacks.compiled import EAGER, Gradients, Objective
from pse_lightning.attacks.losses import margin
from pse_lightning.attacks.norms import flat_norm
from pse_lightning.attacks.search import BestSoFar

MIN_NORMS: tuple[str, ...] = ("l1", "l2", "linf")
# The dual of each norm: |<g, d>| <= ||g||_dual ||d||, so a margin m with gradient g is
# at Lp distance about m / ||g||_dual from the boundary (first-order).
DUAL_NORM = {"l1": "linf", "l2": "l2", "linf": "l1"}
_TINY = 1e-12


def cosine_anneal(step: int, steps: int, start: float, end: float) -> float:
    """``start`` at step 0 falling to ``end`` along half a cosine over ``steps`` steps:
    large moves early to find the boundary, small ones late to settle on it."""
    return end + (start - end) * (1 + math.cos(math.pi * step / steps)) / 2


def per_sample(v: Tensor, like: Tensor) -> Tensor:
    """(N,) values shaped to broadcast against a (N, ...) tensor."""
    return v.view(-1, *([1] * (like.dim() - 1)))


def unit_l2(g: Tensor) -> Tensor:
    """``g`` scaled to unit L2 norm per sample (zero rows stay zero)."""
    return g / per_sample(flat_norm(g, "l2").clamp_min(_TINY), g)


def box_aware(grad: Tensor, x_adv: Tensor) -> Tensor:
    """``grad`` without the coordinates a descent step -grad would push out of the box
    (pixels at 0 with grad > 0, at 1 with grad < 0).

    Those coordinates are clipped back anyway; left in, they shorten the useful part of a
    normalised step and make the first-order distance to the boundary too small, which
    matters when many pixels are saturated.
    """
    blocked = ((x_adv <= 0) & (grad > 0)) | ((x_adv >= 1) & (grad < 0))
    return grad.masked_fill(blocked, 0.0)


def boundary_distance(m: Tensor, grad: Tensor, norm: str) -> Tensor:
    """First-order Lp distance |m| / ||grad m||_dual from the decision boundary."""
    return m.abs() / flat_norm(grad, DUAL_NORM[norm]).clamp_min(_TINY)


def worst_norm(x: Tensor, norm: str, support: Tensor | None = None) -> Tensor:
    """(N,) the largest Lp distance inside the box (and the support): no perturbation of
    x can be larger, so it caps eps."""
    room = torch.maximum(x, 1 - x)
    if support is not None:
        room = room * support
    return flat_norm(room, norm)


def scale_to_l2(delta: Tensor, radius: Tensor) -> Tensor:
    """``delta`` rescaled to L2 norm ``radius`` (N,), up or down (DDN's sphere step)."""
    return delta * per_sample(radius / flat_norm(delta, "l2").clamp_min(_TINY), delta)


def project_l1(delta: Tensor, radius: Tensor) -> Tensor:
    """Euclidean projection onto the L1 ball of radius (N,) (Duchi et al. 2008).

    Soft-thresholds |delta| by the theta that makes the L1 norm equal to the radius; rows
    already inside are returned unchanged. theta comes from the sorted magnitudes: the
    largest j with u_j > (sum_{i<=j} u_i - r) / j.
    """
    flat = delta.flatten(1)
    mag = flat.abs()
    inside = mag.sum(dim=1) <= radius
    u, _ = mag.sort(dim=1, descending=True)
    csum = u.cumsum(dim=1) - radius[:, None]
    j = torch.arange(1, u.shape[1] + 1, device=u.device, dtype=u.dtype)
    count = (u > csum / j).sum(dim=1).clamp_min(1)
    theta = (csum.gather(1, (count - 1)[:, None]) / count[:, None].to(u.dtype)).clamp_min(0)
    shrunk = flat.sign() * (mag - theta).clamp_min(0)
    return torch.where(inside[:, None], flat, shrunk).view_as(delta)


def project_lp(delta: Tensor, radius: Tensor, norm: str) -> Tensor:
    """Euclidean projection of ``delta`` onto the Lp ball of radius (N,) ('l1', 'l2',
    'linf'); rows inside stay unchanged."""
    if norm == "linf":
        r = per_sample(radius, delta)
        return torch.maximum(torch.minimum(delta, r), -r)
    if norm == "l2":
        scale = (radius / flat_norm(delta, "l2").clamp_min(_TINY)).clamp(max=1.0)
        return delta * per_sample(scale, delta)
    if norm == "l1":
        return project_l1(delta, radius)
    raise ValueError(f"unknown norm {norm!r}; choose one of {list(MIN_NORMS)}")


@dataclass(frozen=True)
class Iterate:
    """What one step of a minimum-norm loop sees about the current iterate.

    Attributes:
        step: 0-based iteration number.
        delta: (N, C, H, W) the perturbation x_adv - x (inside the box).
        size: (N,) its norm in the attack's norm.
        margin: (N,) the signed margin, < 0 exactly where the iterate is adversarial.
        adversarial: (N,) bool, margin < 0.
        grad: (N, C, H, W) the gradient of the loss being descended, zero outside the
            support.
    """

    step: int
    delta: Tensor
    size: Tensor
    margin: Tensor
    adversarial: Tensor
    grad: Tensor


Update = Callable[[Iterate, BestSoFar], Tensor]


def descend(
    model: nn.Module,
    batch: AttackBatch,
    *,
    targeted: bool,
    norm: str,
    steps: int,
    loss: Objective,
    update: Update,
    gradients: Gradients = EAGER,
) -> BestSoFar:
    """Run ``steps`` iterations from x and track the smallest adversarial iterate.

    Each iteration forwards x_adv once with gradient, scores it (the strict margin test,
    so a tracked success is also a success by argmax), keeps it if it is the smallest
    adversarial iterate so far, and asks ``update`` for the next perturbation, which is
    clipped to the box here. ``loss(logits, label)`` is the per-sample quantity to decrease
    (a module-level function or a partial of one, so a compiled step can be reused).

    Returns:
        The tracker: ``x_best`` (x where nothing was found), ``score`` (its norm, inf where
        nothing was found) and the logits of each found image.
    """
    x = batch.x
    rows = torch.arange(len(x), device=x.device)
    best = BestSoFar(x)
    no_const = torch.full((len(x),), math.nan, device=x.device)
    x_adv = x.clone()
    for step in range(steps):
        grad, logits, _ = gradients(model, loss, x_adv, batch.label)
        with torch.no_grad():
            grad = box_aware(batch.confine(grad), x_adv)
            delta = x_adv - x
            m = margin(logits, batch.label, targeted)
            size = flat_norm(delta, norm)
            best.update(rows, x_adv, size, m < 0, no_const, logits)
            delta = update(Iterate(step, delta, size, m, m < 0, grad), best)
            x_adv = (x + delta).clamp(0.0, 1.0)
    return best
