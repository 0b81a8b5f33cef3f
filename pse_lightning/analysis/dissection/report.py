"""The dissection section of the report, built from ``compute()``'s result alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from pse_lightning.analysis.base import AnalysisResult
from pse_lightning.analysis.dissection.figures import (
    interpretable_units_figure,
    iou_vs_sensitivity_figure,
    sensitive_units_figure,
    top_images_figure,
)
from pse_lightning.analysis.dissection.probe import ConceptTable
from pse_lightning.analysis.dissection.summary import LayerUnits
from pse_lightning.core.report import ReportSection

UNIT_COLUMNS = [
    "layer",
    "unit",
    "concept",
    "category",
    "iou",
    "interpretable",
    "s_plus",
    "s_minus",
    "s",
    "threshold",
    "promotion",
    "suppression",
]


def report_section(
    result: AnalysisResult,
    out_dir: Path,
    title: str,
    quantile: float,
    iou_threshold: float,
    min_category_units: int,
) -> ReportSection:
    """Figures (IoU vs sensitivity, interpretable units per category, top images), the
    per-unit W&B table and a markdown summary. Rank zero only; no communication."""
    out_dir.mkdir(parents=True, exist_ok=True)
    units: dict[str, LayerUnits] = result.details["units"]
    table: ConceptTable = result.details["concepts"]
    scalars, layers = result.scalars, list(units)
    section = ReportSection(title=TITLE, captions=captions(iou_threshold, quantile))
    section.figures.append(
        iou_vs_sensitivity_figure(
            units, scalars, table, iou_threshold, out_dir / "dissection_iou_vs_sensitivity.png"
        )
    )
    section.figures.append(
        interpretable_units_figure(
            scalars, layers, table.categories, out_dir / "dissection_interpretable_units.png"
        )
    )
    if result.details["showcase"]:
        section.figures.append(
            top_images_figure(result.details["showcase"], out_dir / "dissection_top_images.png")
        )
    if result.details.get("sensitive"):
        section.figures.append(
            sensitive_units_figure(
                result.details["sensitive"], out_dir / "dissection_sensitive_units.png"
            )
        )
    section.tables["units"] = (list(UNIT_COLUMNS), unit_rows(units, table))
    lines = [
        f"Probe set: {result.details['probe_images']} images; "
        f"q = {quantile}, interpretable when IoU > {iou_threshold}; "
        f"sensitivity over {float(scalars.get('images', 0)):.0f} evaluation images.",
        "",
        *markdown_tables(scalars, layers, table.categories, min_category_units),
    ]
    section.markdown = "\n".join(lines)
    section.key_numbers = key_numbers(scalars, layers)
    section.meaning = meaning(scalars, layers)
    return section


TITLE = "Network dissection"


def captions(iou_threshold: float, quantile: float) -> dict[str, str]:
    """The caption of each dissection figure, by file stem."""
    return {
        "dissection_iou_vs_sensitivity": (
            "One panel per dissected layer, one dot per unit: its attack sensitivity "
            "s_k = E|Δ_k|/σ_k (unitless: the mean change of the unit's average activation in "
            "clean standard deviations) against its best concept IoU; interpretable units "
            f"(IoU > {iou_threshold}, dashed) coloured by their concept's category. Title: "
            "Spearman ρ and its permutation p."
        ),
        "dissection_interpretable_units": (
            "Number of interpretable units per layer (x) and concept category (colour)."
        ),
        "dissection_top_images": (
            "The most interpretable units of each layer (rows) on their top-activating probe "
            f"images: the unit's activation mask (top {quantile:g} quantile, white) and the "
            "mask of its best concept (dashed cyan)."
        ),
        "dissection_sensitive_units": (
            "The most attack-sensitive units of each layer (rows, largest s_k first; the row "
            "names layer:unit, s_k, the best concept and its IoU) on the kept evaluation "
            "images: the unit's activation S_k upsampled to the image (heat map, magma, one "
            "scale per row from its lowest value to at least its threshold; unitless "
            f"activation) and where it fires (activation mask, top {quantile:g} quantile "
            "threshold from the probe set) on the clean image x (white) and on the "
            "adversarial image x' (magenta; the clean mask dashed white for comparison). "
            "'no mask': the unit stays below its threshold on that image."
        ),
    }


def key_numbers(scalars: dict[str, Tensor], layers: list[str]) -> dict[str, float]:
    """Per layer: interpretable share, Spearman ρ(s, IoU) with its two-way CI, and the
    random-weights baseline's ρ."""
    keys = ("frac_interpretable", "spearman_rho", "spearman_ci_low", "spearman_ci_high",
            "random/spearman_rho")  # fmt: skip
    return {
        f"{n}/{k}": float(scalars[f"{n}/{k}"])
        for n in layers
        for k in keys
        if f"{n}/{k}" in scalars
    }


def meaning(scalars: dict[str, Tensor], layers: list[str]) -> str:
    """One sentence from the numbers: per layer, the direction of ρ(s, IoU) as its CI says."""
    parts = []
    for n in layers:
        rho = float(scalars.get(f"{n}/spearman_rho", float("nan")))
        low = float(scalars.get(f"{n}/spearman_ci_low", float("nan")))
        high = float(scalars.get(f"{n}/spearman_ci_high", float("nan")))
        if low > 0:
            tie = "more interpretable units are more sensitive to the attack"
        elif high < 0:
            tie = "more interpretable units are less sensitive to the attack"
        else:
            tie = "the 95% interval includes 0, so no tie is shown"
        parts.append(f"in {n}, ρ(s, IoU) = {rho:.3g} [{low:.3g}, {high:.3g}]: {tie}")
    if not parts:
        return "No layer was dissected."
    text = "; ".join(parts)
    return text[0].upper() + text[1:] + "."


