"""The promotion-suppression (PSE) analysis as a torchmetrics Metric (docs/METHODS.md §2).

Per adversarial example it attributes the change of the true logit Z_{t0} and of the
target logit Z_t to pixels (integrated gradients or grad x delta), splits the attributions
into promotion (raising Z_t) and suppression (lowering Z_{t0}), scores groups of pixels
(the structured attack's groups or a fixed grid) and types the image as suppression-
dominated, balanced or promotion-dominated ([P] Xu et al. 2019, thresholds [X]).

State reduces exactly across processes: counts, sums and a fixed-bin histogram of the PSE
ratio; the per-image rows and the maps for figures are ``cat`` states bounded by the
*dataset index* (index < max_rows, index < max_figures), so one process and N processes
keep the same rows. ``compute`` returns scalars; the synchronised samples it also sees are
kept on the instance (they survive ``reset``) for ``report``, which runs on rank zero after
``compute`` and must not communicate.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics.utilities import dim_zero_cat

from pse_lightning.analysis.base import AdversarialBatch, Analysis, AnalysisResult, ReportSection
from pse_lightning.analysis.functional.pse import (
    METHODS,
    NONE,
    PSE_TYPES,
    attribution_totals,
    classify,
    grid_group_map,
    group_scores,
    promotion_suppression_maps,
    pse_attributions,
    pse_ratio,
    pse_type,
)
from pse_lightning.validation import require_at_least, require_choice, require_in_range

log = logging.getLogger(__name__)

HIST_BINS = 20
# Symmetric threshold sweep q: tau_s = q, tau_p = 1 - q (the default pair is q = 1/3).
SWEEP: tuple[float, ...] = (0.1, 0.2, 0.25, 0.3, 1 / 3, 0.4, 0.45)
ROW_INT_COLUMNS = ("index", "label", "target", "type", "steps", "success")
ROW_FLOAT_COLUMNS = ("delta_true", "delta_target", "promotion", "suppression", "r", "residual")
_FIG_META = ("index", "label", "target", "type", "channels", "height", "width")
_TYPE_COLOURS = ("tab:blue", "tab:green", "tab:red", "tab:gray")


class PSE(Analysis):
    """Promotion-suppression attribution, group scores and image types over a dataset.

    Args:
        method: 'ig' (integrated gradients x -> x_adv, midpoint rule) or 'grad'
            (grad x delta, first order).
        steps: integration steps (ig).
        max_steps: a sample whose completeness residual exceeds ``tol`` is refined to
            three times the steps, reusing every gradient already evaluated, while they
            stay <= max_steps (ig): 32 steps reach 96 and 288.
        tol: relative completeness tolerance (ig); 0.01 = 1%.
        tau_s: suppression-dominated when r < tau_s.
        tau_p: promotion-dominated when r > tau_p (tau_s <= tau_p).
        center_logits: attribute per-sample centred logits Z_c - mean_j Z_j (softmax
            ignores a common shift of the logits).
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
        **kwargs: torchmetrics ``Metric`` options (``sync_on_compute``...).
    """

    name = "pse"

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
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.method = require_choice("analysis.method", method, METHODS)
        self.steps = require_at_least("analysis.steps", steps, 1)
        self.max_steps = require_at_least("analysis.max_steps", max_steps, steps)
        self.tol = require_in_range("analysis.tol", tol, 0.0, 1.0, low_open=True)
        self.tau_s = require_in_range("analysis.tau_s", tau_s, 0.0, 1.0)
        self.tau_p = require_in_range("analysis.tau_p", tau_p, 0.0, 1.0)
        if self.tau_s > self.tau_p:
            raise ValueError(
                f"analysis.tau_s must be <= analysis.tau_p, got {tau_s} > {tau_p}; "
                "the defaults are 0.333 and 0.667"
            )
        for key, flag in (
            ("center_logits", center_logits),
            ("successful_only", successful_only),
            ("channels_last", channels_last),
        ):
            if not isinstance(flag, bool):
                raise ValueError(f"analysis.{key} must be true or false, got {flag!r}")
        self.center_logits = center_logits
        self.successful_only = successful_only
        self.channels_last = channels_last
        self.group_size = require_at_least("analysis.group_size", group_size, 1)
        self.chunk_size = require_at_least("analysis.chunk_size", chunk_size, 1)
        self.max_rows = require_at_least("analysis.max_rows", max_rows, 0)
        self.max_figures = require_at_least("analysis.max_figures", max_figures, 0)
        self._samples: dict[str, Any] | None = None

        def counter(*shape: int) -> Tensor:
            return torch.zeros(shape, dtype=torch.long)

        def accumulator(*shape: int) -> Tensor:
            return torch.zeros(shape, dtype=torch.float64)

        self.add_state("n_seen", counter(), dist_reduce_fx="sum")
        self.add_state("type_counts", counter(len(PSE_TYPES)), dist_reduce_fx="sum")
        self.add_state("group_type_counts", counter(len(PSE_TYPES)), dist_reduce_fx="sum")
        self.add_state("r_hist", counter(HIST_BINS), dist_reduce_fx="sum")
        self.add_state("sweep_counts", counter(len(SWEEP), 3), dist_reduce_fx="sum")
        # promotion share, suppression share, counter share, over images with P + S > 0
        self.add_state("share_sums", accumulator(3), dist_reduce_fx="sum")
        self.add_state("share_count", counter(), dist_reduce_fx="sum")
        self.add_state("r_sum", accumulator(), dist_reduce_fx="sum")
        self.add_state("residual_sum", accumulator(), dist_reduce_fx="sum")
        self.add_state("residual_max", accumulator(), dist_reduce_fx="max")
        self.add_state("steps_sum", counter(), dist_reduce_fx="sum")
        # Bounded samples, flat 1-D in one dtype so ranks without rows still gather cleanly.
        for state in (
            "row_ints",
            "row_floats",
            "fig_meta",
            "fig_r",
            "fig_x",
            "fig_delta",
            "fig_promotion",
            "fig_suppression",
        ):
            self.add_state(state, [], dist_reduce_fx="cat")

    # -- update ---------------------------------------------------------------------------

    def update(self, model: nn.Module, batch: AdversarialBatch) -> None:
        """Attribute, type and tally one adversarial batch (needs grad mode, not inference)."""
        self.n_seen += len(batch.y)
        keep = batch.success.bool() if self.successful_only else torch.ones_like(batch.y).bool()
        sel = keep.nonzero().flatten()
        if len(sel) == 0:
            return
        x, x_adv, y, target = batch.x[sel], batch.x_adv[sel], batch.y[sel], batch.target[sel]
        index = batch.index[sel]
        attr = pse_attributions(
            model,
            x,
            x_adv,
            y,
            target,
            method=self.method,
            steps=self.steps,
            max_steps=self.max_steps,
            tol=self.tol,
            center=self.center_logits,
            chunk_size=self.chunk_size,
            channels_last=self.channels_last,
            logits_clean=batch.logits_clean[sel],
            logits_adv=batch.logits_adv[sel],
        )
        r, kind = pse_type(attr.delta_true, attr.delta_target, self.tau_s, self.tau_p)
        totals = attribution_totals(attr.attr_true, attr.attr_target).double()
        self._tally_images(r, kind, totals, attr.residual, attr.steps)
        self._tally_groups(attr.attr_true, attr.attr_target, batch, sel)
        self._keep_rows(index, y, target, kind, attr, totals, r, batch.success[sel])
        self._keep_figures(index, y, target, kind, r, x, x_adv, attr)

    def _tally_images(
        self, r: Tensor, kind: Tensor, totals: Tensor, residual: Tensor, steps: Tensor
    ) -> None:
        dev = self.type_counts.device
        self.type_counts += torch.bincount(kind, minlength=len(PSE_TYPES)).to(dev)
        defined = ~torch.isnan(r)
        r_def = r[defined].double()
        bins = (r_def * HIST_BINS).long().clamp(0, HIST_BINS - 1)  # r = 1 joins the last bin
        self.r_hist += torch.bincount(bins, minlength=HIST_BINS).to(dev)
        self.r_sum += r_def.sum().to(dev)
        for i, q in enumerate(SWEEP):
            swept = classify(r_def, q, 1.0 - q)
            self.sweep_counts[i] += torch.bincount(swept, minlength=3)[:3].to(dev)
        promotion, suppression, counter = totals[:, 0], totals[:, 1], totals[:, 2:].sum(1)
        gross = promotion + suppression
        has = gross > 0
        shares = torch.stack(
            [promotion / gross, suppression / gross, counter / (gross + counter)], dim=1
        )[has]
        self.share_sums += shares.sum(0).to(dev)
        self.share_count += int(has.sum())
        self.residual_sum += residual.double().sum().to(dev)
        self.residual_max = torch.maximum(self.residual_max, residual.double().max().to(dev))
        self.steps_sum += steps.sum().to(dev)

    def _tally_groups(
        self, attr_true: Tensor, attr_target: Tensor, batch: AdversarialBatch, sel: Tensor
    ) -> None:
        _, _, height, width = attr_true.shape
        group_map = batch.extras.get("group_map")
        if group_map is None:
            group_map = grid_group_map(height, width, self.group_size, attr_true.device)
        elif group_map.dim() == 3:
            group_map = group_map[sel]
        promotion, suppression = group_scores(attr_true, attr_target, group_map)
        kind = classify(pse_ratio(promotion, suppression), self.tau_s, self.tau_p).flatten()
        dev = self.group_type_counts.device
        self.group_type_counts += torch.bincount(kind, minlength=len(PSE_TYPES)).to(dev)

    def _keep_rows(
        self,
        index: Tensor,
        y: Tensor,
        target: Tensor,
        kind: Tensor,
        attr: Any,
        totals: Tensor,
        r: Tensor,
        success: Tensor,
    ) -> None:
        rows = index < self.max_rows
        ints = torch.stack([index, y, target, kind, attr.steps, success.long()], dim=1)[rows]
        floats = torch.stack(
            [
                attr.delta_true.double(),
                attr.delta_target.double(),
                totals[:, 0],
                totals[:, 1],
                r.double(),
                attr.residual.double(),
            ],
            dim=1,
        )[rows]
        self.row_ints.append(self._sample(ints))
        self.row_floats.append(self._sample(floats))

    def _keep_figures(
        self,
        index: Tensor,
        y: Tensor,
        target: Tensor,
        kind: Tensor,
        r: Tensor,
        x: Tensor,
        x_adv: Tensor,
        attr: Any,
    ) -> None:
        figs = (index < self.max_figures).nonzero().flatten()
        if len(figs) == 0:
            return
        n, c, h, w = len(figs), *x.shape[1:]
        shape = torch.tensor([c, h, w], device=x.device).expand(n, 3)
        meta = torch.cat([torch.stack([index, y, target, kind], 1)[figs], shape], dim=1)
        promotion, suppression = promotion_suppression_maps(
            attr.attr_true[figs], attr.attr_target[figs]
        )
        self.fig_meta.append(self._sample(meta))
        self.fig_r.append(self._sample(r[figs]))
        self.fig_x.append(self._sample(x[figs]))
        self.fig_delta.append(self._sample((x_adv - x)[figs]))
        self.fig_promotion.append(self._sample(promotion))
        self.fig_suppression.append(self._sample(suppression))

    def _sample(self, values: Tensor) -> Tensor:
        """A bounded-sample entry: flat, on the metric's device, in the metric's dtype.

        One dtype for every ``cat`` state (ids included; exact below 2**24) matches the
        empty tensor torchmetrics substitutes for a rank that kept nothing, so the gather
        of a rank without rows meets the same dtype on every rank.
        """
        return values.detach().flatten().to(device=self.device, dtype=self.dtype)

    # -- compute --------------------------------------------------------------------------

    def _compute_legacy(self) -> dict[str, Tensor]:
        """Scalar metrics over every analysed image (called on every rank: it syncs).

        Keys: ``frac_<type>`` for the four types (over analysed images, summing to 1);
        ``n_images`` analysed and ``analysed_fraction`` of those seen; mean promotion and
        suppression shares P/(P+S), S/(P+S) of the gross pixel attributions and the
        ``counter_share`` (attribution that works against the attack); ``mean_r`` over
        images with a defined ratio; completeness ``residual_mean``/``residual_max`` and
        ``steps_mean``; ``group_frac_<type>`` over groups with a defined type and
        ``group_frac_active``, the fraction of groups that have one.
        """
        counts = self.type_counts.double()
        n_images = counts.sum()
        out: dict[str, Tensor] = {
            f"frac_{name}": counts[i] / n_images.clamp_min(1) for i, name in enumerate(PSE_TYPES)
        }
        out["n_images"] = n_images
        out["analysed_fraction"] = n_images / self.n_seen.double().clamp_min(1)
        share_mean = self.share_sums / self.share_count.double().clamp_min(1)
        out["promotion_share"], out["suppression_share"], out["counter_share"] = share_mean
        defined = n_images - counts[NONE]
        out["mean_r"] = (
            self.r_sum / defined.clamp_min(1) if defined > 0 else counts.new_tensor(math.nan)
        )
        out["residual_mean"] = self.residual_sum / n_images.clamp_min(1)
        out["residual_max"] = self.residual_max.clone()
        out["steps_mean"] = self.steps_sum.double() / n_images.clamp_min(1)
        groups = self.group_type_counts.double()
        groups_defined = groups[:NONE].sum()
        for i, name in enumerate(PSE_TYPES[:NONE]):
            out[f"group_frac_{name}"] = groups[i] / groups_defined.clamp_min(1)
        out["group_frac_active"] = groups_defined / groups.sum().clamp_min(1)
        self._samples = self._gather_samples()
        return out

    def _gather_samples(self) -> dict[str, Any]:
        """The synchronised bounded samples, sorted by dataset index, duplicates dropped."""
        ints = _flat_state(self.row_ints).round().long().view(-1, len(ROW_INT_COLUMNS))
        floats = _flat_state(self.row_floats).view(-1, len(ROW_FLOAT_COLUMNS))
        order = _unique_by_index(ints[:, 0])
        meta = _flat_state(self.fig_meta).round().long().view(-1, len(_FIG_META))
        figures: list[dict[str, Any]] = []
        offsets = {"x": 0, "delta": 0, "map": 0}
        fig_x, fig_delta = _flat_state(self.fig_x), _flat_state(self.fig_delta)
        fig_p, fig_s = _flat_state(self.fig_promotion), _flat_state(self.fig_suppression)
        fig_r = _flat_state(self.fig_r)
        for j, row in enumerate(meta.tolist()):  # at most max_figures entries
            index, label, target, kind, c, h, w = row
            image, pixels = c * h * w, h * w
            figures.append(
                {
                    "index": index,
                    "label": label,
                    "target": target,
                    "type": kind,
                    "r": float(fig_r[j]),
                    "x": fig_x[offsets["x"] : offsets["x"] + image].view(c, h, w),
                    "delta": fig_delta[offsets["delta"] : offsets["delta"] + image].view(c, h, w),
                    "promotion": fig_p[offsets["map"] : offsets["map"] + pixels].view(h, w),
                    "suppression": fig_s[offsets["map"] : offsets["map"] + pixels].view(h, w),
                }
            )
            offsets["x"] += image
            offsets["delta"] += image
            offsets["map"] += pixels
        seen: set[int] = set()
        figures = sorted(figures, key=lambda f: f["index"])
        figures = [f for f in figures if not (f["index"] in seen or seen.add(f["index"]))]
        return {
            "row_ints": ints[order].cpu(),
            "row_floats": floats[order].cpu(),
            "figures": [
                {k: v.cpu() if isinstance(v, Tensor) else v for k, v in f.items()} for f in figures
            ],
            "r_hist": self.r_hist.cpu().clone(),
            "sweep_counts": self.sweep_counts.cpu().clone(),
        }

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
        """Figures (examples, histogram of r, promotion vs suppression) and the image table.

        Rank zero only, after ``compute`` (which gathered the bounded samples).
        """
        if self._samples is None:
            raise RuntimeError(
                "PSE.report needs the samples gathered by compute(); call "
                "compute() on every rank first"
            )
        samples = self._samples
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        figures = []
        if samples["figures"]:
            figures.append(_plot_examples(samples["figures"], out_dir / "pse_examples.png"))
        figures.append(
            _plot_ratio_hist(
                samples["r_hist"], self.tau_s, self.tau_p, out_dir / "pse_ratio_hist.png"
            )
        )
        if len(samples["row_ints"]):
            figures.append(
                _plot_scatter(
                    samples["row_ints"],
                    samples["row_floats"],
                    self.tau_s,
                    self.tau_p,
                    out_dir / "pse_scatter.png",
                )
            )
        columns = (
            list(ROW_INT_COLUMNS[:3]) + ["type"] + list(ROW_FLOAT_COLUMNS) + ["steps", "success"]
        )
        rows = [
            [*ints[:3], PSE_TYPES[ints[3]], *[_clean(v) for v in floats], ints[4], bool(ints[5])]
            for ints, floats in zip(
                samples["row_ints"].tolist(), samples["row_floats"].tolist(), strict=True
            )
        ]
        return ReportSection(
            title="Promotion-suppression effect (PSE)",
            markdown=self._markdown(result, samples["sweep_counts"]),
            figures=figures,
            tables={"pse_images": (columns, rows)},
        )

    def _markdown(self, result: dict[str, Any], sweep: Tensor) -> str:
        def num(key: str) -> float:
            value = result[key]
            return float(value.item() if isinstance(value, Tensor) else value)

        lines = [
            f"Method: {self.method}"
            + (
                f" ({self.steps} steps, tripled up to {self.max_steps} when the "
                f"completeness residual exceeds {self.tol:.0%})"
                if self.method == "ig"
                else ""
            )
            + f"; thresholds tau_s={self.tau_s:.3g}, tau_p={self.tau_p:.3g}"
            + ("; centred logits" if self.center_logits else "")
            + f"; {int(num('n_images'))} images"
            + (" (successful attacks only)." if self.successful_only else "."),
            "",
            "| type | fraction |",
            "|---|---|",
            *[f"| {name} | {num('frac_' + name):.3f} |" for name in PSE_TYPES],
            "",
            f"Mean promotion share {num('promotion_share'):.3f}, suppression share "
            f"{num('suppression_share'):.3f}, counter-effects {num('counter_share'):.3f}; "
            f"completeness residual mean {num('residual_mean'):.2e}, "
            f"max {num('residual_max'):.2e}.",
            "",
            "Threshold sweep (tau_s = q, tau_p = 1 - q; fractions of images with a defined r):",
            "",
            "| q | suppression | balanced | promotion |",
            "|---|---|---|---|",
        ]
        for q, counts in zip(SWEEP, sweep.double(), strict=True):
            frac = counts / counts.sum().clamp_min(1)
            lines.append(f"| {q:.3g} | " + " | ".join(f"{v:.3f}" for v in frac.tolist()) + " |")
        return "\n".join(lines)


# -- helpers -------------------------------------------------------------------------------


def _flat_state(state: list[Tensor] | Tensor) -> Tensor:
    if isinstance(state, list) and not state:
        return torch.zeros(0)
    return dim_zero_cat(state).flatten()


def _unique_by_index(index: Tensor) -> Tensor:
    """Positions that sort rows by dataset index, keeping the first of duplicates."""
    order = torch.argsort(index, stable=True)
    sorted_index = index[order]
    first = torch.ones_like(sorted_index, dtype=torch.bool)
    first[1:] = sorted_index[1:] != sorted_index[:-1]
    return order[first]


def _clean(value: float) -> float | None:
    return None if math.isnan(value) else value


def _new_figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure  # OO API: no pyplot state, no GUI backend

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _show_image(ax: Any, image: Tensor) -> None:
    image = image.clamp(0, 1)
    if image.shape[0] == 1:
        ax.imshow(image[0].numpy(), cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(image[:3].permute(1, 2, 0).numpy())
    ax.set_axis_off()


def _plot_examples(figures: list[dict[str, Any]], path: Path) -> Path:
    """Per example: image, perturbation (scaled to its own max), promotion, suppression.

    Promotion and suppression share one colour scale per example, so their areas compare.
    """
    fig = _new_figure(10, 2.4 * len(figures))
    axes = fig.subplots(len(figures), 4, squeeze=False)
    for row, f in zip(axes, figures, strict=True):
        _show_image(row[0], f["x"])
        row[0].set_title(f"#{f['index']}: {f['label']} -> {f['target']}", fontsize=9)
        delta = f["delta"]
        scale = float(delta.abs().max()) or 1.0
        _show_image(row[1], 0.5 + delta / (2 * scale))
        row[1].set_title(f"perturbation (max {scale:.3g})", fontsize=9)
        vmax = max(float(f["promotion"].max()), float(f["suppression"].max()), 1e-12)
        for ax, key, cmap in ((row[2], "promotion", "Reds"), (row[3], "suppression", "Blues")):
            im = ax.imshow(f[key].numpy(), cmap=cmap, vmin=0, vmax=vmax)
            ax.set_axis_off()
            fig.colorbar(im, ax=ax, fraction=0.046)
        r = "undefined" if math.isnan(f["r"]) else f"{f['r']:.2f}"
        row[2].set_title(f"promotion ({PSE_TYPES[f['type']]}, r={r})", fontsize=9)
        row[3].set_title("suppression", fontsize=9)
    fig.savefig(path)
    return path


def _plot_ratio_hist(hist: Tensor, tau_s: float, tau_p: float, path: Path) -> Path:
    fig = _new_figure(5, 3.2)
    ax = fig.subplots()
    edges = torch.linspace(0, 1, HIST_BINS + 1)
    ax.bar(
        edges[:-1].numpy(),
        hist.numpy(),
        width=1 / HIST_BINS,
        align="edge",
        color="0.6",
        edgecolor="k",
    )
    for tau, label in ((tau_s, "tau_s"), (tau_p, "tau_p")):
        ax.axvline(tau, color="tab:red", linestyle="--", label=f"{label}={tau:.3g}")
    ax.set_xlabel("PSE ratio r = [dZ_t]+ / ([dZ_t]+ + [-dZ_t0]+)")
    ax.set_ylabel("images")
    ax.set_xlim(0, 1)
    ax.legend(fontsize=8)
    fig.savefig(path)
    return path


def _plot_scatter(ints: Tensor, floats: Tensor, tau_s: float, tau_p: float, path: Path) -> Path:
    """Left: measured suppression -dZ_t0 vs promotion dZ_t, with the threshold rays.
    Right: gross pixel attributions S vs P. Both coloured by the image type."""
    fig = _new_figure(10, 4)
    left, right = fig.subplots(1, 2)
    kind = ints[:, 3]
    panels = (
        (
            left,
            -floats[:, 0],
            floats[:, 1],
            "suppression -dZ_t0 (measured)",
            "promotion dZ_t (measured)",
        ),
        (
            right,
            floats[:, 3],
            floats[:, 2],
            "suppression S = sum [-a^t0]+",
            "promotion P = sum [a^t]+",
        ),
    )
    left.set_title("measured logit changes", fontsize=9)
    right.set_title("gross pixel attributions", fontsize=9)
    for ax, xs, ys, xlabel, ylabel in panels:
        for k, name in enumerate(PSE_TYPES):
            m = kind == k
            if m.any():
                ax.scatter(xs[m].numpy(), ys[m].numpy(), s=10, c=_TYPE_COLOURS[k], label=name)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
    x_top = float(max(floats[:, 0].neg().max(), 1e-12))
    y_top = float(max(floats[:, 1].max(), 1e-12))
    for tau in (tau_s, tau_p):
        if 0 < tau < 1:  # r = tau is the ray promotion = tau / (1 - tau) * suppression
            slope = tau / (1 - tau)
            end = min(x_top, y_top / slope)  # stay inside the data's range
            left.plot([0, end], [0, slope * end], color="k", linestyle="--", linewidth=0.8)
            left.annotate(f"r={tau:.3g}", (end, slope * end), fontsize=8)
    left.legend(fontsize=8)
    fig.savefig(path)
    return path
