"""The contract between the pipeline and an inference-time defense.

A defense is calibrated once on a split the evaluation never sees (the validation split),
then applied to the model; the pipeline evaluates the defended model like any model, so the
attack is adaptive (it differentiates through the defense). A defense may also hand back an
extra :class:`~pse_lightning.analysis.base.Analysis` that runs in the same test pass (its
controls, an accuracy-vs-strength curve): it is reduced across processes and reported through
the same machinery as every analysis, so the pipeline needs to know nothing about the defense.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Any

from torch import nn

from pse_lightning.analysis.base import Analysis
from pse_lightning.attacks import Attack


class Defense(ABC):
    """Base class of every ``defense=<choice>``.

    Subclasses set ``name`` (the report section and the log prefix ``test/<name>/...`` of
    their evaluation) and implement :meth:`calibrate`, :meth:`apply` and :meth:`describe`;
    :meth:`evaluation` is optional.
    """

    name: str = "defense"

    @abstractmethod
    def calibrate(self, model: nn.Module, attack: Attack, loader: Iterable) -> Any:
        """Measure what the defense needs on ``loader`` (batches (x, y, index)).

        Returns:
            A calibration object, the only input :meth:`apply` and :meth:`evaluation` take
            besides the model, so a defense can be re-applied without measuring again.
        """

    @abstractmethod
    def apply(self, model: nn.Module, calibration: Any) -> nn.Module:
        """The defended model: a module with the undefended model's classifier facts."""

    @abstractmethod
    def describe(self, calibration: Any) -> str:
        """One line saying what the calibrated defense does (for the log and the report)."""

    def evaluation(self, model: nn.Module, attack: Attack, calibration: Any) -> Analysis | None:
        """An analysis run beside the defended model's evaluation, or None (the default).

        Its ``update`` receives the defended model and its batch; ``model`` here is the
        undefended one, kept by the analysis for transferred examples and controls.
        """
        return None

    def fit(self, model: nn.Module, attack: Attack, loader: Iterable) -> nn.Module:
        """Calibrate on ``loader`` and return the defended model."""
        return self.apply(model, self.calibrate(model, attack, loader))
