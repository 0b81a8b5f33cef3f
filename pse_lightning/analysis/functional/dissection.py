"""Network dissection, staged as pure functions (Bau et al., 2017; METHODS.md §4).

Stages, each a function of tensors (or a small state object whose tallies the caller
reduces across processes):

1. per-unit top-quantile thresholds T_k with P(A_k > T_k) = q over all probe images and
   positions: :class:`RadixQuantile`, an exact streaming selection;
2. activation masks M_k = 1[S_k >= T_k], S_k the activation upsampled bilinearly
   (align_corners=False) to label resolution: :func:`activation_masks`;
3. IoU tallies (intersections, mask areas per category, label areas), integer sums that
   reduce exactly across processes: :func:`iou_tally`, then :func:`iou_from_tally`,
   :func:`best_concepts`;
4. adversarial sensitivity of each unit from streamed sums: :func:`sensitivity_terms`,
   :func:`sensitivity_from_sums`;
5. statistics relating sensitivity and interpretability: :func:`spearman`,
   :func:`permutation_pvalue`, :func:`mann_whitney_u`, :func:`hypergeom_sf`.

Nothing here keeps activation maps of the whole probe set: NetDissect-Lite stores them as
float64 (about 12.7 GB for one ResNet-18 layer on Broden); here memory depends on the
batch, the number of units and concepts only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from pse_lightning.attacks import randomness

# Thresholds ---------------------------------------------------------------------------------

KEY_BITS = 32
_SIGN = 1 << 31
_NO_KEY = 1 << 40  # larger than any 32-bit key: "no element" in min-reductions
_CUMSUM_ELEMENTS = 1 << 22  # histogram entries cumulated at once in RadixQuantile.advance


def ordered_keys(a: Tensor) -> Tensor:
    """Map float32 values to int64 keys in [0, 2**32) with the same order.

    The IEEE-754 bit pattern, with the sign bit flipped for non-negative values and all
    bits flipped for negative ones, sorts like the floats (-0.0 sorts just below +0.0).
    Exact integer keys make radix selection, and so the thresholds, independent of how
    the data is split across batches and processes.
    """
    bits = a.detach().to(torch.float32).contiguous().view(torch.int32)
    # XOR with 0x80000000 (non-negative) or 0xFFFFFFFF (negative), in int32, then unsigned.
    flip = (bits >> 31) | torch.iinfo(torch.int32).min
    return (bits ^ flip).to(torch.int64) & 0xFFFFFFFF


def keys_to_values(keys: Tensor) -> Tensor:
    """Inverse of :func:`ordered_keys`: int64 keys -> float32 values."""
    bits = torch.where(keys >= _SIGN, keys - _SIGN, -1 - keys)
    return bits.to(torch.int32).view(torch.float32)


def radix_schedule(bins: int) -> list[tuple[int, int]]:
    """(shift, width) of each pass: the key bits each pass's histogram resolves.

    ``bins = 2**b`` resolves b bits per pass, so ceil(32 / b) passes find a 32-bit key
    exactly; the last pass may use fewer bits.
    """
    width = int(bins).bit_length() - 1
    if bins < 2 or 1 << width != bins:
        raise ValueError(f"analysis.bins must be a power of two >= 2, got {bins}")
    schedule, top = [], KEY_BITS
    while top > 0:
        w = min(width, top)
        schedule.append((top - w, w))
        top -= w
    return schedule


def quantile_rank(count: int, quantile: float) -> tuple[int, float]:
    """Order statistic index j and weight of numpy's linear quantile at level 1 - q.

    ``numpy.quantile(a, 1 - q)`` is a_(j) + frac * (a_(j+1) - a_(j)) with the 0-based
    order statistics a_(i), j = floor((n - 1)(1 - q)) and frac its fractional part.
    """
    position = (1.0 - quantile) * (count - 1)
    j = min(int(math.floor(position)), count - 1)
    return j, position - j


def lerp(a: Tensor, b: Tensor, t: float) -> Tensor:
    """numpy's ``_lerp`` (float64): a + (b - a) t, from b's side when t >= 0.5."""
    diff = b - a
    return b - diff * (1.0 - t) if t >= 0.5 else a + diff * t


class RadixQuantile:
    """Exact per-unit quantile threshold, streamed in ceil(32 / log2(bins)) passes.

    Pass p histograms, per unit, ``log2(bins)`` bits of the order-preserving 32-bit key of
    every activation whose higher bits equal the prefix found so far; the cumulative
    histogram locates the bin that holds the rank-j order statistic, which extends the
    prefix. After the last pass the prefix is the exact key of a_(j). a_(j+1), needed for
    numpy's linear interpolation, is the same value, or (once it falls in a later bin)
    the minimum of that bin: one masked min in the next pass, exact at the last pass.

    Every tally is an integer sum, min or max, so reducing the tallies across processes
    gives the thresholds of one process bit for bit. Error bound: the threshold equals
    ``numpy.quantile(A_k, 1 - q)`` (linear method) computed in float64, rounded once to
    float32 (relative error <= 2**-24); the order statistics themselves are exact.

    Usage per pass: ``tallies = rq.new_tallies()``; ``rq.accumulate(tallies, acts)`` for
    every local batch; reduce each tally with :attr:`REDUCE_OPS`; ``rq.advance(tallies)``;
    repeat while ``not rq.done``; then :meth:`thresholds`.

    Args:
        units: number of units (channels) K.
        quantile: q in (0, 1), the fraction of activations above T_k (0.005).
        bins: histogram bins per unit and pass (a power of two); memory is K * bins int64.
        device: where the tallies live.
    """

    REDUCE_OPS = {"hist": "sum", "count": "sum", "kmin": "min", "kmax": "max", "succ": "min"}

    def __init__(self, units: int, quantile: float, bins: int, device: torch.device) -> None:
        self.units, self.quantile, self.device = int(units), float(quantile), device
        self.schedule = radix_schedule(bins)
        self.pass_index = 0
        self.count = 0
        self.rank, self.frac = 0, 0.0
        zeros = torch.zeros(self.units, dtype=torch.int64, device=device)
        self.prefix = zeros.clone()  # key bits of a_(j) resolved so far
        self.below = zeros.clone()  # number of keys below the current prefix's range
        self.succ_key = torch.full_like(zeros, -1)  # key of a_(j+1) once known
        self.succ_prefix = torch.full_like(zeros, -1)  # its bin when it left a_(j)'s bin
        self.succ_shift = zeros.clone()
        self.kmin = zeros.clone()
        self.kmax = zeros.clone()

    @property
    def passes(self) -> int:
        return len(self.schedule)

    @property
    def done(self) -> bool:
        return self.pass_index >= self.passes

    def new_tallies(self) -> dict[str, Tensor]:
        """Zeroed tallies of the current pass (reduce each with :attr:`REDUCE_OPS`)."""
        _, width = self.schedule[self.pass_index]
        dev, k = self.device, self.units
        return {
            "hist": torch.zeros(k << width, dtype=torch.int64, device=dev),
            "count": torch.zeros((), dtype=torch.int64, device=dev),
            "kmin": torch.full((k,), _NO_KEY, dtype=torch.int64, device=dev),
            "kmax": torch.full((k,), -1, dtype=torch.int64, device=dev),
            "succ": torch.full((k,), _NO_KEY, dtype=torch.int64, device=dev),
        }

    def accumulate(self, tallies: dict[str, Tensor], acts: Tensor) -> None:
        """Add one batch of activations (N, K, ...) to the current pass's tallies."""
        if acts.shape[1] != self.units:
            raise ValueError(f"expected {self.units} units, got activations {tuple(acts.shape)}")
        values = acts.detach().flatten(2).float()  # (N, K, P)
        shift, width = self.schedule[self.pass_index]
        if self.pass_index == 0:
            if bool(torch.isnan(values).any()):
                raise ValueError("probe activations contain NaN; check the model and inputs")
            keys = ordered_keys(values)
            tallies["count"] += keys.shape[0] * keys.shape[2]
            tallies["kmin"] = torch.minimum(tallies["kmin"], keys.amin(dim=(0, 2)))
            tallies["kmax"] = torch.maximum(tallies["kmax"], keys.amax(dim=(0, 2)))
            unit = torch.arange(self.units, device=keys.device).view(1, -1, 1)
            flat = ((unit << width) | (keys >> shift)).flatten()
        else:
            # Only keys inside the bin found so far count. A float comparison against the
            # bin's value range pre-selects a superset (it cannot tell -0.0 from +0.0), and
            # the exact key test runs on those few.
            prev_shift = self.schedule[self.pass_index - 1][0]
            low = keys_to_values(self.prefix << prev_shift).view(1, -1, 1)
            high = keys_to_values(((self.prefix + 1) << prev_shift) - 1).view(1, -1, 1)
            near = ((values >= low) & (values <= high)).nonzero(as_tuple=True)
            keys = ordered_keys(values[near])
            unit = near[1]
            match = (keys >> prev_shift) == self.prefix[unit]
            unit, keys = unit[match], keys[match]
            flat = (unit << width) | ((keys >> shift) & ((1 << width) - 1))
            pending = self.succ_prefix >= 0
            if bool(pending.any()):
                all_keys = ordered_keys(values)
                inside = (all_keys >> self.succ_shift.view(1, -1, 1)) == self.succ_prefix.view(
                    1, -1, 1
                )
                candidates = all_keys.masked_fill(~inside, _NO_KEY)
                tallies["succ"] = torch.minimum(tallies["succ"], candidates.amin(dim=(0, 2)))
        # scatter_add_ into the running histogram: no per-batch K * bins temporary.
        ones = torch.ones(1, dtype=torch.int64, device=flat.device).expand(len(flat))
        tallies["hist"].scatter_add_(0, flat, ones)

    def advance(self, tallies: dict[str, Tensor]) -> None:
        """Consume the reduced tallies of the current pass and move to the next."""
        shift, width = self.schedule[self.pass_index]
        if self.pass_index == 0:
            self.count = int(tallies["count"])
            if self.count == 0:
                raise ValueError("the probe set is empty: dissection needs probe images")
            self.rank, self.frac = quantile_rank(self.count, self.quantile)
            self.kmin, self.kmax = tallies["kmin"].clone(), tallies["kmax"].clone()
        else:
            pending = self.succ_prefix >= 0
            self.succ_key = torch.where(pending, tallies["succ"], self.succ_key)
            self.succ_prefix = torch.where(
                pending, torch.full_like(self.succ_prefix, -1), self.succ_prefix
            )
        hist = tallies["hist"].view(self.units, 1 << width)
        rank_in = (self.rank - self.below).view(-1, 1)
        bin_j, bin_s, before = (torch.empty_like(self.prefix) for _ in range(3))
        step = max(1, _CUMSUM_ELEMENTS >> width)  # units per chunk: bounds the cumsum copy
        for start in range(0, self.units, step):
            rows = slice(start, start + step)
            cum = hist[rows].cumsum(dim=1)
            j = torch.searchsorted(cum, rank_in[rows], right=True)
            bin_j[rows] = j.view(-1)
            bin_s[rows] = torch.searchsorted(cum, rank_in[rows] + 1, right=True).view(-1)
            before[rows] = torch.where(j > 0, cum.gather(1, (j - 1).clamp_min(0)), 0).view(-1)
        unresolved = self.succ_key < 0
        if self.rank + 1 < self.count:
            split = unresolved & (bin_s != bin_j)
            succ_prefix = (self.prefix << width) | bin_s
            if shift == 0:  # the bin is a single key: a_(j+1) is known exactly
                self.succ_key = torch.where(split, succ_prefix, self.succ_key)
            else:
                self.succ_prefix = torch.where(split, succ_prefix, self.succ_prefix)
                self.succ_shift = torch.where(
                    split, torch.full_like(self.succ_shift, shift), self.succ_shift
                )
        self.below = self.below + before
        self.prefix = (self.prefix << width) | bin_j
        self.pass_index += 1

    def thresholds(self) -> Tensor:
        """(K,) float32 thresholds T_k, equal to numpy.quantile(A_k, 1 - q) (linear)."""
        if not self.done:
            raise RuntimeError(f"RadixQuantile needs {self.passes} passes, ran {self.pass_index}")
        succ = torch.where(self.succ_key >= 0, self.succ_key, self.prefix)
        a = keys_to_values(self.prefix).double()
        b = keys_to_values(succ).double()
        return lerp(a, b, self.frac).float()

    def minimum(self) -> Tensor:
        """(K,) float32 smallest activation of each unit over the probe set."""
        return keys_to_values(self.kmin)

    def maximum(self) -> Tensor:
        """(K,) float32 largest activation of each unit over the probe set."""
        return keys_to_values(self.kmax)


