"""Image-level interpretation of adversarial perturbations with class activation maps.

``analysis=cam`` (docs/METHODS.md §3): for every adversarial example it asks whether the
perturbation sits in the discriminative region of the true class on x (where suppression
would act) and of the target class on x' (where promotion would act), compared with a
random mask of the same area and with cyclic shifts of the same mask.

The maps come from :class:`ActivationMap`, a base class that hooks the model's feature
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

from pse_lightning.analysis.base import AdversarialBatch, Analysis, ReportSection
from pse_lightning.analysis.functional import cam as core
from pse_lightning.analysis.hooks import capture_activations
from pse_lightning.attacks.base import frozen_eval
from pse_lightning.validation import (
    require_at_least,
    require_choice,
    require_in_range,
)

log = logging.getLogger(__name__)

METHODS: tuple[str, ...] = ("auto", "cam", "gradcam")
MASK_KINDS: tuple[str, ...] = ("true", "target", "union")
# Per-example columns kept for figures and the W&B table (one float64 row per example).
EXAMPLE_COLUMNS: tuple[str, ...] = (
    "index", "y", "target", "pred_clean", "pred_adv", "success",
    "is_true", "is_target", "area_true", "area_target", "pvalue_true", "pvalue_target",
)  # fmt: skip
SIGNIFICANCE = 0.05


# -- maps -----------------------------------------------------------------------------------


class ActivationMap:
    """Weighted sums of a layer's channels, captured during the forward pass of the logits.

    Subclasses override only :meth:`channel_weights`. The hook lives in
    :func:`~pse_lightning.analysis.hooks.capture_activations`, so it is removed even when
    the forward pass or the weights raise (pytorch-grad-cam #132).

    Args:
        layer: dotted name of the feature layer; None takes ``model.feature_layer``.
    """

    #: Apply ReLU to the weighted sum (Grad-CAM keeps only positive evidence; CAM does not).
    rectify: bool = False
    #: Whether ``channel_weights`` differentiates through the features.
    needs_grad: bool = False

    def __init__(self, layer: str | None = None) -> None:
        self.layer = layer

    def channel_weights(
        self, model: nn.Module, features: Tensor, logits: Tensor, target: Tensor
    ) -> Tensor:
        """(N, K) weight of each channel of ``features`` (N, K, h, w) for each image's target."""
        raise NotImplementedError

    def resolve_layer(self, model: nn.Module) -> str:
        layer = self.layer or getattr(model, "feature_layer", None)
        if not layer:
            raise ValueError(
                f"{type(model).__name__} has no feature_layer; set analysis.layer to the dotted "
                "name of its last convolutional feature map"
            )
        return layer

    def raw_maps(
        self, model: nn.Module, x: Tensor, targets: Sequence[Tensor]
    ) -> tuple[Tensor, list[Tensor]]:
        """One forward pass; the maps of several target vectors share it.

        Args:
            model: classifier on [0, 1] images; the caller sets eval mode.
            x: (N, C, H, W) images.
            targets: one or more (N,) class vectors, one class per image.

        Returns:
            (logits (N, num_classes) of that same pass, [raw (N, h, w) map per target]).
        """
        layer = self.resolve_layer(model)
        if self.needs_grad:
            _require_autograd(type(self).__name__)
        grad_mode = torch.enable_grad() if self.needs_grad else torch.no_grad()
        with grad_mode, capture_activations(model, [layer], detach=not self.needs_grad) as acts:
            # An input that requires grad keeps the features in the graph even when the
            # parameters are frozen.
            inputs = x.detach().requires_grad_(True) if self.needs_grad else x
            logits = model(inputs)
            if layer not in acts:
                raise ValueError(f"layer {layer!r} did not run in the forward pass")
            features = acts[layer]
            if not isinstance(features, Tensor) or features.dim() != 4:
                raise ValueError(
                    f"layer {layer!r} must output an (N, K, h, w) tensor, got "
                    f"{getattr(features, 'shape', type(features).__name__)}"
                )
            maps = []
            for target in targets:
                weights = self.channel_weights(model, features, logits, target)
                raw = core.weighted_channel_sum(features.detach(), weights.detach())
                maps.append(raw.relu() if self.rectify else raw)
        return logits.detach(), maps

    def __call__(self, model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
        """Normalised (N, H, W) maps in [0, 1] at the input resolution, one per image."""
        _, (raw,) = self.raw_maps(model, x, [target])
        return core.image_maps(raw, (x.shape[-2], x.shape[-1]))


class CAM(ActivationMap):
    """Class activation map M_c = sum_k w_{c,k} A_k (Zhou et al., 2016).

    Exact for a net whose logits are a linear layer (``model.head``) on the global average
    of the feature layer. That structure is checked on the first call for each model:
    mean(M_c) + b_c must reproduce Z_c of the same forward pass.
    """

    def __init__(self, layer: str | None = None) -> None:
        super().__init__(layer)
        self._verified: set[tuple[int, str]] = set()

    def channel_weights(
        self, model: nn.Module, features: Tensor, logits: Tensor, target: Tensor
    ) -> Tensor:
        head = _linear_head(model)
        weights = core.cam_weights(head.weight.detach(), target)
        key = (id(model), self.resolve_layer(model))
        if key not in self._verified:
            self._verify(model, head, features, weights, logits, target)
            self._verified.add(key)
        return weights

    def _verify(
        self,
        model: nn.Module,
        head: nn.Linear,
        features: Tensor,
        weights: Tensor,
        logits: Tensor,
        target: Tensor,
    ) -> None:
        # GAP + linear: Z_c = sum_k w_ck mean(A_k) + b_c. A mismatch means the head is not
        # applied to the pooled feature layer and CAM would be meaningless.
        pooled = core.weighted_channel_sum(features.detach(), weights).mean(dim=(1, 2))
        bias = head.bias.detach()[target] if head.bias is not None else 0.0
        expected = logits.detach().gather(1, target[:, None])[:, 0]
        scale = 1e-3 * (1.0 + expected.abs())
        if not torch.all((pooled + bias - expected).abs() <= scale):
            raise ValueError(
                f"analysis.method=cam needs logits = head(global average of the feature layer),"
                f" but {type(model).__name__}.head={getattr(model, 'head', None)!r} does not "
                f"reproduce them from {self.resolve_layer(model)!r}; use analysis.method=gradcam"
            )


class GradCAM(ActivationMap):
    """Grad-CAM L_c = ReLU(sum_k alpha_k A_k), alpha_k = mean dZ_c/dA_k (Selvaraju 2017)."""

    rectify = True
    needs_grad = True

    def channel_weights(
        self, model: nn.Module, features: Tensor, logits: Tensor, target: Tensor
    ) -> Tensor:
        # Summing the per-image target logits gives each image its own gradient (images are
        # independent in eval mode); autograd.grad leaves parameter .grad untouched.
        score = logits.gather(1, target[:, None]).sum()
        (grad,) = torch.autograd.grad(score, features, retain_graph=True)
        return core.gradcam_weights(grad)


def _require_autograd(what: str) -> None:
    # enable_grad() cannot undo inference_mode (Lightning #19910): fail with the fix.
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            f"{what} needs gradients but runs under torch.inference_mode(); set "
            "trainer.inference_mode=false"
        )


def _linear_head(model: nn.Module) -> nn.Linear:
    name = getattr(model, "head", None)
    if not name:
        raise ValueError(
            f"analysis.method=cam needs a GAP + linear head, but {type(model).__name__} has "
            "head=None; use analysis.method=gradcam (or auto)"
        )
    head = model.get_submodule(name)
    if not isinstance(head, nn.Linear):
        raise ValueError(
            f"analysis.method=cam needs model.head to be nn.Linear, got {type(head).__name__} "
            f"at {name!r}; use analysis.method=gradcam"
        )
    return head


def activation_map_for(
    model: nn.Module, method: str = "auto", layer: str | None = None, key: str = "analysis"
) -> ActivationMap:
    """CAM when the model has a GAP + linear head (``model.head``), else Grad-CAM.

    Args:
        model: the classifier.
        method: 'auto', 'cam' or 'gradcam'.
        layer: feature layer override (default ``model.feature_layer``).
        key: config prefix named in errors.
    """
    require_choice(f"{key}.method", method, METHODS)
    if method == "auto":
        method = "cam" if getattr(model, "head", None) else "gradcam"
    return CAM(layer) if method == "cam" else GradCAM(layer)


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
        self.method = require_choice("analysis.method", method, METHODS)
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
        self._mapper_cache: ActivationMap | None = None

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

    def _mapper(self, model: nn.Module) -> ActivationMap:
        """One map object kept across batches, so CAM verifies the head only once."""
        mapper = activation_map_for(model, self.method, self.layer)
        if type(self._mapper_cache) is not type(mapper):
            self._mapper_cache = mapper
        return self._mapper_cache

    def masks(self, maps: Tensor) -> Tensor:
        """Binary masks from normalised (N, H, W) maps (threshold or top area)."""
        if self.top_area is not None:
            return core.top_area_mask(maps, self.top_area)
        return core.threshold_mask(maps, self.threshold)

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
                # Imported here: functional.pse -> attacks -> cam_guided -> this module.
                from pse_lightning.analysis.functional.pse import grad_times_delta

                attr_true, attr_target, _ = grad_times_delta(model, x, x_adv, y, target)
        map_true = core.image_maps(raw_clean[0], size)
        map_target = core.image_maps(raw_adv[0], size)
        mask = {"true": self.masks(map_true), "target": self.masks(map_target)}
        mask["union"] = mask["true"] | mask["target"]

        energy = core.pixel_energy(delta.double())
        scored = batch.success & (energy.flatten(1).sum(dim=1) > 0)
        sel = scored.double()
        self.evaluated += len(x)
        self.scored += sel.sum()
        shifts = core.choose_shifts(size[0], size[1], self.shifts, self.seed)
        per_kind: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
        for kind, b in mask.items():
            score = core.interpretability_score(delta.double(), b)
            area = core.mask_area(b).double()
            pvalue = core.cyclic_shift_pvalue(energy, b, shifts).double()
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
            promo, promo_ok = core.masked_share(attr_target.clamp_min(0), mask["target"])
            supp, supp_ok = core.masked_share((-attr_true).clamp_min(0), mask["true"])
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
            self.ex_map_clean.append(core.image_maps(raw_clean[1][keep], size))
            self.ex_map_adv.append(core.image_maps(raw_adv[1][keep], size))
        else:
            empty = x.new_zeros((0, *size))
            self.ex_map_clean.append(empty)
            self.ex_map_adv.append(empty)

    def compute(self) -> dict[str, Tensor]:
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

    def report(self, result: dict[str, Any], out_dir: Path) -> ReportSection:
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
