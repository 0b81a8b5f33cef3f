"""IoU tallies between unit masks and concept masks (docs/METHODS.md §4.1).

Integer sums (intersections, mask areas per category, label areas) that add exactly across
batches and processes, and the IoU, best concept and top-image selection derived from
them. Nothing here keeps activation maps of the whole probe set: memory depends on the
batch, the number of units and the number of concepts only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from pse_lightning.analysis.dissection.masks import bilinear_axis


@dataclass
class IoUTally:
    """Integer sums behind IoU_{k,c}; add tallies of batches and processes exactly.

    Attributes:
        intersection: (K, C + 1) int64, pixels in M_k and L_c (column 0: no concept).
        mask_area: (G, K) int64, pixels in M_k over images annotated for category g.
        label_area: (C + 1,) int64, pixels labelled c.
    """

    intersection: Tensor
    mask_area: Tensor
    label_area: Tensor

    def __add__(self, other: IoUTally) -> IoUTally:
        return IoUTally(
            self.intersection + other.intersection,
            self.mask_area + other.mask_area,
            self.label_area + other.label_area,
        )

    def tensors(self) -> list[Tensor]:
        return [self.intersection, self.mask_area, self.label_area]


@dataclass
class ReplicateTally:
    """B Poisson-bootstrap replicates over probe images of an :class:`IoUTally`.

    Replicate b adds each probe image's counts times its weight w_{n,b} ~ Poisson(1), a
    function of (seed, dataset index) only: the sums stream like the tally itself (memory
    B times the tally's, whatever the probe set's size) and, being integers held exactly in
    float64, add up to the same values under any batching or number of processes.

    Attributes:
        intersection: (B, K, C + 1); mask_area: (B, G, K); label_area: (B, C + 1).
    """

    intersection: Tensor
    mask_area: Tensor
    label_area: Tensor

    def tensors(self) -> list[Tensor]:
        return [self.intersection, self.mask_area, self.label_area]

    @property
    def replicates(self) -> int:
        return self.intersection.shape[0]


def empty_replicates(replicates: int, like: IoUTally) -> ReplicateTally:
    """A zero :class:`ReplicateTally` of B = ``replicates`` copies of ``like``'s shapes."""
    zeros = [
        torch.zeros(replicates, *t.shape, dtype=torch.float64, device=t.device)
        for t in like.tensors()
    ]
    return ReplicateTally(*zeros)


def add_replicate_labels(rep: ReplicateTally, labels: Tensor, weights: Tensor) -> None:
    """Add a batch's weighted label areas: ``weights`` (N, B), ``labels`` (N, G, H, W)."""
    n, width = len(labels), rep.label_area.shape[1]
    keys = torch.arange(n, device=labels.device).view(-1, 1) * width + labels.reshape(n, -1)
    per_image = torch.bincount(keys.view(-1), minlength=n * width).view(n, width).double()
    rep.label_area += weights.T @ per_image


