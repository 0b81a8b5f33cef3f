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
from pse_lightning.core.findings import ALPHA
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
    "iou_non_class",
    "target_share",
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
    """Per layer: interpretable share, Spearman ρ(s, IoU) with its two-way CI, the
    random-weights baseline's ρ and the trained − random difference with its CI."""
    keys = ("frac_interpretable", "spearman_rho", "spearman_ci_low", "spearman_ci_high",
            "random/spearman_rho", "delta_rho", "delta_rho_ci_low",
            "delta_rho_ci_high")  # fmt: skip
    return {
        f"{n}/{k}": float(scalars[f"{n}/{k}"])
        for n in layers
        for k in keys
        if f"{n}/{k}" in scalars
    }


#: The section's trained-network tests, by key suffix, as the summary sentence names them.
SECTION_TESTS = {
    "spearman_p": "Spearman ρ",
    "partial_sigma_p": "partial ρ given σ",
    "partial_mean_p": "partial ρ given the mean",
    "partial_target_p": "partial ρ given the target share",
    "non_class/spearman_p": "ρ on non-class concepts",
    "mannwhitney_p": "Mann–Whitney",
    "enrichment_p": "enrichment",
}


def _value(scalars: dict[str, Tensor], key: str) -> float:
    return float(scalars.get(key, float("nan")))


def meaning(scalars: dict[str, Tensor], layers: list[str]) -> str:
    """One sentence per layer from the numbers: interpretable units against the random
    baseline, the trained − random Δρ with its interval, and which of the section's tests
    reject after the section's Holm correction (the Findings hold the verdict)."""
    parts = []
    for n in layers:
        trained, random = (
            _value(scalars, f"{n}/interpretable"),
            _value(scalars, f"{n}/random/interpretable"),
        )
        text = f"in {n}, {trained:.0f} interpretable units"
        if random == random:  # the baseline ran
            text += f" ({random:.0f} at random weights"
            if not trained > random:
                text += ": no more than chance, so Claim 3 is untestable here"
            text += ")"
        delta = _value(scalars, f"{n}/delta_rho")
        if delta == delta:
            low, high = (
                _value(scalars, f"{n}/delta_rho_ci_low"),
                _value(scalars, f"{n}/delta_rho_ci_high"),
            )
            text += f", ρ(s, IoU) trained − random = {delta:.2g} [{low:.2g}, {high:.2g}]"
        else:
            rho = _value(scalars, f"{n}/spearman_rho")
            text += f", ρ(s, IoU) = {rho:.2g}"
        rejected = [
            name
            for suffix, name in SECTION_TESTS.items()
            if _value(scalars, f"{n}/{suffix}_holm") < ALPHA
        ]
        rejected += [
            f"Mann–Whitney of {key.split('/')[-2]} units"
            for key in scalars
            if key.startswith(f"{n}/")
            and key.endswith("/mannwhitney_p_holm")
            and "/random/" not in key
            and _value(scalars, key) < ALPHA
        ]
        if rejected:
            verb = "rejects" if len(rejected) == 1 else "reject"
            text += f"; after Holm over this section's tests, {', '.join(rejected)} {verb}"
        else:
            text += "; none of this section's tests rejects after Holm"
        parts.append(text)
    if not parts:
        return "No layer was dissected."
    text = "; ".join(parts)
    return text[0].upper() + text[1:] + ". The verdict on Claim 3 is the Findings'."


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
                    float(layer.iou_non_class[unit]),
                    float(layer.target_share[unit]),
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


def _class_cells(scalars: dict[str, Tensor], n: str) -> list[str]:
    def f(key: str) -> str:
        return _fmt(scalars, f"{n}/{key}")

    return [
        f("target_share_rho"),
        f"{f('partial_target_rho')} ({_p(scalars, n + '/partial_target_p')})",
        f("non_class/interpretable"),
        f"{f('non_class/spearman_rho')} ({_p(scalars, n + '/non_class/spearman_p')})",
    ]