# Masks and IoU ------------------------------------------------------------------------------


def upsample(acts: Tensor, size: tuple[int, int]) -> Tensor:
    """S_k: activations (N, K, h, w) bilinearly upsampled to (N, K, H, W).

    ``align_corners=False`` is explicit: the default changed between torch versions, and
    the two conventions shift every mask by up to half a feature cell.
    """
    if tuple(acts.shape[-2:]) == tuple(size):
        return acts.float()
    return F.interpolate(acts.float(), size=size, mode="bilinear", align_corners=False)


def mask_thresholds(thresholds: Tensor, floors: Tensor) -> Tensor:
    """T'_k such that 1[S_k >= T'_k] = 1[S_k >= T_k and S_k > floor_k] for float32 S_k.

    ``floor_k`` is the unit's smallest activation over the probe set (a ReLU's zero). A
    unit active on fewer than a fraction q of positions has T_k = floor_k, where ">="
    alone would select every pixel of every image; excluding the floor gives such a unit
    the support of its activation instead. Elsewhere the rule is METHODS' S_k >= T_k.
    "S > floor" is "S >= the next float above floor", so one comparison does both.
    """
    thresholds, floors = thresholds.float(), floors.float()
    above_floor = torch.nextafter(floors, torch.full_like(floors, math.inf))
    return torch.where(thresholds > floors, thresholds, above_floor)


