"""The accuracy-vs-k evaluation of neuron masking, run inside the shared test pass.

:class:`MaskCurve` is an :class:`~pse_lightning.analysis.base.Analysis`: the pipeline hands
it to the same :class:`~pse_lightning.modules.evaluation.EvaluationModule` that evaluates the
defended model, so it sees the same batches, its per-image outcomes are ``cat`` states reduced
by torchmetrics across processes, and its report goes through the same writer. Per image it
keeps whether each mask classifies the clean image, the transferred example and the adaptive
example correctly, which is what the paired tests of :mod:`.curve_stats` need.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchmetrics.utilities import dim_zero_cat

from pse_lightning.analysis.base import AdversarialBatch, Analysis, AnalysisResult
from pse_lightning.attacks import Attack
from pse_lightning.core.contract import Term
from pse_lightning.core.model_state import frozen_eval
from pse_lightning.core.report import ReportSection
from pse_lightning.defenses.curve_report import (
    CURVE_CAPTION,
    KEY_NUMBERS,
    TITLE,
    curve_markdown,
    curve_meaning,
    curve_tables,
)
from pse_lightning.defenses.curve_stats import (
    METRICS,
    MaskChoice,
    accuracy_rows,
    deployed_scalars,
    paired_comparisons,
    random_spread,
)
from pse_lightning.defenses.figures import accuracy_vs_k_figure
from pse_lightning.defenses.glossary import TERMS


class MaskCurve(Analysis):
    """Clean, transferred and adaptive accuracy of every masked variant, per image.

    For every batch the attack runs once on the unmasked model (transferred examples) and
    once on each distinct masked model (adaptive attack: it differentiates through the mask).

    Args:
        model: the undefended classifier (the transfer source and the reference).
        attack: the attack used for the transferred and the adaptive examples.
        masked: the distinct masked models, one per distinct set of units of ``choices``.
        choices: the evaluated (k, selection, draw, units); several may share a model.
        deployed_k: the k of the deployed defense, whose numbers are logged.
        description: one line on the calibrated defense, for the report.
    """

    name = "neuron_mask"
    attacked_rows_only = False  # accuracies are over every test image

    @classmethod
    def glossary(cls) -> tuple[Term, ...]:  # noqa: D102
        return TERMS

    def __init__(
        self,
        model: nn.Module,
        attack: Attack,
        masked: Sequence[nn.Module],
        choices: Sequence[MaskChoice],
        *,
        deployed_k: int,
        description: str,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.source = model
        self.attack = attack
        self.masked = nn.ModuleList(masked)
        keys = [tuple(sorted(m.units.tolist())) for m in masked]
        self.choices = list(choices)
        self.mask_of = [keys.index(c.key) for c in self.choices]  # choice -> masked model
        self.deployed_k = int(deployed_k)
        self.description = description
        self.add_state("index", [], dist_reduce_fx="cat")
        self.add_state("base_clean", [], dist_reduce_fx="cat")  # (N,) undefended, clean
        self.add_state("base_robust", [], dist_reduce_fx="cat")  # (N,) undefended, attacked
        for metric in METRICS:  # (N, masks) bool per image and masked model
            self.add_state(metric, [], dist_reduce_fx="cat")

    def update(self, model: nn.Module, batch: AdversarialBatch) -> None:
        """``model`` is the defended model; the curve uses its own undefended source."""
        x, y, index = batch.x, batch.y, batch.index
        x_transfer = self.attack(self.source, x, y, index=index).x_adv
        with frozen_eval(self.source), torch.no_grad():
            self.base_clean.append(self.source(x).argmax(dim=1) == y)
            self.base_robust.append(self.source(x_transfer).argmax(dim=1) == y)
        per_mask = {metric: [] for metric in METRICS}
        for masked in self.masked:
            with frozen_eval(masked), torch.no_grad():
                per_mask["clean"].append(masked(x).argmax(dim=1) == y)
                per_mask["transfer"].append(masked(x_transfer).argmax(dim=1) == y)
            adaptive = self.attack(masked, x, y, index=index).logits_adv.argmax(dim=1) == y
            per_mask["adaptive"].append(adaptive)
        self.index.append(index)
        for metric, columns in per_mask.items():
            getattr(self, metric).append(torch.stack(columns, dim=1))

    def compute(self) -> AnalysisResult:
        """Rows with Wilson intervals, the random control's spread and the paired tests."""
        if not self.index:
            raise RuntimeError("the neuron_mask curve saw no test batch")
        order = dim_zero_cat(self.index).argsort()
        columns = torch.tensor(self.mask_of, device=order.device)
        outcomes = {m: dim_zero_cat(getattr(self, m))[order][:, columns].cpu() for m in METRICS}
        undefended = {
            "clean": dim_zero_cat(self.base_clean)[order].cpu(),
            "robust": dim_zero_cat(self.base_robust)[order].cpu(),
        }
        rows = accuracy_rows(self.choices, outcomes)
        tests = paired_comparisons(self.choices, outcomes, undefended)
        scalars = deployed_scalars(rows, tests, undefended, self.deployed_k)
        details = {"rows": rows, "spread": random_spread(rows), "tests": tests}
        return AnalysisResult(
            scalars={k: torch.tensor(v, dtype=torch.float64) for k, v in scalars.items()},
            details=details,
        )

    def report(
        self, result: AnalysisResult, out_dir: Path, class_names: Sequence[str]
    ) -> ReportSection:
        """The accuracy-vs-k figure, the curve with intervals and the paired tests."""
        details = result.details
        figure = accuracy_vs_k_figure(
            details["rows"], details["spread"], Path(out_dir) / "neuron_mask_vs_k.png"
        )
        return ReportSection(
            title=TITLE,
            markdown=curve_markdown(self.description, details),
            figures=[figure],
            tables=curve_tables(details),
            captions={figure.stem: CURVE_CAPTION},
            key_numbers={k: float(result.scalars[k]) for k in KEY_NUMBERS},
            meaning=curve_meaning({k: float(v) for k, v in result.scalars.items()}),
        )
