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


class _Recorder:
    """Stands in for an analysis: records the thread count its ``compute`` runs with."""

    def __init__(self, value: int) -> None:
        self.value = value

    def compute(self) -> tuple[int, int]:
        return self.value, torch.get_num_threads()


def test_analyses_compute_on_one_thread_each_in_their_order() -> None:
    from pse_lightning.modules.evaluation import compute_analyses

    before = torch.get_num_threads()
    analyses = {name: _Recorder(i) for i, name in enumerate(("pse", "cam", "dissection"))}
    results = compute_analyses(analyses)  # type: ignore[arg-type]
    assert list(results) == ["pse", "cam", "dissection"]
    assert results == {"pse": (0, 1), "cam": (1, 1), "dissection": (2, 1)}
    assert torch.get_num_threads() == before


def test_an_analysis_error_reaches_the_caller() -> None:
    from pse_lightning.modules.evaluation import compute_analyses

    class Broken(_Recorder):
        def compute(self) -> tuple[int, int]:
            raise ValueError("broken statistics")

    with pytest.raises(ValueError, match="broken statistics"):
        compute_analyses({"a": _Recorder(0), "b": Broken(1)})  # type: ignore[arg-type]
