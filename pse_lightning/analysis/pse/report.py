"""The PSE section of the run report, built from ``PSE.compute``'s result alone."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from pse_lightning.analysis.base import AnalysisResult, ReportSection
from pse_lightning.analysis.pse import figures
from pse_lightning.analysis.pse.clusters import MIN_TYPE_SHARE, sweep_key
from pse_lightning.analysis.pse.mixture import MAX_COMPONENTS
from pse_lightning.analysis.pse.samples import ImageSummary
from pse_lightning.analysis.pse.statistics import (
    MIN_PAIR_IMAGES,
    PSE_TYPES,
    SWEEP,
    PairBreakdown,
    sweep_fractions,
)
from pse_lightning.reporting.figures import class_name

TITLE = "Promotion-suppression effect (PSE)"
_DETAILS = ("images", "pairs", "rows", "examples", "r_hist", "sweep_counts", "modes")
MAX_LISTED = 20  # rows of a markdown listing; the W&B tables hold them all
Table = tuple[list[str], list[list[object]]]


def pse_section(
    result: AnalysisResult,
    out_dir: Path,
    class_names: Sequence[str],
    *,
    settings: str,
    tau_s: float,
    tau_p: float,
    tol: float,
    max_images: int | None = None,
) -> ReportSection:
    """Figures, text (types, sweep, class pairs, incomplete images) and W&B tables.

    Args:
        result: what ``PSE.compute`` returned.
        out_dir: folder for the PNG files.
        class_names: the dataset's class names (figures never show bare indices).
        settings: the sentence describing the method and thresholds.
        tau_s, tau_p: the type thresholds drawn on the figures.
        tol: the completeness tolerance (images above it are listed as incomplete).
        max_images: the bound on the kept images (None: all were kept).

    Raises:
        ValueError: ``result`` is not a PSE ``compute`` result.
    """
    missing = [key for key in _DETAILS if key not in result.details]
    if missing:
        raise ValueError(
            f"PSE.report needs the result of PSE.compute(), whose details hold {list(_DETAILS)}; "
            f"missing {missing}"
        )
    details = result.details
    rows = details["rows"]
    note = "" if max_images is None else sample_note(result.scalars, details["images"], max_images)
    paths = write_figures(details, out_dir, class_names, tau_s=tau_s, tau_p=tau_p)
    pairs, incomplete = (
        pair_table(details["pairs"], class_names),
        incomplete_table(details["images"], tol, class_names),
    )
    text = [
        markdown(result.scalars, details["sweep_counts"], settings),
        pair_markdown(result.scalars, pairs, note),
        incomplete_markdown(result.scalars, incomplete, tol, note),
    ]
    return ReportSection(
        title=TITLE,
        markdown="\n\n".join(text),
        figures=paths,
        tables={"pse_images": rows.table(), "pse_pairs": pairs, "pse_incomplete": incomplete},
        captions=captions(tau_s, tau_p),
        key_numbers={key: float(result.scalars[key]) for key in KEY_NUMBERS},
        meaning=meaning(result.scalars),
    )


KEY_NUMBERS = ("n_images", *(f"frac_{t}" for t in PSE_TYPES), "counter_share", "pair_eta2")


def meaning(scalars: Mapping[str, Tensor]) -> str:
    """One sentence from the numbers: the commonest type, and how much the class pair
    explains (against its chance level)."""
    n = int(scalars["n_images"])
    if n == 0:
        return "No image was analysed (no successful attack on a correctly classified image)."
    shares = {t: float(scalars[f"frac_{t}"]) for t in PSE_TYPES}
    top = max(shares, key=shares.__getitem__)
    kind = {"balanced": "balanced perturbations", "none": "perturbations without a PSE (none)"}
    text = (
        f"Of {n} analysed adversarial examples, {kind.get(top, f'{top}-dominated perturbations')}"
        f" are the commonest ({100 * shares[top]:.3g}% of images)"
    )
    eta2, null = float(scalars["pair_eta2"]), float(scalars["pair_eta2_null"])
    if eta2 == eta2:
        more = "more than" if eta2 > null else "no more than"
        text += (
            f"; the (true, target) class pair explains η² = {eta2:.3g} of the variance of r, "
            f"{more} the {null:.3g} expected by chance"
        )
    return text + "."


def captions(tau_s: float, tau_p: float) -> dict[str, str]:
    """The caption of each PSE figure, by file stem."""
    return {
        "pse_examples": (
            "Per kept example (dataset index: true → target class): the clean image; "
            "δ = x' − x as grey + a·δ with the amplification a on the panel; the promotion "
            "map Σ[a^t]₊ and the suppression map Σ[−a^t0]₊ on one colour scale; and the "
            "signed net map Σ(a^t − a^t0). Colour bars in logit change per pixel."
        ),
        "pse_ratio_hist": (
            f"Histogram of the PSE ratio r over the analysed images, bars stacked by each "
            f"image's type at τ_s = {tau_s:.3g} and τ_p = {tau_p:.3g} (dashed, dotted; a bin "
            "that straddles a threshold shows both types); black line: the Gaussian mixture "
            "BIC prefers, fitted to a 100-bin histogram of r; y: number of images."
        ),
        "pse_sweep": (
            "Share of each PSE type among the images with a defined r as the symmetric "
            "thresholds τ_s = q, τ_p = 1 − q vary; the vertical line marks the configured τ_s."
        ),
        "pse_scatter": (
            "Left: measured fall of the true logit −Δ_t0 against rise of the target logit "
            "Δ_t (logits), with the rays r = τ_s and r = τ_p. Right: gross suppression S "
            "against promotion P of the pixel attributions (logits). One dot per image, "
            "coloured by its type."
        ),
    }


def write_figures(
    details: Mapping[str, Any],
    out_dir: Path,
    class_names: Sequence[str],
    *,
    tau_s: float,
    tau_p: float,
) -> list[Path]:
    """Examples, histogram of r, threshold sweep and the scatter, as PNG files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    if len(details["examples"]):
        paths.append(figures.examples_figure(details["examples"], class_names,
                                             out_dir / "pse_examples.png"))  # fmt: skip
    paths.append(figures.ratio_histogram_figure(details["r_hist"], tau_s, tau_p,
                                                out_dir / "pse_ratio_hist.png",
                                                details["modes"]))  # fmt: skip
    paths.append(figures.sweep_figure(details["sweep_counts"], tau_s, tau_p,
                                      out_dir / "pse_sweep.png"))  # fmt: skip
    if len(details["rows"]):
        paths.append(figures.scatter_figure(details["rows"], tau_s, tau_p,
                                            out_dir / "pse_scatter.png"))  # fmt: skip
    return paths


