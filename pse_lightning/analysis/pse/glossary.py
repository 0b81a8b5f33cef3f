"""The glossary entries of the PSE analysis (docs/METHODS.md §2).

Declared by ``PSE.glossary()`` with the keys as the analysis computes them
(without ``test/pse/``); the report, ``docs/GLOSSARY.md`` and the tests add the prefix
(:meth:`~pse_lightning.core.contract.Term.under`).
"""

from __future__ import annotations

from pse_lightning.core.contract import Term, metric, word

_TYPE = r"(suppression|balanced|promotion|none)"

TERMS: tuple[Term, ...] = (
    word("PSE ratio r", "r = [Δ_t]₊ / ([Δ_t]₊ + [−Δ_t0]₊) from the measured logit changes: "
         "Δ_t the rise of the target logit, −Δ_t0 the fall of the true-class logit.",
         ref="§2.6"),  # fmt: skip
    word("suppression-, promotion-dominated, balanced", "PSE types of an image: r < τ_s "
         "(mainly lowers the true class), r > τ_p (mainly raises the target), else balanced.",
         ref="§2.6"),  # fmt: skip
    word("none (PSE type)", "The image's r is undefined: the target logit did not rise and "
         "the true logit did not fall, so the perturbation has no promotion-suppression "
         "effect to classify.", ref="§2.6"),  # fmt: skip
    word("counter-effects", "Attribution that works against the attack: pixels that lower "
         "the target logit ([−a^t]₊) or raise the true-class logit ([a^t0]₊).", ref="§2.4"),
    word("promotion, suppression maps", "Per pixel, the channel sum of [a^t]₊ (raises the "
         "target logit) and of [−a^t0]₊ (lowers the true logit), in logit units; a is the "
         "integrated-gradients attribution of the logit change.", ref="§2.4"),
    metric("frac_<type>", rf"frac_{_TYPE}",
            "Share of the analysed images of each PSE type (the four sum to 1).", "§2.6"),
    metric("n_images", r"n_images",
            "Images analysed: attacked and (by default) successful.", "§2.1"),
    metric("analysed_fraction", r"analysed_fraction",
            "Analysed images over the images the analysis saw.", "§2.1"),
    metric("n_clean_misclassified", r"n_clean_misclassified",
            "Images the PSE analysis skipped because the clean prediction was wrong.", "§2.1"),
    metric("promotion_share, suppression_share",
            r"(promotion|suppression)_share",
            "Mean P/(P+S) and S/(P+S) over complete images: the gross pixel promotion and "
            "suppression as shares of their sum.", "§2.4"),
    metric("counter_share", r"counter_share",
            "Mean share of counter-effects in all attribution, (P̄+S̄)/(P+S+P̄+S̄), over "
            "complete images.", "§2.4"),
    metric("mean_r", r"mean_r", "Mean PSE ratio r over images with a defined r.",
            "§2.6"),
    metric("residual_mean, residual_max", r"residual_(mean|max)",
            "Relative completeness residual of the attributions: how far they fail to add up "
            "to the measured logit changes (0 = exact).", "§2.3"),
    metric("steps_mean", r"steps_mean",
            "Mean integrated-gradients steps per image after refinement.", "§2.3"),
    metric("n_incomplete", r"n_incomplete",
            "Images whose residual stays above the tolerance; left out of shares and groups.",
            "§2.3"),
    metric("group_frac_<type>", r"group_frac_(suppression|balanced|promotion)",
            "Share of each PSE type among pixel groups with a defined type.", "§2.5"),
    metric("group_frac_active", r"group_frac_active",
            "Share of pixel groups that have a defined type.", "§2.5"),
    metric("pair_eta2", r"pair_eta2",
            "η²: share of the variance of r explained by the (true, target) class pair.",
            "§2.7"),
    metric("pair_eta2_null", r"pair_eta2_null",
            "The η² expected were r independent of the class pair.", "§2.7"),
    metric("pair_epsilon2", r"pair_epsilon2",
            "ε²: the bias-corrected η² (about 0 under independence).", "§2.7"),
    metric("n_pairs, n_pairs_small", r"n_pairs(_small)?",
            "Class pairs seen, and those with fewer than 5 images with a defined r.", "§2.7"),
    metric("frac_<type>_low, frac_<type>_high",
            r"frac_(suppression|balanced|promotion)_(low|high)",
            "95 % percentile interval of the type's share (configured thresholds), from the "
            "cluster bootstrap over (true, target) class pairs.", "§2.7"),
    metric("rarest_q<1000q>, …_low, …_high, …_p", r"rarest_q\d{3}(|_low|_high|_p)",
            "Claim 1 at the sweep threshold q (τ_s = q, τ_p = 1 − q; q250 is q = 0.25): the "
            "smallest of the three type shares among images with a defined r, its 95 % "
            "percentile interval and the p of share > 0.05, from one cluster bootstrap over "
            "class pairs: p = (1 + #replicates ≤ 0.05)/(B + 1).", "§2.7"),
    metric("n_pair_clusters", r"n_pair_clusters",
            "Class-pair slots the cluster bootstrap resamples (pairs, unless hashed).", "§2.7"),
    metric("n_pairs_hashed", r"n_pairs_hashed",
            "Images whose true or target class is ≥ analysis.pair_classes: their pairs share "
            "hashed slots of the bounded pair table (fewer, larger clusters).", "§2.7"),
    metric("n_bootstrap", r"n_bootstrap",
            "Replicates B of the cluster bootstrap over class pairs.", "§2.7"),
    metric("pair_within_share", r"pair_within_share",
            "Share of the variance of r within class pairs, SS_within/SS_total (1 − η² over "
            "the pair slots).", "§2.7"),
    metric("mixture_bic_k<k>", r"mixture_bic_k\d",
            "BIC of a Gaussian mixture with k components fitted to a 100-bin histogram of r "
            "(NaN with fewer than 20 images with a defined r).", "§2.6"),
    metric("mixture_k", r"mixture_k",
            "Number of mixture components of r with the smallest BIC (0: not fitted).",
            "§2.6"),
    metric("mixture_p_1v2, mixture_p_2v3", r"mixture_p_(1v2|2v3)",
            "Parametric-bootstrap likelihood-ratio p of k against k + 1 mixture components "
            "of r (small: evidence for more components).", "§2.6"),
)  # fmt: skip
