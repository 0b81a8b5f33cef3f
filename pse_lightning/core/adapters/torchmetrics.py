"""The one place that relies on a private part of torchmetrics: ``Metric._wrap_compute``.

torchmetrics wraps every ``compute`` (``self.compute = self._wrap_compute(self.compute)`` in
``Metric.__init__``): synchronise the states across processes, call, cache, and squeeze every
one-element tensor of the result. An analysis's result keeps a sample axis of length one (one
kept example) and returns 0-d scalars already, so :class:`UnsqueezedCompute` keeps the
wrapper's synchronisation and cache but hides the result from its squeeze.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from lightning_utilities import apply_to_collection
from torch import Tensor
from torchmetrics import Metric

#: The private hook overridden here; tests/core/test_adapters.py checks it on the installed
#: version.
WRAP_COMPUTE = "_wrap_compute"


class _Boxed:
    """Carries a computed result past torchmetrics' squeeze (it does not look inside)."""

    def __init__(self, value: Any) -> None:
        self.value = value


class UnsqueezedCompute(Metric):
    """A Metric whose ``compute`` result is returned as computed (tensors cloned, as
    torchmetrics does), never squeezed."""

    def _wrap_compute(self, compute: Callable[..., Any]) -> Callable[..., Any]:
        def boxed(*args: Any, **kwargs: Any) -> _Boxed:
            return _Boxed(apply_to_collection(compute(*args, **kwargs), Tensor, Tensor.clone))

        wrapped = super()._wrap_compute(boxed)

        @functools.wraps(compute)
        def unboxed(*args: Any, **kwargs: Any) -> Any:
            return wrapped(*args, **kwargs).value

        return unboxed
