"""Image-level interpretation of adversarial perturbations with class activation maps.

``analysis=cam`` (docs/METHODS.md §3): for every adversarial example it asks whether the
perturbation sits in the discriminative region of the true class on x (where suppression
would act) and of the target class on x' (where promotion would act), compared with a
random mask of the same area and with cyclic shifts of the same mask.

The maps come from :class:`amaps.ActivationMap`, a base class that hooks the model's feature
layer during the forward pass producing the logits and combines the captured channels with
per-image weights; :class:`CAM` (GAP + linear head, no backward pass) and :class:`GradCAM`
(any model, one backward pass to the features) differ only in ``channel_weights``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics.utilities import dim_zero_cat

from pse_lightning.analysis.base import AdversarialBatch, Analysis, AnalysisResult, ReportSection
from pse_lightning.analysis.functional import cam as fcam
from pse_lightning.analysis.functional.pse import grad_times_delta
from pse_lightning.core import activation_maps as amaps
from pse_lightning.core.model_state import frozen_eval
from pse_lightning.validation import (
    require_at_least,
    require_choice,
    require_in_range,
)

log = logging.getLogger(__name__)

MASK_KINDS: tuple[str, ...] = ("true", "target", "union")
# Per-example columns kept for figures and the W&B table (one float64 row per example).
EXAMPLE_COLUMNS: tuple[str, ...] = (
    "index", "y", "target", "pred_clean", "pred_adv", "success",
    "is_true", "is_target", "area_true", "area_target", "pvalue_true", "pvalue_target",
)  # fmt: skip
SIGNIFICANCE = 0.05


# -- maps -----------------------------------------------------------------------------------


# -- the analysis ---------------------------------------------------------------------------


class CAMAnalysis(Analysis):
    """Where the perturbation lies relative to the CAM regions of the true and target class.

    For each successful adversarial example with a nonzero perturbation delta it scores
    IS(delta, B) = ||B * delta|| / ||delta|| against B_true (true class on x), B_target
    (target class on x') and their union, with the random-mask baseline sqrt(area), the
    lift IS^2 / area and a cyclic-shift p-value. All sums are float64 ``sum`` states, so N
    processes reproduce one; a few examples (global index < ``examples``) are kept for
    figures.

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
        self.class_names: list[str] | None = None
        self._examples: dict[str, Tensor] = {}
        self._mapper_cache: amaps.ActivationMap | None = None

        f64 = dict(dtype=torch.float64)
        self.add_state("evaluated", torch.zeros((), **f64), dist_reduce_fx="sum")
        self.add_state("scored", torch.zeros((), **f64), dist_reduce_fx="sum")
        for kind in MASK_KINDS:
            for stat in ("is", "area", "random", "lift", "lift_n", "pvalue", "signif"):
                self.add_state(f"{kind}_{stat}", torch.zeros((), **f64), dist_reduce_fx="sum")
        for stat in ("promotion", "promotion_n", "suppression", "suppression_n"):
            self.add_state(stat, torch.zeros((), **f64), dist_reduce_fx="sum")
        for name in ("ex_stats", "ex_x", "ex_x_adv", "ex_map_clean", "ex_map_adv",
                     "ex_mask_true", "ex_mask_target"):  # fmt: skip
            self.add_state(name, [], dist_reduce_fx="cat")

    def prepare(self, model: nn.Module, datamodule: Any) -> None:
        """Remember the class names for figure titles."""
        names = getattr(datamodule, "class_names", None)
        self.class_names = list(names) if names else None

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

    def update(self, model: nn.Module, batch: AdversarialBatch) -> None:  # noqa: D102
        x, x_adv, y, target = batch.x, batch.x_adv, batch.y, batch.target
        size = (x.shape[-2], x.shape[-1])
        keep = batch.index < self.examples
        want_examples = bool(keep.any())
        pred_clean = batch.logits_clean.argmax(dim=1)
        pred_adv = batch.logits_adv.argmax(dim=1)
        mapper = self._mapper(model)
        with frozen_eval(model):
            _, raw_clean = mapper.raw_maps(model, x, [y, pred_clean] if want_examples else [y])
            _, raw_adv = mapper.raw_maps(model, x_adv, [target, pred_adv] if want_examples
                                         else [target])  # fmt: skip
            delta = (x_adv - x).detach()
            if self.pse_share:
                attr_true, attr_target, _ = grad_times_delta(model, x, x_adv, y, target)
        map_true = amaps.image_maps(raw_clean[0], size)
        map_target = amaps.image_maps(raw_adv[0], size)
        mask = {"true": self.masks(map_true), "target": self.masks(map_target)}
        mask["union"] = mask["true"] | mask["target"]

        energy = fcam.pixel_energy(delta.double())
        scored = batch.success & (energy.flatten(1).sum(dim=1) > 0)
        sel = scored.double()
        self.evaluated += len(x)
        self.scored += sel.sum()
        shifts = fcam.choose_shifts(size[0], size[1], self.shifts, self.seed)
        per_kind: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
        for kind, b in mask.items():
            score = fcam.interpretability_score(delta.double(), b)
            area = amaps.mask_area(b).double()
            pvalue = fcam.cyclic_shift_pvalue(energy, b, shifts).double()
            has_area = (area > 0).double() * sel
            lift = score.pow(2) / area.clamp_min(1e-12)
            getattr(self, f"{kind}_is").add_((score * sel).sum())
            getattr(self, f"{kind}_area").add_((area * sel).sum())
            getattr(self, f"{kind}_random").add_((area.sqrt() * sel).sum())
            getattr(self, f"{kind}_lift").add_((lift * has_area).sum())
            getattr(self, f"{kind}_lift_n").add_(has_area.sum())
            getattr(self, f"{kind}_pvalue").add_((pvalue * sel).sum())
            getattr(self, f"{kind}_signif").add_(((pvalue <= SIGNIFICANCE).double() * sel).sum())
            per_kind[kind] = (score, area, pvalue)

        if self.pse_share:
            # Promotion raises Z_t, suppression lowers Z_t0 (first order, docs/METHODS.md §3.5).
            promo, promo_ok = fcam.masked_share(attr_target.clamp_min(0), mask["target"])
            supp, supp_ok = fcam.masked_share((-attr_true).clamp_min(0), mask["true"])
            promo_w = promo_ok.double() * sel
            supp_w = supp_ok.double() * sel
            self.promotion += (promo.double() * promo_w).sum()
            self.promotion_n += promo_w.sum()
            self.suppression += (supp.double() * supp_w).sum()
            self.suppression_n += supp_w.sum()

        # Bounded sample by global dataset index: 1 and N processes keep the same rows.
        # Every batch appends (possibly zero rows) so each rank's list has the right shape.
        stats = torch.stack(
            [batch.index.double(), y.double(), target.double(), pred_clean.double(),
             pred_adv.double(), batch.success.double(), per_kind["true"][0],
             per_kind["target"][0], per_kind["true"][1], per_kind["target"][1],
             per_kind["true"][2], per_kind["target"][2]], dim=1,
        )  # fmt: skip
        self.ex_stats.append(stats[keep])
        self.ex_x.append(x.detach()[keep])
        self.ex_x_adv.append(x_adv.detach()[keep])
        self.ex_mask_true.append(mask["true"][keep].float())
        self.ex_mask_target.append(mask["target"][keep].float())
        if want_examples:
            self.ex_map_clean.append(amaps.image_maps(raw_clean[1][keep], size))
            self.ex_map_adv.append(amaps.image_maps(raw_adv[1][keep], size))
        else:
            empty = x.new_zeros((0, *size))
            self.ex_map_clean.append(empty)
            self.ex_map_adv.append(empty)

    def _compute_legacy(self) -> dict[str, Tensor]:
        """Means over scored samples (successful, nonzero perturbation).

        Keys per mask kind k in (true, target, union): ``is_k`` mean IS, ``random_k`` mean
        sqrt(area) (a random mask's RMS score), ``area_k``, ``lift_k`` mean IS^2/area,
        ``pvalue_k`` mean cyclic-shift p-value, ``significant_k`` share with p <= 0.05.
        With ``pse_share``: ``promotion_in_target`` and ``suppression_in_true``.
        """
        n = self.scored
        nan = torch.tensor(float("nan"), dtype=torch.float64, device=n.device)

        def mean(total: Tensor, count: Tensor) -> Tensor:
            return total / count if count > 0 else nan

        result: dict[str, Tensor] = {"evaluated": self.evaluated.clone(), "scored": n.clone()}
        for kind in MASK_KINDS:
            get = lambda stat, k=kind: getattr(self, f"{k}_{stat}")  # noqa: E731
            result[f"is_{kind}"] = mean(get("is"), n)
            result[f"random_{kind}"] = mean(get("random"), n)
            result[f"area_{kind}"] = mean(get("area"), n)
            result[f"lift_{kind}"] = mean(get("lift"), get("lift_n"))
            result[f"pvalue_{kind}"] = mean(get("pvalue"), n)
            result[f"significant_{kind}"] = mean(get("signif"), n)
        if self.pse_share:
            result["promotion_in_target"] = mean(self.promotion, self.promotion_n)
            result["suppression_in_true"] = mean(self.suppression, self.suppression_n)
        self._examples = self._gather_examples()
        return result

    def _gather_examples(self) -> dict[str, Tensor]:
        names = ("ex_stats", "ex_x", "ex_x_adv", "ex_map_clean", "ex_map_adv",
                 "ex_mask_true", "ex_mask_target")  # fmt: skip
        values = {}
        for name in names:
            state = getattr(self, name)
            if isinstance(state, list) and not state:
                return {}
            values[name[3:]] = dim_zero_cat(state)
        if values["stats"].numel() == 0:
            return {}
        order = values["stats"][:, 0].argsort()
        return {k: v[order].cpu() for k, v in values.items()}

    # -- report ---------------------------------------------------------------------------

    def compute(self) -> AnalysisResult:  # TRANSITION: until this analysis is split by job
        out = self._compute_legacy()
        scalars = {k: v for k, v in out.items() if isinstance(v, Tensor) and v.numel() == 1}
        return AnalysisResult(scalars=scalars, details=out)

    def report(
        self, result: AnalysisResult, out_dir: Path, class_names: Sequence[str]
    ) -> ReportSection:
        return self._report_legacy(result.details, out_dir)

    def _report_legacy(self, result: dict[str, Any], out_dir: Path) -> ReportSection:
        """Markdown summary, one figure per kept example and a W&B table of the examples."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        lines = [
            "| mask | IS | random sqrt(area) | area | lift IS^2/area | mean p | p <= 0.05 |",
            "|---|---|---|---|---|---|---|",
        ]
        for kind in MASK_KINDS:
            cells = [_num(result.get(f"{s}_{kind}")) for s in
                     ("is", "random", "area", "lift", "pvalue", "significant")]  # fmt: skip
            lines.append(f"| {kind} | " + " | ".join(cells) + " |")
        body = [
            f"Scored {int(_num_value(result.get('scored', 0)))} successful adversarial examples "
            f"of {int(_num_value(result.get('evaluated', 0)))} (maps: {self.method}, "
            + (
                f"top {self.top_area:.0%} area"
                if self.top_area is not None
                else f"threshold {self.threshold}"
            )
            + ").",  # fmt: skip
            "",
            *lines,
            "",
            "IS = ||B*delta||/||delta||; a random mask of the same area scores sqrt(area) on "
            "average (E[IS^2] = area), so lift > 1 means the perturbation concentrates in the "
            "CAM region; p compares IS with cyclic shifts of the same mask.",
        ]
        if "promotion_in_target" in result:
            body += [
                "",
                f"Share of first-order promotion inside B_target: "
                f"{_num(result['promotion_in_target'])}; share of suppression inside B_true: "
                f"{_num(result['suppression_in_true'])}.",
            ]
        examples = self._examples
        figures: list[Path] = []
        tables: dict[str, tuple[list[str], list[list[Any]]]] = {}
        if examples:
            figures = self._figures(examples, out_dir)
            rows = [[_cell(col, v) for col, v in zip(EXAMPLE_COLUMNS, row.tolist(), strict=True)]
                    for row in examples["stats"]]  # fmt: skip
            tables["cam_examples"] = (list(EXAMPLE_COLUMNS), rows)
        return ReportSection(title="cam", markdown="\n".join(body), figures=figures, tables=tables)

    def _class(self, c: int) -> str:
        if self.class_names and 0 <= c < len(self.class_names):
            return f"{self.class_names[c]} ({c})"
        return str(c)

    def _figures(self, examples: dict[str, Tensor], out_dir: Path) -> list[Path]:
        from matplotlib.figure import Figure  # no pyplot: no global state between jobs

        paths = []
        col = {name: i for i, name in enumerate(EXAMPLE_COLUMNS)}
        for i, row in enumerate(examples["stats"]):
            index = int(row[col["index"]])
            delta = (examples["x_adv"][i] - examples["x"][i]).abs().sum(dim=0)
            delta = delta / delta.max().clamp_min(1e-12)
            fig = Figure(figsize=(9, 6), layout="constrained")
            axes = fig.subplots(2, 3)
            panels = (
                ("clean", examples["x"][i], examples["map_clean"][i], examples["mask_true"][i],
                 int(row[col["pred_clean"]]), f"B_true (y={self._class(int(row[col['y']]))})",
                 float(row[col["is_true"]])),
                ("adversarial", examples["x_adv"][i], examples["map_adv"][i],
                 examples["mask_target"][i], int(row[col["pred_adv"]]),
                 f"B_target (t={self._class(int(row[col['target']]))})",
                 float(row[col["is_target"]])),
            )  # fmt: skip
            for r, (label, image, cam_map, mask, pred, mask_name, score) in enumerate(panels):
                shown = _as_image(image)
                axes[r, 0].imshow(shown, cmap="gray" if shown.ndim == 2 else None)
                axes[r, 0].set_title(f"{label}: pred {self._class(pred)}", fontsize=8)
                # Overlays sit on the grey image, so the colour belongs to the heat map.
                grey = image.clamp(0, 1).mean(dim=0).numpy()
                axes[r, 1].imshow(grey, cmap="gray", vmin=0, vmax=1)
                axes[r, 1].imshow(cam_map.numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1)
                axes[r, 1].set_title(f"CAM of pred {self._class(pred)}", fontsize=8)
                axes[r, 2].imshow(grey, cmap="gray", vmin=0, vmax=1)
                axes[r, 2].imshow(delta.numpy(), cmap="magma", alpha=0.7, vmin=0, vmax=1)
                if 0 < float(mask.mean()) < 1:
                    axes[r, 2].contour(mask.numpy(), levels=[0.5], colors="cyan",
                                       linewidths=0.8)  # fmt: skip
                axes[r, 2].set_title(f"|delta| in {mask_name}: IS={score:.2f}", fontsize=8)
                for ax in axes[r]:
                    ax.axis("off")
            path = out_dir / f"cam_example_{index}.png"
            fig.savefig(path, dpi=100)
            paths.append(path)
        return paths


def _as_image(x: Tensor) -> Any:
    """(C, H, W) in [0, 1] -> an (H, W) or (H, W, 3) array for imshow."""
    x = x.clamp(0, 1)
    return x[0].numpy() if x.shape[0] == 1 else x[:3].permute(1, 2, 0).numpy()


def _num_value(v: Any) -> float:
    return float(v.item()) if isinstance(v, Tensor) else float(v)


def _num(v: Any) -> str:
    return "n/a" if v is None else f"{_num_value(v):.3g}"


def _cell(column: str, value: float) -> Any:
    if column in ("index", "y", "target", "pred_clean", "pred_adv"):
        return int(value)
    if column == "success":
        return bool(value)
    return round(value, 4)
