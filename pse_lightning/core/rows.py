"""Which rows of a batch an attack is about: the one owner of that rule (METHODS §1.1).

An attack can only flip a correct prediction, so only images the model classifies
correctly before the attack count as *attacked*; the attack's result, the evaluation loop
and the analyses all ask this function, never their own copy of the rule.
"""

from __future__ import annotations

from torch import Tensor


def clean_correct(logits_clean: Tensor, y: Tensor) -> Tensor:
    """(N,) bool: the clean prediction argmax Z(x) equals the label y (the attacked rows).

    Args:
        logits_clean: (N, K) logits of the clean images.
        y: (N,) labels.
    """
    return logits_clean.argmax(dim=1) == y
