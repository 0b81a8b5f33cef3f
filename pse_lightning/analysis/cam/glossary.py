"""The glossary entries of the CAM analysis (docs/METHODS.md §3).

Declared by ``CAMAnalysis.glossary()`` with the keys as the analysis computes them
(without ``test/cam/``); the report, ``docs/GLOSSARY.md`` and the tests add the prefix
(:meth:`~pse_lightning.core.contract.Term.under`).
"""

from __future__ import annotations

from pse_lightning.core.contract import Term, metric, word

_KIND = r"(true|target|union)"
_CI = r"(|_low|_high|_p)"

TERMS: tuple[Term, ...] = (
    word("IS (interpretability score)", "IS = ‖B⊙δ‖₂/‖δ‖₂: the share of the perturbation's "
         "L2 norm inside mask B (IS² is the share of its energy).", ref="§3.3"),
    word("B_true, B_target", "CAM region of the true class on x and of the target class on "
         "x': pixels whose normalised class map reaches the threshold.", ref="§3.2"),
    metric("evaluated, scored", r"(evaluated|scored)",
            "Images seen, and those scored (successful with δ ≠ 0).", "§3.6"),
    metric("is_<mask>", rf"is_({_KIND[1:-1]}|object)",
            "Mean IS of δ in the mask (true, target, union of both, ground-truth object).",
            "§3.3"),
    metric("random_<mask>", rf"random_{_KIND}",
            "Mean √area: the IS a random mask of the same area scores on average.", "§3.3"),
    metric("area_<mask>", rf"area_({_KIND[1:-1]}|object)",
            "Mean share of the image the mask covers.", "§3.3"),
    metric("lift_<mask>", rf"lift_({_KIND[1:-1]}|object)",
            "Mean IS²/area: 1 for a random mask; descriptive, not calibrated for a verdict "
            "(δ and a map that share a centre bias give > 1 with no link).", "§3.3"),
    metric("significant_<mask>", rf"significant_{_KIND}",
            "Share of scored images with cyclic-shift p ≤ 0.05; uncalibrated (valid only "
            "for spatially even perturbation energy), descriptive only.", "§3.4"),
    metric("is_<k>_top<A>, lift_<k>_top<A>", r"(is|lift)_(true|target)_top\d+",
            "IS and IS²/area for the fixed-area mask: the A% highest pixels of the class map.",
            "§3.8"),
    metric("null_is_<k>_top<A>", r"null_is_(true|target)_top\d+",
            "IS in the same-area mask of another class on the same image (the null).",
            "§3.8"),
    metric("specific_<k>_top<A>[_low|_high|_p]", rf"specific_(true|target)_top\d+{_CI}",
            "IS²(class mask) − IS²(another class's mask of the same area): Hodges–Lehmann "
            "effect, its 95% CI and the Wilcoxon signed-rank p over images; context, not "
            "calibrated for a verdict when classes' maps sit differently.", "§3.8"),
    metric("same_is_<k>_top<A>", r"same_is_(true|target)_top\d+",
            "IS in the same class's fixed-area mask on another evaluated image of the true "
            "class (the same-class null; NaN for an image alone in its class).", "§3.8"),
    metric("specific_same_<k>_top<A>[_low|_high|_p]",
            rf"specific_same_(true|target)_top\d+{_CI}",
            "IS²(class mask) − IS²(the same class's mask on another image of that class): "
            "Hodges–Lehmann effect, 95% CI and Wilcoxon p; what is specific to the image "
            "beyond where the class's maps usually lie.", "§3.8"),
    metric("cam_vs_object[_low|_high|_p]", rf"cam_vs_object{_CI}",
            "IS²(true class's CAM region) − IS²(ground-truth object mask), both of the "
            "object's pixel count on each image: Hodges–Lehmann effect, 95% CI and two-sided "
            "Wilcoxon p; > 0: specific to the CAM beyond the object, < 0: on the object.",
            "§3.8"),
    metric("is_true_object_area", r"is_true_object_area",
            "Mean IS in the true class's CAM region of the object's area (the top-k pixels "
            "of the map, k = the object's pixel count).", "§3.8"),
    metric("excess_<mask>[_low|_high|_p]", rf"excess_({_KIND[1:-1]}|object){_CI}",
            "IS² − area against a random mask: Hodges–Lehmann effect, 95% CI, Wilcoxon p.",
            "§3.8"),
    metric("promotion_in_target, suppression_in_true",
            r"(promotion_in_target|suppression_in_true)",
            "Share of first-order promotion inside B_target, of suppression inside B_true.",
            "§3.5"),
)  # fmt: skip