def _add_replicate_hits(
    rep: ReplicateTally, weights: Tensor, image: Tensor, keys: Tensor, area: Tensor,
    annotated: Tensor,
) -> None:  # fmt: skip
    """Weighted intersections and mask areas of one batch's hits: each distinct
    (image, unit, concept) key once, its pixel count times the image's B weights."""
    cells = rep.intersection[0].numel()
    pair, counts = torch.unique(image * cells + keys, return_counts=True)
    source = weights[pair // cells] * counts.double().view(-1, 1)  # (pairs, B)
    rep.intersection.view(rep.replicates, cells).index_add_(1, pair % cells, source.T)
    rep.mask_area += torch.einsum("nb,ng,nk->bgk", weights, annotated, area.double())


def replicate_best_iou(rep: ReplicateTally, concept_category: Tensor) -> Tensor:
    """(B, K) each unit's best IoU in each probe replicate (:func:`iou_from_tally`)."""
    rows = [
        best_concepts(iou_from_tally(IoUTally(*parts), concept_category))[0]
        for parts in zip(*rep.tensors(), strict=True)
    ]
    return torch.stack(rows) if rows else torch.zeros(0, rep.intersection.shape[1])


def replicate_category_iou(
    rep: ReplicateTally, concept_category: Tensor, categories: int
) -> Tensor:
    """(B, K, G) each unit's best IoU per category in each probe replicate
    (:func:`iou_from_tally`, :func:`category_iou`); the max over G is the best IoU."""
    rows = [
        category_iou(iou_from_tally(IoUTally(*parts), concept_category), concept_category,
                     categories)
        for parts in zip(*rep.tensors(), strict=True)
    ]  # fmt: skip
    units = rep.intersection.shape[1]
    return torch.stack(rows) if rows else torch.zeros(0, units, categories, dtype=torch.float64)


def empty_tally(units: int, categories: int, concepts: int, device: torch.device) -> IoUTally:
    """A zero :class:`IoUTally` for K units, G categories and C concepts."""
    long = {"dtype": torch.int64, "device": device}
    return IoUTally(
        torch.zeros(units, concepts + 1, **long),
        torch.zeros(categories, units, **long),
        torch.zeros(concepts + 1, **long),
    )


def label_area(labels: Tensor, concepts: int) -> Tensor:
    """(C + 1,) pixels per concept id of a batch of labels (N, G, H, W)."""
    return torch.bincount(labels.reshape(-1), minlength=concepts + 1)


def annotated_categories(labels: Tensor) -> Tensor:
    """(N, G) bool: image n carries some label of category g (so g's IoU counts it)."""
    return (labels.flatten(2) > 0).any(dim=2)


def _add_hits(
    tally: IoUTally,
    labels: Tensor,
    image: Tensor,
    unit: Tensor,
    y: Tensor,
    x: Tensor,
    replicate: tuple[ReplicateTally, Tensor] | None = None,
) -> None:
    """Add mask pixels (image, unit, y, x) to intersections and annotated mask areas, and
    with ``replicate`` = (replicate tally, (N, B) probe-image weights) to its replicates."""
    n, categories = labels.shape[:2]
    units, width = tally.intersection.shape
    height, width_px = labels.shape[-2:]
    pixel = (image * categories * height + y) * width_px + x  # flat index at category 0
    step = torch.arange(categories, device=labels.device) * (height * width_px)
    hit_labels = labels.reshape(-1)[pixel.view(-1, 1) + step]  # (hits, G)
    keys = (unit.view(-1, 1) * width + hit_labels).view(-1)
    tally.intersection += torch.bincount(keys, minlength=units * width).view(units, width)
    area = torch.bincount(image * units + unit, minlength=n * units).view(n, units)
    annotated = annotated_categories(labels).double()
    # Sums of at most N H W per entry: exact in float64 (a long matmul has no CUDA kernel).
    tally.mask_area += (annotated.T @ area.double()).round().long()
    if replicate is not None:
        rep, weights = replicate
        hit_image = image.view(-1, 1).expand(-1, categories).reshape(-1)
        _add_replicate_hits(rep, weights, hit_image, keys, area, annotated)


def add_sparse_tally(
    tally: IoUTally,
    acts: Tensor,
    mask_t: Tensor,
    bound: Tensor,
    labels: Tensor,
    replicate: tuple[ReplicateTally, Tensor] | None = None,
) -> None:
    """Add one batch's intersections and mask areas, visiting only pixels near hot cells.

    Equal to the tally of the dense masks ``upsample(acts) >= T'`` bit for bit: a mask
    pixel needs a source cell at or above ``bound`` (:func:`hot_bounds`), so only the
    pixels owned (see :class:`BilinearAxis`) by a cell whose 2 x 2 neighbourhood holds such
    a "hot" cell are evaluated, with :func:`upsample`'s exact arithmetic. The cost follows
    the number of hot cells (about a fraction q of all), not units x pixels; intersections
    are one ``bincount`` over (unit, concept) keys.

    Args:
        tally: the running tally (label areas are added separately, once per batch).
        acts: (N, K, h, w) activations.
        mask_t: (K,) T'_k (:func:`mask_thresholds`); bound: (K,) :func:`hot_bounds`.
        labels: (N, G, H, W) long, per pixel and category the global concept id in [1, C],
            0 where no concept of that category is present. An image counts as annotated
            for category g when any of its pixels carries a label of g.
        replicate: optional (:class:`ReplicateTally`, (N, B) Poisson weights of the
            batch's probe images), updated with the same hits.
    """
    a = acts.detach().float()
    n, units, h, w = a.shape
    size = tuple(labels.shape[-2:])
    mask_t, bound = mask_t.to(a.device), bound.to(a.device)
    if (h, w) == size:
        image, unit, y, x = (a >= mask_t.view(1, -1, 1, 1)).nonzero(as_tuple=True)
        _add_hits(tally, labels, image, unit, y, x, replicate)
        return
    # Maps whose peak is below the bound have no hot cell: a max per map skips them.
    maps = (a.flatten(2).amax(dim=2) >= bound).view(-1).nonzero().squeeze(1)  # n * K + k
    ay, ax = bilinear_axis(h, size[0], a.device), bilinear_axis(w, size[1], a.device)
    # A cell's owned pixels read it, its right, lower and lower-right neighbours (the last
    # row and column read themselves).
    sub = a.view(n * units, h, w).index_select(0, maps)  # (M, h, w) maps with a hot cell
    hot = sub >= bound[maps % units].view(-1, 1, 1)
    near = hot.clone()
    near[..., :-1] |= hot[..., 1:]
    near[..., :-1, :] |= near[..., 1:, :].clone()
    cell = near.view(-1).nonzero().squeeze(1)  # flat (map, y, x) index into sub
    y, x = (cell // w) % h, cell % w
    right, down = (x < w - 1).long(), (y < h - 1).long() * w
    flat = sub.view(-1)
    c00, c01 = flat[cell], flat[cell + right]
    c10, c11 = flat[cell + down], flat[cell + down + right]
    wx = ax.owned_weight[x]  # (m, rx), NaN pads
    wy = ay.owned_weight[y].unsqueeze(2)  # (m, ry, 1)
    top = c00.view(-1, 1) + (c01 - c00).view(-1, 1) * wx  # (m, rx)
    bottom = c10.view(-1, 1) + (c11 - c10).view(-1, 1) * wx
    s = top.unsqueeze(1) + (bottom - top).unsqueeze(1) * wy  # (m, ry, rx)
    image_unit = maps[cell // (h * w)]
    inside = s >= mask_t[image_unit % units].view(-1, 1, 1)
    hit, row, col = inside.nonzero(as_tuple=True)
    image_unit = image_unit[hit]
    _add_hits(
        tally,
        labels,
        image_unit // units,
        image_unit % units,
        ay.owned[y[hit], row],
        ax.owned[x[hit], col],
        replicate,
    )


def iou_tally(masks: Tensor, labels: Tensor, concepts: int) -> IoUTally:
    """The :class:`IoUTally` of one batch of dense unit masks (N, K, H, W) and labels.

    The dense reference of :func:`add_sparse_tally` (tests, figures).

    Args:
        masks: (N, K, H, W) bool unit masks.
        labels: (N, G, H, W) long concept ids (see :func:`add_sparse_tally`).
        concepts: C, the number of concepts.
    """
    n, units = masks.shape[:2]
    tally = empty_tally(units, labels.shape[1], concepts, masks.device)
    image, unit, y, x = masks.nonzero(as_tuple=True)
    _add_hits(tally, labels, image, unit, y, x)
    tally.label_area += label_area(labels, concepts)
    return tally


def iou_from_tally(tally: IoUTally, concept_category: Tensor) -> Tensor:
    """IoU_{k,c} = |M_k ∩ L_c| / |M_k ∪ L_c| as (K, C + 1) float64; column 0 is 0.

    The union counts mask pixels only in images annotated for c's category.

    Args:
        tally: the summed :class:`IoUTally`.
        concept_category: (C + 1,) long, category index of each concept id (entry 0 unused).
    """
    inter = tally.intersection.double()
    category = concept_category.clamp_min(0).to(inter.device)
    union = tally.mask_area.double()[category].T + tally.label_area.double() - inter
    iou = torch.where(union > 0, inter / union.clamp_min(1.0), torch.zeros_like(inter))
    iou[:, 0] = 0.0
    return iou


def best_concepts(iou: Tensor) -> tuple[Tensor, Tensor]:
    """(best IoU (K,), best concept id (K,) in [1, C]) of each unit; ties -> lowest id."""
    best, arg = iou[:, 1:].max(dim=1)
    return best, arg + 1


def category_iou(iou: Tensor, concept_category: Tensor, categories: int) -> Tensor:
    """(K, G): each unit's best IoU among the concepts of each category."""
    out = torch.zeros(iou.shape[0], categories, dtype=iou.dtype, device=iou.device)
    category = concept_category.to(iou.device)
    for g in range(categories):
        columns = (category == g).nonzero().squeeze(1)
        if len(columns):
            out[:, g] = iou[:, columns].amax(dim=1)
    return out


def merge_top(
    scores: Tensor, index: Tensor, best_scores: Tensor, best_index: Tensor, k: int
) -> tuple[Tensor, Tensor]:
    """Keep each unit's k highest scores, ties broken by the smaller dataset index.

    A total order on (score, index) makes the kept set the same however the images are
    split into batches and processes.

    Args:
        scores: (K, M) new scores; index: (M,) or (K, M) their dataset indices.
        best_scores, best_index: (K, k) the running selection (-inf / huge index = empty).
    """
    if index.dim() == 1:
        index = index.view(1, -1).expand_as(scores)
    all_scores = torch.cat([best_scores, scores.to(best_scores.dtype)], dim=1)
    all_index = torch.cat([best_index, index.to(best_index.dtype)], dim=1)
    by_index = all_index.argsort(dim=1, stable=True)
    all_scores, all_index = all_scores.gather(1, by_index), all_index.gather(1, by_index)
    by_score = (-all_scores).argsort(dim=1, stable=True)[:, :k]
    return all_scores.gather(1, by_score), all_index.gather(1, by_score)
