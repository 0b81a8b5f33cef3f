"""Attack objectives on logits, shared by every attack."""

from __future__ import annotations

import functools
import logging

import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger(__name__)


def other_max(logits: Tensor, label: Tensor) -> Tensor:
    """max_{j != label} Z_j, with the label's logit masked by -inf (not by a zero one-hot,
    which is wrong when every other logit is negative; torchattacks #184)."""
    masked = logits.scatter(1, label[:, None], float("-inf"))
    return masked.amax(dim=1)


def other_max_index(logits: Tensor, label: Tensor) -> Tensor:
    """argmax_{j != label} Z_j per sample, shape (N,)."""
    return logits.scatter(1, label[:, None], float("-inf")).argmax(dim=1)


def margin(logits: Tensor, label: Tensor, targeted: bool) -> Tensor:
    """Signed margin that is <= 0 exactly when the attack succeeds (ties aside).

    Targeted: max_{j != t} Z_j - Z_t. Untargeted: Z_{t0} - max_{j != t0} Z_j.
    """
    own = logits.gather(1, label[:, None])[:, 0]
    rest = other_max(logits, label)
    return rest - own if targeted else own - rest


ATTACK_LOSSES: tuple[str, ...] = ("ce", "margin", "kl")


def ascent_objective(
    logits: Tensor, label: Tensor, targeted: bool, loss: str, reference: Tensor | None = None
) -> Tensor:
    """Per-sample objective an attack maximises.

    'ce': CE on the true label (untargeted) or minus CE on the target (targeted);
    'margin': the negated margin; 'kl': KL(p_ref || p) from the clean log-probabilities
    ``reference`` (the inner problem of TRADES; labels are not used).
    """
    if loss == "kl":
        if reference is None:
            raise ValueError("the 'kl' attack loss needs the clean log-probabilities")
        log_p = F.log_softmax(logits, dim=1)
        return (reference.exp() * (reference - log_p)).sum(dim=1)
    if loss == "ce":
        ce = F.cross_entropy(logits, label, reduction="none")
        return -ce if targeted else ce
    if loss == "margin":
        return -margin(logits, label, targeted)
    raise ValueError(f"attack.loss must be one of {list(ATTACK_LOSSES)}, got {loss!r}")


def is_success(logits: Tensor, y: Tensor, target: Tensor | None, targeted: bool) -> Tensor:
    """Per-sample success from logits: prediction equals the target, or differs from y."""
    pred = logits.argmax(dim=1)
    return pred == target if targeted else pred != y


@functools.cache
def capped_targets_notice(count: int, last: int) -> None:
    """One line per process when a dataset has fewer other classes than targets asked for
    (AutoAttack's 9 targets on a 6-class dataset): the cap is the authors', not silent."""
    log.warning(
        "attack.target_classes=%d is more than the %d other classes of this dataset: "
        "%d targets are attacked (the authors' AutoAttack caps it the same way)",
        count,
        last,
        last,
    )


def runner_up_aims(logits: Tensor, count: int) -> list[tuple[Tensor, int]]:
    """(aim, rank) for the classes ranked 2, ..., 1 + ``count`` by logit (capped at K - 1
    classes): the targets of AutoAttack's APGD-T and FAB-T, in their order."""
    ranked = logits.argsort(dim=1, descending=True)
    last = min(count, logits.shape[1] - 1)
    if last < count:
        capped_targets_notice(count, last)
    return [(ranked[:, r], r) for r in range(1, last + 1)]
