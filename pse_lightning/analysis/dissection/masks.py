"""Unit activation masks M_k = 1[S_k >= T_k] at label resolution (docs/METHODS.md §4.1).

S_k is the activation upsampled bilinearly with half-pixel centres; the arithmetic is
fixed here (not left to a backend kernel) so that the sparse IoU pass in
:mod:`~pse_lightning.analysis.dissection.tally`, which evaluates the same expressions at a
few pixels only, gives bit-identical masks.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class BilinearAxis:
    """Bilinear interpolation along one axis, half-pixel centres (align_corners=False).

    Output position i reads input cells ``low[i]`` and ``high[i] = min(low[i] + 1, n - 1)``
    and mixes them with the weight ``weight[i]`` of ``high`` (float32, computed as PyTorch
    computes its source index).
    ``owned[c]`` lists the output positions whose ``low`` is cell c, padded with -1, and
    ``owned_weight[c]`` their weights, padded with NaN (a padded pixel then fails every
    threshold test): the cells partition the output, so a sparse pass that visits pixels
    through their owning cell visits each pixel once.
    """

    low: Tensor
    high: Tensor
    weight: Tensor
    owned: Tensor
    owned_weight: Tensor


@functools.lru_cache(maxsize=64)
def bilinear_axis(n_in: int, n_out: int, device: torch.device) -> BilinearAxis:
    """The :class:`BilinearAxis` from ``n_in`` cells to ``n_out`` positions."""
    scale = torch.tensor(n_in / n_out, dtype=torch.float32, device=device)
    dst = torch.arange(n_out, dtype=torch.float32, device=device)
    src = ((dst + 0.5) * scale - 0.5).clamp_min(0.0)
    low = src.long().clamp_max(n_in - 1)
    high = (low + 1).clamp_max(n_in - 1)
    weight = src - low.float()
    counts = torch.bincount(low, minlength=n_in)
    start = counts.cumsum(0) - counts
    j = torch.arange(max(1, int(counts.max())), device=device).view(1, -1)
    owned = torch.where(j < counts.view(-1, 1), start.view(-1, 1) + j, -1)
    owned_weight = torch.where(owned >= 0, weight[owned.clamp_min(0)], math.nan)
    return BilinearAxis(low, high, weight, owned, owned_weight)


def upsample(acts: Tensor, size: tuple[int, int]) -> Tensor:
    """S_k: activations (N, K, h, w) bilinearly upsampled to (N, K, H, W).

    Half-pixel centres (align_corners=False), the convention of NetDissect and of
    ``F.interpolate``; explicit because the default changed between torch versions and the
    two conventions shift every mask by up to half a feature cell. The arithmetic is fixed
    here rather than left to a backend kernel: rows first, each mix as a lerp
    ``a0 + (a1 - a0) w`` in float32 (no fused multiply-add), so that

    - :func:`add_sparse_tally`, which evaluates the same expressions at a few pixels only,
      gives bit-identical masks;
    - a constant region stays exactly constant (a map equal to T_k everywhere is all mask).

    It agrees with ``F.interpolate`` to a few float32 ulps.
    """
    a = acts.float()
    if tuple(a.shape[-2:]) == tuple(size):
        return a
    ay = bilinear_axis(a.shape[-2], size[0], a.device)
    ax = bilinear_axis(a.shape[-1], size[1], a.device)

    def along_x(rows: Tensor) -> Tensor:
        left = rows.index_select(-1, ax.low)
        return left + (rows.index_select(-1, ax.high) - left) * ax.weight

    top, bottom = along_x(a.index_select(-2, ay.low)), along_x(a.index_select(-2, ay.high))
    return top + (bottom - top) * ay.weight.view(-1, 1)


def mask_thresholds(thresholds: Tensor, floors: Tensor) -> Tensor:
    """T'_k such that 1[S_k >= T'_k] = 1[S_k >= T_k and S_k > floor_k] for float32 S_k.

    ``floor_k`` is the unit's smallest activation over the probe set (a ReLU's zero). A
    unit active on fewer than a fraction q of positions has T_k = floor_k, where ">="
    alone would select every pixel of every image; excluding the floor gives such a unit
    the support of its activation instead. Elsewhere the rule is S_k >= T_k (docs/METHODS.md §4.2).
    "S > floor" is "S >= the next float above floor", so one comparison does both.
    """
    thresholds, floors = thresholds.float(), floors.float()
    above_floor = torch.nextafter(floors, torch.full_like(floors, math.inf))
    return torch.where(thresholds > floors, thresholds, above_floor)


def activation_masks(
    acts: Tensor, thresholds: Tensor, floors: Tensor, size: tuple[int, int]
) -> Tensor:
    """M_k = 1[S_k >= T_k and S_k > floor_k], bool (N, K, H, W) (see :func:`mask_thresholds`)."""
    return above_threshold(upsample(acts, size), thresholds, floors)


def above_threshold(s: Tensor, thresholds: Tensor, floors: Tensor) -> Tensor:
    """The masks of :func:`activation_masks` from already upsampled activations S (N, K, H, W)."""
    return s >= mask_thresholds(thresholds, floors).to(s.device).view(1, -1, 1, 1)


def hot_bounds(mask_t: Tensor, minimum: Tensor, maximum: Tensor) -> Tensor:
    """(K,) cell values below which no bilinear mix of cells reaches T'_k (``minimum`` and
    ``maximum``: each unit's extreme activations over the probe set).

    A bilinear value is a convex combination of 4 cells, so exactly it is at most their
    maximum; computed in float32 (three lerps of 3 roundings each, differences up to
    2 max|a_k|) it exceeds that by less than 2**-20 max|a_k|. The bound
    T'_k - 2**-18 (|T'_k| + max|a_k|) keeps every cell whose neighbourhood can produce a
    mask pixel, whatever the unit's range. Cells at the unit's minimum are never needed
    (T'_k is above it, and a mix of 4 equal cells is exact, see :func:`upsample`), so the
    bound is at least the next float above the minimum: the zeros of a ReLU unit that is
    rarely active do not all count as hot.
    """
    floor = minimum.float().to(mask_t.device)
    above_floor = torch.nextafter(floor, torch.full_like(floor, math.inf))
    mask_t = mask_t.double()
    span = torch.maximum(floor.double().abs(), maximum.double().abs().to(mask_t.device))
    margin = (mask_t.abs() + span) * 2.0**-18 + torch.finfo(torch.float32).tiny
    return torch.maximum((mask_t - margin).float(), above_floor)
