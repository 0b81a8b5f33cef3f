"""Thread count of torch's CPU operations for a stretch of code."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with ``count`` intra-op threads, then restore the previous count.

    The epoch-end statistics (mixture EM, bootstraps, permutations) run thousands of small
    float64 operations; split over two threads each one waits at a barrier, which costs far
    more than the work (mixture.modes: 1 s of CPU on one thread, 49 s on two threads of a
    busy 2-core machine) and gives the same numbers: elementwise kernels and reductions over
    many outputs compute each element in the same order on any number of threads.
    """
    before = torch.get_num_threads()
    if count == before:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