def activation_masks(
    acts: Tensor, thresholds: Tensor, floors: Tensor, size: tuple[int, int]
) -> Tensor:
    """M_k = 1[S_k >= T_k and S_k > floor_k], bool (N, K, H, W) (see :func:`mask_thresholds`)."""
    s = upsample(acts, size)
    return s >= mask_thresholds(thresholds, floors).to(s.device).view(1, -1, 1, 1)


def candidate_pairs(peak: Tensor, thresholds: Tensor, floors: Tensor) -> tuple[Tensor, Tensor]:
    """(image, unit) index pairs whose upsampled map can reach the mask threshold.

    ``peak`` is (N, K), the maximum of each feature map.

    A bilinear value is a convex combination of feature cells, so it exceeds the map's
    maximum at most by rounding; maps whose maximum is below T'_k (less a relative 2**-20
    margin for that rounding) have empty masks and are never upsampled. The margin makes
    the candidates a superset, so the masks, computed exactly on the candidates, are the
    same as for every pair.
    """
    t = mask_thresholds(thresholds, floors).to(peak.device)
    margin = (t.abs() + torch.finfo(torch.float32).tiny) * 2.0**-20
    image, unit = (peak >= (t - margin).view(1, -1)).nonzero(as_tuple=True)
    return image, unit


