"""Network dissection, staged as pure functions (Bau et al., 2017; docs/METHODS.md §4).

Stages, each a function of tensors (or a small state object whose tallies the caller
reduces across processes):

1. per-unit top-quantile thresholds T_k with P(A_k > T_k) = q over all probe images and
   positions: :class:`RadixQuantile`, an exact streaming selection;
2. activation masks M_k = 1[S_k >= T_k], S_k the activation upsampled bilinearly
   (align_corners=False) to label resolution: :func:`activation_masks` (dense);
3. IoU tallies (intersections, mask areas per category, label areas), integer sums that
   reduce exactly across processes: :func:`add_sparse_tally` (only pixels near cells that
   can reach T_k), :func:`iou_tally` (dense reference), then :func:`iou_from_tally`,
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

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from pse_lightning.core import randomness

# Thresholds ---------------------------------------------------------------------------------

KEY_BITS = 32
_SIGN = 1 << 31
_NO_KEY = 1 << 40  # larger than any 32-bit key: "no element" in min-reductions
# Signed int32 keys (float bits, low 31 bits flipped when negative) of +inf and -inf: any
# key beyond them is a NaN.
_SIGNED_POS_INF = 0x7F800000
_SIGNED_NEG_INF = -0x7F800000 - 1


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


def locate_rank(hist: Tensor, rank: Tensor) -> tuple[Tensor, Tensor]:
    """Per row of ``hist`` (K, B), the bin holding the 0-based ``rank`` (K,) and the count
    of the bins before it (B when the rank is beyond the total).

    Two levels, blocks of about sqrt(B) bins then the bins of one block, so the cost is one
    sum over the histogram instead of a (K, B) cumulative sum (65536 bins: 256 times less
    sequential work and no (K, B) temporary).
    """
    units, bins = hist.shape
    block = 1 << ((bins.bit_length() - 1) // 2)
    blocks = hist.view(units, bins // block, block)
    cum_blocks = blocks.sum(dim=2).cumsum(dim=1)  # (K, B / block)
    rank = rank.view(-1, 1)
    j = torch.searchsorted(cum_blocks, rank, right=True).clamp_max(bins // block - 1)
    before_block = torch.where(j > 0, cum_blocks.gather(1, (j - 1).clamp_min(0)), 0)
    inner = blocks.gather(1, j.view(-1, 1, 1).expand(-1, 1, block))[:, 0].cumsum(dim=1)
    i = torch.searchsorted(inner, rank - before_block, right=True)
    before = before_block + torch.where(i > 0, inner.gather(1, (i - 1).clamp_min(0)), 0)
    beyond = rank >= cum_blocks[:, -1:]
    found = torch.where(beyond, bins, j * block + i)
    return found.view(-1), torch.where(beyond, cum_blocks[:, -1:], before).view(-1)


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
        self._ranges: tuple[Tensor, Tensor, Tensor | None, Tensor | None] | None = None

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
        """Add one batch of activations (N, K, ...) to the current pass's tallies.

        Pass 0 histograms every value's top key bits; it works on int32 keys (the float
        bits with the low 31 bits flipped for negative values sort like the floats as signed
        integers), half the memory traffic of int64. Later passes visit only the values in
        the bins found so far, pre-selected by a float range test.
        """
        if acts.shape[1] != self.units:
            raise ValueError(f"expected {self.units} units, got activations {tuple(acts.shape)}")
        values = acts.detach().flatten(2).float().contiguous()  # (N, K, P)
        shift, width = self.schedule[self.pass_index]
        if self.pass_index == 0:
            self._accumulate_first(tallies, values, shift, width)
            return
        low, high, succ_low, succ_high = self._ranges
        # Only maps whose peak reaches the bin can hold a value in it (the successor's bin
        # lies above): a max per map, then the range test on those maps alone.
        positions = values.shape[2]
        maps = (values.amax(dim=2) >= low).view(-1).nonzero().squeeze(1)  # (M,) n * K + k
        map_unit = maps % self.units
        sub = values.view(-1, positions).index_select(0, maps)  # (M, P)
        near = (sub >= low[map_unit].view(-1, 1)) & (sub <= high[map_unit].view(-1, 1))
        if succ_low is not None:
            near |= (sub >= succ_low[map_unit].view(-1, 1)) & (
                sub <= succ_high[map_unit].view(-1, 1)
            )
        where = near.view(-1).nonzero().squeeze(1)  # flat indices: one cheap 1-D gather
        keys = ordered_keys(sub.view(-1)[where])
        unit = map_unit[where // positions]
        prev_shift = self.schedule[self.pass_index - 1][0]
        match = (keys >> prev_shift) == self.prefix[unit]
        flat = (unit[match] << width) | ((keys[match] >> shift) & ((1 << width) - 1))
        if succ_low is not None:
            inside = (keys >> self.succ_shift[unit]) == self.succ_prefix[unit]
            candidates = keys.masked_fill(~inside, _NO_KEY)
            tallies["succ"].scatter_reduce_(0, unit, candidates, "amin")
        ones = torch.ones(1, dtype=torch.int64, device=flat.device).expand(len(flat))
        tallies["hist"].scatter_add_(0, flat, ones)

    def _accumulate_first(
        self, tallies: dict[str, Tensor], values: Tensor, shift: int, width: int
    ) -> None:
        bits = values.view(torch.int32)
        signed = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # signed int32 keys in float order
        low, high = torch.aminmax(signed, dim=2)
        low, high = low.amin(dim=0), high.amax(dim=0)
        if bool((high > _SIGNED_POS_INF).any() | (low < _SIGNED_NEG_INF).any()):
            raise ValueError("probe activations contain NaN; check the model and inputs")
        tallies["count"] += values.shape[0] * values.shape[2]
        tallies["kmin"] = torch.minimum(tallies["kmin"], low.to(torch.int64) + _SIGN)
        tallies["kmax"] = torch.maximum(tallies["kmax"], high.to(torch.int64) + _SIGN)
        # (signed >> shift) + 2**(31 - shift) is the unsigned key's top bits; adding the
        # int64 unit offsets promotes to the int64 index in the same operation.
        offset = (torch.arange(self.units, device=values.device, dtype=torch.int64) << width) + (
            1 << (31 - shift)
        )
        flat = (signed >> shift) + offset.view(1, -1, 1)
        flat = flat.view(-1)
        ones = torch.ones(1, dtype=torch.int64, device=flat.device).expand(len(flat))
        tallies["hist"].scatter_add_(0, flat, ones)

    def _update_ranges(self) -> None:
        """Float bounds of the current prefix bin and of a pending successor's bin.

        A float comparison cannot tell -0.0 from +0.0 and keys of NaN bit patterns have no
        order as floats, so the ranges are supersets (NaN bounds widened to infinities);
        :meth:`accumulate` re-checks the exact keys of the few values they select.
        """
        if self.done or self.pass_index == 0:
            return
        prev_shift = self.schedule[self.pass_index - 1][0]

        def bounds(prefix: Tensor, shift: Tensor | int) -> tuple[Tensor, Tensor]:
            low = keys_to_values(prefix << shift)
            high = keys_to_values(((prefix + 1) << shift) - 1)
            return torch.nan_to_num(low, nan=-math.inf), torch.nan_to_num(high, nan=math.inf)

        low, high = bounds(self.prefix, prev_shift)
        pending = self.succ_prefix >= 0
        succ_low = succ_high = None
        if bool(pending.any()):
            succ_low, succ_high = bounds(self.succ_prefix.clamp_min(0), self.succ_shift)
            empty = ~pending
            succ_low = succ_low.masked_fill(empty, math.inf)
            succ_high = succ_high.masked_fill(empty, -math.inf)
        self._ranges = (low, high, succ_low, succ_high)

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
        rank_in = self.rank - self.below
        bin_j, before = locate_rank(hist, rank_in)
        bin_s, _ = locate_rank(hist, rank_in + 1)
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
        self._update_ranges()

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
    s = upsample(acts, size)
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


def annotated_categories(labels: Tensor) -> Tensor:
    """(N, G) bool: image n carries some label of category g (so g's IoU counts it)."""
    return (labels.flatten(2) > 0).any(dim=2)


def _add_hits(
    tally: IoUTally, labels: Tensor, image: Tensor, unit: Tensor, y: Tensor, x: Tensor
) -> None:
    """Add mask pixels (image, unit, y, x) to intersections and annotated mask areas."""
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


def add_sparse_tally(
    tally: IoUTally, acts: Tensor, mask_t: Tensor, bound: Tensor, labels: Tensor
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
    """
    a = acts.detach().float()
    n, units, h, w = a.shape
    size = tuple(labels.shape[-2:])
    mask_t, bound = mask_t.to(a.device), bound.to(a.device)
    if (h, w) == size:
        image, unit, y, x = (a >= mask_t.view(1, -1, 1, 1)).nonzero(as_tuple=True)
        _add_hits(tally, labels, image, unit, y, x)
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
    """Unit sensitivities from streamed sums (docs/METHODS.md §4.4).

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
