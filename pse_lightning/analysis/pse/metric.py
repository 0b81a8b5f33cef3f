"""The promotion-suppression (PSE) analysis as a torchmetrics Metric (docs/METHODS.md §2).

Per adversarial example it attributes the change of the true logit Z_{t0} and of the
target logit Z_t to pixels (integrated gradients or grad x delta, :mod:`.attribution`),
splits the attributions into promotion (raising Z_t) and suppression (lowering Z_{t0}),
scores groups of pixels (the structured attack's groups or a fixed grid) and types the
image as suppression-dominated, balanced or promotion-dominated ([P] Xu et al. 2019,
thresholds [X]; :mod:`.statistics`).

Only images the model classified correctly before the attack are analysed: an attack on a
misclassified image has nothing to flip, and its tiny perturbation makes every ratio of
attributions noise (they are counted as ``n_clean_misclassified``). An image whose
completeness residual stays above ``tol`` after refinement is *incomplete*: its
attributions do not add up to the logit changes, so it is left out of every
attribution-based number (promotion/suppression/counter shares, group types) and listed in
the report; its image type still counts, since r comes from the measured logit changes
(docs/METHODS.md §2.6-§2.7).

State reduces exactly across processes: counts, sums and a fixed-bin histogram of the PSE
ratio; the per-image rows and the example maps for figures are one named ``cat`` state per
column (:mod:`.samples`), bounded by the *dataset index* (index < max_rows,
index < max_figures), so one process and N processes keep the same rows. ``compute``
returns the scalars and everything ``report`` needs; ``report`` reads nothing else.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics.utilities import dim_zero_cat

from pse_lightning.analysis.base import AdversarialBatch, Analysis, AnalysisResult, ReportSection
from pse_lightning.analysis.pse import clusters, figures, mixture, statistics
from pse_lightning.analysis.pse.attribution import METHODS, PSEAttribution, pse_attributions
from pse_lightning.analysis.pse.findings import pse_findings
from pse_lightning.analysis.pse.glossary import TERMS
from pse_lightning.analysis.pse.mixture import MAX_COMPONENTS, MIX_BINS
from pse_lightning.analysis.pse.report import pse_section
from pse_lightning.analysis.pse.samples import (
    EXACT_ID_LIMIT,
    EXAMPLE_STATES,
    IMAGE_STATES,
    ROW_STATES,
    example_maps,
    image_rows,
    image_summary,
    sample_images,
)
from pse_lightning.analysis.pse.statistics import HIST_BINS, PSE_TYPES, SWEEP
from pse_lightning.core.contract import SweepTable, Term
from pse_lightning.core.findings import Finding
from pse_lightning.core.pse_types import DOMINANCE_TYPES
from pse_lightning.core.report import ExamplePanel
from pse_lightning.validation import require_at_least, require_choice, require_in_range

log = logging.getLogger(__name__)
# pair_classes^2 slots x 28 numbers: 256 classes is ~15 MB of state per process
MAX_PAIR_CLASSES = 256


class PSE(Analysis):
    """Promotion-suppression attribution, group scores and image types over a dataset.

    Args:
        method: 'ig' (integrated gradients x -> x_adv, midpoint rule) or 'grad'
            (grad x delta, first order).
        steps: integration steps (ig).
        max_steps: a sample whose completeness residual exceeds ``tol`` is refined to
            three times the steps, reusing every gradient already evaluated, while they
            stay <= max_steps (ig): 32 steps reach 96 and 288.
        tol: relative completeness tolerance; 0.01 = 1%. ig refines above it; with
            either method an image still above it is incomplete (see the module doc).
        tau_s: suppression-dominated when r < tau_s.
        tau_p: promotion-dominated when r > tau_p (tau_s <= tau_p).
        center_logits: attribute per-sample centred logits Z_c - mean_j Z_j (softmax
            ignores a common shift).
        group_size: side of the square pixel groups used when the attack provides no
            ``group_map`` in its extras.
        successful_only: analyse only successful adversarial examples (a failed
            perturbation changed the logits without fooling the model).
        chunk_size: images per forward pass of integrated gradients (memory bound); the
            path points of all steps and samples are packed into passes of this size.
        channels_last: evaluate the integrated-gradient path points in channels-last
            memory format (faster CPU convolutions, same numbers up to rounding); set false
            for a model that ``.view``-s its convolution outputs.
        max_rows: keep per-image rows (W&B table, scatter) for dataset index < max_rows.
        max_figures: keep maps for the example figure for dataset index < max_figures.
        max_images: keep at most this many analysed images for the class-pair table,
            eta^2 and the list of incomplete attributions: all of them when they fit, else
            a seeded uniform random sample of this many (:func:`.samples.sample_images`),
            so the state does not grow with the dataset (every count and the cluster
            bootstrap still cover all images).
        pair_classes: (true, target) pairs with both classes below it are tallied exactly
            for the cluster bootstrap; other pairs share hashed slots (:mod:`.clusters`).
            The per-pair state holds pair_classes^2 slots.
        bootstrap: replicates of the cluster bootstrap over class pairs (Claim 1).
        mixture_bootstrap: replicates of each parametric-bootstrap likelihood-ratio test
            of the number of mixture components of r (0 skips the tests).
        **kwargs: torchmetrics ``Metric`` options (``sync_on_compute``...).
    """

    name = "pse"
    key_results = ("frac_suppression", "frac_promotion", "frac_balanced")
    sweep_tables = (
        SweepTable(
            "PSE types of the successful perturbations",
            keys=tuple(f"frac_{t}" for t in DOMINANCE_TYPES),
            figure="pse_types",
            legend=DOMINANCE_TYPES,
            ylabel="fraction of successful perturbations",
        ),
    )
    # Sees every row: the clean-misclassified ones are counted (``n_clean_misclassified``,
    # the report's "skipped" line), then left out by the same ``batch.attacked`` mask.
    attacked_rows_only = False

    @classmethod
    def glossary(cls) -> tuple[Term, ...]:  # noqa: D102
        return TERMS

    def __init__(
        self,
        *,
        method: str = "ig",
        steps: int = 32,
        max_steps: int = 288,
        tol: float = 0.01,
        tau_s: float = 1 / 3,
        tau_p: float = 2 / 3,
        center_logits: bool = False,
        group_size: int = 4,
        successful_only: bool = True,
        chunk_size: int = 64,
        channels_last: bool = True,
        max_rows: int = 1000,
        max_figures: int = 8,
        max_images: int = 50_000,
        pair_classes: int = 64,
        bootstrap: int = 2000,
        mixture_bootstrap: int = 99,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.method = require_choice("analysis.pse.method", method, METHODS)
        self.steps = require_at_least("analysis.pse.steps", steps, 1)
        self.max_steps = require_at_least("analysis.pse.max_steps", max_steps, steps)
        self.tol = require_in_range("analysis.pse.tol", tol, 0.0, 1.0, low_open=True)
        self.tau_s = require_in_range("analysis.pse.tau_s", tau_s, 0.0, 1.0)
        self.tau_p = require_in_range("analysis.pse.tau_p", tau_p, 0.0, 1.0)
        if self.tau_s > self.tau_p:
            raise ValueError(
                f"analysis.pse.tau_s must be <= analysis.pse.tau_p, got {tau_s} > {tau_p}; "
                "the defaults are 0.333 and 0.667"
            )
        self.center_logits = _require_flag("center_logits", center_logits)
        self.successful_only = _require_flag("successful_only", successful_only)
        self.channels_last = _require_flag("channels_last", channels_last)
        self.group_size = require_at_least("analysis.pse.group_size", group_size, 1)
        self.chunk_size = require_at_least("analysis.pse.chunk_size", chunk_size, 1)
        self.max_rows = _require_id_bound("max_rows", max_rows)
        self.max_figures = _require_id_bound("max_figures", max_figures)
        self.max_images = require_at_least("analysis.pse.max_images", max_images, 1)
        self.pair_classes = require_at_least("analysis.pse.pair_classes", pair_classes, 1)
        if pair_classes > MAX_PAIR_CLASSES:
            raise ValueError(
                f"analysis.pse.pair_classes must be <= {MAX_PAIR_CLASSES} (the pair table holds "
                f"pair_classes^2 slots), got {pair_classes}; pairs of larger classes are hashed "
                "into the table, so keep the default 64"
            )
        self.bootstrap = require_at_least("analysis.pse.bootstrap", bootstrap, 1)
        self.mixture_bootstrap = require_at_least(
            "analysis.pse.mixture_bootstrap", mixture_bootstrap, 0
        )
        self._add_tally_states()
        self._add_sample_states()

    def _add_tally_states(self) -> None:
        """Fixed-size states that reduce exactly: counts, sums, one max."""
        long, double = dict(dtype=torch.long), dict(dtype=torch.float64)
        types = len(PSE_TYPES)
        self.add_state("n_seen", torch.zeros((), **long), dist_reduce_fx="sum")
        self.add_state("n_clean_misclassified", torch.zeros((), **long), dist_reduce_fx="sum")
        self.add_state("n_incomplete", torch.zeros((), **long), dist_reduce_fx="sum")
        self.add_state("type_counts", torch.zeros(types, **long), dist_reduce_fx="sum")
        self.add_state("group_type_counts", torch.zeros(types, **long), dist_reduce_fx="sum")
        # histogram of r by the image's type (bins x suppression/balanced/promotion)
        self.add_state("r_hist", torch.zeros(HIST_BINS, 3, **long), dist_reduce_fx="sum")
        self.add_state("mix_hist", torch.zeros(MIX_BINS, **long), dist_reduce_fx="sum")
        slots = self.pair_classes**2
        self.add_state("slot_sweep", torch.zeros(slots, len(SWEEP), 3, **long),
                       dist_reduce_fx="sum")  # fmt: skip
        self.add_state("slot_types", torch.zeros(slots, types, **long), dist_reduce_fx="sum")
        self.add_state("slot_moments", torch.zeros(slots, 3, **double), dist_reduce_fx="sum")
        self.add_state("n_pairs_hashed", torch.zeros((), **long), dist_reduce_fx="sum")
        self.add_state("sweep_counts", torch.zeros(len(SWEEP), 3, **long), dist_reduce_fx="sum")
        # promotion share, suppression share, counter share, over complete images, P + S > 0
        self.add_state("share_sums", torch.zeros(3, **double), dist_reduce_fx="sum")
        self.add_state("share_count", torch.zeros((), **long), dist_reduce_fx="sum")
        self.add_state("r_sum", torch.zeros((), **double), dist_reduce_fx="sum")
        self.add_state("residual_sum", torch.zeros((), **double), dist_reduce_fx="sum")
        self.add_state("residual_max", torch.zeros((), **double), dist_reduce_fx="max")
        self.add_state("steps_sum", torch.zeros((), **long), dist_reduce_fx="sum")
        # (C, H, W) of the example images; ranks without examples hold zeros
        self.add_state("example_shape", torch.zeros(3, **long), dist_reduce_fx="max")

    def _add_sample_states(self) -> None:
        """Samples: one ``cat`` state per column (names and bounds in :mod:`.samples`)."""
        for state in (*ROW_STATES.values(), *EXAMPLE_STATES.values(), *IMAGE_STATES.values()):
            self.add_state(state, [], dist_reduce_fx="cat")

    # -- update ---------------------------------------------------------------------------

    def update(self, model: nn.Module, batch: AdversarialBatch) -> None:
        """Attribute, type and tally one adversarial batch (needs grad mode, not inference)."""
        if len(batch.index) and int(batch.index.max()) >= EXACT_ID_LIMIT:
            raise ValueError(
                f"PSE keeps dataset indices < {EXACT_ID_LIMIT} exactly, got "
                f"{int(batch.index.max())}; evaluate a smaller split (data.* limits)"
            )
        self.n_seen += len(batch.y)
        keep = batch.attacked.clone()
        self.n_clean_misclassified += int((~keep).sum())
        if self.successful_only:
            keep &= batch.success.bool()
        sel = keep.nonzero().flatten()
        if len(sel) == 0:
            return
        x, x_adv, y, target = batch.x[sel], batch.x_adv[sel], batch.y[sel], batch.target[sel]
        if bool((batch.index[sel] < self.max_figures).any()):  # checked before any tally
            self._record_example_shape(x.shape[1:])
        attr = pse_attributions(
            model, x, x_adv, y, target, method=self.method, steps=self.steps,
            max_steps=self.max_steps, tol=self.tol, center=self.center_logits,
            chunk_size=self.chunk_size, channels_last=self.channels_last,
            logits_clean=batch.logits_clean[sel], logits_adv=batch.logits_adv[sel],
        )  # fmt: skip
        r, kind = statistics.pse_type(attr.delta_true, attr.delta_target, self.tau_s, self.tau_p)
        totals = statistics.attribution_totals(attr.attr_true, attr.attr_target).double()
        complete = attr.residual <= self.tol  # NaN residuals are incomplete too
        self._tally_images(r, kind, totals, attr, complete)
        self._tally_pairs(r, y, target)
        self._tally_groups(attr, batch.extras.get("group_map"), sel, complete)
        ids = {"index": batch.index[sel], "label": y, "target": target, "type": kind}
        image = {"r": r, "residual": attr.residual, "steps": attr.steps}
        self._append(IMAGE_STATES, {**ids, **image})
        self._bound_images()
        self._keep_rows(ids, attr, totals, r, batch.success[sel])
        self._keep_examples(ids, r, x, x_adv, attr)

    def _tally_images(
        self, r: Tensor, kind: Tensor, totals: Tensor, attr: PSEAttribution, complete: Tensor
    ) -> None:
        dev = self.type_counts.device
        self.type_counts += torch.bincount(kind, minlength=len(PSE_TYPES)).to(dev)
        self.r_hist += statistics.ratio_histogram_by_type(r, kind).to(dev)
        self.mix_hist += mixture.fine_histogram(r).to(dev)
        self.r_sum += r[~torch.isnan(r)].double().sum().to(dev)
        self.sweep_counts += statistics.sweep_counts(r).to(dev)
        self.n_incomplete += int((~complete).sum())
        shares = statistics.image_shares(totals[complete])
        self.share_sums += shares.sum(0).to(dev)
        self.share_count += len(shares)
        residual = attr.residual.double()
        self.residual_sum += residual.sum().to(dev)
        self.residual_max = torch.maximum(self.residual_max, residual.max().to(dev))
        self.steps_sum += attr.steps.sum().to(dev)

    def _tally_pairs(self, r: Tensor, y: Tensor, target: Tensor) -> None:
        """Per (true, target) pair slot: sweep and configured type counts, sums of r."""
        dev = self.slot_types.device
        slot, hashed = clusters.pair_slots(y.to(dev), target.to(dev), self.pair_classes)
        sweep, types, moments = clusters.slot_tallies(
            r.to(dev), slot, self.tau_s, self.tau_p, self.pair_classes**2
        )
        self.slot_sweep += sweep
        self.slot_types += types
        self.slot_moments += moments
        self.n_pairs_hashed += int(hashed.sum())

    def _tally_groups(
        self, attr: PSEAttribution, group_map: Tensor | None, sel: Tensor, complete: Tensor
    ) -> None:
        """Group types of the complete images (their attributions add up)."""
        _, _, height, width = attr.attr_true.shape
        if group_map is None:
            group_map = statistics.grid_group_map(
                height, width, self.group_size, attr.attr_true.device
            )
        elif group_map.dim() == 3:
            group_map = group_map[sel][complete]
        promotion, suppression = statistics.group_scores(
            attr.attr_true[complete], attr.attr_target[complete], group_map
        )
        ratio = statistics.pse_ratio(promotion, suppression)
        kind = statistics.classify(ratio, self.tau_s, self.tau_p).flatten()
        dev = self.group_type_counts.device
        self.group_type_counts += torch.bincount(kind, minlength=len(PSE_TYPES)).to(dev)

    def _bound_images(self) -> None:
        """Cut this process's images to ``max_images`` once they hold twice as many (the
        sample is the same as if cut once at the end, :func:`.samples.sample_images`)."""
        if sum(len(part) for part in getattr(self, IMAGE_STATES["index"])) <= 2 * self.max_images:
            return
        kept = sample_images(self._columns(IMAGE_STATES), self.max_images)
        for name, state in IMAGE_STATES.items():
            setattr(self, state, [kept[name]])

    def _keep_rows(
        self,
        ids: Mapping[str, Tensor],
        attr: PSEAttribution,
        totals: Tensor,
        r: Tensor,
        success: Tensor,
    ) -> None:
        rows = ids["index"] < self.max_rows
        columns = {
            **ids,
            "delta_true": attr.delta_true,
            "delta_target": attr.delta_target,
            "promotion": totals[:, 0],
            "suppression": totals[:, 1],
            "r": r,
            "residual": attr.residual,
            "steps": attr.steps,
            "success": success,
        }
        self._append(ROW_STATES, {name: values[rows] for name, values in columns.items()})

    def _keep_examples(
        self, ids: Mapping[str, Tensor], r: Tensor, x: Tensor, x_adv: Tensor, attr: PSEAttribution
    ) -> None:
        keep = (ids["index"] < self.max_figures).nonzero().flatten()
        if len(keep) == 0:
            return
        attr_true, attr_target = attr.attr_true[keep], attr.attr_target[keep]
        promotion, suppression = statistics.promotion_suppression_maps(attr_true, attr_target)
        columns = {
            **{name: values[keep] for name, values in ids.items()},
            "r": r[keep],
            "x": x[keep],
            "delta": (x_adv - x)[keep],
            "promotion": promotion,
            "suppression": suppression,
            "net": (attr_target - attr_true).sum(dim=1),
        }
        self._append(EXAMPLE_STATES, columns)

    def _record_example_shape(self, shape: torch.Size) -> None:
        """Every example image must have one shape: the gathered maps are cut by it."""
        new = torch.tensor(list(shape), dtype=torch.long, device=self.example_shape.device)
        if bool(self.example_shape.any()) and not torch.equal(self.example_shape, new):
            raise ValueError(
                f"PSE examples must share one image shape, got {tuple(new.tolist())} after "
                f"{tuple(self.example_shape.tolist())}; resize the dataset's images to one size"
            )
        self.example_shape = new

    def _append(self, states: Mapping[str, str], columns: Mapping[str, Tensor]) -> None:
        """Append each column to its ``cat`` state, flat, in the metric's device and dtype."""
        for name, state in states.items():
            values = columns[name].detach().flatten().to(device=self.device, dtype=self.dtype)
            getattr(self, state).append(values)

    # -- compute --------------------------------------------------------------------------

    def compute(self) -> AnalysisResult:
        """Scalar metrics over every analysed image, and the samples for the report.

        Called on every rank (it synchronises). Scalars (docs/METHODS.md §2.4-§2.7):

        - ``frac_<type>`` for the four types, over analysed images, summing to 1;
          ``n_images`` analysed and ``analysed_fraction`` of those seen;
          ``n_clean_misclassified`` seen but skipped (wrong clean prediction);
        - over the *complete* images (residual <= tol): mean promotion and suppression
          shares P/(P+S), S/(P+S) of the gross pixel attributions and the
          ``counter_share`` (attribution that works against the attack);
          ``group_frac_<type>`` over groups with a defined type and ``group_frac_active``,
          the fraction of groups that have one;
        - ``mean_r`` over images with a defined ratio; completeness
          ``residual_mean``/``residual_max`` and ``steps_mean`` over all analysed images,
          ``n_incomplete`` of them above ``tol``;
        - the class-pair effect on r: ``pair_eta2`` (share of the variance of r explained
          by the (true, target) pair), ``pair_eta2_null`` (its expectation were r
          independent of the pair), ``pair_epsilon2`` (bias-corrected), ``n_pairs`` and
          ``n_pairs_small`` (pairs with fewer than ``MIN_PAIR_IMAGES`` defined ratios);
        - Claim 1 by a cluster bootstrap over (true, target) pair slots (:mod:`.clusters`,
          ``n_bootstrap`` replicates over ``n_pair_clusters`` slots, ``n_pairs_hashed``
          images in shared slots): per sweep threshold q, ``rarest_q<1000q>`` (the smallest
          type share among defined r) with ``_low``/``_high`` (percentile interval) and
          ``_p``; ``frac_<type>_low``/``_high`` for the configured dominance types;
          ``pair_within_share`` (SS_within / SS_total of r by pair slot);
        - the modes of r (:mod:`.mixture`): ``mixture_bic_k1..k4``, ``mixture_k`` (smallest
          BIC, 0 if not fitted), ``mixture_p_1v2`` and ``mixture_p_2v3`` (bootstrap LR tests).

        The class-pair effect, ``pairs`` and ``images`` cover every analysed image up to
        ``max_images``, a seeded uniform sample of that many above it.

        Details: ``rows`` (:class:`.samples.ImageRows`), ``examples``
        (:class:`.samples.ExampleMaps`), ``images`` (:class:`.samples.ImageSummary`, the
        analysed images up to ``max_images``), ``pairs`` (:class:`.statistics.PairBreakdown`),
        ``r_hist`` (HIST_BINS, 3) by type, ``sweep_counts`` (len(SWEEP), 3) and ``modes``
        (:class:`.mixture.Modes`), all on the CPU.
        """
        n_images = self.type_counts.double().sum()
        scalars = statistics.type_fractions(self.type_counts)
        scalars["n_images"] = n_images
        scalars["analysed_fraction"] = statistics.share(n_images, self.n_seen)
        scalars["n_clean_misclassified"] = self.n_clean_misclassified.clone()
        scalars["n_incomplete"] = self.n_incomplete.clone()
        # NaN, not 0, when no complete image has P + S > 0: there is nothing to average
        shares = self.share_sums / self.share_count.double()
        for i, key in enumerate(("promotion_share", "suppression_share", "counter_share")):
            scalars[key] = shares[i]
        scalars["mean_r"] = statistics.mean_ratio(self.r_sum, self.type_counts)
        scalars["residual_mean"] = statistics.share(self.residual_sum, n_images)
        scalars["residual_max"] = self.residual_max.clone()
        scalars["steps_mean"] = statistics.share(self.steps_sum, n_images)
        scalars.update(statistics.group_fractions(self.group_type_counts))
        images = image_summary(sample_images(self._columns(IMAGE_STATES), self.max_images))
        scalars.update(self._pair_effect(images.label, images.target, images.r))
        kind = statistics.classify(images.r, self.tau_s, self.tau_p)
        modes = mixture.modes(self.mix_hist.cpu(), replicates=self.mixture_bootstrap)
        scalars.update(self._modes_scalars(modes))
        scalars.update(self._cluster_scalars())
        details = {
            "modes": modes,
            "images": images,
            "pairs": statistics.pair_breakdown(images.label, images.target, kind, images.r),
            "rows": image_rows(self._columns(ROW_STATES)),
            "examples": example_maps(self._columns(EXAMPLE_STATES), self.example_shape),
            "r_hist": self.r_hist.cpu().clone(),
            "sweep_counts": self.sweep_counts.cpu().clone(),
        }
        return AnalysisResult(scalars=scalars, details=details)

    @staticmethod
    def _modes_scalars(modes: mixture.Modes) -> dict[str, Tensor]:
        out = {f"mixture_bic_k{k + 1}": modes.bic[k] for k in range(MAX_COMPONENTS)}
        out["mixture_k"] = torch.tensor(float(modes.k), dtype=torch.float64)
        out["mixture_p_1v2"], out["mixture_p_2v3"] = modes.p[1], modes.p[2]
        return out

    def _cluster_scalars(self) -> dict[str, Tensor]:
        """Claim 1 per sweep threshold and the type-share intervals, one cluster bootstrap
        over (true, target) pair slots; the within-pair share of the variance of r."""
        test = clusters.rarest_share_test(
            self.slot_sweep, self.slot_types, replicates=self.bootstrap
        )
        out: dict[str, Tensor] = {}
        for i, q in enumerate(SWEEP):
            tag = clusters.sweep_key(q)
            out[f"rarest_{tag}"] = test["rarest"][i]
            out[f"rarest_{tag}_low"] = test["low"][i]
            out[f"rarest_{tag}_high"] = test["high"][i]
            out[f"rarest_{tag}_p"] = test["p"][i]
        for i, name in enumerate(PSE_TYPES[:3]):
            out[f"frac_{name}_low"] = test["type_low"][i]
            out[f"frac_{name}_high"] = test["type_high"][i]
        out["n_pair_clusters"] = test["clusters"]
        out["n_pairs_hashed"] = self.n_pairs_hashed.clone()
        out["pair_within_share"] = clusters.within_pair_share(self.slot_moments.cpu())
        out["n_bootstrap"] = torch.tensor(float(self.bootstrap), dtype=torch.float64)
        return out

    @staticmethod
    def _pair_effect(label: Tensor, target: Tensor, r: Tensor) -> dict[str, Tensor]:
        """eta^2 of r by (true, target) pair, with its null expectation and epsilon^2."""
        effect = statistics.eta_squared(r, statistics.pair_ids(label, target))
        names = {"eta2": "pair_eta2", "eta2_null": "pair_eta2_null", "epsilon2": "pair_epsilon2",
                 "n_groups": "n_pairs", "n_small": "n_pairs_small"}  # fmt: skip
        return {key: effect[name] for name, key in names.items()}

    def _columns(self, states: Mapping[str, str]) -> dict[str, Tensor]:
        """The gathered ``cat`` states as flat tensors (empty where nothing was kept)."""
        out = {}
        for name, state in states.items():
            values = getattr(self, state)
            if isinstance(values, list) and not values:
                out[name] = torch.zeros(0, dtype=self.dtype, device=self.device)
            else:
                out[name] = dim_zero_cat(values).flatten()
        return out

    # -- report ---------------------------------------------------------------------------

    def example_panel(self, result: AnalysisResult) -> ExamplePanel | None:  # noqa: D102
        kept = result.details.get("examples")
        return None if kept is None else figures.example_panel(kept)

    def findings(self, result: AnalysisResult) -> list[Finding]:  # noqa: D102
        return pse_findings(result.values())

    def report(
        self, result: AnalysisResult, out_dir: Path, class_names: Sequence[str]
    ) -> ReportSection:
        """Figures (examples, histogram of r, promotion vs suppression) and the image table,
        from ``result`` alone (rank zero, after ``compute``; no communication)."""
        return pse_section(
            result,
            Path(out_dir),
            class_names,
            settings=self.settings_sentence(int(result.scalars.get("n_images", 0))),
            tau_s=self.tau_s,
            tau_p=self.tau_p,
            tol=self.tol,
            max_images=self.max_images,
        )

    def settings_sentence(self, n_images: int) -> str:
        """One sentence naming the method, thresholds and the images analysed."""
        ig = (
            f" ({self.steps} steps, tripled up to {self.max_steps} when the "
            f"completeness residual exceeds {100 * self.tol:.3g}%)"
        )
        return (
            f"Method: {self.method}"
            + (ig if self.method == "ig" else "")
            + f"; thresholds tau_s={self.tau_s:.3g}, tau_p={self.tau_p:.3g}"
            + ("; centred logits" if self.center_logits else "")
            + f"; {n_images} images"
            + (" (successful attacks only)." if self.successful_only else ".")
        )


def _require_flag(key: str, flag: object) -> bool:
    if not isinstance(flag, bool):
        raise ValueError(f"analysis.pse.{key} must be true or false, got {flag!r}")
    return flag


def _require_id_bound(key: str, value: int) -> int:
    """A sample bound: dataset indices below it are stored exactly in a float32 state."""
    value = require_at_least(f"analysis.pse.{key}", value, 0)
    if value > EXACT_ID_LIMIT:
        raise ValueError(
            f"analysis.pse.{key} must be <= {EXACT_ID_LIMIT} (ids are kept in float32 states), "
            f"got {value}; keep fewer samples"
        )
    return value