def pair_masks(
    acts: Tensor,
    image: Tensor,
    unit: Tensor,
    thresholds: Tensor,
    floors: Tensor,
    size: tuple[int, int],
) -> Tensor:
    """Masks (P, H, W) of the (image, unit) pairs; equal to :func:`activation_masks`'s."""
    maps = acts[image, unit].unsqueeze(1)  # (P, 1, h, w)
    t = mask_thresholds(thresholds, floors).to(acts.device)[unit].view(-1, 1, 1)
    return upsample(maps, size)[:, 0] >= t


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


def add_pair_tally(
    tally: IoUTally, masks: Tensor, image: Tensor, unit: Tensor, labels: Tensor
) -> None:
    """Add intersections and annotated mask areas of (image, unit) masks to ``tally``.

    Only mask pixels are visited (about a fraction q of all), so the cost follows the
    masks' size rather than units x pixels x concepts.

    Args:
        tally: the running tally (label areas are added separately, once per batch).
        masks: (P, H, W) bool masks of the pairs.
        image, unit: (P,) the pairs' image (row of ``labels``) and unit.
        labels: (N, G, H, W) long, per pixel and category the global concept id in [1, C],
            0 where no concept of that category is present. An image counts as annotated
            for category g when any of its pixels carries a label of g.
    """
    n, categories = labels.shape[:2]
    width = tally.intersection.shape[1]
    pixels = masks.shape[1] * masks.shape[2]
    hits = masks.reshape(-1).nonzero().squeeze(1)
    pair, pixel = hits // pixels, hits % pixels
    by_pixel = labels.reshape(n, categories, pixels).permute(0, 2, 1)  # (N, pixels, G) view
    hit_labels = by_pixel[image[pair], pixel]  # (hits, G)
    keys = (unit[pair].view(-1, 1) * width + hit_labels).reshape(-1)
    ones = torch.ones(1, dtype=torch.int64, device=keys.device)
    tally.intersection.view(-1).scatter_add_(0, keys, ones.expand(len(keys)))
    annotated = (labels.reshape(n, categories, -1) > 0).any(dim=2).to(torch.int64)  # (N, G)
    area = masks.reshape(len(masks), -1).sum(dim=1)  # (P,)
    tally.mask_area.index_add_(1, unit, (annotated[image] * area.view(-1, 1)).T)


