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
    RankSample,
    enrichment,
    holm,
    mann_whitney_u,
    partial_spearman,
    percentile_ci,
    permutation_pvalue,
    rho_difference,
    spearman,
    unit_bootstrap_ci,
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
    min_category_units: int = 10
    #: Replicates of the trained − random difference's bootstrap (at least ``bootstrap``):
    #: its p can reach 2/2001 ≈ 0.001, small enough to survive Holm over the Findings.
    difference_replicates: int = 2000


@dataclass
class LayerUnits:
    """Per-unit tensors (K,) of one layer: the report's scatter and unit table.

    Attributes:
        threshold: T_k; iou, concept: best IoU and its concept id in [1, C];
        interpretable: iou > the threshold; s, s_plus, s_minus, shift, sigma, mean:
        sensitivity and the clean mean activation
        (:func:`~pse_lightning.analysis.dissection.sensitivity.sensitivity_from_sums`);
        head: π_k, ς_k and their signed means at the feature layer of a GAP + linear
        head (empty elsewhere); iou_non_class: the best IoU over the concepts of the
        categories that are not class labels (``ConceptTable.class_categories``; = iou when
        there are none); preferred_class, target_share: c_k and f_k of
        :func:`~pse_lightning.analysis.dissection.sensitivity.class_target_share`.
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
    mean: Tensor
    head: dict[str, Tensor]
    iou_non_class: Tensor
    preferred_class: Tensor
    target_share: Tensor


def _scalar(value: float) -> Tensor:
    return torch.as_tensor(value, dtype=torch.float64)


def non_class_iou(layer: LayerDissection, table: ConceptTable) -> tuple[Tensor, Tensor]:
    """Best IoU over the concepts that are not class labels: (K,) and (B', K) per probe
    replicate; the best IoU itself when the dataset names no class categories, NaN when
    every category is one."""
    keep = ~table.class_mask
    if not bool(keep.any()):
        nan = torch.full_like(layer.best_iou, math.nan)
        return nan, torch.full_like(layer.boot_best_iou, math.nan)
    per_category = category_iou(layer.iou, table.concept_category, len(table.categories))
    return per_category[:, keep].amax(dim=1), layer.boot_best_iou_outside(~keep)


def layer_units(
    layer: LayerDissection,
    sens: dict[str, Tensor],
    head: bool,
    iou_threshold: float,
    table: ConceptTable,
) -> LayerUnits:
    """The unit tensors of one layer (replicate 0 of the sensitivity: all images once)."""
    k = len(layer.best_iou)
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
        mean=sens["mean"][0],
        head={key: sens[key][0] for key in HEAD_TERMS} if head else {},
        iou_non_class=non_class_iou(layer, table)[0],
        preferred_class=sens.get("preferred_class", torch.zeros(k, dtype=torch.long)),
        target_share=sens["target_share"][0]
        if "target_share" in sens
        else torch.full((k,), math.nan, dtype=torch.float64),
    )


def correlation_scalars(
    units: LayerUnits, boot_s: Tensor, settings: SummarySettings, boot_iou: Tensor | None = None
) -> dict[str, Tensor]:
    """Spearman's rho(s, IoU) with its permutation p and its intervals (§7.2, §7.3).

    ``spearman_ci_*`` is the two-way bootstrap: units, together with evaluation images
    (``boot_s``) and probe images (``boot_iou``, (B', K) best IoUs), units only when there
    are no image replicates; ``spearman_ci_units_*`` resamples units only;
    ``spearman_ci_images_*`` evaluation images only (units fixed: the noise of s_k's
    estimate alone, not a CI of rho as a property of the layer).
    """
    gen = torch.Generator().manual_seed(settings.seed)
    unit_gen = torch.Generator().manual_seed(settings.seed + 1)
    s, iou = units.s, units.iou
    out = {
        "spearman_rho": spearman(s, iou),
        "spearman_p": permutation_pvalue(s, iou, settings.permutations, gen),
    }
    replicates = max(settings.bootstrap, 1000)
    low, high = unit_bootstrap_ci(s, iou, replicates, unit_gen)
    out["spearman_ci_units_low"], out["spearman_ci_units_high"] = low, high
    if settings.bootstrap:
        probe = boot_iou if boot_iou is not None and len(boot_iou) else None
        two_way = unit_bootstrap_ci(s, iou, 0, unit_gen, s_images=boot_s, iou_probe=probe)
        out["spearman_ci_low"], out["spearman_ci_high"] = two_way
        images = torch.stack([spearman(row, iou) for row in boot_s])
        out["spearman_ci_images_low"], out["spearman_ci_images_high"] = percentile_ci(images)
    else:
        out["spearman_ci_low"], out["spearman_ci_high"] = low.clone(), high.clone()
    return out


def layer_scalars(
    units: LayerUnits,
    boot_s: Tensor,
    table: ConceptTable,
    settings: SummarySettings,
    boot_iou: Tensor | None = None,
) -> dict[str, Tensor]:
    """The logged scalars of one layer.

    Args:
        units: the layer's :class:`LayerUnits`.
        boot_s: (B, K) s_k of each Poisson-bootstrap replicate over evaluation images.
        table: the probe's concepts and categories.
        boot_iou: (B', K) best IoU of each Poisson-bootstrap replicate over probe images.
        settings: the statistics' settings.
    """
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
        **correlation_scalars(units, boot_s, settings, boot_iou),
        "mannwhitney_u": u_stat,
        "mannwhitney_p": u_p,
        "enrichment_observed": _scalar(observed),
        "enrichment_expected": _scalar(expected),
        "enrichment_p": _scalar(enrich_p),
    }
    out.update(partial_scalars(units, settings))
    out.update(class_control_scalars(units, table, settings))
    out.update(category_scalars(units, table, settings.min_category_units))
    return out


def partial_scalars(units: LayerUnits, settings: SummarySettings) -> dict[str, Tensor]:
    """Partial Spearman of (s, IoU) controlling σ_k, and controlling the clean mean ā_k:
    s_k is divided by σ_k, and both may track IoU through the unit's scale (§7.8)."""
    gen = torch.Generator().manual_seed(settings.seed + 2)
    out = {}
    for name, control in (("sigma", units.sigma), ("mean", units.mean)):
        rho, p = partial_spearman(units.s, units.iou, control, settings.permutations, gen)
        out[f"partial_{name}_rho"], out[f"partial_{name}_p"] = rho, p
    return out


def class_control_scalars(
    units: LayerUnits, table: ConceptTable, settings: SummarySettings
) -> dict[str, Tensor]:
    """ρ(s, IoU) with class selectivity controlled (§4.6): on the concepts that are not
    class labels (``non_class/*``: interpretable units, ρ and permutation p; only when the
    dataset names class categories), and partialled on the target share f_k
    (``partial_target_rho/_p``, block permutation of §7.8); ``target_share_rho`` = ρ(s, f)."""
    gen = torch.Generator().manual_seed(settings.seed + 4)
    s, f = units.s, units.target_share
    out: dict[str, Tensor] = {"target_share_rho": spearman(s, f)}
    if table.class_categories:
        iou = units.iou_non_class
        out["non_class/interpretable"] = _scalar(int((iou > settings.iou_threshold).sum()))
        out["non_class/spearman_rho"] = spearman(s, iou)
        out["non_class/spearman_p"] = permutation_pvalue(s, iou, settings.permutations, gen)
    rho, p = partial_spearman(s, units.iou, f, settings.permutations, gen)
    out["partial_target_rho"], out["partial_target_p"] = rho, p
    return out


def category_scalars(units: LayerUnits, table: ConceptTable, min_units: int) -> dict[str, Tensor]:
    """Per concept category g: interpretable units of g, their mean s, and (only when
    there are at least ``min_units`` of them) a Mann–Whitney test of their s against
    the layer's other units. The rule keeps tests that have power: with 10 units against
    ~120 others the test detects a one-SD shift of s about 80% of the time at α = 0.05
    (simulated), with 5 about half the time (§7.4). A category that holds every
    interpretable unit is not tested: its test would be the layer's ``mannwhitney_p``
    again, the same p twice in one Holm family."""
    s, interp = units.s, units.interpretable
    unit_category = table.concept_category[units.concept]
    out: dict[str, Tensor] = {}
    for g, category in enumerate(table.categories):
        in_cat = interp & (unit_category == g)
        out[f"{category}/interpretable"] = _scalar(int(in_cat.sum()))
        out[f"{category}/mean_s_interpretable"] = (
            s[in_cat].mean() if bool(in_cat.any()) else _scalar(math.nan)
        )
        duplicate = torch.equal(in_cat, interp)
        if int(in_cat.sum()) >= min_units and bool((~in_cat).any()) and not duplicate:
            u_stat, u_p = mann_whitney_u(s[in_cat], s[~in_cat])
            out[f"{category}/mannwhitney_u"], out[f"{category}/mannwhitney_p"] = u_stat, u_p
    return out


def baseline_scalars(
    layer: LayerDissection,
    sens: dict[str, Tensor],
    table: ConceptTable,
    settings: SummarySettings,
) -> dict[str, Tensor]:
    """The random-weights baseline of one layer: its interpretable units and rho(s, IoU)
    with permutation p and two-way CI, keyed under ``random/`` (§4.7); with class
    categories also its ``non_class/interpretable`` and ``non_class/spearman_rho``, and its
    ``partial_target_rho``."""
    units = layer_units(layer, sens, False, settings.iou_threshold, table)
    correlation = correlation_scalars(units, sens["s"][1:], settings, layer.boot_best_iou)
    keys = ("spearman_rho", "spearman_p", "spearman_ci_low", "spearman_ci_high")
    out = {
        "interpretable": _scalar(int(units.interpretable.sum())),
        "frac_interpretable": _scalar(float(units.interpretable.double().mean())),
        "mean_best_iou": units.iou.mean(),
        "mean_s": units.s.mean(),
        **{k: correlation[k] for k in keys},
    }
    if table.class_categories:
        iou = units.iou_non_class
        out["non_class/interpretable"] = _scalar(int((iou > settings.iou_threshold).sum()))
        out["non_class/spearman_rho"] = spearman(units.s, iou)
    out["partial_target_rho"] = rank_sample(layer, sens, table, "partial_target").rho()
    return {f"random/{k}": v for k, v in out.items()}


#: The trained − random differences (prefix of the keys -> what ρ is): plain, on the
#: concepts that are not class labels, and partialled on the target share f_k.
DIFFERENCES = ("", "non_class/", "partial_target/")


def rank_sample(
    layer: LayerDissection, sens: dict[str, Tensor], table: ConceptTable, kind: str
) -> RankSample:
    """One network's units for the difference ``kind`` (a :data:`DIFFERENCES` entry without
    its slash): s with its evaluation-image replicates, the (non-class) best IoU with its
    probe replicates, and for ``partial_target`` the target share f_k with its replicates."""
    s, boot_s = sens["s"][0], sens["s"][1:]
    if kind == "non_class":
        iou, boot_iou = non_class_iou(layer, table)
    else:
        iou, boot_iou = layer.best_iou, layer.boot_best_iou
    z = z_rows = None
    if kind == "partial_target":
        z, z_rows = sens["target_share"][0], sens["target_share"][1:]
    return RankSample(s, iou, z, boot_s, boot_iou, z_rows)


def difference_scalars(
    trained: tuple[LayerDissection, dict[str, Tensor]],
    random: tuple[LayerDissection, dict[str, Tensor]],
    table: ConceptTable,
    settings: SummarySettings,
) -> dict[str, Tensor]:
    """Claim 3's test (§7.13): ρ of the trained network minus ρ of the random-weights
    baseline, for each of :data:`DIFFERENCES`, with interval and p from one two-way
    bootstrap (:func:`~pse_lightning.analysis.dissection.statistics.rho_difference`):
    ``<prefix>delta_rho``, ``…_ci_low``, ``…_ci_high``, ``…_p``."""
    replicates = max(settings.bootstrap, settings.difference_replicates)
    out: dict[str, Tensor] = {}
    for prefix in DIFFERENCES:
        if prefix == "non_class/" and not table.class_categories:
            continue
        kind = prefix.rstrip("/")
        gen = torch.Generator().manual_seed(settings.seed + 3)
        a, b = (rank_sample(layer, sens, table, kind) for layer, sens in (trained, random))
        found = rho_difference(a, b, replicates, gen)
        out.update({f"{prefix}{k}": v for k, v in found.items()})
    return out


def holm_families(scalars: dict[str, Tensor]) -> dict[str, Tensor]:
    """``<key>_holm`` for the dissection section's two Holm families (§7.7).

    - the trained network's tests: every ``*_p`` of a layer except the random-weights
      baseline's and the trained − random differences;
    - the random-weights baseline's ``random/*_p``, its own family.

    The differences' ``*delta_rho_p`` are the Findings' tests: Holm-adjusted there, over
    the Findings table, and printed raw in the section.
    """
    trained, random = {}, {}
    for key, value in scalars.items():
        if not key.endswith("_p") or key.endswith("delta_rho_p"):
            continue
        (random if "/random/" in key else trained)[key] = value
    adjusted = {**holm(trained), **holm(random)}
    return {f"{k}_holm": v for k, v in adjusted.items()}


def summarise_layer(
    layer: LayerDissection,
    sens: dict[str, Tensor],
    table: ConceptTable,
    head: bool,
    settings: SummarySettings,
) -> tuple[dict[str, Tensor], LayerUnits]:
    """(scalars, unit tensors) of one layer from its probe result and sensitivity."""
    units = layer_units(layer, sens, head, settings.iou_threshold, table)
    scalars = layer_scalars(units, sens["s"][1:], table, settings, layer.boot_best_iou)
    return scalars, units
