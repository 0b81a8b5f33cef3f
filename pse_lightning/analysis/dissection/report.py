"""The dissection section of the report, built from ``compute()``'s result alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from pse_lightning.analysis.base import AnalysisResult
from pse_lightning.analysis.dissection.figures import (
    interpretable_units_figure,
    iou_vs_sensitivity_figure,
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
    result: AnalysisResult, out_dir: Path, title: str, quantile: float, iou_threshold: float
) -> ReportSection:
    """Figures (IoU vs sensitivity, interpretable units per category, top images), the
    per-unit W&B table and a markdown summary. Rank zero only; no communication."""
    out_dir.mkdir(parents=True, exist_ok=True)
    units: dict[str, LayerUnits] = result.details["units"]
    table: ConceptTable = result.details["concepts"]
    scalars, layers = result.scalars, list(units)
    section = ReportSection(title=title)
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
    section.tables["units"] = (list(UNIT_COLUMNS), unit_rows(units, table))
    lines = [
        f"Probe set: {result.details['probe_images']} images; "
        f"q = {quantile}, interpretable when IoU > {iou_threshold}; "
        f"sensitivity over {float(scalars.get('images', 0)):.0f} evaluation images.",
        "",
        *markdown_tables(scalars, layers, table.categories),
    ]
    section.markdown = "\n".join(lines)
    return section


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


def markdown_tables(
    scalars: dict[str, Tensor], layers: list[str], categories: list[str]
) -> list[str]:
    """The per-layer statistics table and the interpretable-units-per-category table."""
    lines = [
        "| layer | units | interpretable | Spearman ρ(s, IoU) | perm. p | 95% CI | "
        "Mann–Whitney p | enrichment p |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n in layers:
        f = lambda key, n=n: _fmt(scalars, f"{n}/{key}")  # noqa: E731
        lines.append(
            f"| {n} | {f('units')} | {f('interpretable')} | {f('spearman_rho')} | "
            f"{f('spearman_p')} | [{f('spearman_ci_low')}, {f('spearman_ci_high')}] | "
            f"{f('mannwhitney_p')} | {f('enrichment_p')} |"
        )
    lines += ["", "| layer | " + " | ".join(categories) + " |", "|---|" + "---|" * len(categories)]
    for n in layers:
        counts = [_fmt(scalars, f"{n}/{c}/interpretable") for c in categories]
        lines.append(f"| {n} | " + " | ".join(counts) + " |")
    return lines
