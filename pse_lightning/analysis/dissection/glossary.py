"""The glossary entries of network dissection (docs/METHODS.md §4).

Declared by ``Dissection.glossary()`` with the keys as the analysis computes them
(without ``test/dissection/``); the report, ``docs/GLOSSARY.md`` and the tests add the prefix
(:meth:`~pse_lightning.core.contract.Term.under`).
"""

from __future__ import annotations

from pse_lightning.core.contract import Term, metric, word

_LAYER = r"[^/]+"  # a dotted layer name such as net.features.2

TERMS: tuple[Term, ...] = (
    word("unit sensitivity s", "s_k = E|Δ_k|/σ_k: the mean change of unit k's spatially "
         "averaged activation under the attack, in units of its clean standard deviation "
         "(s⁺: rises, s⁻: falls).", ref="§4.4"),
    word("IoU, interpretable unit", "IoU of a unit's top-quantile activation mask with a "
         "concept's mask over the probe set; a unit is interpretable when its best IoU "
         "exceeds the threshold.", ref="§4.3"),
    word("Holm", "p-values adjusted for multiple testing by Holm's step-down method.",
         ref="§7.7"),  # fmt: skip
    word("target share f_k", "The share of the attack's targets (the runner-up when "
         "untargeted) that go to unit k's preferred class, the class whose clean images "
         "activate it most: how often a class-selective unit's class is attacked into.",
         ref="§4.6"),
    word("non-class concept", "A concept of a category that is not the class labels (on "
         "shapes: colour, texture, background and part, not object); a unit interpretable "
         "only for an object concept is class-selective.", ref="§4.6"),
    word("Δρ (trained − random)", "Claim 3's effect: the trained network's ρ(s, IoU) minus "
         "the random-weights baseline's, with a two-way bootstrap interval and sign p.",
         ref="§7.13"),
    metric("<layer>/[random/]non_class/<interpretable|spearman_rho|spearman_p>",
            rf"{_LAYER}/(random/)?non_class/(interpretable|spearman_rho|spearman_p)",
            "Units interpretable for a non-class concept (best IoU over colour, texture, "
            "background, part…), and Spearman ρ of s against that IoU with its permutation p.",
            "§4.6"),
    metric("<layer>/[random/]partial_target_<rho|p>, …/target_share_rho",
            rf"{_LAYER}/(random/)?(partial_target_(rho|p)|target_share_rho)",
            "Partial Spearman ρ(s, IoU) controlling the target share f_k and its "
            "block-permutation p; ρ(s, f_k).", "§4.6"),
    metric("<layer>/[non_class/|partial_target/]delta_rho[_ci_low|_ci_high|_p]",
            rf"{_LAYER}/((non_class|partial_target)/)?delta_rho(_ci_low|_ci_high|_p)?",
            "Trained minus random-weights ρ (plain, non-class concepts, partial given the "
            "target share): estimate, 95% two-way bootstrap interval and the bootstrap sign "
            "p, from one set of replicates (Claim 3's test; Holm in the Findings).", "§7.13"),
    metric("images", r"images",
            "Evaluation images the unit sensitivities are measured on.", "§4.4"),
    metric("<layer>/units, …/interpretable, …/frac_interpretable",
            rf"{_LAYER}/(random/)?(units|interpretable|frac_interpretable)",
            "Units of the layer, interpretable units and their share (random/: the "
            "re-initialised network).", "§4.6"),
    metric("<layer>/mean_best_iou", rf"{_LAYER}/(random/)?mean_best_iou",
            "Mean over units of the best concept IoU.", "§4.6"),
    metric("<layer>/mean_s[_plus|_minus]",
            rf"{_LAYER}/(random/)?mean_s(_plus|_minus)?",
            "Mean unit sensitivity s (s⁺ rises, s⁻ falls) over the layer's units.", "§4.4"),
    metric("<layer>/spearman_rho[_p|_ci_*]",
            rf"{_LAYER}/(random/)?spearman_(rho|p|ci(_units|_images)?_(low|high))",
            "Spearman ρ between unit sensitivity s and best IoU, its permutation p and 95% "
            "bootstrap intervals (two-way, units only, images only).", "§4.6"),
    metric("<layer>/partial_<sigma|mean>_<rho|p>",
            rf"{_LAYER}/partial_(sigma|mean)_(rho|p)",
            "Partial Spearman ρ(s, IoU) controlling the unit's clean σ or mean, and its "
            "permutation p.", "§7.8"),
    metric("<layer>/mannwhitney_<u|p>",
            rf"{_LAYER}/({_LAYER}/)?mannwhitney_(u|p)",
            "Mann–Whitney U and p: s of interpretable units (of a category) against the "
            "layer's other units.", "§7.4"),
    metric("<layer>/enrichment_<observed|expected|p>",
            rf"{_LAYER}/enrichment_(observed|expected|p)",
            "Interpretable units among the 10% most sensitive, the number expected by chance "
            "and the hypergeometric p.", "§7.5"),
    metric("<layer>/<category>/interpretable, …/mean_s_interpretable",
            rf"{_LAYER}/{_LAYER}/(interpretable|mean_s_interpretable)",
            "Interpretable units whose concept is in the category, and their mean s (n/a "
            "when there is none).", "§4.6"),
    metric("…_holm", r".+_p_holm",
            "The p-value Holm-adjusted over its family in the dissection section: the trained "
            "network's tests, or the random-weights baseline's (random/).", "§7.7"),
)  # fmt: skip