def iou_tally(masks: Tensor, labels: Tensor, concepts: int) -> IoUTally:
    """The :class:`IoUTally` of one batch of dense unit masks (N, K, H, W) and labels.

    Args:
        masks: (N, K, H, W) bool unit masks.
        labels: (N, G, H, W) long concept ids (see :func:`add_pair_tally`).
        concepts: C, the number of concepts.
    """
    n, units = masks.shape[:2]
    tally = empty_tally(units, labels.shape[1], concepts, masks.device)
    image = torch.arange(n, device=masks.device).repeat_interleave(units)
    unit = torch.arange(units, device=masks.device).repeat(n)
    add_pair_tally(tally, masks.reshape(n * units, *masks.shape[2:]), image, unit, labels)
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


# Sensitivity --------------------------------------------------------------------------------

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


def poisson_weights(index: Tensor, replicates: int, seed: int) -> Tensor:
    """(N, 1 + B) sample weights: 1, then B Poisson(1) bootstrap weights per sample.

    A Poisson bootstrap resamples images in a stream: each image's B weights depend only
    on (seed, dataset index), so the replicate sums are the same under any batching or
    number of processes, and memory is B sums instead of the per-image data.
    """
    ones = torch.ones(len(index), 1, dtype=torch.float64, device=index.device)
    if replicates == 0:
        return ones
    u = randomness.uniform(index, (replicates,), seed, _POISSON_STREAM).double()
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


# Statistics ---------------------------------------------------------------------------------


