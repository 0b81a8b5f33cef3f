"""The Attack contract shared by every attack.

``Attack.__call__`` is the one public entry point and is the same for all attacks: it
validates the batch, freezes the model in eval mode (restoring every module's own mode
afterwards), resolves the target, calls the subclass's ``_perturb``, enforces the box and
the norm budget exactly, and recomputes logits and success with a fresh forward pass on the
exact tensor it returns (the EAD bug of foolbox PR #559 and torchattacks PR #140).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from pse_lightning.attacks import randomness
from pse_lightning.attacks.losses import ascent_objective, is_success, other_max_index
from pse_lightning.attacks.norms import NORMS, LpBall, Norm
from pse_lightning.validation import (
    require_choice,
    require_images,
    require_in_range,
    require_labels,
    require_positive,
)

TARGET_RULES: tuple[str, ...] = ("random", "least_likely", "next")
# Streams of the counter-based RNG, one per use, so uses never share noise.
STREAM_START, STREAM_TARGET = 1, 2


@dataclass(frozen=True)
class AttackResult:
    """What an attack returns for a batch of N images.

    Attributes:
        x_adv: (N, C, H, W) adversarial images in [0, 1], within the budget.
        success: (N,) bool, from a fresh forward pass on ``x_adv``.
        logits_adv: (N, K) logits of ``x_adv``.
        target: (N,) the class the perturbation aims at: the requested target of a
            targeted attack, else the adversarial runner-up argmax_{j != y} Z_j(x_adv)
            (the class the PSE analysis measures promotion for).
        targeted: whether the attack was targeted.
        extras: attack-specific per-sample tensors (for example the group structure of the
            structured attack), keyed by name.
    """

    x_adv: Tensor
    success: Tensor
    logits_adv: Tensor
    target: Tensor
    targeted: bool
    extras: dict[str, Tensor] = field(default_factory=dict)


@contextmanager
def frozen_eval(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode and restore each one's own flag afterwards.

    Restoring module by module (not ``model.train(was_training)``) keeps a deliberately
    frozen BatchNorm inside a training model frozen (torchattacks #21).
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, mode in modes:
            module.training = mode


def input_gradient(objective: Tensor, x: Tensor) -> Tensor:
    """d(sum of per-sample objectives)/dx: each sample's gradient ignores its batch mates.

    ``torch.autograd.grad`` never fills parameter ``.grad`` and never fires a DDP reducer,
    unlike ``.backward()`` (pytorch #22436).
    """
    (grad,) = torch.autograd.grad(objective.sum(), x)
    return grad


class Attack(ABC):
    """Base class: subclasses implement ``_perturb`` only.

    Args:
        norm: the threat model's norm, 'linf' or 'l2'; None for minimum-norm attacks
            (CW, EAD) that have no budget.
        eps: the budget in [0, 1] pixel units (linf: (0, 1]; l2: > 0).
        targeted: aim at a target class chosen by ``target_rule`` (or passed explicitly).
        target_rule: 'random', 'least_likely' (lowest clean logit) or 'next' ((y + 1) mod K).
        seed: seed of the per-sample counter-based RNG (random starts, random targets).
    """

    def __init__(
        self,
        *,
        norm: Norm | None = "linf",
        eps: float | None = 0.03,
        targeted: bool = False,
        target_rule: str = "random",
        seed: int = 0,
    ) -> None:
        if norm is None:
            self.ball = None
        else:
            require_choice("attack.norm", norm, NORMS)
            if norm == "linf":
                require_in_range(
                    "attack.eps", eps, 0.0, 1.0, low_open=True,
                    hint="inputs are in [0, 1], for 8/255 write 0.0314",
                )
            else:
                require_positive("attack.eps", eps)
            self.ball = LpBall(norm, float(eps))
        self.norm = norm
        self.eps = None if eps is None else float(eps)
        if not isinstance(targeted, bool):
            raise ValueError(f"attack.targeted must be true or false, got {targeted!r}")
        self.targeted = targeted
        self.target_rule = require_choice("attack.target_rule", target_rule, TARGET_RULES)
        self.seed = int(seed)

    @property
    def name(self) -> str:
        return type(self).__name__

    def __call__(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        target: Tensor | None = None,
        index: Tensor | None = None,
    ) -> AttackResult:
        """Attack a batch.

        Args:
            model: maps [0, 1] images (N, C, H, W) to logits (N, K).
            x: clean images in [0, 1].
            y: (N,) true labels.
            target: (N,) explicit target classes; only for targeted attacks.
            index: (N,) dataset indices that key the per-sample randomness; defaults to
                0..N-1, so pass them whenever results must not depend on batching.

        Returns:
            An :class:`AttackResult`.
        """
        require_images("x", x)
        if index is None:
            index = torch.arange(len(x), device=x.device)
        with frozen_eval(model), torch.enable_grad():
            logits_clean = None
            if self.targeted and target is None:
                with torch.no_grad():
                    logits_clean = model(x)
            num_classes = self._num_classes(model, x, logits_clean)
            require_labels("y", y, len(x), num_classes)
            if target is not None:
                if not self.targeted:
                    raise ValueError("an explicit target was passed to an untargeted attack; "
                                     "set attack.targeted=true")
                require_labels("target", target, len(x), num_classes)
            elif self.targeted:
                target = self.choose_target(logits_clean, y, index)
            label = target if self.targeted else y
            x_adv = self._perturb(model, x.detach(), label, index).detach()
            x_adv = self.enforce_constraints(x, x_adv)
            with torch.no_grad():
                logits_adv = model(x_adv)
        success = is_success(logits_adv, y, target, self.targeted)
        aimed = target if self.targeted else other_max_index(logits_adv, y)
        return AttackResult(
            x_adv=x_adv,
            success=success,
            logits_adv=logits_adv,
            target=aimed,
            targeted=self.targeted,
            extras=self.extras(),
        )

    # -- hooks for subclasses -------------------------------------------------------------

    @abstractmethod
    def _perturb(self, model: nn.Module, x: Tensor, label: Tensor, index: Tensor) -> Tensor:
        """Return adversarial images for ``x``; ``label`` is the target (targeted) or y."""

    def extras(self) -> dict[str, Tensor]:
        """Attack-specific outputs of the last call (group structure, constants...)."""
        return {}

    # -- shared machinery -----------------------------------------------------------------

    def enforce_constraints(self, x: Tensor, x_adv: Tensor) -> Tensor:
        """Clip to the budget (if any) and to the box [0, 1]."""
        if self.ball is not None:
            return self.ball.project(x, x_adv)
        return x_adv.clamp(0.0, 1.0)

    def sample_start(self, x: Tensor, index: Tensor) -> Tensor:
        """A uniformly random point of the ball, keyed by (seed, sample index)."""
        noise = randomness.uniform(index, tuple(x.shape[1:]), self.seed, STREAM_START)
        return self.ball.sample(x, noise.to(x.dtype))

    def objective_gradient(
        self, model: nn.Module, x_adv: Tensor, label: Tensor, loss: str,
        reference: Tensor | None = None,
    ) -> Tensor:
        """Gradient of the per-sample ascent objective at ``x_adv`` (one fwd + one bwd)."""
        x_adv = x_adv.detach().requires_grad_(True)
        objective = ascent_objective(model(x_adv), label, self.targeted, loss, reference)
        return input_gradient(objective, x_adv)

    def choose_target(self, logits_clean: Tensor, y: Tensor, index: Tensor) -> Tensor:
        """Resolve ``target_rule`` into (N,) target classes, never equal to y."""
        num_classes = logits_clean.shape[1]
        if self.target_rule == "next":
            return (y + 1) % num_classes
        if self.target_rule == "least_likely":
            return logits_clean.scatter(1, y[:, None], float("inf")).argmin(dim=1)
        return randomness.randint_excluding(index, y, num_classes, self.seed, STREAM_TARGET)

    @staticmethod
    def _num_classes(model: nn.Module, x: Tensor, logits: Tensor | None) -> int:
        known = getattr(model, "num_classes", None)
        if isinstance(known, int):
            return known
        if logits is None:
            with torch.no_grad():
                logits = model(x[:1])
        return int(logits.shape[1])

