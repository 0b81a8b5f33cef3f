"""The contract between the evaluation loop and the analyses.

An analysis is a torchmetrics ``Metric``: ``update`` sees one adversarial batch, its state
is registered with an exact reduction (sums, counts, histograms; ``cat`` only for a bounded
sample), so N processes give the numbers of one. ``compute`` returns an
:class:`AnalysisResult`: the scalars that are logged and everything the report needs;
``report`` turns that result, and nothing else, into figures and tables for the run
directory and W&B. No analysis reads another's state.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from torch import Tensor, nn

from pse_lightning.core.adapters.torchmetrics import UnsqueezedCompute
from pse_lightning.core.contract import ReportContract, SweepTable, Term
from pse_lightning.core.findings import Finding
from pse_lightning.core.report import ExamplePanel, ReportSection
from pse_lightning.core.rows import clean_correct


@dataclass(frozen=True)
class AdversarialBatch:
    """Everything an analysis may need about one evaluated batch of N images.

    Attributes:
        x: (N, C, H, W) clean images in [0, 1].
        y: (N,) true labels.
        index: (N,) dataset indices (stable across batch sizes and DDP shardings).
        logits_clean: (N, K) logits of x.
        x_adv: (N, C, H, W) adversarial images.
        logits_adv: (N, K) logits of x_adv.
        target: (N,) the attack's target, or the adversarial runner-up when untargeted.
        success: (N,) bool attack success.
        targeted: whether the attack was targeted.
        extras: attack-specific tensors (for example ``groups`` of the structured attack).
        attacked: (N,) bool, the rows the attack was about (clean prediction correct,
            :func:`~pse_lightning.core.rows.clean_correct`); filled from the logits when
            not given.
    """

    x: Tensor
    y: Tensor
    index: Tensor
    logits_clean: Tensor
    x_adv: Tensor
    logits_adv: Tensor
    target: Tensor
    success: Tensor
    targeted: bool
    extras: dict[str, Tensor] = field(default_factory=dict)
    attacked: Tensor | None = None

    def __post_init__(self) -> None:
        if self.attacked is None:  # frozen: set once, here
            object.__setattr__(self, "attacked", clean_correct(self.logits_clean, self.y))


@dataclass
class AnalysisResult:
    """What an analysis's ``compute`` returns, on every rank.

    Attributes:
        scalars: metric name -> 0-d tensor; logged as ``test/<analysis>/<name>`` and written
            to ``metrics.json``.
        details: whatever else ``report`` needs (per-unit tensors, kept examples, tables);
            never logged as metrics.
    """

    scalars: dict[str, Tensor]
    details: dict[str, Any] = field(default_factory=dict)

    def values(self) -> dict[str, float]:
        """``scalars`` as Python floats (float64: a p-value of 1e-79 stays 1e-79)."""
        return {k: float(v) for k, v in self.scalars.items()}


class Analysis(UnsqueezedCompute):
    """Base class of every analysis run inside the evaluation loop.

    Subclasses set ``name`` (the log prefix: ``test/<name>/<key>``) and implement
    ``update(model, batch)``, ``compute()`` (an :class:`AnalysisResult`; called on every
    rank: it synchronises) and ``report(result, out_dir, class_names)`` (rank zero only,
    after ``compute``; reads only ``result``, must not communicate). ``findings(result)``
    declares the paper's claims the analysis tests (rank zero, after ``compute``).

    ``prepare(model, datamodule)`` runs once on every rank before the first batch, for
    analyses that need their own pass over other data (dissection's probe set).

    What the report, the W&B run and a sweep say about the analysis's metrics is declared
    here too, with the keys as ``compute`` returns them (no ``test/<name>/``), so nothing
    outside the analysis names them (:mod:`pse_lightning.core.contract`): ``glossary()``
    explains every scalar key (a test fails on one unexplained), ``key_results`` are the
    headline numbers (the W&B run summary) and ``sweep_tables`` the comparison tables of a
    multirun. ``example_maps`` and ``example_panel`` add the analysis's per-example maps to
    the W&B examples table and the report's per-example panel.
    """

    name: str = "analysis"
    #: See only the attacked rows (clean prediction correct): interpretations of an attack
    #: are about images it had to move. A defense's accuracy curve needs every row.
    attacked_rows_only: bool = True
    #: Headline keys (un-prefixed), shown as ``results/<name>_<key>`` in the W&B summary.
    key_results: ClassVar[tuple[str, ...]] = ()
    #: Tables (and stacked-share figures) of a sweep's comparison.
    sweep_tables: ClassVar[tuple[SweepTable, ...]] = ()
    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def prepare(self, model: nn.Module, datamodule: Any) -> None:
        """Optional pass over auxiliary data before evaluation; default: nothing."""

    def update(self, model: nn.Module, batch: AdversarialBatch) -> None:  # noqa: D102
        raise NotImplementedError

    def compute(self) -> AnalysisResult:  # noqa: D102
        raise NotImplementedError

    @classmethod
    def glossary(cls) -> tuple[Term, ...]:
        """The entries that explain this analysis's scalar keys (patterns without
        ``test/<name>/``) and the words of its report section; default: none."""
        return ()

    def contract(self, prefix: str) -> ReportContract:
        """What the run records of this analysis, logged under ``test/<prefix>/``, for a
        sweep to read back (``contract.json``)."""
        return ReportContract(prefix, tuple(self.key_results), tuple(self.sweep_tables))

    def example_panel(self, result: AnalysisResult) -> ExamplePanel | None:
        """This analysis's columns of the report's per-example panel and of the W&B
        examples table, from the examples ``result`` kept (rank zero); default: none."""
        return None

    def findings(self, result: AnalysisResult) -> list[Finding]:
        """The paper's claims this analysis tests on ``result``, for the report's Findings
        (judged there by :func:`~pse_lightning.core.findings.judge`); default: none."""
        return []

    def report(
        self, result: AnalysisResult, out_dir: Path, class_names: Sequence[str]
    ) -> ReportSection:
        """Figures and tables for ``result``; default: a table of the scalars."""
        rows = [f"| {k} | {float(v):.4g} |" for k, v in result.scalars.items()]
        body = "| metric | value |\n|---|---|\n" + "\n".join(rows)
        return ReportSection(title=self.name, markdown=body)