def unit_rows(units: dict[str, LayerUnits], table: ConceptTable) -> list[list[Any]]:
    """One row per unit in :data:`UNIT_COLUMNS` order; π_k and ς_k only at the feature
    layer of a GAP + linear net (None elsewhere)."""
    rows = []
    for name, layer in units.items():
        promo, supp = layer.head.get("promotion"), layer.head.get("suppression")
        for unit in range(len(layer.iou)):
            concept = int(layer.concept[unit])
            rows.append(
                [
                    name,
                    unit,
                    table.name_of(concept),
                    table.category_of(concept),
                    float(layer.iou[unit]),
                    bool(layer.interpretable[unit]),
                    float(layer.s_plus[unit]),
                    float(layer.s_minus[unit]),
                    float(layer.s[unit]),
                    float(layer.threshold[unit]),
                    float(promo[unit]) if promo is not None else None,
                    float(supp[unit]) if supp is not None else None,
                ]
            )
    return rows


def _fmt(scalars: dict[str, Tensor], key: str) -> str:
    value = scalars.get(key)
    return "—" if value is None else f"{float(value):.3g}"


def _p(scalars: dict[str, Tensor], key: str) -> str:
    """A p-value and its Holm-adjusted value: "raw (Holm)"."""
    if key not in scalars:
        return "—"
    return f"{_fmt(scalars, key)} ({_fmt(scalars, key + '_holm')})"


def _ci(scalars: dict[str, Tensor], prefix: str) -> str:
    return f"[{_fmt(scalars, prefix + '_low')}, {_fmt(scalars, prefix + '_high')}]"


def _row(*cells: str) -> str:
    return "| " + " | ".join(cells) + " |"


def _correlation_cells(scalars: dict[str, Tensor], n: str) -> list[str]:
    def f(key: str) -> str:
        return _fmt(scalars, f"{n}/{key}")

    return [
        f("units"),
        f("interpretable"),
        f("spearman_rho"),
        _p(scalars, f"{n}/spearman_p"),
        _ci(scalars, f"{n}/spearman_ci"),
        _ci(scalars, f"{n}/spearman_ci_units"),
        f"{f('partial_sigma_rho')} ({_p(scalars, n + '/partial_sigma_p')})",
        f"{f('partial_mean_rho')} ({_p(scalars, n + '/partial_mean_p')})",
    ]


def _group_cells(scalars: dict[str, Tensor], n: str) -> list[str]:
    return [
        _p(scalars, f"{n}/mannwhitney_p"),
        _p(scalars, f"{n}/enrichment_p"),
        _fmt(scalars, f"{n}/random/interpretable"),
        _fmt(scalars, f"{n}/random/spearman_rho"),
        _ci(scalars, f"{n}/random/spearman_ci"),
        _p(scalars, f"{n}/random/spearman_p"),
    ]


def markdown_tables(
    scalars: dict[str, Tensor], layers: list[str], categories: list[str], min_units: int
) -> list[str]:
    """The correlation, group-test, baseline and per-category tables of the section."""
    family = sum(1 for k in scalars if k.endswith("_holm") and bool(scalars[k].isfinite()))
    lines = [
        f"p-values: raw (Holm-adjusted over the {family} p-values of this section, "
        "family-wise α = 0.05). CI: 95% percentile bootstrap; two-way resamples units and "
        "evaluation images, units resamples units only. Random-weights baseline: the same "
        "architecture re-initialised from the seed, on the same adversarial examples.",
        "",
        "| layer | units | interpretable | Spearman ρ(s, IoU) | perm. p (Holm) | CI two-way | "
        "CI units | partial ρ given σ (p) | partial ρ given mean (p) |",
        "|---|---|---|---|---|---|---|---|---|",
        *(_row(n, *_correlation_cells(scalars, n)) for n in layers),
        "",
        "| layer | Mann–Whitney p (Holm) | enrichment p (Holm) | random-weights baseline: "
        "interpretable | ρ | CI two-way | perm. p (Holm) |",
        "|---|---|---|---|---|---|---|",
        *(_row(n, *_group_cells(scalars, n)) for n in layers),
    ]
    return lines + category_table(scalars, layers, categories, min_units)


def category_table(
    scalars: dict[str, Tensor], layers: list[str], categories: list[str], min_units: int
) -> list[str]:
    """Interpretable units per category, with the category's test where it has power."""
    lines = [
        "",
        f"Per category: interpretable units, and the Mann–Whitney p (Holm) of their s "
        f"against the layer's other units, tested only with at least {min_units} of them.",
        "",
        "| layer | " + " | ".join(categories) + " |",
        "|---|" + "---|" * len(categories),
    ]
    for n in layers:
        cells = []
        for c in categories:
            cell = _fmt(scalars, f"{n}/{c}/interpretable")
            if f"{n}/{c}/mannwhitney_p" in scalars:
                cell += f"; p {_p(scalars, f'{n}/{c}/mannwhitney_p')}"
            cells.append(cell)
        lines.append(_row(n, *cells))
    return lines