def _group_cells(scalars: dict[str, Tensor], n: str) -> list[str]:
    return [
        _p(scalars, f"{n}/mannwhitney_p"),
        _p(scalars, f"{n}/enrichment_p"),
        _fmt(scalars, f"{n}/random/interpretable"),
        _fmt(scalars, f"{n}/random/non_class/interpretable"),
        _fmt(scalars, f"{n}/random/spearman_rho"),
        _ci(scalars, f"{n}/random/spearman_ci"),
        _p(scalars, f"{n}/random/spearman_p"),
    ]


def _difference_cells(scalars: dict[str, Tensor], n: str) -> list[str]:
    cells = []
    for prefix in ("", "non_class/", "partial_target/"):
        key = f"{n}/{prefix}delta_rho"
        cells.append(
            f"{_fmt(scalars, key)} {_ci(scalars, key + '_ci')}; p {_fmt(scalars, key + '_p')}"
        )
    return cells


def markdown_tables(
    scalars: dict[str, Tensor], layers: list[str], categories: list[str], min_units: int
) -> list[str]:
    """The correlation, class-control, group-test, baseline, difference and per-category
    tables of the section."""
    trained = sum(
        1
        for k in scalars
        if k.endswith("_holm") and "/random/" not in k and bool(scalars[k].isfinite())
    )
    random = sum(
        1
        for k in scalars
        if k.endswith("_holm") and "/random/" in k and bool(scalars[k].isfinite())
    )
    lines = [
        f"p-values: raw (Holm-adjusted over this section's {trained} tests of the trained "
        f"network, family-wise α = 0.05; the random-weights baseline's {random} p-values are "
        "their own Holm family). CI: 95% percentile bootstrap; two-way resamples units and "
        "evaluation and probe images, units resamples units only. Random-weights baseline: "
        "the same architecture re-initialised from the seed, on the same adversarial examples. "
        "Target share f_k: the share of the attack's targets that go to the class whose "
        "clean images activate unit k most; non-class concepts: every category but the class "
        "labels'.",
        "",
        "| layer | units | interpretable | Spearman ρ(s, IoU) | perm. p (Holm) | CI two-way | "
        "CI units | partial ρ given σ (p) | partial ρ given mean (p) |",
        "|---|---|---|---|---|---|---|---|---|",
        *(_row(n, *_correlation_cells(scalars, n)) for n in layers),
        "",
        "| layer | ρ(s, target share) | partial ρ given target share (p) | interpretable, "
        "non-class concepts | ρ(s, non-class IoU) (perm. p) |",
        "|---|---|---|---|---|",
        *(_row(n, *_class_cells(scalars, n)) for n in layers),
        "",
        "| layer | Mann–Whitney p (Holm) | enrichment p (Holm) | random-weights baseline: "
        "interpretable | non-class | ρ | CI two-way | perm. p (Holm, baseline family) |",
        "|---|---|---|---|---|---|---|---|",
        *(_row(n, *_group_cells(scalars, n)) for n in layers),
        "",
        "Claim 3's tests, trained − random-weights: Δρ [95% CI]; p, both from one two-way "
        "bootstrap (raw p: Holm-adjusted in the Findings table, over its own family).",
        "",
        "| layer | Δρ(s, IoU) | Δρ(s, non-class IoU) | Δ partial ρ given target share |",
        "|---|---|---|---|",
        *(_row(n, *_difference_cells(scalars, n)) for n in layers),
    ]
    return lines + category_table(scalars, layers, categories, min_units)


def category_table(
    scalars: dict[str, Tensor], layers: list[str], categories: list[str], min_units: int
) -> list[str]:
    """Interpretable units per category, with the category's test where it has power."""
    lines = [
        "",
        f"Per category: interpretable units, and the Mann–Whitney p (Holm) of their s "
        f"against the layer's other units, tested only with at least {min_units} of them "
        "and not when the category holds every interpretable unit (its test is then the "
        "layer's Mann–Whitney above).",
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
