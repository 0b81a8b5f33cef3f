"""Exact per-unit top-quantile thresholds T_k, streamed (docs/METHODS.md §4.1).

:class:`RadixQuantile` selects, per unit, the order statistic behind
``numpy.quantile(A_k, 1 - q)`` in ceil(32 / log2(bins)) histogram passes over
order-preserving integer keys of the activations. Every tally is an integer sum, min or
max, so reducing them across processes gives the thresholds of one process bit for bit,
and memory is K * bins int64 whatever the size of the probe set.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

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
        raise ValueError(f"analysis.dissection.bins must be a power of two >= 2, got {bins}")
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
