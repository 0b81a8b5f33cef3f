"""Counter-based per-sample randomness.

Random starts and random targets are derived from (seed, sample index, stream) by an
integer hash instead of a stateful generator, so a sample gets the same noise whatever its
batch, its batch mates, the number of DDP processes or the device (CPU and CUDA run the
same integer arithmetic). A global RNG cannot give that (see PITFALLS: random starts).
"""

from __future__ import annotations

import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF
_MULT = 0x45D9F3B  # < 2**27, so products of 32-bit values never overflow int64


def _mix32(h: Tensor) -> Tensor:
    """A 32-bit integer finaliser (two multiply-xorshift rounds), on int64 tensors."""
    h = ((h >> 16) ^ h) * _MULT & _MASK32
    h = ((h >> 16) ^ h) * _MULT & _MASK32
    return (h >> 16) ^ h


def sample_keys(index: Tensor, seed: int, stream: int) -> Tensor:
    """Per-sample 32-bit keys, shape (N,), from the dataset index of each sample."""
    base = _mix32(torch.tensor((seed * 0x9E3779B1 + stream * 0x85EBCA77) & _MASK32))
    return _mix32((index.to(torch.int64) & _MASK32) ^ base.to(index.device))


def uniform(index: Tensor, shape: tuple[int, ...], seed: int, stream: int) -> Tensor:
    """Uniform [0, 1) float32 noise of shape (N, *shape); row i depends only on index[i]."""
    keys = sample_keys(index, seed, stream)
    numel = 1
    for s in shape:
        numel *= s
    counter = torch.arange(numel, device=index.device, dtype=torch.int64)
    bits = _mix32(keys[:, None] ^ _mix32(counter + 0x27D4EB2F)[None, :])
    return ((bits >> 8).to(torch.float32) / float(1 << 24)).view(len(index), *shape)


def randint_excluding(index: Tensor, exclude: Tensor, high: int, seed: int, stream: int) -> Tensor:
    """A uniform integer in [0, high) different from ``exclude`` for each sample."""
    u = uniform(index, (1,), seed, stream)[:, 0]
    offset = 1 + torch.clamp((u * (high - 1)).long(), max=high - 2)
    return (exclude + offset) % high
