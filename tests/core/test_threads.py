"""core.threads: the statistics' thread count is scoped, and it does not change a result."""

from __future__ import annotations

import pytest
import torch

from pse_lightning.analysis.pse import mixture
from pse_lightning.core.threads import torch_threads


def test_thread_count_is_set_inside_and_restored_after() -> None:
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_thread_count_is_restored_after_an_error() -> None:
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError), torch_threads(1):
        raise RuntimeError("inside")
    assert torch.get_num_threads() == before


@pytest.mark.slow
def test_mixture_modes_identical_on_one_and_two_threads() -> None:
    """The epoch-end statistics run on one thread: the numbers must be those of two."""
    gen = torch.Generator().manual_seed(1)
    r = torch.cat([
        torch.rand(150, generator=gen) * 0.2,
        0.4 + torch.rand(150, generator=gen) * 0.2,
        0.8 + torch.rand(150, generator=gen) * 0.2,
    ])  # fmt: skip
    counts = mixture.fine_histogram(r)
    results = []
    for threads in (1, 2):
        with torch_threads(threads):
            results.append(mixture.modes(counts, replicates=9))
    one, two = results
    assert torch.equal(one.bic, two.bic)
    assert one.k == two.k
    assert all(torch.equal(one.p[j], two.p[j]) for j in (1, 2))
    for name in ("weights", "means", "sds", "loglik"):
        assert torch.equal(getattr(one.fit, name), getattr(two.fit, name))
