"""Promotion-suppression effect (PSE): pure tensor functions (METHODS.md section 2).

An adversarial perturbation delta = x_adv - x changes the true logit Z_{t0} and the target
logit Z_t by Delta_{t0} and Delta_t. Each input coordinate's share of those changes is an
attribution a^c_i with sum_i a^c_i ~ Delta_c, from either

- grad x delta, a^c_i = delta_i * d_i Z_c(x): one forward and two backward passes, exact
  for a linear model; or
- integrated gradients (Sundararajan et al. 2017) along the straight path x -> x_adv,
  a^c_i = delta_i * mean_k d_i Z_c(x + alpha_k delta) with midpoints alpha_k = (k + 1/2)/N,
  whose totals equal Delta_c up to the quadrature error; a sample whose relative residual
  exceeds ``tol`` is recomputed with twice the steps (per sample, up to ``max_steps``).

Promotion is P_i = [a^t_i]_+ (pushes the target up), suppression S_i = [-a^{t0}_i]_+
(pushes the true class down). The image type comes from the measured logit changes,
r = [Delta_t]_+ / ([Delta_t]_+ + [-Delta_{t0}]_+): suppression-dominated if r < tau_s,
promotion-dominated if r > tau_p, balanced otherwise, and "none" when the perturbation
neither raised the target nor lowered the true logit (r undefined).

Every function is batched (no Python loop over samples) and every per-sample result
depends on that sample alone, so batch sizes and DDP shardings agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from pse_lightning.attacks.base import frozen_eval

PSE_TYPES: tuple[str, ...] = ("suppression", "balanced", "promotion", "none")
SUPPRESSION, BALANCED, PROMOTION, NONE = range(4)
METHODS: tuple[str, ...] = ("ig", "grad")
PairMode = Literal["retain", "vmap"]
PAIR_MODES: tuple[str, ...] = ("retain", "vmap")

# A logit that moves less than this fraction of the total change |Delta_t| + |Delta_t0| is
# judged against that fraction, so a nearly unmoved logit cannot force endless doubling.
RESIDUAL_FLOOR = 0.1
_TINY = 1e-12


@dataclass(frozen=True)
class PSEAttribution:
    """Attributions of the true and the target logit changes for N images.

    Attributes:
        attr_true: (N, C, H, W) a^{t0}, sums to about ``delta_true``.
        attr_target: (N, C, H, W) a^t, sums to about ``delta_target``.
        delta_true: (N,) measured Z_{t0}(x_adv) - Z_{t0}(x).
        delta_target: (N,) measured Z_t(x_adv) - Z_t(x).
        residual: (N,) relative completeness residual, the larger over the two logits.
        steps: (N,) long, integration steps used (1 for grad x delta).
    """

    attr_true: Tensor
    attr_target: Tensor
    delta_true: Tensor
    delta_target: Tensor
    residual: Tensor
    steps: Tensor


def logit_cotangent(num_classes: int, classes: Tensor, *, center: bool = False) -> Tensor:
    """Vector v (N, K) with v . Z = Z_c, or the centred logit Z_c - mean_j Z_j.

    Centring (METHODS.md: softmax ignores a common shift) is linear in Z, so its gradient
    is the backward pass of this cotangent: still one backward per logit.
    """
    v = torch.zeros(len(classes), num_classes, device=classes.device)
    v.scatter_(1, classes[:, None], 1.0)
    return v - 1.0 / num_classes if center else v


def logit_change(
    logits_clean: Tensor, logits_adv: Tensor, classes: Tensor, *, center: bool = False
) -> Tensor:
    """Delta_c = Z_c(x_adv) - Z_c(x) per sample (centred logits when ``center``), shape (N,)."""
    v = logit_cotangent(logits_clean.shape[1], classes, center=center).to(logits_clean.dtype)
    return ((logits_adv - logits_clean) * v).sum(dim=1)


def pair_gradients(
    model: nn.Module,
    points: Tensor,
    cotangent_a: Tensor,
    cotangent_b: Tensor,
    *,
    mode: PairMode = "retain",
) -> tuple[Tensor, Tensor, Tensor]:
    """Input gradients of two logit combinations from ONE forward pass.

    Backpropagation is linear in the cotangent, so two different logits need two vector-
    Jacobian products; the forward pass (and its saved activations) is shared. ``retain``
    runs two backward passes over the retained graph; ``vmap`` runs them as one batched
    backward (``is_grads_batched``). Only the input gradient is requested, so parameter
    ``.grad`` is never filled and no DDP reducer fires (pytorch #22436).

    Args:
        model: maps (M, C, H, W) to logits (M, K); already in the wanted mode.
        points: (M, C, H, W) inputs.
        cotangent_a, cotangent_b: (M, K) logit weights.
        mode: 'retain' or 'vmap'.

    Returns:
        (logits (M, K) detached, d(v_a . Z)/dx, d(v_b . Z)/dx), gradients shaped like points.
    """
    points = points.detach().requires_grad_(True)
    logits = model(points)
    if mode == "vmap":
        cot = torch.stack([cotangent_a, cotangent_b]).to(logits.dtype)
        (grads,) = torch.autograd.grad(logits, points, cot, is_grads_batched=True)
        return logits.detach(), grads[0], grads[1]
    (grad_a,) = torch.autograd.grad(
        logits, points, cotangent_a.to(logits.dtype), retain_graph=True
    )
    (grad_b,) = torch.autograd.grad(logits, points, cotangent_b.to(logits.dtype))
    return logits.detach(), grad_a, grad_b


def _check_grad_enabled() -> None:
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "the PSE analysis needs input gradients but runs under torch.inference_mode(); "
            "set trainer.inference_mode=false (Lightning #19910)"
        )


def grad_times_delta(
    model: nn.Module,
    x: Tensor,
    x_adv: Tensor,
    y: Tensor,
    target: Tensor,
    *,
    center: bool = False,
    mode: PairMode = "retain",
) -> tuple[Tensor, Tensor, Tensor]:
    """First-order attributions delta_i * d_i Z_c(x) of the true and the target logit.

    Returns:
        (a^{t0}, a^t, logits_clean): attributions (N, C, H, W) and Z(x) (N, K), a by-product
        of the shared forward pass.
    """
    _check_grad_enabled()
    delta = (x_adv - x).detach()
    with frozen_eval(model), torch.enable_grad():
        num_classes = _num_classes(model, x)
        logits, grad_true, grad_target = pair_gradients(
            model,
            x,
            logit_cotangent(num_classes, y, center=center),
            logit_cotangent(num_classes, target, center=center),
            mode=mode,
        )
    return delta * grad_true, delta * grad_target, logits


def integrated_gradients(
    model: nn.Module,
    x: Tensor,
    x_adv: Tensor,
    y: Tensor,
    target: Tensor,
    *,
    steps: int = 32,
    center: bool = False,
    chunk_size: int = 64,
    mode: PairMode = "retain",
) -> tuple[Tensor, Tensor]:
    """Integrated gradients of Z_{t0} and Z_t along x -> x_adv, midpoint rule.

    The N images times ``steps`` path points are processed as large batches of at most
    ``chunk_size`` images (several steps per forward pass), so memory stays bounded
    whatever the number of steps (captum #245) while each pass stays large enough to be
    efficient. Both logits' gradients come from each shared forward pass.

    Args:
        model: maps [0, 1] images to logits.
        x, x_adv: (N, C, H, W) clean and adversarial images.
        y, target: (N,) true and target classes.
        steps: midpoints alpha_k = (k + 1/2) / steps.
        center: attribute centred logits.
        chunk_size: images per forward pass (at least one step of the whole batch).
        mode: see :func:`pair_gradients`.

    Returns:
        (a^{t0}, a^t), each (N, C, H, W).
    """
    _check_grad_enabled()
    x, delta = x.detach(), (x_adv - x).detach()
    n = len(x)
    per_chunk = max(1, min(steps, chunk_size // max(n, 1)))
    with frozen_eval(model), torch.enable_grad():
        num_classes = _num_classes(model, x)
        cot_true = logit_cotangent(num_classes, y, center=center)
        cot_target = logit_cotangent(num_classes, target, center=center)
        sum_true = torch.zeros_like(x)
        sum_target = torch.zeros_like(x)
        for start in range(0, steps, per_chunk):
            k = min(per_chunk, steps - start)
            alphas = (torch.arange(start, start + k, device=x.device, dtype=x.dtype) + 0.5) / steps
            points = (x[None] + alphas.view(k, 1, 1, 1, 1) * delta[None]).flatten(0, 1)
            _, grad_true, grad_target = pair_gradients(
                model, points, cot_true.repeat(k, 1), cot_target.repeat(k, 1), mode=mode
            )
            sum_true += grad_true.view(k, *x.shape).sum(dim=0)
            sum_target += grad_target.view(k, *x.shape).sum(dim=0)
    return delta * sum_true / steps, delta * sum_target / steps


def completeness_residual(
    attr_true: Tensor, attr_target: Tensor, delta_true: Tensor, delta_target: Tensor
) -> Tensor:
    """Relative error of sum_i a^c_i against Delta_c, the larger over c in {t0, t}, (N,).

    Each logit is judged relative to its own change, floored at ``RESIDUAL_FLOOR`` of the
    total change |Delta_t| + |Delta_t0| (and at 1e-12 absolute).
    """
    total = delta_true.abs() + delta_target.abs()
    floor = (RESIDUAL_FLOOR * total).clamp_min(_TINY)
    res_true = (attr_true.flatten(1).sum(1) - delta_true).abs() / torch.maximum(
        delta_true.abs(), floor
    )
    res_target = (attr_target.flatten(1).sum(1) - delta_target).abs() / torch.maximum(
        delta_target.abs(), floor
    )
    return torch.maximum(res_true, res_target)


def pse_attributions(
    model: nn.Module,
    x: Tensor,
    x_adv: Tensor,
    y: Tensor,
    target: Tensor,
    *,
    method: str = "ig",
    steps: int = 32,
    max_steps: int = 256,
    tol: float = 0.01,
    center: bool = False,
    chunk_size: int = 64,
    logits_clean: Tensor | None = None,
    logits_adv: Tensor | None = None,
    mode: PairMode = "retain",
) -> PSEAttribution:
    """Attribute the true and target logit changes of x -> x_adv to input coordinates.

    Args:
        model: maps [0, 1] images (N, C, H, W) to logits (N, K); put in eval mode here.
        x, x_adv: clean and adversarial images.
        y: (N,) true labels t0.
        target: (N,) target classes t (for untargeted attacks the adversarial runner-up).
        method: 'ig' (integrated gradients) or 'grad' (grad x delta).
        steps: initial integration steps (ig).
        max_steps: samples whose residual exceeds ``tol`` are recomputed with doubled steps
            while the steps stay <= max_steps (ig).
        tol: relative completeness tolerance (ig).
        center: attribute per-sample centred logits Z_c - mean_j Z_j.
        chunk_size: images per forward pass (ig).
        logits_clean, logits_adv: (N, K) logits of x and x_adv when already known (saves a
            forward pass); computed here otherwise.
        mode: how the two logits' gradients share a forward pass, see :func:`pair_gradients`.

    Returns:
        A :class:`PSEAttribution`.
    """
    if method not in METHODS:
        raise ValueError(f"analysis.method must be one of {list(METHODS)}, got {method!r}")
    if mode not in PAIR_MODES:
        raise ValueError(f"mode must be one of {list(PAIR_MODES)}, got {mode!r}")
    x, x_adv = x.detach(), x_adv.detach()
    if method == "grad":
        attr_true, attr_target, logits_x = grad_times_delta(
            model, x, x_adv, y, target, center=center, mode=mode
        )
        logits_clean = logits_x if logits_clean is None else logits_clean
    if logits_clean is None or logits_adv is None:
        with frozen_eval(model), torch.no_grad():
            both = model(torch.cat([x, x_adv]))
        logits_clean = both[: len(x)] if logits_clean is None else logits_clean
        logits_adv = both[len(x) :] if logits_adv is None else logits_adv
    delta_true = logit_change(logits_clean, logits_adv, y, center=center)
    delta_target = logit_change(logits_clean, logits_adv, target, center=center)
    steps_used = torch.ones(len(x), dtype=torch.long, device=x.device)
    if method == "ig":
        attr_true, attr_target = integrated_gradients(
            model,
            x,
            x_adv,
            y,
            target,
            steps=steps,
            center=center,
            chunk_size=chunk_size,
            mode=mode,
        )
        steps_used = torch.full_like(steps_used, steps)
    residual = completeness_residual(attr_true, attr_target, delta_true, delta_target)
    current = steps
    while method == "ig" and 2 * current <= max_steps:
        redo = (residual > tol).nonzero().flatten()
        if len(redo) == 0:
            break
        current *= 2
        sub_true, sub_target = integrated_gradients(
            model,
            x[redo],
            x_adv[redo],
            y[redo],
            target[redo],
            steps=current,
            center=center,
            chunk_size=chunk_size,
            mode=mode,
        )
        attr_true[redo], attr_target[redo] = sub_true, sub_target
        steps_used[redo] = current
        residual[redo] = completeness_residual(
            sub_true, sub_target, delta_true[redo], delta_target[redo]
        )
    return PSEAttribution(attr_true, attr_target, delta_true, delta_target, residual, steps_used)


def _num_classes(model: nn.Module, x: Tensor) -> int:
    known = getattr(model, "num_classes", None)
    if isinstance(known, int):
        return known
    with torch.no_grad():
        return int(model(x[:1]).shape[1])


# -- maps, totals, groups, types -----------------------------------------------------------


def promotion_suppression_maps(attr_true: Tensor, attr_target: Tensor) -> tuple[Tensor, Tensor]:
    """Pixel maps (N, H, W): promotion sum_ch [a^t]_+ and suppression sum_ch [-a^{t0}]_+."""
    return attr_target.clamp_min(0).sum(dim=1), (-attr_true).clamp_min(0).sum(dim=1)


def attribution_totals(attr_true: Tensor, attr_target: Tensor) -> Tensor:
    """Gross per-image totals (N, 4): promotion, suppression, and their counter-effects.

    Columns: P = sum [a^t]_+, S = sum [-a^{t0}]_+, counter-promotion sum [-a^t]_+ (pixels
    that lower the target), counter-suppression sum [a^{t0}]_+ (pixels that raise the true
    class). P - counter-promotion = sum a^t and S - counter-suppression = -sum a^{t0}.
    """
    a_t, a_0 = attr_target.flatten(1), attr_true.flatten(1)
    return torch.stack(
        [
            a_t.clamp_min(0).sum(1),
            (-a_0).clamp_min(0).sum(1),
            (-a_t).clamp_min(0).sum(1),
            a_0.clamp_min(0).sum(1),
        ],
        dim=1,
    )


def grid_group_map(height: int, width: int, group_size: int, device: torch.device) -> Tensor:
    """(H, W) long ids of non-overlapping ``group_size`` squares, row-major (edges partial)."""
    cols = -(-width // group_size)
    rows = torch.arange(height, device=device) // group_size
    return rows[:, None] * cols + (torch.arange(width, device=device) // group_size)[None, :]


def group_scores(
    attr_true: Tensor, attr_target: Tensor, group_map: Tensor
) -> tuple[Tensor, Tensor]:
    """Net group scores P_G = sum_{i in G} a^t_i and S_G = -sum_{i in G} a^{t0}_i.

    Args:
        attr_true, attr_target: (N, C, H, W) attributions.
        group_map: (H, W) or (N, H, W) long group ids >= 0 (all channels of a pixel share
            its group).

    Returns:
        (P_G, S_G), each (N, G) with G = max id + 1; empty groups score 0.
    """
    n, _, h, w = attr_true.shape
    if group_map.shape not in ((h, w), (n, h, w)):
        raise ValueError(
            f"group_map must have shape ({h}, {w}) or ({n}, {h}, {w}), "
            f"got {tuple(group_map.shape)}"
        )
    ids = group_map.to(attr_true.device).long().expand(n, h, w).reshape(n, h * w)
    if ids.numel() and int(ids.min()) < 0:
        raise ValueError("group_map ids must be >= 0")
    num_groups = int(ids.max()) + 1 if ids.numel() else 0
    pixel_t = attr_target.sum(dim=1).reshape(n, h * w)
    pixel_0 = attr_true.sum(dim=1).reshape(n, h * w)
    zeros = pixel_t.new_zeros(n, num_groups)
    return zeros.scatter_add(1, ids, pixel_t), -zeros.scatter_add(1, ids, pixel_0)


def pse_ratio(promotion: Tensor, suppression: Tensor) -> Tensor:
    """r = [P]_+ / ([P]_+ + [S]_+), NaN where both are <= 0 (no PSE at all)."""
    p, s = promotion.clamp_min(0), suppression.clamp_min(0)
    total = p + s
    return torch.where(total > 0, p / total.clamp_min(torch.finfo(total.dtype).tiny), torch.nan)


def classify(r: Tensor, tau_s: float, tau_p: float) -> Tensor:
    """PSE type ids (see ``PSE_TYPES``): r < tau_s suppression, r > tau_p promotion,
    balanced in between, none where r is NaN. Long tensor shaped like r."""
    kind = torch.full(r.shape, BALANCED, dtype=torch.long, device=r.device)
    kind[r < tau_s] = SUPPRESSION
    kind[r > tau_p] = PROMOTION
    kind[torch.isnan(r)] = NONE
    return kind


def pse_type(
    delta_true: Tensor, delta_target: Tensor, tau_s: float, tau_p: float
) -> tuple[Tensor, Tensor]:
    """Image ratio r from the measured logit changes and its type: (r (N,), type (N,))."""
    r = pse_ratio(delta_target, -delta_true)
    return r, classify(r, tau_s, tau_p)
