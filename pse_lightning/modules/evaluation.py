"""EvaluationModule: clean forward, attack, adversarial forward, analyses; per test batch."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torchmetrics.utilities import dim_zero_cat

from pse_lightning.analysis.base import AdversarialBatch, Analysis, AnalysisResult
from pse_lightning.attacks import Attack
from pse_lightning.core.distributed import all_gather_objects, rank_world, unshare_tensors
from pse_lightning.core.threads import torch_threads
from pse_lightning.modules.attack_metrics import AttackMetrics
from pse_lightning.validation import InputError


@dataclass
class EvaluationResult:
    """Everything one evaluation produced, reduced over every process.

    Attributes:
        scalars: ``test/...`` metric name -> value (what is logged and in ``metrics.json``).
        analyses: analysis name -> its :class:`~pse_lightning.analysis.base.AnalysisResult`.
        examples: the kept adversarial examples (index, x, x_adv, y, pred_clean, pred_adv),
            sorted by dataset index; empty when none were kept.
        norms: per-image ``l2`` and ``linf`` norms of the successful perturbations, in
            dataset-index order (the report's norm distribution).
        outcomes: per-image ``index``, ``clean_correct`` and ``adv_correct`` of every
            process, sorted by dataset index (what a sweep's paired test compares).
    """

    scalars: dict[str, float]
    analyses: dict[str, AnalysisResult] = field(default_factory=dict)
    examples: dict[str, Tensor] = field(default_factory=dict)
    norms: dict[str, Tensor] = field(default_factory=dict)
    outcomes: dict[str, Tensor] = field(default_factory=dict)


# Extras that describe the batch rather than one sample (StrAttack's (H, W) group ids).
SHARED_EXTRAS = frozenset({"group_map"})


def attacked_rows(adv: AdversarialBatch) -> AdversarialBatch:
    """The rows the attack was about (``adv.attacked``: clean prediction correct), for the
    analyses that see only those (docs/METHODS.md §1.1)."""
    attacked = adv.attacked
    if bool(attacked.all()):
        return adv
    rows = {k: v[attacked] for k, v in vars(adv).items() if isinstance(v, Tensor)}
    extras = {k: v if k in SHARED_EXTRAS else v[attacked] for k, v in adv.extras.items()}
    return AdversarialBatch(**rows, targeted=adv.targeted, extras=extras)


def compute_analyses(analyses: Mapping[str, Analysis]) -> dict[str, AnalysisResult]:
    """Every analysis's ``compute()``, in the order given.

    The statistics are many small operations: one intra-op thread does them fastest
    (core/threads.py). In one process the analyses compute side by side, one Python thread
    each (torch releases the GIL inside its operations), so the machine's second core is
    not idle; each analysis draws from its own seeded generators and reads only its own
    state, so the results are those of computing them one after another. Under DDP they
    compute one after another: ``compute`` synchronises, and collectives must be issued in
    the same order on every rank.
    """
    with torch_threads(1):  # set here once: two workers setting and restoring it would race
        if len(analyses) < 2 or rank_world()[1] > 1:
            return {name: analysis.compute() for name, analysis in analyses.items()}
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="analysis") as pool:
            futures = {name: pool.submit(_compute, a) for name, a in analyses.items()}
            return {name: future.result() for name, future in futures.items()}


def _compute(analysis: Analysis) -> AnalysisResult:
    # Again in the worker: where torch's thread count is a per-thread setting (some OpenMP
    # builds) a new thread starts from the default; elsewhere this is a no-op.
    with torch_threads(1):
        return analysis.compute()


class EvaluationModule(pl.LightningModule):
    """Runs an attack on every test batch and feeds the result to each analysis.

    Only orchestration lives here: attacks and analyses are plain objects usable without
    Lightning. All metrics are torchmetrics states reduced at epoch end on every rank; the
    computed results (an :class:`EvaluationResult`) are handed to ``on_result`` on every
    rank (the pipeline passes :meth:`.ReportWriter.receive`) and kept in
    ``self.result`` for callers of the Python API.

    Args:
        model: a :class:`~pse_lightning.models.Classifier` (kept in eval mode).
        attack: the attack to run.
        analyses: name -> analysis.
        log_examples: keep images of the samples with dataset index < this for the report.
        on_result: called with the reduced :class:`EvaluationResult` at the end of each test
            epoch, on every rank.
    """

    def __init__(
        self,
        model: nn.Module,
        attack: Attack,
        analyses: Mapping[str, Analysis] | None = None,
        log_examples: int = 8,
        on_result: Callable[[EvaluationResult], None] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.attack = attack
        self.analyses = nn.ModuleDict(dict(analyses or {}))
        self.attack_metrics = AttackMetrics()
        self.log_examples = int(log_examples)
        self.examples: dict[str, list[Tensor]] = {}
        self.result: EvaluationResult | None = None
        self.on_result = on_result

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def setup(self, stage: str) -> None:
        unshare_tensors(self)
        # The logged scalars come from torchmetrics' compute(), already reduced over every
        # process; Lightning cannot know that and asks for sync_dist, which would reduce twice.
        warnings.filterwarnings("ignore", message=r".*`self\.log\('test/.*sync_dist=True")

    def on_test_start(self) -> None:
        if torch.is_inference_mode_enabled():
            raise RuntimeError("attacks need gradients: set trainer.inference_mode=false")
        low = sorted(
            {str(p.dtype) for p in self.model.parameters()} - {"torch.float32", "torch.float64"}
        )
        if low:
            raise InputError(
                f"the model's weights are {', '.join(low)}: attacks compute in float32 so their "
                "budgets and success are exact; use trainer.precision=32 or bf16-mixed/16-mixed "
                "(mixed precision is switched off inside the attack), not a *-true precision"
            )
        self.model.eval()
        self.examples = {k: [] for k in ("index", "x", "x_adv", "y", "pred_clean", "pred_adv")}
        for analysis in self.analyses.values():
            analysis.prepare(self.model, self.trainer.datamodule)

    def test_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> None:
        x, y, index = batch
        with torch.no_grad():
            logits_clean = self.model(x)
        result = self.attack(self.model, x, y, index=index, logits_clean=logits_clean)
        self.attack_metrics.update(
            x, result.x_adv, y, logits_clean, result.logits_adv, result.success, index
        )
        full = AdversarialBatch(
            x=x,
            y=y,
            index=index,
            logits_clean=logits_clean,
            x_adv=result.x_adv,
            logits_adv=result.logits_adv,
            target=result.target,
            success=result.success,
            targeted=result.targeted,
            extras=result.extras,
            attacked=result.attacked,
        )
        adv = attacked_rows(full)
        with torch.enable_grad():
            for analysis in self.analyses.values():
                batch = adv if analysis.attacked_rows_only else full
                if len(batch.y):
                    analysis.update(self.model, batch)
        self._keep_examples(full)  # the first images as they are, misclassified ones too

    def _keep_examples(self, adv: AdversarialBatch) -> None:
        keep = adv.index < self.log_examples
        if keep.any():
            for key, value in (
                ("index", adv.index),
                ("x", adv.x),
                ("x_adv", adv.x_adv),
                ("y", adv.y),
                ("pred_clean", adv.logits_clean.argmax(1)),
                ("pred_adv", adv.logits_adv.argmax(1)),
            ):
                self.examples[key].append(value[keep].detach().cpu())

    def on_test_epoch_end(self) -> None:
        scalars = {f"test/{k}": v for k, v in self.attack_metrics.compute().items()}
        analysis_results = compute_analyses(self.analyses)
        for name, computed in analysis_results.items():
            for key, value in computed.scalars.items():
                scalars[f"test/{name}/{key}"] = torch.as_tensor(value)
        # float64 everywhere (loggers, metrics.json, the report): a p-value of 1e-79
        # computed in float64 is not stored as 0, and the logged numbers equal the files'.
        self.log_dict({k: v.double() for k, v in scalars.items()}, sync_dist=False)
        per_image = self.attack_metrics.per_image()  # one gather for norms and outcomes
        self.result = EvaluationResult(
            scalars={k: float(v) for k, v in scalars.items()},
            analyses=analysis_results,
            examples=self._gather_examples(),
            norms=self.attack_metrics.successful_norms(per_image),
            outcomes=self.attack_metrics.outcomes(per_image),
        )
        self.attack_metrics.reset()
        for analysis in self.analyses.values():
            analysis.reset()
        if self.on_result is not None:
            self.on_result(self.result)

    def _gather_examples(self) -> dict[str, Tensor]:
        """All ranks' kept examples, sorted by dataset index (the same under any sharding)."""
        local = {k: (torch.cat(v) if v else None) for k, v in self.examples.items()}
        parts = [g for g in all_gather_objects(local) if g["index"] is not None]
        if not parts:
            return {}
        merged = {k: dim_zero_cat([p[k] for p in parts]) for k in local}
        order = merged["index"].argsort()
        return {k: v[order] for k, v in merged.items()}
