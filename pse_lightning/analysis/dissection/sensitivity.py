"""Adversarial sensitivity of units from streamed sums (docs/METHODS.md §4.4).

:func:`sensitivity_terms` gives each image's contribution to the rows of
:data:`SENSITIVITY_ROWS`; the evaluation loop adds them, weighted by
:func:`poisson_weights` (the bootstrap replicates over images), into fixed-size sums;
:func:`sensitivity_from_sums` turns the reduced sums into s_k, s⁺_k, s⁻_k and the exact
unit-level PSE terms of a GAP + linear head.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from pse_lightning.core import randomness

#: Rows of the streamed sensitivity sums, each (K,) per replicate.
SENSITIVITY_ROWS: tuple[str, ...] = (
    "clean",  # sum of ā_k(x)
    "clean_sq",  # sum of ā_k(x)^2
    "delta",  # sum of Δ_k
    "delta_pos",  # sum of [Δ_k]+
    "delta_neg",  # sum of [-Δ_k]+
    "promotion",  # sum of [w_{t,k} Δ_k]+
    "promotion_signed",  # sum of w_{t,k} Δ_k
    "suppression",  # sum of [-w_{t0,k} Δ_k]+
    "suppression_signed",  # sum of -w_{t0,k} Δ_k
)
_POISSON_STREAM = 101  # counter-based RNG stream of the bootstrap weights (attacks use 1, 2)
PROBE_POISSON_STREAM = 102  # the probe images' bootstrap weights (IoU replicates)


def spatial_mean(acts: Tensor) -> Tensor:
    """ā_k: (N, K, ...) activations -> (N, K) means over positions."""
    return acts.flatten(2).mean(dim=2) if acts.dim() > 2 else acts


def sensitivity_terms(
    clean: Tensor,
    adv: Tensor,
    w_target: Tensor | None = None,
    w_true: Tensor | None = None,
) -> Tensor:
    """Per-sample terms of :data:`SENSITIVITY_ROWS`, shape (R, N, K), float64.

    Args:
        clean, adv: (N, K) spatial means ā_k(x) and ā_k(x').
        w_target, w_true: (N, K) head weights w_{t,k} and w_{t0,k} of each sample's target
            and true class, for the feature layer of a GAP + linear net (where
            Z_c(x') - Z_c(x) = sum_k w_{c,k} Δ_k exactly); None elsewhere (rows are 0).
    """
    clean, adv = clean.double(), adv.double()
    delta = adv - clean
    zero = torch.zeros_like(delta)
    if w_target is None or w_true is None:
        promo = supp = zero
    else:
        promo, supp = w_target.double() * delta, -w_true.double() * delta
    return torch.stack(
        [
            clean,
            clean * clean,
            delta,
            delta.clamp_min(0),
            (-delta).clamp_min(0),
            promo.clamp_min(0),
            promo,
            supp.clamp_min(0),
            supp,
        ]
    )


def poisson_weights(
    index: Tensor, replicates: int, seed: int, stream: int = _POISSON_STREAM
) -> Tensor:
    """(N, 1 + B) sample weights: 1, then B Poisson(1) bootstrap weights per sample.

    A Poisson bootstrap resamples images in a stream: each image's B weights depend only
    on (seed, dataset index), so the replicate sums are the same under any batching or
    number of processes, and memory is B sums instead of the per-image data. The probe's
    replicates use another ``stream``, independent of the evaluation images' weights.
    """
    ones = torch.ones(len(index), 1, dtype=torch.float64, device=index.device)
    if replicates == 0:
        return ones
    u = randomness.uniform(index, (replicates,), seed, stream).double()
    pmf = [math.exp(-1.0) / math.factorial(i) for i in range(12)]
    cdf = torch.tensor(pmf, dtype=torch.float64, device=index.device).cumsum(0)
    counts = (u.unsqueeze(-1) >= cdf).sum(dim=-1).double()
    return torch.cat([ones, counts], dim=1)


def sensitivity_from_sums(sums: Tensor, count: Tensor) -> dict[str, Tensor]:
    """Unit sensitivities from streamed sums (METHODS §4).

    s⁺_k = E[[Δ_k]₊]/σ_k (promotion), s⁻_k = E[[−Δ_k]₊]/σ_k (suppression),
    s_k = s⁺_k + s⁻_k = E|Δ_k|/σ_k, σ_k the std of ā_k over clean images. The positive
    part is taken per image, so a unit pushed up on some images and down on others shows
    both. Units with σ_k = 0 (constant on clean data) get 0.

    Args:
        sums: (..., R, K) sums of :data:`SENSITIVITY_ROWS` (leading replicate dims allowed).
        count: (...,) the (weighted) number of images.

    Returns:
        Per-unit tensors (..., K): s, s_plus, s_minus, shift (E[Δ_k]/σ_k), sigma, mean
        (clean E[ā_k]), promotion π_k = E[[w_{t,k}Δ_k]₊], suppression ς_k = E[[−w_{t0,k}Δ_k]₊],
        and their signed means.
    """
    rows = dict(zip(SENSITIVITY_ROWS, sums.unbind(dim=-2), strict=True))
    n = count.double().unsqueeze(-1)
    safe_n = n.clamp_min(1.0)
    mean = rows["clean"] / safe_n
    var = (rows["clean_sq"] / safe_n - mean * mean).clamp_min(0.0)
    # Unbiased when possible; population variance with a single image.
    var = torch.where(n > 1, var * n / (n - 1).clamp_min(1.0), var)
    sigma = var.sqrt()
    live = (sigma > 0) & (n > 0)
    safe_sigma = torch.where(live, sigma, torch.ones_like(sigma))

    def per_sigma(row: Tensor) -> Tensor:
        return torch.where(live, row / safe_n / safe_sigma, torch.zeros_like(row))

    s_plus, s_minus = per_sigma(rows["delta_pos"]), per_sigma(rows["delta_neg"])
    return {
        "s": s_plus + s_minus,
        "s_plus": s_plus,
        "s_minus": s_minus,
        "shift": per_sigma(rows["delta"]),
        "sigma": sigma,
        "mean": mean,
        "promotion": rows["promotion"] / safe_n,
        "promotion_signed": rows["promotion_signed"] / safe_n,
        "suppression": rows["suppression"] / safe_n,
        "suppression_signed": rows["suppression_signed"] / safe_n,
    }


def class_target_share(
    class_clean: Tensor, class_images: Tensor, targets: Tensor, count: Tensor
) -> tuple[Tensor, Tensor]:
    """Each unit's preferred class and the share of adversarial targets that go to it.

    The preferred class c_k is the class whose clean images give unit k the highest mean
    activation, argmax_c mean{ā_k(x) : y(x) = c} (classes without images are skipped; ties
    to the lower class). The target share f_k = #{n : t_n = c_k} / N is the fraction of
    the attack's targets (the runner-up when untargeted) that are c_k. A unit selective for
    a class the attack often pushes images into changes on many images, whatever concept it
    detects: f_k is the class-traffic confound of ρ(s, IoU) (docs/METHODS.md §4.6).

    Args:
        class_clean: (C, K) sums of ā_k over clean images of each true class.
        class_images: (C,) images of each true class.
        targets: (1 + B, C) weighted target counts per bootstrap replicate.
        count: (1 + B,) weighted image counts.

    Returns:
        (c_k (K,) long, f_k (1 + B, K) float64: row 0 on all images, rows 1..B per replicate).
    """
    mean = class_clean.double() / class_images.double().clamp_min(1.0).view(-1, 1)
    mean = torch.where(class_images.view(-1, 1) > 0, mean, torch.full_like(mean, -math.inf))
    preferred = mean.argmax(dim=0)
    share = targets.double() / count.double().clamp_min(1.0).view(-1, 1)
    return preferred, share[:, preferred]
