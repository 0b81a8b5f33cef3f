"""The dissection analysis as a torchmetrics Metric (``analysis=dissection``).

``prepare`` dissects the chosen layers on the probe set (:mod:`.probe`); ``update``
accumulates each unit's activation change between clean and adversarial inputs into
fixed-size sums; ``compute`` relates sensitivity and interpretability (:mod:`.summary`)
and returns everything ``report`` draws (:mod:`.report`).

State design. The number of units of each layer is known only once the model has run on a
probe image, so the per-unit sums cannot be sized in ``Dissection.__init__``. Instead of
registering states late under generated names, each layer's sums live in a small child
Metric, :class:`UnitSums`, that declares its fixed, named states (one per row of
:data:`~.sensitivity.SENSITIVITY_ROWS`) in its own ``__init__``; ``prepare`` creates one
per layer in the ``unit_sums`` ModuleList (ordered like the probe's layers). Every child
syncs itself in its ``compute`` and moves with the parent (``.to``), and ``reset`` resets
them with the parent's own state, the weighted image count.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from pse_lightning.analysis.base import AdversarialBatch, Analysis, AnalysisResult, ReportSection
from pse_lightning.analysis.dissection.activations import layer_activations
from pse_lightning.analysis.dissection.findings import dissection_findings
from pse_lightning.analysis.dissection.glossary import TERMS
from pse_lightning.analysis.dissection.probe import (
    ProbePasses,
    ProbeResult,
    ProbeSettings,
    concept_table,
    head_layer,
)
from pse_lightning.analysis.dissection.report import report_section
from pse_lightning.analysis.dissection.sensitive import (
    KeptActivations,
    SensitiveUnit,
    sensitive_units,
)
from pse_lightning.analysis.dissection.sensitivity import (
    SENSITIVITY_ROWS,
    class_target_share,
    poisson_weights,
    sensitivity_from_sums,
    sensitivity_terms,
    spatial_mean,
)
from pse_lightning.analysis.dissection.showcase import Showcase, build_showcase
from pse_lightning.analysis.dissection.summary import (
    SummarySettings,
    baseline_scalars,
    difference_scalars,
    holm_families,
    summarise_layer,
)
from pse_lightning.core.contract import SweepTable, Term
from pse_lightning.core.distributed import rank_world
from pse_lightning.core.findings import Finding
from pse_lightning.core.model_state import frozen_eval, model_device
from pse_lightning.validation import require_at_least, require_in_range

log = logging.getLogger(__name__)


class UnitSums(Metric):
    """Streamed, bootstrap-weighted sums of :data:`SENSITIVITY_ROWS` for one layer.

    One named state per row, each (1 + B, K) float64: replicate 0 weighs every image once,
    replicates 1..B by the Poisson weights. Sums reduce exactly across processes.

    Args:
        units: K, the layer's units.
        replicates: 1 + B.
        kwargs: passed to ``torchmetrics.Metric``.
    """

    full_state_update = False
    clean: Tensor
    clean_sq: Tensor
    delta: Tensor
    delta_pos: Tensor
    delta_neg: Tensor
    promotion: Tensor
    promotion_signed: Tensor
    suppression: Tensor
    suppression_signed: Tensor

    def __init__(self, units: int, replicates: int, classes: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for row in SENSITIVITY_ROWS:
            zeros = torch.zeros(replicates, units, dtype=torch.float64)
            self.add_state(row, zeros, dist_reduce_fx="sum")
        zeros = torch.zeros(classes, units, dtype=torch.float64)
        self.add_state("class_clean", zeros, dist_reduce_fx="sum")

    def update(
        self, weights: Tensor, terms: Tensor, y: Tensor | None = None, clean: Tensor | None = None
    ) -> None:
        """Add per-image ``terms`` (R, N, K) weighted by ``weights`` (N, 1 + B), and with
        labels ``y`` (N,) the clean means ``clean`` (N, K) to their true class's row of
        ``class_clean`` (C, K) (replicate-0 weights: each counted image once)."""
        sums = torch.einsum("nb,rnk->brk", weights, terms)
        for i, row in enumerate(SENSITIVITY_ROWS):
            getattr(self, row).add_(sums[:, i])
        if y is not None and clean is not None and len(self.class_clean):
            self.class_clean.index_add_(0, y, clean.double() * weights[:, :1])

    def compute(self) -> tuple[Tensor, Tensor]:
        """((1 + B, R, K) the rows stacked in :data:`SENSITIVITY_ROWS` order, (C, K)
        ``class_clean``), synchronised: read the states through this, not afterwards (the
        states return to the local values once ``compute`` is done)."""
        rows = torch.stack([getattr(self, row) for row in SENSITIVITY_ROWS], dim=1)
        return rows, self.class_clean.clone()


class ClassCounts(Metric):
    """Evaluated images per true class (replicate-0 weights) and the attack's targets per
    class in every bootstrap replicate: the class traffic of :func:`class_target_share`.

    Args:
        classes: C.
        replicates: 1 + B.
        kwargs: passed to ``torchmetrics.Metric``.
    """

    full_state_update = False
    images: Tensor
    targets: Tensor

    def __init__(self, classes: int, replicates: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("images", torch.zeros(classes, dtype=torch.float64), "sum")
        self.add_state("targets", torch.zeros(replicates, classes, dtype=torch.float64), "sum")

    def update(self, weights: Tensor, y: Tensor, target: Tensor) -> None:
        """Add a batch: ``weights`` (N, 1 + B), labels ``y`` and targets ``target`` (N,)."""
        self.images.index_add_(0, y, weights[:, 0])
        self.targets.index_add_(1, target, weights.T)

    def compute(self) -> tuple[Tensor, Tensor]:
        """(images (C,), targets (1 + B, C)), synchronised."""
        return self.images.clone(), self.targets.clone()


class Dissection(Analysis):
    """Network dissection and unit sensitivity (``analysis=dissection``).

    Args:
        layers: dotted layer names to dissect; null uses the model's ``dissection_layers``
            (the last two conv blocks).
        quantile: q, the fraction of a unit's activations above its threshold (0.005).
        iou_threshold: a unit is interpretable when its best IoU exceeds this (0.04).
        bins: histogram bins per unit in each threshold pass, a power of two; thresholds
            take ceil(32 / log2(bins)) probe passes (3 at 4096, 2 at 65536) and K * bins
            int64 of memory per layer, capped at 256 MB by lowering a wide layer's bins.
            With the cache only the first pass runs the model and the others cost about a
            tenth of a forward each, so 4096 (2 MB for 64 units) is the default; without
            it 65536 saves one forward pass for 16 times the memory.
        max_probe_images: dissect only probe images with dataset index below this (null:
            all); chosen by index, so the same images under any number of processes.
        top_images: top-activating probe images kept per unit for the report figure.
        top_units: units shown per layer in that figure (the most interpretable ones) and
            in the sensitive-unit figure (the most sensitive ones).
        sensitive_images: evaluation images (dataset index < this, those s is measured on)
            shown with the most sensitive units' masks on x and x' (0: no such figure).
        permutations: permutations for the p-value of Spearman's rho.
        bootstrap: Poisson-bootstrap replicates over evaluation images and (independently)
            over probe images for rho's two-way CI.
        enrichment_top: fraction of most sensitive units tested for enrichment in
            interpretable units (hypergeometric p-value).
        successful_only: accumulate sensitivity over successful attacks only.
        seed: seed of the permutations and the bootstrap weights.
        cache_features: keep the probe set's activations of the dissected layers (float32)
            and labels in temporary files during ``prepare``, so the model runs once per
            probe image and the later passes read the files (disk: about 4 bytes per
            activation, deleted at the end); false runs the model in every pass instead
            (no disk, 1 + ceil(32 / log2(bins)) forward passes).
        cache_dir: directory of those files (null: the system's temporary directory).
        min_category_units: a concept category is tested (Mann–Whitney of its
            interpretable units' s against the others) only with at least this many
            interpretable units of that category in the layer (docs/METHODS.md §7.4).
        random_baseline: also dissect the same architecture re-initialised from ``seed``
            and measure its units' sensitivity to the same adversarial examples: the
            interpretable units and rho a trained network must beat (docs/METHODS.md
            §4.7). Doubles the dissection's cost.
        kwargs: passed to ``torchmetrics.Metric``.
    """

    name = "dissection"
    sweep_tables = (
        SweepTable("Interpretable units", pattern=r".*interpretable.*", per_attack=False),
    )
    count: Tensor

    @classmethod
    def glossary(cls) -> tuple[Term, ...]:  # noqa: D102
        return TERMS

    def __init__(
        self,
        *,
        layers: Sequence[str] | None = None,
        quantile: float = 0.005,
        iou_threshold: float = 0.04,
        bins: int = 4096,
        max_probe_images: int | None = None,
        top_images: int = 4,
        top_units: int = 4,
        sensitive_images: int = 4,
        permutations: int = 10000,
        bootstrap: int = 200,
        enrichment_top: float = 0.1,
        successful_only: bool = False,
        seed: int = 0,
        cache_features: bool = True,
        cache_dir: str | None = None,
        min_category_units: int = 10,
        random_baseline: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if layers is not None and (isinstance(layers, str) or not len(layers)):
            raise ValueError(
                "analysis.dissection.layers must be a non-empty list of layer names or null, "
                f"got {layers!r}"
            )
        self.layers = None if layers is None else [str(name) for name in layers]
        self.probe_settings = ProbeSettings(
            quantile=require_in_range(
                "analysis.dissection.quantile", quantile, 0.0, 0.5, low_open=True
            ),
            bins=_require_bins(bins),
            max_probe_images=_optional_at_least(
                "analysis.dissection.max_probe_images", max_probe_images
            ),
            top_images=require_at_least("analysis.dissection.top_images", top_images, 0),
            cache_features=_require_bool("analysis.dissection.cache_features", cache_features),
            cache_dir=None if cache_dir is None else str(cache_dir),
            bootstrap=require_at_least("analysis.dissection.bootstrap", bootstrap, 0),
            seed=int(seed),
        )
        self.summary_settings = SummarySettings(
            iou_threshold=require_in_range(
                "analysis.dissection.iou_threshold", iou_threshold, 0.0, 1.0
            ),
            permutations=require_at_least("analysis.dissection.permutations", permutations, 0),
            bootstrap=require_at_least("analysis.dissection.bootstrap", bootstrap, 0),
            enrichment_top=require_in_range(
                "analysis.dissection.enrichment_top", enrichment_top, 0.0, 1.0, low_open=True
            ),
            seed=int(seed),
            min_category_units=require_at_least(
                "analysis.dissection.min_category_units", min_category_units, 1
            ),
        )
        self.random_baseline = _require_bool(
            "analysis.dissection.random_baseline", random_baseline
        )
        self.top_units = require_at_least("analysis.dissection.top_units", top_units, 0)
        self.sensitive_images = require_at_least(
            "analysis.dissection.sensitive_images", sensitive_images, 0
        )
        self.kept = KeptActivations(0, 0, **kwargs)  # sized by prepare
        self.successful_only = _require_bool(
            "analysis.dissection.successful_only", successful_only
        )
        self._metric_kwargs = kwargs
        self.probe: ProbeResult | None = None
        self.baseline: tuple[nn.Module, ProbeResult] | None = None
        self.showcase: list[Showcase] = []
        replicates = 1 + self.summary_settings.bootstrap
        self.add_state("count", torch.zeros(replicates, dtype=torch.float64), "sum")
        self.unit_sums = nn.ModuleList()  # one UnitSums per probed layer, made by prepare
        self.baseline_sums = nn.ModuleList()  # the same for the random-weights baseline
        self.class_counts = ClassCounts(0, replicates, **kwargs)  # sized by prepare
        self.classes = 0

    @property
    def iou_threshold(self) -> float:
        return self.summary_settings.iou_threshold

    # -- probe passes ---------------------------------------------------------------------

    def prepare(self, model: nn.Module, datamodule: Any) -> None:
        """Dissect the layers on ``datamodule.probe_dataloader()`` (every rank calls this).

        Raises:
            ValueError: no layers to dissect, a concept of an unknown category, probe
                labels of the wrong shape or range, or an empty probe set.
        """
        layers = list(self.layers or getattr(model, "dissection_layers", ()) or ())
        if not layers:
            raise ValueError(
                "analysis.dissection.layers is null and the model names no "
                "dissection_layers; set analysis.layers=[<layer name>, ...]"
            )
        table = concept_table(datamodule)
        loader = datamodule.probe_dataloader()
        self.classes = _num_classes(model, datamodule)
        replicates = 1 + self.summary_settings.bootstrap
        self.class_counts = ClassCounts(self.classes, replicates, **self._metric_kwargs)
        self.class_counts = self.class_counts.to(model_device(model))
        self.probe = self._dissect(model, loader, layers, table, datamodule, "trained model")
        self.unit_sums = self._new_sums(model)
        self.baseline, self.baseline_sums = None, nn.ModuleList()
        if self.random_baseline:
            random = random_weights(model, self.summary_settings.seed)
            baseline = self._dissect(
                random, loader, layers, table, datamodule, "random-weights baseline"
            )
            self.baseline = (random, baseline)
            self.baseline_sums = self._new_sums(model)
        self.count = self.count.to(model_device(model))
        limit = self.sensitive_images if self.top_units else 0
        self.kept = KeptActivations(len(layers), limit, **self._metric_kwargs)
        self.kept = self.kept.to(model_device(model))
        self.showcase = []
        if rank_world()[0] == 0 and self.top_units and self.probe_settings.top_images:
            with frozen_eval(model), torch.no_grad():
                self.showcase = build_showcase(model, loader, self.probe, self.top_units)

    def _dissect(
        self,
        model: nn.Module,
        loader: Any,
        layers: list[str],
        table: Any,
        datamodule: Any,
        network: str,
    ) -> ProbeResult:
        """Dissect ``model``'s layers; ``network`` names it in the log line (the trained
        model, or the random-weights baseline)."""
        passes = ProbePasses(model, loader, layers, table, self.probe_settings)
        results, probe_images = passes.run()
        counts = ", ".join(
            f"{n} {int((r.best_iou > self.iou_threshold).sum())} of {r.units}"
            for n, r in results.items()
        )
        log.info(
            "dissection of the %s: interpretable units (IoU > %g): %s",
            network,
            self.iou_threshold,
            counts,
        )
        return ProbeResult(
            layers=results,
            table=table,
            concepts=list(datamodule.concepts),
            probe_images=probe_images,
            head_layer=head_layer(model, layers),
            pass_seconds=passes.seconds,
            pass_cpu_seconds=passes.cpu_seconds,
        )

    def _new_sums(self, model: nn.Module) -> nn.ModuleList:
        """One zeroed :class:`UnitSums` per probed layer, on the model's device."""
        assert self.probe is not None
        replicates = 1 + self.summary_settings.bootstrap
        return nn.ModuleList(
            UnitSums(r.units, replicates, self.classes, **self._metric_kwargs).to(
                model_device(model)
            )
            for r in self.probe.layers.values()
        )

    # -- sensitivity ----------------------------------------------------------------------

    def update(self, model: nn.Module, batch: AdversarialBatch) -> None:
        """Accumulate clean and adversarial spatial-mean activations of every unit."""
        if self.probe is None:
            raise RuntimeError("Dissection.prepare(model, datamodule) must run before update")
        settings = self.summary_settings
        weights = poisson_weights(batch.index, settings.bootstrap, settings.seed)
        if self.successful_only:
            weights = weights * batch.success.to(weights).view(-1, 1)
        acts = self._accumulate(model, self.unit_sums, batch, weights, self.probe.head_layer)
        if self.kept.limit:
            shown = (weights[:, 0] > 0).nonzero().flatten()  # the images s is measured on
            pairs = [torch.cat([a[shown], a[len(batch.x) + shown]]) for a in acts]
            self.kept.update(batch.index[shown], batch.x[shown], batch.x_adv[shown], pairs)
        if self.baseline is not None:
            self._accumulate(self.baseline[0], self.baseline_sums, batch, weights, None)
        self.class_counts.update(weights, batch.y, batch.target)
        self.count += weights.sum(dim=0)

    def _accumulate(
        self,
        model: nn.Module,
        unit_sums: nn.ModuleList,
        batch: AdversarialBatch,
        weights: Tensor,
        head: str | None,
    ) -> list[Tensor]:
        """Add one batch's sensitivity terms of ``model``'s probed layers to ``unit_sums``;
        returns each layer's activations (2N, K, h, w) on x then x'."""
        assert self.probe is not None
        layers, n = list(self.probe.layers), len(batch.x)
        with frozen_eval(model), torch.no_grad():
            acts = layer_activations(model, torch.cat([batch.x, batch.x_adv]), layers)
        for name, sums in zip(layers, unit_sums, strict=True):
            means = spatial_mean(acts[name])
            w_target = w_true = None
            if name == head:
                weight = model.get_submodule(model.head).weight.detach()
                if weight.shape[1] == means.shape[1]:
                    w_target, w_true = weight[batch.target], weight[batch.y]
            terms = sensitivity_terms(means[:n], means[n:], w_target, w_true)
            sums.update(weights, terms, batch.y, means[:n])
        return [acts[name] for name in layers]

    def compute(self) -> AnalysisResult:
        """Per-layer scalars (logged) and the unit tensors, concepts and top images the
        report draws (call on every rank: the sums synchronise)."""
        if self.probe is None:
            raise RuntimeError("Dissection.prepare(model, datamodule) must run before compute")
        count = self.count.detach().cpu()
        class_images, targets = (t.detach().cpu() for t in self.class_counts.compute())
        scalars: dict[str, Tensor] = {"images": count[0].clone()}
        units = {}
        table, settings = self.probe.table, self.summary_settings

        def sensitivities(sums: UnitSums) -> dict[str, Tensor]:
            rows, class_clean = (t.detach().cpu() for t in sums.compute())
            sens = sensitivity_from_sums(rows, count)
            sens["preferred_class"], sens["target_share"] = class_target_share(
                class_clean, class_images, targets, count
            )
            return sens

        for i, (name, layer) in enumerate(self.probe.layers.items()):
            sens = sensitivities(self.unit_sums[i])
            head = name == self.probe.head_layer
            layer_scalars, units[name] = summarise_layer(layer, sens, table, head, settings)
            if self.baseline is not None:
                random = self.baseline[1].layers[name]
                random_sens = sensitivities(self.baseline_sums[i])
                layer_scalars.update(baseline_scalars(random, random_sens, table, settings))
                layer_scalars.update(
                    difference_scalars((layer, sens), (random, random_sens), table, settings)
                )
            scalars.update({f"{name}/{k}": v for k, v in layer_scalars.items()})
        scalars.update(holm_families(scalars))
        details = {
            "units": units,
            "concepts": self.probe.table,
            "probe_images": self.probe.probe_images,
            "showcase": self.showcase,
            "sensitive": self._sensitive(units),
        }
        return AnalysisResult(scalars=scalars, details=details)

    def _sensitive(self, units: dict[str, Any]) -> list[SensitiveUnit]:
        """The most sensitive units on the kept evaluation images (synchronises)."""
        kept = self.kept.gathered() if self.kept.limit else None
        if kept is None or self.probe is None:
            return []
        return sensitive_units(kept, self.probe, units, self.top_units)

    def reset(self) -> None:
        """Reset the image count, every layer's sums and the kept images (the probe result
        is kept)."""
        super().reset()
        for sums in (*self.unit_sums, *self.baseline_sums, self.kept, self.class_counts):
            sums.reset()

    # -- report ---------------------------------------------------------------------------

    def findings(self, result: AnalysisResult) -> list[Finding]:  # noqa: D102
        return dissection_findings(result.values())

    def report(
        self, result: AnalysisResult, out_dir: Path, class_names: Sequence[str]
    ) -> ReportSection:
        """Figures, the per-unit table and a markdown summary, from ``result`` alone."""
        return report_section(
            result,
            Path(out_dir),
            self.name,
            self.probe_settings.quantile,
            self.iou_threshold,
            self.summary_settings.min_category_units,
        )


def random_weights(model: nn.Module, seed: int) -> nn.Module:
    """A copy of ``model`` with every parameter and buffer re-initialised from ``seed``.

    Each submodule's own ``reset_parameters`` (PyTorch's default initialisation; batch
    norm's running statistics back to 0 and 1) runs in module order under a forked RNG
    seeded with ``seed`` on CPU, so the global random state is untouched and the baseline
    is the same in every process and on every device. Hooks are not copied: they belong to
    the trained model.
    """
    device = model_device(model)
    random = copy.deepcopy(model).cpu()  # initialised on CPU: the same on every device
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for module in random.modules():
            module._forward_hooks.clear()
            module._forward_pre_hooks.clear()
            if callable(getattr(module, "reset_parameters", None)):
                module.reset_parameters()
    return random.to(device).eval()


def _num_classes(model: nn.Module, datamodule: Any) -> int:
    """The number of classes: the datamodule's ``num_classes``, else the model's.

    Raises:
        ValueError: neither names it.
    """
    classes = getattr(datamodule, "num_classes", None) or getattr(model, "num_classes", None)
    if classes is None:
        raise ValueError(
            "dissection needs the number of classes (for each unit's target share): "
            "give the datamodule or the model a num_classes attribute"
        )
    return int(classes)


def _require_bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false, got {value!r}")
    return value


def _require_bins(bins: int) -> int:
    bins = require_at_least("analysis.dissection.bins", bins, 16)
    if bins & (bins - 1) or bins > 1 << 16:
        raise ValueError(
            f"analysis.dissection.bins must be a power of two in [16, 65536], got {bins}"
        )
    return bins


def _optional_at_least(key: str, value: int | None, minimum: int = 1) -> int | None:
    return None if value is None else require_at_least(key, value, minimum)
