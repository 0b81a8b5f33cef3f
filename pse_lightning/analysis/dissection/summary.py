"""One layer's result: sensitivity against interpretability (docs/METHODS.md §4.3, §7).

Pure functions from the reduced probe result and sensitivity sums to the logged scalars
and the per-unit tensors the report draws.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from pse_lightning.analysis.dissection.probe import ConceptTable, LayerDissection
from pse_lightning.analysis.dissection.statistics import (
    enrichment,
    mann_whitney_u,
    percentile_ci,
    permutation_pvalue,
    spearman,
)
from pse_lightning.analysis.dissection.tally import category_iou

#: Exact unit-level PSE terms, present at the feature layer of a GAP + linear net only.
HEAD_TERMS = ("promotion", "suppression", "promotion_signed", "suppression_signed")


@dataclass(frozen=True)
class SummarySettings:
    """The constructor settings the statistics read (see ``Dissection``)."""

    iou_threshold: float
    permutations: int
    bootstrap: int
    enrichment_top: float
    seed: int


@dataclass
class LayerUnits:
    """Per-unit tensors (K,) of one layer: the report's scatter and unit table.

    Attributes:
        threshold: T_k; iou, concept: best IoU and its concept id in [1, C];
        interpretable: iou > the threshold; s, s_plus, s_minus, shift, sigma: sensitivity
        (:func:`~pse_lightning.analysis.dissection.sensitivity.sensitivity_from_sums`);
        head: π_k, ς_k and their signed means at the feature layer of a GAP + linear
        head (empty elsewhere).
    """

    threshold: Tensor
    iou: Tensor
    concept: Tensor
    interpretable: Tensor
    s: Tensor
    s_plus: Tensor
    s_minus: Tensor
    shift: Tensor
    sigma: Tensor
    head: dict[str, Tensor]


def _scalar(value: float) -> Tensor:
    return torch.as_tensor(value, dtype=torch.float64)


def layer_units(
    layer: LayerDissection, sens: dict[str, Tensor], head: bool, iou_threshold: float
) -> LayerUnits:
    """The unit tensors of one layer (replicate 0 of the sensitivity: all images once)."""
    return LayerUnits(
        threshold=layer.thresholds.double(),
        iou=layer.best_iou,
        concept=layer.best_concept,
        interpretable=layer.best_iou > iou_threshold,
        s=sens["s"][0],
        s_plus=sens["s_plus"][0],
        s_minus=sens["s_minus"][0],
        shift=sens["shift"][0],
        sigma=sens["sigma"][0],
        head={key: sens[key][0] for key in HEAD_TERMS} if head else {},
    )


def layer_scalars(
    units: LayerUnits,
    boot_s: Tensor,
    category_ious: Tensor,
    table: ConceptTable,
    settings: SummarySettings,
) -> dict[str, Tensor]:
    """The logged scalars of one layer.

    Args:
        units: the layer's :class:`LayerUnits`.
        boot_s: (B, K) s_k of each Poisson-bootstrap replicate over images.
        category_ious: (K, G) each unit's best IoU within each concept category.
        table: the probe's concepts and categories.
        settings: the statistics' settings.
    """
    gen = torch.Generator().manual_seed(settings.seed)
    s, iou, interp = units.s, units.iou, units.interpretable
    u_stat, u_p = mann_whitney_u(s[interp], s[~interp])
    observed, expected, enrich_p = enrichment(s, interp, settings.enrichment_top)
    out = {
        "units": _scalar(len(s)),
        "interpretable": _scalar(int(interp.sum())),
        "frac_interpretable": _scalar(float(interp.double().mean())),
        "mean_best_iou": iou.mean(),
        "mean_s": s.mean(),
        "mean_s_plus": units.s_plus.mean(),
        "mean_s_minus": units.s_minus.mean(),
        "spearman_rho": spearman(s, iou),
        "spearman_p": permutation_pvalue(s, iou, settings.permutations, gen),
        "mannwhitney_u": u_stat,
        "mannwhitney_p": u_p,
        "enrichment_observed": _scalar(observed),
        "enrichment_expected": _scalar(expected),
        "enrichment_p": _scalar(enrich_p),
    }
    if settings.bootstrap:
        boot = torch.stack([spearman(row, iou) for row in boot_s])
        out["spearman_ci_low"], out["spearman_ci_high"] = percentile_ci(boot)
    unit_category = table.concept_category[units.concept]
    for g, category in enumerate(table.categories):
        in_cat = interp & (unit_category == g)
        out[f"{category}/interpretable"] = _scalar(int(in_cat.sum()))
        out[f"{category}/mean_s_interpretable"] = (
            s[in_cat].mean() if bool(in_cat.any()) else _scalar(math.nan)
        )
        out[f"{category}/spearman_rho"] = spearman(s, category_ious[:, g])
        out[f"{category}/spearman_p"] = permutation_pvalue(
            s, category_ious[:, g], settings.permutations, gen
        )
    return out


def summarise_layer(
    layer: LayerDissection,
    sens: dict[str, Tensor],
    table: ConceptTable,
    head: bool,
    settings: SummarySettings,
) -> tuple[dict[str, Tensor], LayerUnits]:
    """(scalars, unit tensors) of one layer from its probe result and sensitivity."""
    units = layer_units(layer, sens, head, settings.iou_threshold)
    per_category = category_iou(layer.iou, table.concept_category, len(table.categories))
    scalars = layer_scalars(units, sens["s"][1:], per_category, table, settings)
    return scalars, units
