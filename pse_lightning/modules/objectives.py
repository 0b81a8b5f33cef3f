"""Training objectives: ``objective(model, x, y) -> (loss, logs)``.

Each training variant (standard, and the adversarial ones) is one small class; the
TrainingModule only calls it, so a variant never duplicates the training loop.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class StandardObjective:
    """Cross-entropy on clean images."""

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor,
                 index: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        acc = (logits.argmax(dim=1) == y).float().mean()
        return loss, {"loss": loss.detach(), "acc": acc}