def markdown(scalars: Mapping[str, Tensor], sweep_counts: Tensor, settings: str) -> str:
    """The type fractions, shares, completeness and the threshold sweep as text."""

    def num(key: str) -> float:
        return float(scalars[key])

    def text(key: str, spec: str) -> str:  # an unmeasured (NaN) value as n/a
        value = num(key)
        return "n/a" if value != value else format(value, spec)

    lines = [
        settings + f" Skipped {int(num('n_clean_misclassified'))} images the model misclassified"
        " before the attack.",
        "",
        "| type | fraction |",
        "|---|---|",
        *[f"| {name} | {text('frac_' + name, '.3f')} |" for name in PSE_TYPES],
        "",
        f"Over the images whose attributions are complete: mean promotion share "
        f"{text('promotion_share', '.3f')}, suppression share {text('suppression_share', '.3f')}, "
        f"counter-effects {text('counter_share', '.3f')}. Completeness residual over all "
        f"analysed images: mean {text('residual_mean', '.2e')}, max {num('residual_max'):.2e}.",
        "",
        "Threshold sweep (tau_s = q, tau_p = 1 - q; fractions of images with a defined r). "
        f"The rarest type's share with its 95% interval and the p of share > {MIN_TYPE_SHARE} "
        f"come from one cluster bootstrap over (true, target) class pairs "
        f"({int(num('n_bootstrap'))} replicates of {int(num('n_pair_clusters'))} pairs):",
        "",
        "| q | suppression | balanced | promotion | rarest [95% CI] | p |",
        "|---|---|---|---|---|---|",
    ]
    for q, fractions in zip(SWEEP, sweep_fractions(sweep_counts), strict=True):
        tag = f"rarest_{sweep_key(q)}"
        rarest = f"{num(tag):.3f} [{num(tag + '_low'):.3f}, {num(tag + '_high'):.3f}]"
        lines.append(f"| {q:.3g} | " + " | ".join(f"{v:.3f}" for v in fractions.tolist())
                     + f" | {rarest} | {num(tag + '_p'):.3g} |")  # fmt: skip
    lines += ["", modes_sentence(scalars)]
    return "\n".join(lines)


def modes_sentence(scalars: Mapping[str, Tensor]) -> str:
    """BIC per number of mixture components of r, the preferred k and the LR tests."""
    k = int(float(scalars["mixture_k"]))
    if k == 0:
        return "Modes of r: too few images with a defined r to fit a mixture."
    bics = ", ".join(
        f"{float(scalars[f'mixture_bic_k{j}']):.1f}" for j in range(1, MAX_COMPONENTS + 1)
    )
    return (
        f"Modes of r: Gaussian mixtures fitted to a 100-bin histogram of r, BIC for "
        f"k = 1..{MAX_COMPONENTS} components: {bics}; BIC prefers k = {k}. Parametric-"
        f"bootstrap likelihood-ratio tests: 1 vs 2 components p = "
        f"{float(scalars['mixture_p_1v2']):.3g}, 2 vs 3 p = {float(scalars['mixture_p_2v3']):.3g}"
        " (a small p is evidence for the larger number)."
    )


