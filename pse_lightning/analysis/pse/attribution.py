"""PSE attribution: the true and target logit changes split over input coordinates.

The pure functional core of the PSE analysis (docs/METHODS.md §2.1-§2.3): tensors in,
tensors out, no state.

An adversarial perturbation delta = x_adv - x changes the true logit Z_{t0} and the target
logit Z_t by Delta_{t0} and Delta_t. Each input coordinate's share of those changes is an
attribution a^c_i with sum_i a^c_i ~ Delta_c, from either

- grad x delta, a^c_i = delta_i * d_i Z_c(x): one forward and two backward passes, exact
  for a linear model; or
- integrated gradients (Sundararajan et al. 2017) along the straight path x -> x_adv,
  a^c_i = delta_i * mean_k d_i Z_c(x + alpha_k delta) with midpoints alpha_k = (k + 1/2)/N,
  whose totals equal Delta_c up to the quadrature error; a sample whose relative residual
  exceeds ``tol`` is refined to three times the steps (per sample, up to ``max_steps``).
  Tripling, not doubling: the midpoints of N intervals, (2k + 1) / (2N), are exactly the
  midpoints j = 3k + 1 of 3N intervals, (2j + 1) / (6N), so a refinement evaluates only the
  2N new points and reuses every gradient already summed (doubling reuses none: the
  midpoints of 2N intervals have odd numerators over 4N, the old ones even). The midpoint
  error falls as 1/N^2, so the same 2N new evaluations buy a 9x (not 4x) smaller error.

Cost. Each path point needs the input gradients of two logits: one forward pass and two
vector-Jacobian products (VJPs) through the retained graph. Backpropagation is linear in
its cotangent and both gradients are needed in full, so no exact method does fewer than
two VJPs per point; with a VJP about as dear as a forward pass that is about 1.5 x the
forward+backward floor per step (bench suite ``pse`` prints this lower bound). What is
saved instead: path points are batched into passes of ``chunk_size`` images across steps
and samples (no per-step Python pass), optionally in channels-last memory format (faster
convolutions on CPU), and the logit changes reuse the caller's endpoint logits.

Maps, totals, group scores and image types built from these attributions live in
:mod:`pse_lightning.analysis.pse.statistics`.

Every function is batched (no Python loop over samples) and every per-sample result
depends on that sample alone, so batch sizes and DDP shardings agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from pse_lightning.core.model_state import frozen_eval, model_num_classes

METHODS: tuple[str, ...] = ("ig", "grad")
PairMode = Literal["retain", "vmap"]
PAIR_MODES: tuple[str, ...] = ("retain", "vmap")

# A logit that moves less than this fraction of the total change |Delta_t| + |Delta_t0| is
# judged against that fraction, so a nearly unmoved logit cannot force endless refinement.
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

    Centring (docs/METHODS.md §2.1: softmax ignores a common shift) is linear in Z, so its gradient
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
        num_classes = model_num_classes(model, x)
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
    channels_last: bool = True,
) -> tuple[Tensor, Tensor]:
    """Integrated gradients of Z_{t0} and Z_t along x -> x_adv, midpoint rule.

    Args:
        model: maps [0, 1] images to logits.
        x, x_adv: (N, C, H, W) clean and adversarial images.
        y, target: (N,) true and target classes.
        steps: midpoints alpha_k = (k + 1/2) / steps.
        center: attribute centred logits.
        chunk_size: images per forward pass, see :func:`path_gradient_sums`.
        mode: see :func:`pair_gradients`.
        channels_last: see :func:`path_gradient_sums`.

    Returns:
        (a^{t0}, a^t), each (N, C, H, W).
    """
    _check_grad_enabled()
    x, delta = x.detach(), (x_adv - x).detach()
    with frozen_eval(model), torch.enable_grad():
        num_classes = model_num_classes(model, x)
        sum_true, sum_target = path_gradient_sums(
            model,
            x,
            delta,
            logit_cotangent(num_classes, y, center=center),
            logit_cotangent(num_classes, target, center=center),
            midpoints(steps, device=x.device, dtype=x.dtype),
            chunk_size=chunk_size,
            mode=mode,
            channels_last=channels_last,
        )
    return delta * sum_true / steps, delta * sum_target / steps


def midpoints(steps: int, *, device: torch.device, dtype: torch.dtype) -> Tensor:
    """alpha_k = (k + 1/2) / steps, k < steps: the midpoint-rule nodes on [0, 1]."""
    return (torch.arange(steps, device=device, dtype=dtype) + 0.5) / steps


def refinement_points(steps: int, *, device: torch.device, dtype: torch.dtype) -> Tensor:
    """The 2 x ``steps`` midpoints of 3 x ``steps`` intervals that ``steps`` intervals lack.

    Node j of 3N intervals is (2j + 1) / (6N); node k of N intervals is (6k + 3) / (6N),
    node j = 3k + 1. So the new nodes are those with j mod 3 != 1, and the sum over all 3N
    nodes is the old sum plus the sum over these.
    """
    j = torch.arange(3 * steps, device=device)
    return midpoints(3 * steps, device=device, dtype=dtype)[j % 3 != 1]


def path_gradient_sums(
    model: nn.Module,
    x: Tensor,
    delta: Tensor,
    cot_true: Tensor,
    cot_target: Tensor,
    alphas: Tensor,
    *,
    chunk_size: int = 64,
    mode: PairMode = "retain",
    channels_last: bool = True,
) -> tuple[Tensor, Tensor]:
    """sum_k d(v . Z)/dx at x + alpha_k delta for both cotangents, per sample (unscaled).

    The A x N path points are laid out step-major and cut into passes of exactly
    ``chunk_size`` images (the last one shorter), whatever N and A: passes stay large
    enough to be efficient yet small enough to keep activations in cache and memory
    bounded (captum #245), with one Python iteration per pass, not per step. Each image
    contributes to its own sample's sum only, so the result does not depend on the batch.
    The caller holds ``frozen_eval`` and grad mode.

    Args:
        model: maps (M, C, H, W) to logits (M, K).
        x, delta: (N, C, H, W) path start and direction.
        cot_true, cot_target: (N, K) logit weights.
        alphas: (A,) path positions, shared by all samples.
        chunk_size: images per pass.
        mode: see :func:`pair_gradients`.
        channels_last: evaluate 4-D images in channels-last memory format, which speeds up
            CPU convolutions (oneDNN); same numbers up to float rounding. A model that
            ``.view``-s a convolution output cannot take it: set it false.

    Returns:
        (sum_true, sum_target), each shaped like x.
    """
    n, total = len(x), len(alphas) * len(x)
    sum_true, sum_target = torch.zeros_like(x), torch.zeros_like(x)
    use_cl = channels_last and x.dim() == 4
    for start in range(0, total, chunk_size):
        pos = torch.arange(start, min(start + chunk_size, total), device=x.device)
        sample = pos % n
        points = torch.addcmul(x[sample], alphas[pos // n].view(-1, 1, 1, 1), delta[sample])
        if use_cl:
            points = points.contiguous(memory_format=torch.channels_last)
        try:
            _, grad_true, grad_target = pair_gradients(
                model, points, cot_true[sample], cot_target[sample], mode=mode
            )
        except RuntimeError as err:
            if use_cl and "view size is not compatible" in str(err):
                raise RuntimeError(
                    "the model .view()-s a channels-last activation; set "
                    "analysis.pse.channels_last=false (or use .reshape in the model)"
                ) from err
            raise
        _add_by_sample(sum_true, grad_true, start)
        _add_by_sample(sum_target, grad_target, start)
    return sum_true, sum_target


def _add_by_sample(total: Tensor, grads: Tensor, start: int) -> None:
    """total[p % N] += grads[p - start] for the step-major flat positions p of one pass.

    Slices (a partial step, whole steps summed at once, a partial step) instead of a
    scatter, so the summation order is fixed on every device.
    """
    n, m = len(total), len(grads)
    first = start % n
    done = 0
    if first:
        done = min(n - first, m)
        total[first : first + done] += grads[:done]
    whole = (m - done) // n
    if whole:
        total += grads[done : done + whole * n].view(whole, *total.shape).sum(dim=0)
        done += whole * n
    if done < m:
        total[: m - done] += grads[done:]


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
    max_steps: int = 288,
    tol: float = 0.01,
    center: bool = False,
    chunk_size: int = 64,
    logits_clean: Tensor | None = None,
    logits_adv: Tensor | None = None,
    mode: PairMode = "retain",
    channels_last: bool = True,
) -> PSEAttribution:
    """Attribute the true and target logit changes of x -> x_adv to input coordinates.

    Args:
        model: maps [0, 1] images (N, C, H, W) to logits (N, K); put in eval mode here.
        x, x_adv: clean and adversarial images.
        y: (N,) true labels t0.
        target: (N,) target classes t (for untargeted attacks the adversarial runner-up).
        method: 'ig' (integrated gradients) or 'grad' (grad x delta).
        steps: initial integration steps (ig).
        max_steps: samples whose residual exceeds ``tol`` are refined to three times the
            steps (reusing every evaluated point) while the steps stay <= max_steps (ig);
            steps x 3^k are the reachable counts, e.g. 32, 96, 288.
        tol: relative completeness tolerance (ig).
        center: attribute per-sample centred logits Z_c - mean_j Z_j.
        chunk_size: images per forward pass (ig).
        logits_clean, logits_adv: (N, K) logits of x and x_adv when already known (saves a
            forward pass); computed here otherwise.
        mode: how the two logits' gradients share a forward pass, see :func:`pair_gradients`.
        channels_last: evaluate the path points channels-last (ig), see
            :func:`path_gradient_sums`.

    Returns:
        A :class:`PSEAttribution`.
    """
    _require_method_and_mode(method, mode)
    x, x_adv = x.detach(), x_adv.detach()
    if method == "grad":
        attr_true, attr_target, logits_x = grad_times_delta(
            model, x, x_adv, y, target, center=center, mode=mode
        )
        logits_clean = logits_x if logits_clean is None else logits_clean
    logits_clean, logits_adv = _endpoint_logits(model, x, x_adv, logits_clean, logits_adv)
    delta_true = logit_change(logits_clean, logits_adv, y, center=center)
    delta_target = logit_change(logits_clean, logits_adv, target, center=center)
    if method == "grad":
        residual = completeness_residual(attr_true, attr_target, delta_true, delta_target)
        steps_used = torch.ones(len(x), dtype=torch.long, device=x.device)
        return PSEAttribution(attr_true, attr_target, delta_true, delta_target, residual,
                              steps_used)  # fmt: skip
    return _refined_integrated_gradients(
        model, x, x_adv, y, target, delta_true, delta_target, steps=steps,
        max_steps=max_steps, tol=tol, center=center, chunk_size=chunk_size, mode=mode,
        channels_last=channels_last,
    )  # fmt: skip


def _require_method_and_mode(method: str, mode: str) -> None:
    if method not in METHODS:
        raise ValueError(f"analysis.pse.method must be one of {list(METHODS)}, got {method!r}")
    if mode not in PAIR_MODES:
        raise ValueError(f"mode must be one of {list(PAIR_MODES)}, got {mode!r}")


def _endpoint_logits(
    model: nn.Module,
    x: Tensor,
    x_adv: Tensor,
    logits_clean: Tensor | None,
    logits_adv: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """The caller's logits of x and x_adv, with one forward pass for whichever is missing."""
    if logits_clean is None or logits_adv is None:
        with frozen_eval(model), torch.no_grad():
            both = model(torch.cat([x, x_adv]))
        logits_clean = both[: len(x)] if logits_clean is None else logits_clean
        logits_adv = both[len(x) :] if logits_adv is None else logits_adv
    return logits_clean, logits_adv


def _refined_integrated_gradients(
    model: nn.Module,
    x: Tensor,
    x_adv: Tensor,
    y: Tensor,
    target: Tensor,
    delta_true: Tensor,
    delta_target: Tensor,
    *,
    steps: int,
    max_steps: int,
    tol: float,
    center: bool,
    chunk_size: int,
    mode: PairMode,
    channels_last: bool,
) -> PSEAttribution:
    """Integrated gradients with per-sample step tripling until the residual is <= tol.

    The unscaled gradient sums of every sample are kept, so a refinement from N to 3N
    steps adds the 2N new points' gradients to them (see :func:`refinement_points`).
    """
    _check_grad_enabled()
    delta = x_adv - x
    kw = dict(chunk_size=chunk_size, mode=mode, channels_last=channels_last)
    with frozen_eval(model), torch.enable_grad():
        num_classes = model_num_classes(model, x)
        cot_true = logit_cotangent(num_classes, y, center=center)
        cot_target = logit_cotangent(num_classes, target, center=center)
        alphas = midpoints(steps, device=x.device, dtype=x.dtype)
        sum_true, sum_target = path_gradient_sums(
            model, x, delta, cot_true, cot_target, alphas, **kw
        )
        attr_true, attr_target = delta * sum_true / steps, delta * sum_target / steps
        residual = completeness_residual(attr_true, attr_target, delta_true, delta_target)
        steps_used = torch.full((len(x),), steps, dtype=torch.long, device=x.device)
        current = steps
        while 3 * current <= max_steps:
            redo = (residual > tol).nonzero().flatten()
            if len(redo) == 0:
                break
            new_true, new_target = path_gradient_sums(
                model, x[redo], delta[redo], cot_true[redo], cot_target[redo],
                refinement_points(current, device=x.device, dtype=x.dtype), **kw,
            )  # fmt: skip
            current *= 3
            sum_true[redo] += new_true
            sum_target[redo] += new_target
            attr_true[redo] = delta[redo] * sum_true[redo] / current
            attr_target[redo] = delta[redo] * sum_target[redo] / current
            steps_used[redo] = current
            residual[redo] = completeness_residual(
                attr_true[redo], attr_target[redo], delta_true[redo], delta_target[redo]
            )
    return PSEAttribution(attr_true, attr_target, delta_true, delta_target, residual, steps_used)
