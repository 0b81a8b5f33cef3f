"""The contract between the evaluation loop and the analyses.

An analysis is a torchmetrics ``Metric``: ``update`` sees one adversarial batch, its state
is registered with an exact reduction (sums, counts, histograms; ``cat`` only for a bounded
sample), so N processes give the numbers of one. ``compute`` returns scalar metrics;
``report`` turns the computed result into figures and tables for the run directory and
W&B. No analysis reads another's state: shared maths lives in ``analysis/functional.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn
from torchmetrics import Metric


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


@dataclass
class ReportSection:
    """What one analysis contributes to ``report.md`` and to W&B.

    Attributes:
        title: section heading.
        markdown: body text (tables in markdown, short interpretation).
        figures: PNG files written into the run directory, embedded in the report and
            logged to W&B as images under ``report/<title>/<file stem>``.
        tables: W&B tables, name -> (columns, rows).
    """

    title: str
    markdown: str = ""
    figures: list[Path] = field(default_factory=list)
    tables: dict[str, tuple[list[str], list[list[Any]]]] = field(default_factory=dict)


class Analysis(Metric):
    """Base class of every analysis run inside the evaluation loop.

    Subclasses set ``name`` (the log prefix: ``test/<name>/<key>``) and implement
    ``update(model, batch)``, ``compute()`` (a dict of scalar or small tensors, called on
    every rank: it synchronises) and ``report(result, out_dir)`` (rank zero only, after
    ``compute``; must not communicate).

    ``prepare(model, datamodule)`` runs once on every rank before the first batch, for
    analyses that need their own pass over other data (dissection's probe set).
    """

    name: str = "analysis"
    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def prepare(self, model: nn.Module, datamodule: Any) -> None:
        """Optional pass over auxiliary data before evaluation; default: nothing."""

    def update(self, model: nn.Module, batch: AdversarialBatch) -> None:  # noqa: D102
        raise NotImplementedError

    def report(self, result: dict[str, Any], out_dir: Path) -> ReportSection:
        """Figures and tables for ``result`` (the output of ``compute``); default: a table."""
        rows = [f"| {k} | {_fmt(v)} |" for k, v in result.items()]
        body = "| metric | value |\n|---|---|\n" + "\n".join(rows)
        return ReportSection(title=self.name, markdown=body)


def _fmt(value: Any) -> str:
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    return f"{value:.4g}" if isinstance(value, float) else str(value)