def pair_table(pairs: PairBreakdown, class_names: Sequence[str]) -> Table:
    """One row per (true, target) pair, most images first, with a note on small pairs."""
    columns = ["true class", "target class", "images", *PSE_TYPES, "mean r", "note"]
    order = sorted(range(len(pairs)), key=lambda g: (-int(pairs.counts[g].sum()), g))
    rows = []
    for g in order:
        small = int(pairs.n_defined[g]) < MIN_PAIR_IMAGES
        mean_r = float(pairs.mean_r[g])
        rows.append([
            class_name(class_names, int(pairs.label[g])),
            class_name(class_names, int(pairs.target[g])),
            int(pairs.counts[g].sum()),
            *pairs.counts[g].tolist(),
            None if mean_r != mean_r else round(mean_r, 3),
            f"fewer than {MIN_PAIR_IMAGES} images with a defined r" if small else "",
        ])  # fmt: skip
    return columns, rows


def sample_note(scalars: Mapping[str, Tensor], images: ImageSummary, limit: int) -> str:
    """Empty when the kept images are all the analysed ones, else a sentence saying that the
    class pairs and the incomplete list come from a uniform random sample of ``limit``."""
    total = int(scalars["n_images"])
    if len(images) < limit or total <= limit:
        return ""
    return (
        f" These come from a seeded uniform random sample of {len(images)} of the {total} "
        "analysed images (analysis.pse.max_images); the counts and the cluster bootstrap "
        "cover them all."
    )


def pair_markdown(scalars: Mapping[str, Tensor], pairs: Table, note: str = "") -> str:
    """The class-pair effect on r and the largest pairs (``note``: :func:`sample_note`)."""
    columns, rows = pairs
    eta2, null, eps2 = (float(scalars[k]) for k in ("pair_eta2", "pair_eta2_null",
                                                    "pair_epsilon2"))  # fmt: skip
    lines = [
        f"Class pairs: the (true, target) pair explains eta^2 = {eta2:.3f} of the variance of "
        f"r over {int(scalars['n_pairs'])} pairs ({null:.3f} expected were r independent of "
        f"the pair; bias-corrected epsilon^2 = {eps2:.3f}). "
        f"{int(scalars['n_pairs_small'])} pairs have fewer than {MIN_PAIR_IMAGES} images "
        "with a defined r: their means are noise. A large eta^2 means the types mostly "
        "encode which classes are attacked into which." + note,
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for row in rows[:MAX_LISTED]:
        lines.append("| " + " | ".join("" if v is None else str(v) for v in row) + " |")
    if len(rows) > MAX_LISTED:
        lines.append(f"\n{len(rows) - MAX_LISTED} more pairs in the W&B table pse_pairs.")
    return "\n".join(lines)


def incomplete_table(images: ImageSummary, tol: float, class_names: Sequence[str]) -> Table:
    """The images whose completeness residual stays above ``tol`` (or is NaN)."""
    columns = ["index", "true class", "target class", "residual", "steps"]
    bad = (~(images.residual <= tol)).nonzero().flatten().tolist()
    rows = [
        [int(images.index[i]), class_name(class_names, int(images.label[i])),
         class_name(class_names, int(images.target[i])), float(images.residual[i]),
         int(images.steps[i])]
        for i in bad
    ]  # fmt: skip
    return columns, rows


def incomplete_markdown(
    scalars: Mapping[str, Tensor], incomplete: Table, tol: float, note: str = ""
) -> str:
    """How many attributions stayed incomplete, what that changes, and which they are
    (``note``: :func:`sample_note`, said when any is listed)."""
    columns, rows = incomplete
    head = (
        f"Incomplete attributions: {int(scalars['n_incomplete'])} images keep a completeness "
        f"residual above {100 * tol:.3g}% at the largest step count. They are left out of the "
        "promotion/suppression/counter shares and the group types; their image type counts, "
        "since r comes from the measured logit changes."
    )
    if not rows:
        return head
    lines = [head + note, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for index, true, target, residual, steps in rows[:MAX_LISTED]:
        lines.append(f"| {index} | {true} | {target} | {residual:.3g} | {steps} |")
    if len(rows) > MAX_LISTED:
        lines.append(f"\n{len(rows) - MAX_LISTED} more in the W&B table pse_incomplete.")
    return "\n".join(lines)
