"""The glossary entries of the neuron-masking defense's evaluation (docs/METHODS.md §5).

Declared by ``MaskCurve.glossary()`` with the keys as the analysis computes them
(without ``test/neuron_mask/``); the report, ``docs/GLOSSARY.md`` and the tests add the prefix
(:meth:`~pse_lightning.core.contract.Term.under`).
"""

from __future__ import annotations

from pse_lightning.core.contract import Term, metric

TERMS: tuple[Term, ...] = (
    metric("k", r"k", "Units masked by the deployed defense.",
            "§5.2"),
    metric("clean_acc, …/transfer_acc, …/adaptive_acc",
            r"(clean|transfer|adaptive)_acc",
            "Accuracy of the defended model on clean images, on adversarial examples crafted "
            "on the undefended model (transfer) and crafted on the defended model (adaptive).",
            "§5.3"),
    metric("undefended_<clean|robust>_acc",
            r"undefended_(clean|robust)_acc",
            "The same accuracies of the model without the defense.", "§5.3"),
    metric("mcnemar_p_<clean|adaptive>", r"mcnemar_p_(clean|adaptive)",
            "Exact McNemar p of defended against undefended accuracy on the same images.",
            "§7.11"),
)  # fmt: skip
