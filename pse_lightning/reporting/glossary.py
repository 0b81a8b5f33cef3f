"""The one glossary of the project: every metric a run logs and every term its report uses.

It is the single source of truth for three readers: the Glossary section of each
``report.md`` (the entries that run shows), ``docs/GLOSSARY.md`` (every entry, written by
``python -m pse_lightning.reporting.glossary docs/GLOSSARY.md`` and checked by a test to be
up to date) and the test that every key of a real run's ``metrics.json`` is explained here,
so a new metric without an entry fails the test suite instead of reaching users unexplained.

Metric entries match keys without their ``test/`` stage prefix by a regular expression, so
one entry covers a family (per layer, per mask kind, per category); ``<layer>`` and similar
placeholders in the shown name stand for the varying part.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

_LAYER = r"[^/]+"  # a dotted layer name such as net.features.2
_KIND = r"(true|target|union)"
_TYPE = r"(suppression|balanced|promotion|none)"
_CI = r"(|_low|_high|_p)"


@dataclass(frozen=True)
class Term:
    """One glossary entry.

    Attributes:
        name: the term as the report shows it (placeholders in angle brackets).
        meaning: its definition: what is measured, over which images, in which unit.
        scope: the part of the run it belongs to: ``attack`` (always shown), or an
            analysis name (shown when that analysis ran).
        pattern: for a metric, a regular expression matched in full against the key without
            ``test/``; None for a word of the report's text.
        ref: the section of docs/METHODS.md that specifies it.
    """

    name: str
    meaning: str
    scope: str
    pattern: str | None = None
    ref: str = ""

    def matches(self, key: str) -> bool:
        return self.pattern is not None and re.fullmatch(self.pattern, key) is not None


def _metric(name: str, pattern: str, meaning: str, ref: str) -> Term:
    return Term(f"`{name}`", meaning, name.split("/")[0] if "/" in name else "attack",
                pattern, ref)  # fmt: skip


TERMS: tuple[Term, ...] = (
    # -- the attack ---------------------------------------------------------------------------
    _metric("samples", r"samples", "Test images evaluated.", "§7.1"),
    _metric("clean_acc", r"clean_acc",
            "Share of test images the model classifies correctly before the attack.", "§7.1"),
    _metric("robust_acc", r"robust_acc",
            "Share of all test images classified correctly both before and after the attack.",
            "§7.1"),
    _metric("clean_misclassified", r"clean_misclassified",
            "Test images misclassified before the attack; they are not attacked and enter no "
            "analysis.", "§1.1"),
    _metric("success_rate", r"success_rate",
            "Share of the attacked (correctly classified) images whose adversarial example is "
            "misclassified (targeted: classified as the target).", "§7.1"),
    _metric("l2_mean, l2_median", r"l2_(mean|median)",
            "Mean and median L2 norm of the perturbation δ = x' − x over the successful "
            "adversarial examples, pixels in [0, 1].", "§7.1"),
    _metric("linf_mean, linf_median", r"linf_(mean|median)",
            "Mean and median L∞ norm (largest pixel change) of δ over the successful "
            "adversarial examples, pixels in [0, 1].", "§7.1"),
    Term("amplification (×a)", "Perturbation panels show grey 0.5 + a·δ, with a written on "
         "the panel: the factor that stretches the largest |δ| to the full grey range.",
         "attack"),  # fmt: skip
    # -- PSE ----------------------------------------------------------------------------------
    Term("PSE ratio r", "r = [Δ_t]₊ / ([Δ_t]₊ + [−Δ_t0]₊) from the measured logit changes: "
         "Δ_t the rise of the target logit, −Δ_t0 the fall of the true-class logit.",
         "pse", ref="§2.6"),  # fmt: skip
    Term("suppression-, promotion-dominated, balanced", "PSE types of an image: r < τ_s "
         "(mainly lowers the true class), r > τ_p (mainly raises the target), else balanced.",
         "pse", ref="§2.6"),  # fmt: skip
    Term("none (PSE type)", "The image's r is undefined: the target logit did not rise and "
         "the true logit did not fall, so the perturbation has no promotion-suppression "
         "effect to classify.", "pse", ref="§2.6"),  # fmt: skip
    Term("counter-effects", "Attribution that works against the attack: pixels that lower "
         "the target logit ([−a^t]₊) or raise the true-class logit ([a^t0]₊).", "pse",
         ref="§2.4"),  # fmt: skip
    Term("promotion, suppression maps", "Per pixel, the channel sum of [a^t]₊ (raises the "
         "target logit) and of [−a^t0]₊ (lowers the true logit), in logit units; a is the "
         "integrated-gradients attribution of the logit change.", "pse", ref="§2.4"),
    _metric("pse/frac_<type>", rf"pse/frac_{_TYPE}",
            "Share of the analysed images of each PSE type (the four sum to 1).", "§2.6"),
    _metric("pse/n_images", r"pse/n_images",
            "Images analysed: attacked and (by default) successful.", "§2.1"),
    _metric("pse/analysed_fraction", r"pse/analysed_fraction",
            "Analysed images over the images the analysis saw.", "§2.1"),
    _metric("pse/n_clean_misclassified", r"pse/n_clean_misclassified",
            "Images the PSE analysis skipped because the clean prediction was wrong.", "§2.1"),
    _metric("pse/promotion_share, pse/suppression_share",
            r"pse/(promotion|suppression)_share",
            "Mean P/(P+S) and S/(P+S) over complete images: the gross pixel promotion and "
            "suppression as shares of their sum.", "§2.4"),
    _metric("pse/counter_share", r"pse/counter_share",
            "Mean share of counter-effects in all attribution, (P̄+S̄)/(P+S+P̄+S̄), over "
            "complete images.", "§2.4"),
    _metric("pse/mean_r", r"pse/mean_r", "Mean PSE ratio r over images with a defined r.",
            "§2.6"),
    _metric("pse/residual_mean, pse/residual_max", r"pse/residual_(mean|max)",
            "Relative completeness residual of the attributions: how far they fail to add up "
            "to the measured logit changes (0 = exact).", "§2.3"),
    _metric("pse/steps_mean", r"pse/steps_mean",
            "Mean integrated-gradients steps per image after refinement.", "§2.3"),
    _metric("pse/n_incomplete", r"pse/n_incomplete",
            "Images whose residual stays above the tolerance; left out of shares and groups.",
            "§2.3"),
    _metric("pse/group_frac_<type>", r"pse/group_frac_(suppression|balanced|promotion)",
            "Share of each PSE type among pixel groups with a defined type.", "§2.5"),
    _metric("pse/group_frac_active", r"pse/group_frac_active",
            "Share of pixel groups that have a defined type.", "§2.5"),
    _metric("pse/pair_eta2", r"pse/pair_eta2",
            "η²: share of the variance of r explained by the (true, target) class pair.",
            "§2.7"),
    _metric("pse/pair_eta2_null", r"pse/pair_eta2_null",
            "The η² expected were r independent of the class pair.", "§2.7"),
    _metric("pse/pair_epsilon2", r"pse/pair_epsilon2",
            "ε²: the bias-corrected η² (about 0 under independence).", "§2.7"),
    _metric("pse/n_pairs, pse/n_pairs_small", r"pse/n_pairs(_small)?",
            "Class pairs seen, and those with fewer than 5 images with a defined r.", "§2.7"),
    _metric("pse/frac_<type>_low, pse/frac_<type>_high",
            r"pse/frac_(suppression|balanced|promotion)_(low|high)",
            "95 % percentile interval of the type's share (configured thresholds), from the "
            "cluster bootstrap over (true, target) class pairs.", "§2.7"),
    _metric("pse/rarest_q<1000q>, …_low, …_high, …_p", r"pse/rarest_q\d{3}(|_low|_high|_p)",
            "Claim 1 at the sweep threshold q (τ_s = q, τ_p = 1 − q; q250 is q = 0.25): the "
            "smallest of the three type shares among images with a defined r, its 95 % "
            "percentile interval and the p of share > 0.05, from one cluster bootstrap over "
            "class pairs: p = (1 + #replicates ≤ 0.05)/(B + 1).", "§2.7"),
    _metric("pse/n_pair_clusters", r"pse/n_pair_clusters",
            "Class-pair slots the cluster bootstrap resamples (pairs, unless hashed).", "§2.7"),
    _metric("pse/n_pairs_hashed", r"pse/n_pairs_hashed",
            "Images whose true or target class is ≥ analysis.pair_classes: their pairs share "
            "hashed slots of the bounded pair table (fewer, larger clusters).", "§2.7"),
    _metric("pse/n_bootstrap", r"pse/n_bootstrap",
            "Replicates B of the cluster bootstrap over class pairs.", "§2.7"),
    _metric("pse/pair_within_share", r"pse/pair_within_share",
            "Share of the variance of r within class pairs, SS_within/SS_total (1 − η² over "
            "the pair slots).", "§2.7"),
    _metric("pse/mixture_bic_k<k>", r"pse/mixture_bic_k\d",
            "BIC of a Gaussian mixture with k components fitted to a 100-bin histogram of r "
            "(NaN with fewer than 20 images with a defined r).", "§2.6"),
    _metric("pse/mixture_k", r"pse/mixture_k",
            "Number of mixture components of r with the smallest BIC (0: not fitted).",
            "§2.6"),
    _metric("pse/mixture_p_1v2, pse/mixture_p_2v3", r"pse/mixture_p_(1v2|2v3)",
            "Parametric-bootstrap likelihood-ratio p of k against k + 1 mixture components "
            "of r (small: evidence for more components).", "§2.6"),
    # -- CAM ----------------------------------------------------------------------------------
    Term("IS (interpretability score)", "IS = ‖B⊙δ‖₂/‖δ‖₂: the share of the perturbation's "
         "L2 norm inside mask B (IS² is the share of its energy).", "cam", ref="§3.3"),
    Term("B_true, B_target", "CAM region of the true class on x and of the target class on "
         "x': pixels whose normalised class map reaches the threshold.", "cam", ref="§3.2"),
    _metric("cam/evaluated, cam/scored", r"cam/(evaluated|scored)",
            "Images seen, and those scored (successful with δ ≠ 0).", "§3.6"),
    _metric("cam/is_<mask>", rf"cam/is_({_KIND[1:-1]}|object)",
            "Mean IS of δ in the mask (true, target, union of both, ground-truth object).",
            "§3.3"),
    _metric("cam/random_<mask>", rf"cam/random_{_KIND}",
            "Mean √area: the IS a random mask of the same area scores on average.", "§3.3"),
    _metric("cam/area_<mask>", rf"cam/area_({_KIND[1:-1]}|object)",
            "Mean share of the image the mask covers.", "§3.3"),
    _metric("cam/lift_<mask>", rf"cam/lift_({_KIND[1:-1]}|object)",
            "Mean IS²/area: 1 for a random mask; descriptive, not calibrated for a verdict "
            "(δ and a map that share a centre bias give > 1 with no link).", "§3.3"),
    _metric("cam/significant_<mask>", rf"cam/significant_{_KIND}",
            "Share of scored images with cyclic-shift p ≤ 0.05; uncalibrated (valid only "
            "for spatially even perturbation energy), descriptive only.", "§3.4"),
    _metric("cam/is_<k>_top<A>, cam/lift_<k>_top<A>", r"cam/(is|lift)_(true|target)_top\d+",
            "IS and IS²/area for the fixed-area mask: the A% highest pixels of the class map.",
            "§3.8"),
    _metric("cam/null_is_<k>_top<A>", r"cam/null_is_(true|target)_top\d+",
            "IS in the same-area mask of another class on the same image (the null).",
            "§3.8"),
    _metric("cam/specific_<k>_top<A>[_low|_high|_p]", rf"cam/specific_(true|target)_top\d+{_CI}",
            "IS²(class mask) − IS²(another class's mask of the same area): Hodges–Lehmann "
            "effect, its 95% CI and the Wilcoxon signed-rank p over images; context, not "
            "calibrated for a verdict when classes' maps sit differently.", "§3.8"),
    _metric("cam/same_is_<k>_top<A>", r"cam/same_is_(true|target)_top\d+",
            "IS in the same class's fixed-area mask on another evaluated image of the true "
            "class (the same-class null; NaN for an image alone in its class).", "§3.8"),
    _metric("cam/specific_same_<k>_top<A>[_low|_high|_p]",
            rf"cam/specific_same_(true|target)_top\d+{_CI}",
            "IS²(class mask) − IS²(the same class's mask on another image of that class): "
            "Hodges–Lehmann effect, 95% CI and Wilcoxon p; what is specific to the image "
            "beyond where the class's maps usually lie.", "§3.8"),
    _metric("cam/cam_vs_object[_low|_high|_p]", rf"cam/cam_vs_object{_CI}",
            "IS²(true class's CAM region) − IS²(ground-truth object mask), both of the "
            "object's pixel count on each image: Hodges–Lehmann effect, 95% CI and two-sided "
            "Wilcoxon p; > 0: specific to the CAM beyond the object, < 0: on the object.",
            "§3.8"),
    _metric("cam/is_true_object_area", r"cam/is_true_object_area",
            "Mean IS in the true class's CAM region of the object's area (the top-k pixels "
            "of the map, k = the object's pixel count).", "§3.8"),
    _metric("cam/excess_<mask>[_low|_high|_p]", rf"cam/excess_({_KIND[1:-1]}|object){_CI}",
            "IS² − area against a random mask: Hodges–Lehmann effect, 95% CI, Wilcoxon p.",
            "§3.8"),
    _metric("cam/promotion_in_target, cam/suppression_in_true",
            r"cam/(promotion_in_target|suppression_in_true)",
            "Share of first-order promotion inside B_target, of suppression inside B_true.",
            "§3.5"),
    # -- dissection ---------------------------------------------------------------------------
    Term("unit sensitivity s", "s_k = E|Δ_k|/σ_k: the mean change of unit k's spatially "
         "averaged activation under the attack, in units of its clean standard deviation "
         "(s⁺: rises, s⁻: falls).", "dissection", ref="§4.4"),
    Term("IoU, interpretable unit", "IoU of a unit's top-quantile activation mask with a "
         "concept's mask over the probe set; a unit is interpretable when its best IoU "
         "exceeds the threshold.", "dissection", ref="§4.3"),
    Term("Holm", "p-values adjusted for multiple testing by Holm's step-down method.",
         "dissection", ref="§7.7"),  # fmt: skip
    Term("target share f_k", "The share of the attack's targets (the runner-up when "
         "untargeted) that go to unit k's preferred class, the class whose clean images "
         "activate it most: how often a class-selective unit's class is attacked into.",
         "dissection", ref="§4.6"),
    Term("non-class concept", "A concept of a category that is not the class labels (on "
         "shapes: colour, texture, background and part, not object); a unit interpretable "
         "only for an object concept is class-selective.", "dissection", ref="§4.6"),
    Term("Δρ (trained − random)", "Claim 3's effect: the trained network's ρ(s, IoU) minus "
         "the random-weights baseline's, with a two-way bootstrap interval and sign p.",
         "dissection", ref="§7.13"),
    _metric("dissection/<layer>/[random/]non_class/<interpretable|spearman_rho|spearman_p>",
            rf"dissection/{_LAYER}/(random/)?non_class/(interpretable|spearman_rho|spearman_p)",
            "Units interpretable for a non-class concept (best IoU over colour, texture, "
            "background, part…), and Spearman ρ of s against that IoU with its permutation p.",
            "§4.6"),
    _metric("dissection/<layer>/[random/]partial_target_<rho|p>, …/target_share_rho",
            rf"dissection/{_LAYER}/(random/)?(partial_target_(rho|p)|target_share_rho)",
            "Partial Spearman ρ(s, IoU) controlling the target share f_k and its "
            "block-permutation p; ρ(s, f_k).", "§4.6"),
    _metric("dissection/<layer>/[non_class/|partial_target/]delta_rho[_ci_low|_ci_high|_p]",
            rf"dissection/{_LAYER}/((non_class|partial_target)/)?delta_rho(_ci_low|_ci_high|_p)?",
            "Trained minus random-weights ρ (plain, non-class concepts, partial given the "
            "target share): estimate, 95% two-way bootstrap interval and the bootstrap sign "
            "p, from one set of replicates (Claim 3's test; Holm in the Findings).", "§7.13"),
    _metric("dissection/images", r"dissection/images",
            "Evaluation images the unit sensitivities are measured on.", "§4.4"),
    _metric("dissection/<layer>/units, …/interpretable, …/frac_interpretable",
            rf"dissection/{_LAYER}/(random/)?(units|interpretable|frac_interpretable)",
            "Units of the layer, interpretable units and their share (random/: the "
            "re-initialised network).", "§4.6"),
    _metric("dissection/<layer>/mean_best_iou", rf"dissection/{_LAYER}/(random/)?mean_best_iou",
            "Mean over units of the best concept IoU.", "§4.6"),
    _metric("dissection/<layer>/mean_s[_plus|_minus]",
            rf"dissection/{_LAYER}/(random/)?mean_s(_plus|_minus)?",
            "Mean unit sensitivity s (s⁺ rises, s⁻ falls) over the layer's units.", "§4.4"),
    _metric("dissection/<layer>/spearman_rho[_p|_ci_*]",
            rf"dissection/{_LAYER}/(random/)?spearman_(rho|p|ci(_units|_images)?_(low|high))",
            "Spearman ρ between unit sensitivity s and best IoU, its permutation p and 95% "
            "bootstrap intervals (two-way, units only, images only).", "§4.6"),
    _metric("dissection/<layer>/partial_<sigma|mean>_<rho|p>",
            rf"dissection/{_LAYER}/partial_(sigma|mean)_(rho|p)",
            "Partial Spearman ρ(s, IoU) controlling the unit's clean σ or mean, and its "
            "permutation p.", "§7.8"),
    _metric("dissection/<layer>/mannwhitney_<u|p>",
            rf"dissection/{_LAYER}/({_LAYER}/)?mannwhitney_(u|p)",
            "Mann–Whitney U and p: s of interpretable units (of a category) against the "
            "layer's other units.", "§7.4"),
    _metric("dissection/<layer>/enrichment_<observed|expected|p>",
            rf"dissection/{_LAYER}/enrichment_(observed|expected|p)",
            "Interpretable units among the 10% most sensitive, the number expected by chance "
            "and the hypergeometric p.", "§7.5"),
    _metric("dissection/<layer>/<category>/interpretable, …/mean_s_interpretable",
            rf"dissection/{_LAYER}/{_LAYER}/(interpretable|mean_s_interpretable)",
            "Interpretable units whose concept is in the category, and their mean s (n/a "
            "when there is none).", "§4.6"),
    _metric("dissection/…_holm", r"dissection/.+_p_holm",
            "The p-value Holm-adjusted over its family in the dissection section: the trained "
            "network's tests, or the random-weights baseline's (random/).", "§7.7"),
    # -- neuron masking -----------------------------------------------------------------------
    _metric("neuron_mask/k", r"neuron_mask/k", "Units masked by the deployed defense.",
            "§5.2"),
    _metric("neuron_mask/clean_acc, …/transfer_acc, …/adaptive_acc",
            r"neuron_mask/(clean|transfer|adaptive)_acc",
            "Accuracy of the defended model on clean images, on adversarial examples crafted "
            "on the undefended model (transfer) and crafted on the defended model (adaptive).",
            "§5.3"),
    _metric("neuron_mask/undefended_<clean|robust>_acc",
            r"neuron_mask/undefended_(clean|robust)_acc",
            "The same accuracies of the model without the defense.", "§5.3"),
    _metric("neuron_mask/mcnemar_p_<clean|adaptive>", r"neuron_mask/mcnemar_p_(clean|adaptive)",
            "Exact McNemar p of defended against undefended accuracy on the same images.",
            "§7.11"),
)  # fmt: skip

STAGE = "test/"


def explain(key: str) -> Term | None:
    """The entry that explains metric ``key`` (with or without ``test/``), or None."""
    bare = key.removeprefix(STAGE)
    return next((term for term in TERMS if term.matches(bare)), None)


def unexplained(keys: Iterable[str]) -> list[str]:
    """The keys no entry explains, sorted."""
    return sorted(key for key in keys if explain(key) is None)


def terms_for(keys: Iterable[str]) -> list[Term]:
    """The entries a report with these metric keys needs: every metric entry matching one of
    them and every word entry of the parts that ran, in glossary order."""
    bare = [key.removeprefix(STAGE) for key in keys]
    scopes = {"attack"} | {key.split("/")[0] for key in bare if "/" in key}
    return [
        term
        for term in TERMS
        if (term.pattern is None and term.scope in scopes)
        or any(term.matches(key) for key in bare)
    ]


def glossary_markdown(terms: Sequence[Term]) -> str:
    """A two-column table: term and meaning with its section of docs/METHODS.md."""
    rows = [
        f"| {_cell(t.name)} | {_cell(t.meaning)}{f' (docs/METHODS.md {t.ref})' if t.ref else ''} |"
        for t in terms
    ]
    return "\n".join(["| term | meaning |", "|---|---|", *rows])


def _cell(text: str) -> str:
    """Text safe inside a markdown table cell (a bare | would end the cell)."""
    return text.replace("|", "\\|")


def document() -> str:
    """The whole glossary as ``docs/GLOSSARY.md``: every entry, grouped by scope."""
    lines = [
        "# Metric glossary",
        "",
        "Generated from `pse_lightning/reporting/glossary.py` (the one source of the report's "
        "Glossary section); regenerate with "
        "`python -m pse_lightning.reporting.glossary docs/GLOSSARY.md`.",
        "Metrics are logged as `test/<name>`; `<...>` stands for the varying part of a key.",
    ]
    for scope in dict.fromkeys(term.scope for term in TERMS):
        lines += ["", f"## {scope}", "", glossary_markdown([t for t in TERMS if t.scope == scope])]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str]) -> None:
    """Write :func:`document` to the path given (``docs/GLOSSARY.md``)."""
    if len(argv) != 1:
        raise SystemExit("usage: python -m pse_lightning.reporting.glossary docs/GLOSSARY.md")
    Path(argv[0]).write_text(document())


if __name__ == "__main__":
    main(sys.argv[1:])
