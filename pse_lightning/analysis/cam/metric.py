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
from pse_lightning.analysis.cam import figures
from pse_lightning.analysis.cam import statistics as stats
from pse_lightning.analysis.cam.findings import cam_findings
from pse_lightning.analysis.cam.glossary import TERMS
from pse_lightning.analysis.cam.partners import SameClassPartners, evaluation_labels
from pse_lightning.analysis.cam.report import cam_section
from pse_lightning.analysis.cam.result import FINDING_AREA, MASK_KINDS, CAMExamples
from pse_lightning.analysis.pse.attribution import grad_times_delta
from pse_lightning.core import activation_maps as amaps
from pse_lightning.core.contract import Term
from pse_lightning.core.findings import Finding
from pse_lightning.core.model_state import frozen_eval, model_num_classes
from pse_lightning.core.randomness import uniform
from pse_lightning.core.report import ExamplePanel
from pse_lightning.validation import require_at_least, require_choice, require_in_range

SIGNIFICANCE = 0.05
# The mask kinds that also get fixed-area masks and the other-class null (the union of two
# fixed-area masks has no fixed area).
AREA_KINDS: tuple[str, ...] = ("true", "target")
_OTHER_CLASS_STREAM = 7  # randomness stream of the other-class draw (core.randomness)
# float64 sums over scored samples, each a vector over MASK_KINDS.
KIND_SUMS: tuple[str, ...] = (
    "is_sum", "area_sum", "random_sum", "lift_sum", "lift_count", "significant_count",
)  # fmt: skip
# float64 per-image rows of the scored samples, for the dataset-level tests (``cat``: the
# signed-rank test needs every difference; a few floats per image).
IMAGE_STATES: tuple[str, ...] = (
    "image_is_sq",  # (n, len(MASK_KINDS)) IS^2 against the threshold (or top_area) mask
    "image_area",  # (n, len(MASK_KINDS)) its area
    "image_top_is_sq",  # (n, len(AREA_KINDS), len(areas)) IS^2 of the top-area masks
    "image_top_area",  # same shape: their areas (round(a H W) pixels)
    "image_null_is_sq",  # same shape: IS^2 of the other class's top-area masks, NaN if K < 3
    "image_same_is_sq",  # same shape: IS^2 of the same class's masks on another image (or NaN)
    "image_object_is_sq",  # (n,) IS^2 of the ground-truth object mask (datasets that have it)
    "image_object_area",  # (n,) its area
    "image_object_cam_is_sq",  # (n,) IS^2 of the true class's top-k CAM, k = object pixels
)
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


def other_class(index: Tensor, y: Tensor, target: Tensor, num_classes: int, seed: int) -> Tensor:
    """Per image a class drawn uniformly from those that are neither y nor the target.

    The class of the null mask (docs/METHODS.md §3): drawn from (seed, dataset index), so
    an image gets the same class under any batching or process count.

    Args:
        index: (N,) dataset indices.
        y, target: (N,) labels and targets (equal ones exclude a single class).
        num_classes: K >= 3.
        seed: the analysis seed.

    Returns:
        (N,) long classes in [0, K) \\ {y, target}.
    """
    lo, hi = torch.minimum(y, target), torch.maximum(y, target)
    free = num_classes - 1 - (hi != lo).long()  # how many classes are left to draw from
    u = uniform(index, (1,), seed, _OTHER_CLASS_STREAM)[:, 0].to(y.device)
    rank = torch.minimum((u * free).long(), free - 1)
    c = rank + (rank >= lo).long()  # skip lo, then hi: c runs over the free classes in order
    return c + ((c >= hi) & (hi != lo)).long()


def _cat_or_none(state: list[Tensor] | Tensor) -> Tensor | None:
    """A ``cat`` state as one float64 tensor, None before any update."""
    if isinstance(state, list) and not state:
        return None
    return dim_zero_cat(state).double().cpu()