def rankdata(x: Tensor) -> Tensor:
    """Ranks 1..n of a 1-D tensor, ties averaged (scipy.stats.rankdata 'average')."""
    values, order = x.sort(stable=True)
    _, inverse, counts = torch.unique_consecutive(values, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    average = ends - (counts.double() - 1.0) / 2.0
    ranks = torch.empty(len(x), dtype=torch.float64, device=x.device)
    ranks[order] = average[inverse]
    return ranks


def _centred_unit(r: Tensor) -> Tensor | None:
    r = r - r.mean()
    norm = r.norm()
    return None if float(norm) == 0.0 else r / norm


def spearman(x: Tensor, y: Tensor) -> Tensor:
    """Spearman's rank correlation of two 1-D tensors (NaN if either is constant)."""
    rx, ry = _centred_unit(rankdata(x)), _centred_unit(rankdata(y))
    if rx is None or ry is None or len(x) < 2:
        return torch.tensor(float("nan"), dtype=torch.float64)
    return (rx * ry).sum().clamp(-1.0, 1.0)


def permutation_pvalue(
    x: Tensor, y: Tensor, permutations: int, generator: torch.Generator, chunk: int = 1000
) -> Tensor:
    """Two-sided permutation p-value of Spearman's rho: (1 + #{|rho_perm| >= |rho|})/(R + 1).

    Permuting the ranks of y R times gives the null distribution of rho with x and y
    unrelated; the +1 keeps p > 0 (Phipson and Smyth, 2010).
    """
    rx, ry = _centred_unit(rankdata(x)), _centred_unit(rankdata(y))
    if rx is None or ry is None or permutations < 1:
        return torch.tensor(float("nan"), dtype=torch.float64)
    rho = (rx * ry).sum().abs() - 1e-12
    hits, done = 0, 0
    while done < permutations:
        r = min(chunk, permutations - done)
        perm = torch.rand(r, len(ry), generator=generator).argsort(dim=1).to(ry.device)
        hits += int(((ry[perm] * rx).sum(dim=1).abs() >= rho).sum())
        done += r
    return torch.tensor((1 + hits) / (permutations + 1), dtype=torch.float64)


def mann_whitney_u(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Mann–Whitney U of x against y and its two-sided asymptotic p-value.

    Normal approximation with tie and continuity corrections, as
    ``scipy.stats.mannwhitneyu(x, y, method="asymptotic")``. NaN when a group is empty.
    """
    n1, n2 = len(x), len(y)
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    if n1 == 0 or n2 == 0:
        return nan, nan
    ranks = rankdata(torch.cat([x, y]).double())
    u1 = ranks[:n1].sum() - n1 * (n1 + 1) / 2.0
    n = n1 + n2
    _, ties = torch.unique(ranks, return_counts=True)
    tie_term = float((ties.double() ** 3 - ties.double()).sum()) / (n * (n - 1)) if n > 1 else 0
    sigma = math.sqrt(n1 * n2 / 12.0 * ((n + 1) - tie_term))
    if sigma == 0.0:
        return u1, torch.tensor(1.0, dtype=torch.float64)
    u = max(float(u1), n1 * n2 - float(u1))
    z = (u - n1 * n2 / 2.0 - 0.5) / sigma
    p = min(1.0, math.erfc(z / math.sqrt(2.0)))
    return u1, torch.tensor(p, dtype=torch.float64)


def hypergeom_sf(observed: int, population: int, successes: int, draws: int) -> float:
    """P(X >= observed) for X ~ Hypergeometric(population, successes, draws).

    The enrichment p-value of interpretable units among the most sensitive ones.
    """

    def log_choose(a: int, b: int) -> float:
        return math.lgamma(a + 1) - math.lgamma(b + 1) - math.lgamma(a - b + 1)

    top = min(draws, successes)
    low = max(observed, 0, draws - (population - successes))
    if low > top:
        return 0.0
    log_total = log_choose(population, draws)
    terms = [
        log_choose(successes, i) + log_choose(population - successes, draws - i) - log_total
        for i in range(low, top + 1)
    ]
    peak = max(terms)
    return min(1.0, math.exp(peak) * sum(math.exp(t - peak) for t in terms))
