"""The CAM analysis as a torchmetrics Metric: where the perturbation lies (docs/METHODS.md §3).

``analysis=cam``: for every adversarial example it asks whether the perturbation sits in
the discriminative region of the true class on x (where suppression would act) and of the
target class on x' (where promotion would act), compared with a random mask of the same
area and with cyclic shifts of the same mask. The maps come from
:mod:`pse_lightning.core.activation_maps`; the statistics are the pure functions of
:mod:`.statistics`; ``report`` draws from the :class:`AnalysisResult` alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics.utilities import dim_zero_cat

from pse_lightning.analysis.base import AdversarialBatch, Analysis, AnalysisResult, ReportSection
from pse_lightning.analysis.cam import statistics as stats
from pse_lightning.analysis.cam.report import cam_section
from pse_lightning.analysis.cam.result import MASK_KINDS, CAMExamples
from pse_lightning.analysis.pse.attribution import grad_times_delta
from pse_lightning.core import activation_maps as amaps
from pse_lightning.core.model_state import frozen_eval
from pse_lightning.validation import require_at_least, require_choice, require_in_range

SIGNIFICANCE = 0.05
# float64 sums over scored samples, each a vector over MASK_KINDS.
KIND_SUMS: tuple[str, ...] = (
    "is_sum", "area_sum", "random_sum", "lift_sum", "lift_count", "pvalue_sum",
    "significant_count",
)  # fmt: skip
# float64 scalar sums of the first-order PSE shares (``pse_share``).
SHARE_SUMS: tuple[str, ...] = (
    "promotion_sum", "promotion_count", "suppression_sum", "suppression_count"
)  # fmt: skip
# ``cat`` states of the kept examples, state name -> field of :class:`CAMExamples`.
KEPT_STATES: dict[str, str] = {
    "kept_index": "index", "kept_y": "y", "kept_target": "target",
    "kept_pred_clean": "pred_clean", "kept_pred_adv": "pred_adv", "kept_success": "success",
    "kept_score": "score", "kept_area": "area", "kept_pvalue": "pvalue", "kept_x": "x",
    "kept_x_adv": "x_adv", "kept_map_clean": "map_clean", "kept_map_adv": "map_adv",
    "kept_mask_true": "mask_true", "kept_mask_target": "mask_target",
}  # fmt: skip


class CAMAnalysis(Analysis):
    """Where the perturbation lies relative to the CAM regions of the true and target class.

    For each successful adversarial example with a nonzero perturbation delta it scores
    IS(delta, B) = ||B * delta|| / ||delta|| against B_true (true class on x), B_target
    (target class on x') and their union, with the random-mask baseline sqrt(area), the
    lift IS^2 / area and a cyclic-shift p-value. All sums are float64 ``sum`` states, so N
    processes reproduce one; a few examples (global index < ``examples``) are kept for
    figures in ``cat`` states, one per field of :class:`CAMExamples` (``KEPT_STATES``).

    Args:
        method: 'auto' (CAM for GAP + linear heads, else Grad-CAM), 'cam' or 'gradcam'.
        layer: feature layer (default: the model's ``feature_layer``).
        threshold: B = 1[normalised map >= threshold] (0.2: the CAM paper's 20% of max).
        top_area: if set, B is instead the top ``top_area`` share of pixels of each map.
        shifts: number R of cyclic shifts for the p-value; null uses all of them.
        seed: seed of the shift draw (the same shifts for every image).
        pse_share: also measure the share of first-order promotion of Z_t inside B_target
            and of suppression of Z_t0 inside B_true (one extra forward + two backward).
        examples: keep samples with dataset index < examples for figures and the table.
    """

    name = "cam"
    evaluated: Tensor
    scored: Tensor

    def __init__(
        self,
        *,
        method: str = "auto",
        layer: str | None = None,
        threshold: float = 0.2,
        top_area: float | None = None,
        shifts: int | None = 100,
        seed: int = 0,
        pse_share: bool = False,
        examples: int = 4,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.method = require_choice("analysis.method", method, amaps.METHODS)
        self.layer = layer
        self.threshold = require_in_range("analysis.threshold", threshold, 0.0, 1.0)
        self.top_area = (
            None
            if top_area is None
            else require_in_range("analysis.top_area", top_area, 0.0, 1.0, low_open=True)
        )
        self.shifts = None if shifts is None else require_at_least("analysis.shifts", shifts, 1)
        self.seed = int(seed)
        if not isinstance(pse_share, bool):
            raise ValueError(f"analysis.pse_share must be true or false, got {pse_share!r}")
        self.pse_share = pse_share
        self.examples = require_at_least("analysis.examples", examples, 0)
        self._mapper_cache: amaps.ActivationMap | None = None

        f64 = dict(dtype=torch.float64)
        self.add_state("evaluated", torch.zeros((), **f64), dist_reduce_fx="sum")
        self.add_state("scored", torch.zeros((), **f64), dist_reduce_fx="sum")
        for name in KIND_SUMS:
            self.add_state(name, torch.zeros(len(MASK_KINDS), **f64), dist_reduce_fx="sum")
        for name in SHARE_SUMS:
            self.add_state(name, torch.zeros((), **f64), dist_reduce_fx="sum")
        for name in KEPT_STATES:
            self.add_state(name, [], dist_reduce_fx="cat")

    def _mapper(self, model: nn.Module) -> amaps.ActivationMap:
        """One map object kept across batches, so CAM verifies the head only once."""
        mapper = amaps.activation_map_for(model, self.method, self.layer)
        if type(self._mapper_cache) is not type(mapper):
            self._mapper_cache = mapper
        return self._mapper_cache

    def masks(self, maps: Tensor) -> Tensor:
        """Binary masks from normalised (N, H, W) maps (threshold or top area)."""
        if self.top_area is not None:
            return amaps.top_area_mask(maps, self.top_area)
        return amaps.threshold_mask(maps, self.threshold)

    # -- update -------------------------------------------------------------------------------

    def update(self, model: nn.Module, batch: AdversarialBatch) -> None:  # noqa: D102
        maps = self._maps(model, batch)
        mask = {"true": self.masks(maps["true"]), "target": self.masks(maps["target"])}
        mask["union"] = mask["true"] | mask["target"]
        delta = (batch.x_adv - batch.x).detach().double()
        energy = stats.pixel_energy(delta)
        scored = batch.success & (energy.flatten(1).sum(dim=1) > 0)
        self.evaluated += len(batch.x)
        self.scored += scored.double().sum()
        per_kind = self._score(delta, energy, mask, scored.double())
        if self.pse_share:
            self._share(model, batch, mask, scored.double())
        self._keep(batch, maps, mask, per_kind)

    def _maps(self, model: nn.Module, batch: AdversarialBatch) -> dict[str, Tensor]:
        """Normalised maps: true class on x, target on x' (+ predicted classes when kept)."""
        size = (batch.x.shape[-2], batch.x.shape[-1])
        keep = bool((batch.index < self.examples).any())
        pred_clean = batch.logits_clean.argmax(dim=1)
        pred_adv = batch.logits_adv.argmax(dim=1)
        mapper = self._mapper(model)
        with frozen_eval(model):
            _, clean = mapper.raw_maps(model, batch.x, [batch.y, pred_clean] if keep
                                       else [batch.y])  # fmt: skip
            _, adv = mapper.raw_maps(model, batch.x_adv, [batch.target, pred_adv] if keep
                                     else [batch.target])  # fmt: skip
        maps = {"true": amaps.image_maps(clean[0], size),
                "target": amaps.image_maps(adv[0], size)}  # fmt: skip
        if keep:
            maps["pred_clean"] = amaps.image_maps(clean[1], size)
            maps["pred_adv"] = amaps.image_maps(adv[1], size)
        return maps

    def _score(
        self, delta: Tensor, energy: Tensor, mask: dict[str, Tensor], sel: Tensor
    ) -> dict[str, Tensor]:
        """Add every mask kind's sums; return per-image (N, kinds) score, area and p-value."""
        size = energy.shape[-2:]
        shifts = stats.choose_shifts(size[0], size[1], self.shifts, self.seed)
        score = torch.stack([stats.interpretability_score(delta, mask[k]) for k in MASK_KINDS], 1)
        area = torch.stack([amaps.mask_area(mask[k]).double() for k in MASK_KINDS], 1)
        pvalue = torch.stack(
            [stats.cyclic_shift_pvalue(energy, mask[k], shifts).double() for k in MASK_KINDS], 1
        )
        w = sel[:, None]
        has_area = (area > 0).double() * w
        self.is_sum += (score * w).sum(0)
        self.area_sum += (area * w).sum(0)
        self.random_sum += (area.sqrt() * w).sum(0)
        self.lift_sum += (score.pow(2) / area.clamp_min(1e-12) * has_area).sum(0)
        self.lift_count += has_area.sum(0)
        self.pvalue_sum += (pvalue * w).sum(0)
        self.significant_count += ((pvalue <= SIGNIFICANCE).double() * w).sum(0)
        return {"score": score, "area": area, "pvalue": pvalue}

    def _share(
        self, model: nn.Module, batch: AdversarialBatch, mask: dict[str, Tensor], sel: Tensor
    ) -> None:
        """Promotion raises Z_t, suppression lowers Z_t0 (first order, docs/METHODS.md §2)."""
        with frozen_eval(model):
            attr_true, attr_target, _ = grad_times_delta(
                model, batch.x, batch.x_adv, batch.y, batch.target
            )
        promo, promo_ok = stats.masked_share(attr_target.clamp_min(0), mask["target"])
        supp, supp_ok = stats.masked_share((-attr_true).clamp_min(0), mask["true"])
        promo_w, supp_w = promo_ok.double() * sel, supp_ok.double() * sel
        self.promotion_sum += (promo.double() * promo_w).sum()
        self.promotion_count += promo_w.sum()
        self.suppression_sum += (supp.double() * supp_w).sum()
        self.suppression_count += supp_w.sum()

    def _keep(
        self,
        batch: AdversarialBatch,
        maps: dict[str, Tensor],
        mask: dict[str, Tensor],
        per_kind: dict[str, Tensor],
    ) -> None:
        """Append the examples with dataset index < ``examples`` (possibly none).

        Selection by global dataset index: 1 and N processes keep the same rows. Every
        batch appends, so each rank's lists have matching lengths for the gather.
        """
        keep = batch.index < self.examples
        empty = batch.x.new_zeros((0, *batch.x.shape[-2:]))
        values = {
            "kept_index": batch.index, "kept_y": batch.y, "kept_target": batch.target,
            "kept_pred_clean": batch.logits_clean.argmax(dim=1),
            "kept_pred_adv": batch.logits_adv.argmax(dim=1), "kept_success": batch.success,
            "kept_score": per_kind["score"], "kept_area": per_kind["area"],
            "kept_pvalue": per_kind["pvalue"], "kept_x": batch.x.detach(),
            "kept_x_adv": batch.x_adv.detach(), "kept_mask_true": mask["true"],
            "kept_mask_target": mask["target"],
            "kept_map_clean": maps.get("pred_clean", empty),
            "kept_map_adv": maps.get("pred_adv", empty),
        }  # fmt: skip
        for name, value in values.items():
            getattr(self, name).append(value if value is empty else value[keep])

    # -- compute and report ---------------------------------------------------------------------

    def compute(self) -> AnalysisResult:
        """Means over scored samples (successful, nonzero perturbation) and the kept examples.

        Scalars per mask kind k in (true, target, union): ``is_k`` mean IS, ``random_k``
        mean sqrt(area) (a random mask's RMS score), ``area_k``, ``lift_k`` mean IS^2/area,
        ``pvalue_k`` mean cyclic-shift p-value, ``significant_k`` share with p <= 0.05.
        With ``pse_share``: ``promotion_in_target`` and ``suppression_in_true``. Details:
        ``examples``, a :class:`CAMExamples` or None when none was kept.
        """
        n = self.scored.expand(len(MASK_KINDS))
        columns = {
            "is": stats.mean_or_nan(self.is_sum, n),
            "random": stats.mean_or_nan(self.random_sum, n),
            "area": stats.mean_or_nan(self.area_sum, n),
            "lift": stats.mean_or_nan(self.lift_sum, self.lift_count),
            "pvalue": stats.mean_or_nan(self.pvalue_sum, n),
            "significant": stats.mean_or_nan(self.significant_count, n),
        }
        scalars = {"evaluated": self.evaluated.clone(), "scored": self.scored.clone()}
        for i, kind in enumerate(MASK_KINDS):
            scalars.update({f"{stat}_{kind}": value[i] for stat, value in columns.items()})
        if self.pse_share:
            scalars["promotion_in_target"] = stats.mean_or_nan(
                self.promotion_sum, self.promotion_count
            )
            scalars["suppression_in_true"] = stats.mean_or_nan(
                self.suppression_sum, self.suppression_count
            )
        return AnalysisResult(scalars=scalars, details={"examples": self._kept_examples()})

    def _kept_examples(self) -> CAMExamples | None:
        """The gathered kept examples in dataset-index order, or None when there are none."""
        values = {}
        for name, field in KEPT_STATES.items():
            state = getattr(self, name)
            if isinstance(state, list) and not state:
                return None
            values[field] = dim_zero_cat(state)
        if values["index"].numel() == 0:
            return None
        return CAMExamples(**values).sorted_cpu()

    def report(
        self, result: AnalysisResult, out_dir: Path, class_names: Sequence[str]
    ) -> ReportSection:
        """Markdown summary, one figure per kept example and a W&B table of the examples."""
        setting = (
            f"top {self.top_area:.0%} area"
            if self.top_area is not None
            else f"threshold {self.threshold}"
        )
        return cam_section(result, Path(out_dir), class_names, f"maps: {self.method}, {setting}")