def _test_keys(name: str, d: Tensor) -> dict[str, Tensor]:
    """``name`` (the effect), ``name_low``, ``name_high``, ``name_p`` of d (NaN rows left out)."""
    summary = stats.signed_rank_summary(d[~d.isnan()])
    return {name: summary["effect"], f"{name}_low": summary["low"],
            f"{name}_high": summary["high"], f"{name}_p": summary["p"]}  # fmt: skip


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
        areas: fixed-area masks (the top share of each map) scored beside the threshold mask,
            each against the same-area mask of another class on the same image.
    """

    name = "cam"
    key_results = ("lift_true",)
    evaluated: Tensor
    scored: Tensor

    @classmethod
    def glossary(cls) -> tuple[Term, ...]:  # noqa: D102
        return TERMS

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
        areas: Sequence[float] = (0.1, 0.2, 0.3),
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.method = require_choice("analysis.cam.method", method, amaps.METHODS)
        self.layer = layer
        self.threshold = require_in_range("analysis.cam.threshold", threshold, 0.0, 1.0)
        self.top_area = (
            None
            if top_area is None
            else require_in_range("analysis.cam.top_area", top_area, 0.0, 1.0, low_open=True)
        )
        self.shifts = (
            None if shifts is None else require_at_least("analysis.cam.shifts", shifts, 1)
        )
        self.seed = int(seed)
        if not isinstance(pse_share, bool):
            raise ValueError(f"analysis.cam.pse_share must be true or false, got {pse_share!r}")
        self.pse_share = pse_share
        self.examples = require_at_least("analysis.cam.examples", examples, 0)
        self.areas = tuple(
            require_in_range("analysis.cam.areas", float(a), 0.0, 1.0, low_open=True)
            for a in areas
        )
        self._mapper_cache: amaps.ActivationMap | None = None
        self._object_masks: Tensor | None = None
        self._partners: SameClassPartners | None = None

        f64 = dict(dtype=torch.float64)
        self.add_state("evaluated", torch.zeros((), **f64), dist_reduce_fx="sum")
        self.add_state("scored", torch.zeros((), **f64), dist_reduce_fx="sum")
        for name in KIND_SUMS:
            self.add_state(name, torch.zeros(len(MASK_KINDS), **f64), dist_reduce_fx="sum")
        for name in SHARE_SUMS:
            self.add_state(name, torch.zeros((), **f64), dist_reduce_fx="sum")
        for name in IMAGE_STATES:
            self.add_state(name, [], dist_reduce_fx="cat")
        for name in KEPT_STATES:
            self.add_state(name, [], dist_reduce_fx="cat")

    def prepare(self, model: nn.Module, datamodule: Any) -> None:
        """Ground-truth object masks of the evaluation split, where the dataset has them.

        A datamodule with ``concept_labels(split)`` (shapes) labels the object's pixels in
        its first category, so those pixels are the object. Others (CIFAR-10, ImageNet) have
        none and the object reference is left out. Also the evaluation split's labels, from
        which each image's same-class partner is drawn (none: the same-class null is NaN).
        """
        labels = getattr(datamodule, "concept_labels", None)
        self._object_masks = None if labels is None else labels("test")[:, 0] > 0
        loader = getattr(datamodule, "test_dataloader", None)
        dataset = None if loader is None else loader().dataset
        classes = evaluation_labels(dataset)
        self._partners = (
            None if classes is None else SameClassPartners(dataset, classes, self.seed)
        )

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
        self._per_image(batch, delta, maps, per_kind, scored)
        self._keep(batch, maps, per_kind)

    def _maps(self, model: nn.Module, batch: AdversarialBatch) -> dict[str, Tensor]:
        """Normalised maps: true class on x, target on x', another class on both (the null)
        and, when examples are kept, the predicted classes."""
        size = (batch.x.shape[-2], batch.x.shape[-1])
        num_classes = model_num_classes(model, batch.x, batch.logits_clean)
        targets = {"true": (batch.x, batch.y), "target": (batch.x_adv, batch.target)}
        if num_classes >= 3:
            other = other_class(batch.index, batch.y, batch.target, num_classes, self.seed)
            targets |= {"null_true": (batch.x, other), "null_target": (batch.x_adv, other)}
        if bool((batch.index < self.examples).any()):
            targets["pred_clean"] = (batch.x, batch.logits_clean.argmax(dim=1))
            targets["pred_adv"] = (batch.x_adv, batch.logits_adv.argmax(dim=1))
        batches = [batch.x, batch.x_adv]
        if self._partners is not None:  # the same classes' maps on another image of class y
            partner = self._partners.images(self._partners.partners(batch.index), batch.x)
            targets |= {"same_true": (partner, batch.y), "same_target": (partner, batch.target)}
            batches.append(partner)
        mapper = self._mapper(model)
        maps = {}
        with frozen_eval(model):
            for images in batches:  # one forward pass per image batch
                names = [k for k, (im, _) in targets.items() if im is images]
                _, raw = mapper.raw_maps(model, images, [targets[k][1] for k in names])
                maps |= {k: amaps.image_maps(r, size) for k, r in zip(names, raw, strict=True)}
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
            [stats.cyclic_shift_pvalue(energy, mask[k], shifts) for k in MASK_KINDS], 1
        )  # per image for the examples' table only: no mean of p-values (docs/METHODS.md §7)
        w = sel[:, None]
        has_area = (area > 0).double() * w
        self.is_sum += (score * w).sum(0)
        self.area_sum += (area * w).sum(0)
        self.random_sum += (area.sqrt() * w).sum(0)
        self.lift_sum += (score.pow(2) / area.clamp_min(1e-12) * has_area).sum(0)
        self.lift_count += has_area.sum(0)
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

    def _per_image(
        self,
        batch: AdversarialBatch,
        delta: Tensor,
        maps: dict[str, Tensor],
        per_kind: dict[str, Tensor],
        scored: Tensor,
    ) -> None:
        """Append the scored images' rows for the dataset-level tests (``IMAGE_STATES``)."""
        delta = delta[scored]
        top_sq, top_area, null_sq, same_sq = [], [], [], []
        has_partner = self._has_partner(batch.index[scored])
        for kind in AREA_KINDS:
            for a in self.areas:
                top = amaps.top_area_mask(maps[kind][scored], a)
                top_sq.append(stats.interpretability_score(delta, top).pow(2))
                top_area.append(amaps.mask_area(top).double())
                null_sq.append(self._null_score(delta, maps, f"null_{kind}", scored, a))
                same = self._null_score(delta, maps, f"same_{kind}", scored, a)
                same_sq.append(torch.where(has_partner, same, float("nan")))
        shape = (len(delta), len(AREA_KINDS), len(self.areas))
        self.image_is_sq.append(per_kind["score"][scored].pow(2))
        self.image_area.append(per_kind["area"][scored])
        self.image_top_is_sq.append(torch.stack(top_sq, 1).view(shape))
        self.image_top_area.append(torch.stack(top_area, 1).view(shape))
        self.image_null_is_sq.append(torch.stack(null_sq, 1).view(shape))
        self.image_same_is_sq.append(torch.stack(same_sq, 1).view(shape))
        none = delta.new_zeros(0)
        if self._object_masks is None:  # no ground truth: the object states stay empty
            for name in ("image_object_is_sq", "image_object_area", "image_object_cam_is_sq"):
                getattr(self, name).append(none)
            return
        obj = self._object_masks.to(delta.device)[batch.index[scored]]
        # The true class's CAM region with exactly the object's pixel count, per image: the
        # CAM-vs-object test compares the two at the same area (docs/METHODS.md §3.8).
        cam = stats.top_count_mask(maps["true"][scored], obj.flatten(1).sum(dim=1))
        score = stats.interpretability_score
        self.image_object_is_sq.append(score(delta, obj).pow(2))
        self.image_object_area.append(amaps.mask_area(obj).double())
        self.image_object_cam_is_sq.append(score(delta, cam).pow(2))

    def _has_partner(self, index: Tensor) -> Tensor:
        if self._partners is None:
            return torch.zeros(len(index), dtype=torch.bool, device=index.device)
        return (self._partners.partners(index) >= 0).to(index.device)

    def _null_score(
        self, delta: Tensor, maps: dict[str, Tensor], name: str, scored: Tensor, area: float
    ) -> Tensor:
        """IS^2 of the scored rows against the top ``area`` of null map ``name`` (NaN rows
        when that null is not available)."""
        if name not in maps:
            return delta.new_full((len(delta),), float("nan"))
        mask = amaps.top_area_mask(maps[name][scored], area)
        return stats.interpretability_score(delta, mask).pow(2)

    def _keep(
        self, batch: AdversarialBatch, maps: dict[str, Tensor], per_kind: dict[str, Tensor]
    ) -> None:
        """Append the examples with dataset index < ``examples`` (possibly none).

        Selection by global dataset index: 1 and N processes keep the same rows. Every
        batch appends, so each rank's lists have matching lengths for the gather.
        """
        keep = batch.index < self.examples
        empty = batch.x.new_zeros((0, *batch.x.shape[-2:]))
        # The figures outline the masks the Findings test: the top FINDING_AREA of each map.
        top = {k: amaps.top_area_mask(maps[k], FINDING_AREA) for k in ("true", "target")}
        values = {
            "kept_index": batch.index, "kept_y": batch.y, "kept_target": batch.target,
            "kept_pred_clean": batch.logits_clean.argmax(dim=1),
            "kept_pred_adv": batch.logits_adv.argmax(dim=1), "kept_success": batch.success,
            "kept_score": per_kind["score"], "kept_area": per_kind["area"],
            "kept_pvalue": per_kind["pvalue"], "kept_x": batch.x.detach(),
            "kept_x_adv": batch.x_adv.detach(), "kept_mask_true": top["true"],
            "kept_mask_target": top["target"],
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
        ``significant_k`` share with cyclic-shift p <= 0.05 (calibrated only for spatially
        stationary perturbations). With ``pse_share``: ``promotion_in_target`` and
        ``suppression_in_true``. The dataset-level tests are in :meth:`_dataset_scalars`.
        Details: ``examples``, a :class:`CAMExamples` or None when none was kept.
        """
        n = self.scored.expand(len(MASK_KINDS))
        columns = {
            "is": stats.mean_or_nan(self.is_sum, n),
            "random": stats.mean_or_nan(self.random_sum, n),
            "area": stats.mean_or_nan(self.area_sum, n),
            "lift": stats.mean_or_nan(self.lift_sum, self.lift_count),
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
        scalars |= self._dataset_scalars()
        return AnalysisResult(scalars=scalars, details={"examples": self._kept_examples()})

    def _dataset_scalars(self) -> dict[str, Tensor]:
        """Signed-rank tests over images, each with its Hodges-Lehmann effect and 95% CI.

        ``excess_k`` (k in MASK_KINDS, and ``object``): d = IS^2 - area, the mask against
        a random mask of its area (E[IS^2] = area); it does not control for uneven spatial
        spread. ``specific_k_topA`` (k in AREA_KINDS, A in ``areas`` in %): d = IS^2(top A%
        of class k's map) - IS^2(top A% of another class's map on the same image), the same
        area by construction, so a centre-biased perturbation scores alike on both. Each
        comes with ``_low``, ``_high`` and ``_p`` (two-sided Wilcoxon, uncorrected; see
        docs/METHODS.md §7). ``specific_same_k_topA``: the same with the null mask of class
        k's own label on another evaluated image of the true class, which shares the class's
        typical spread (images without such a partner are left out). ``cam_vs_object``
        (datasets with object masks): d = IS^2(top-k true-class CAM) - IS^2(object mask),
        k = the object's pixel count on that image (images without an object left out);
        ``is_true_object_area`` the mean IS of that CAM region. ``is_k_topA``,
        ``lift_k_topA``, ``null_is_k_topA``, ``same_is_k_topA``,
        ``is_object``, ``area_object``, ``lift_object``: means over images.
        """
        rows = {name: _cat_or_none(getattr(self, name)) for name in IMAGE_STATES}
        out: dict[str, Tensor] = {}
        if rows["image_is_sq"] is None:
            return out
        for i, kind in enumerate(MASK_KINDS):
            d = rows["image_is_sq"][:, i] - rows["image_area"][:, i]
            out |= _test_keys(f"excess_{kind}", d)
        for i, kind in enumerate(AREA_KINDS):
            for j, a in enumerate(self.areas):
                tag = f"{kind}_top{round(100 * a)}"
                is_sq, area = rows["image_top_is_sq"][:, i, j], rows["image_top_area"][:, i, j]
                null = rows["image_null_is_sq"][:, i, j]
                same = rows["image_same_is_sq"][:, i, j]
                out[f"is_{tag}"] = is_sq.sqrt().mean()
                out[f"lift_{tag}"] = (is_sq / area).mean()
                out[f"null_is_{tag}"] = null.sqrt().mean()
                out |= _test_keys(f"specific_{tag}", is_sq - null)
                out[f"same_is_{tag}"] = same[~same.isnan()].sqrt().mean()
                out |= _test_keys(f"specific_same_{tag}", is_sq - same)
        obj_sq, obj_area = rows["image_object_is_sq"], rows["image_object_area"]
        if obj_sq is not None and len(obj_sq):
            has = obj_area > 0
            out["is_object"], out["area_object"] = obj_sq.sqrt().mean(), obj_area.mean()
            out["lift_object"] = (obj_sq[has] / obj_area[has]).mean()
            out |= _test_keys("excess_object", obj_sq - obj_area)
            cam_sq = rows["image_object_cam_is_sq"][has]
            out["is_true_object_area"] = cam_sq.sqrt().mean()
            out |= _test_keys("cam_vs_object", cam_sq - obj_sq[has])
        return out

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

    def example_panel(self, result: AnalysisResult) -> ExamplePanel | None:  # noqa: D102
        kept = result.details.get("examples")
        return None if kept is None else figures.example_panel(kept, self.examples)

    def findings(self, result: AnalysisResult) -> list[Finding]:  # noqa: D102
        return cam_findings(result.values())

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
