"""Training objectives: ``objective(model, x, y, index) -> (loss, logs)``.

Each training variant is one small class; the TrainingModule only calls it, so no variant
duplicates the training loop. Adversarial variants craft their examples with an attack of
the attack suite (in eval mode, via ``Attack.__call__``) and update in train mode.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from pse_lightning.attacks import Attack, other_max_index
from pse_lightning.core.hooks import capture_activations
from pse_lightning.validation import require_in_range, require_non_negative

Logs = dict[str, Tensor]


def _accuracy(logits: Tensor, y: Tensor) -> Tensor:
    return (logits.argmax(dim=1) == y).float().mean()


def forward_without_buffer_updates(model: nn.Module, x: Tensor) -> Tensor:
    """``model(x)`` in the model's current mode, with its buffers (BatchNorm running
    statistics) updated on throw-away copies only; forward hooks still fire."""
    params = dict(model.named_parameters())
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    return functional_call(model, (params, buffers), (x,))


class StandardObjective(nn.Module):
    """Cross-entropy on clean images."""

    def forward(
        self, model: nn.Module, x: Tensor, y: Tensor, index: Tensor | None = None
    ) -> tuple[Tensor, Logs]:
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        return loss, {"loss": loss.detach(), "acc": _accuracy(logits, y).detach()}


class AdversarialObjective(nn.Module):
    """PGD adversarial training (Madry et al., 2018): CE on examples from ``attack``.

    Args:
        attack: the attack that crafts the training examples (from the attack suite).
    """

    def __init__(self, attack: Attack) -> None:
        super().__init__()
        if not isinstance(attack, Attack):
            raise TypeError(f"training.objective.attack must be an Attack, got {type(attack)}")
        self.attack = attack

    def craft(self, model: nn.Module, x: Tensor, y: Tensor, index: Tensor | None) -> Tensor:
        """Adversarial examples, crafted in eval mode (the attack restores train mode)."""
        return self.attack(model, x, y, index=index).x_adv

    def forward(
        self, model: nn.Module, x: Tensor, y: Tensor, index: Tensor | None = None
    ) -> tuple[Tensor, Logs]:
        return self.adversarial_ce(model(self.craft(model, x, y, index)), y)

    @staticmethod
    def adversarial_ce(logits_adv: Tensor, y: Tensor) -> tuple[Tensor, Logs]:
        loss = F.cross_entropy(logits_adv, y)
        return loss, {"loss": loss.detach(), "adv_acc": _accuracy(logits_adv, y).detach()}


class TradesObjective(AdversarialObjective):
    """TRADES (Zhang et al., 2019): CE(f(x), y) + beta * KL(f(x) || f(x')).

    ``attack`` should maximise the KL term (``PGD(loss="kl")``, as in conf/training/trades).
    """

    def __init__(self, attack: Attack, beta: float = 6.0) -> None:
        super().__init__(attack)
        self.beta = require_non_negative("training.objective.beta", beta)

    def forward(
        self, model: nn.Module, x: Tensor, y: Tensor, index: Tensor | None = None
    ) -> tuple[Tensor, Logs]:
        x_adv = self.craft(model, x, y, index)
        logits, logits_adv = model(torch.cat([x, x_adv])).chunk(2)
        ce = F.cross_entropy(logits, y)
        kl = F.kl_div(
            F.log_softmax(logits_adv, 1),
            F.log_softmax(logits, 1),
            log_target=True,
            reduction="batchmean",
        )
        loss = ce + self.beta * kl
        return loss, {
            "loss": loss.detach(),
            "ce": ce.detach(),
            "kl": kl.detach(),
            "acc": _accuracy(logits, y).detach(),
            "adv_acc": _accuracy(logits_adv, y).detach(),
        }


class PSEObjective(AdversarialObjective):
    """PSE-informed adversarial training (this project's proposal, docs/METHODS.md §6.4).

    ``L = CE(f(x'), y) + lambda_s [Z_y(x) - Z_y(x')]_+ + lambda_p [Z_t(x') - Z_t(x)]_+
    + lambda_u sum_k omega_k |a_k(x') - a_k(x)| / sigma_k``

    The first extra term penalises suppression of the true logit, the second promotion of
    the adversarial runner-up t, the third the drift of the units that attacks move most
    (omega_k: each unit's share of the running mean sensitivity |Delta a_k| / sigma_k,
    sigma_k: the running std of the clean unit activation a_k, the spatial mean at
    ``layer``). Running statistics are buffers, so they follow the model's device and are
    broadcast under DDP.

    The clean reference (Z(x), a(x)) is a target, not a training signal: it is computed
    without gradients, in the model's own mode but on copies of its buffers, so BatchNorm
    normalises x and x' alike (batch statistics in train mode) while its running statistics
    see exactly the batches PGD-AT feeds them (x' alone). The loss therefore tends to
    PGD-AT's continuously as the lambdas tend to 0, with no special case.

    Args:
        attack: crafts x' (PGD-Linf on CE in conf/training/pse_at).
        lambda_s, lambda_p, lambda_u: weights of suppression, promotion and unit drift.
        layer: the hooked layer (null: the model's ``feature_layer``).
        momentum: of the running statistics, in (0, 1].
    """

    def __init__(
        self,
        attack: Attack,
        lambda_s: float = 0.1,
        lambda_p: float = 0.1,
        lambda_u: float = 0.1,
        layer: str | None = None,
        momentum: float = 0.05,
    ) -> None:
        super().__init__(attack)
        self.lambda_s = require_non_negative("training.objective.lambda_s", lambda_s)
        self.lambda_p = require_non_negative("training.objective.lambda_p", lambda_p)
        self.lambda_u = require_non_negative("training.objective.lambda_u", lambda_u)
        self.momentum = require_in_range(
            "training.objective.momentum", momentum, 0.0, 1.0, low_open=True
        )
        self.layer = layer
        self.register_buffer("unit_var", torch.empty(0))
        self.register_buffer("unit_sensitivity", torch.empty(0))

    def pse_terms(self, logits: Tensor, logits_adv: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Mean true-class suppression and runner-up promotion, each >= 0."""
        target = other_max_index(logits_adv.detach(), y)
        z_y, z_y_adv = logits.gather(1, y[:, None]), logits_adv.gather(1, y[:, None])
        z_t, z_t_adv = logits.gather(1, target[:, None]), logits_adv.gather(1, target[:, None])
        return F.relu(z_y - z_y_adv).mean(), F.relu(z_t_adv - z_t).mean()

    def unit_drift(self, units: Tensor, units_adv: Tensor) -> Tensor:
        """Sensitivity-weighted normalised drift of unit means; updates running stats."""
        with torch.no_grad():
            var = units.var(dim=0, unbiased=False)
            if self.unit_var.numel() != var.numel():
                self.unit_var = var.clone()
            else:
                self.unit_var.lerp_(var, self.momentum)
        sigma = self.unit_var.sqrt().clamp_min(1e-6)
        drift = (units_adv - units).abs() / sigma
        with torch.no_grad():
            sens = drift.mean(dim=0)
            if self.unit_sensitivity.numel() != sens.numel():
                self.unit_sensitivity = sens.clone()
            else:
                self.unit_sensitivity.lerp_(sens, self.momentum)
            omega = self.unit_sensitivity / self.unit_sensitivity.sum().clamp_min(1e-12)
        return (drift * omega).sum(dim=1).mean()

    def clean_and_adversarial(
        self, model: nn.Module, x: Tensor, y: Tensor, index: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Clean logits and units (no gradient, no BatchNorm update), then the crafted
        adversarial batch's logits and units (with gradient): what every PSE-type penalty
        compares."""
        x_adv = self.craft(model, x, y, index)
        layer = self.layer or model.feature_layer
        with capture_activations(model, [layer]) as acts:
            with torch.no_grad():
                logits = forward_without_buffer_updates(model, x)
                units = acts[layer].mean(dim=(2, 3))
            logits_adv = model(x_adv)
            units_adv = acts[layer].mean(dim=(2, 3))
        return logits, logits_adv, units, units_adv

    def forward(
        self, model: nn.Module, x: Tensor, y: Tensor, index: Tensor | None = None
    ) -> tuple[Tensor, Logs]:
        logits, logits_adv, units, units_adv = self.clean_and_adversarial(model, x, y, index)
        ce = F.cross_entropy(logits_adv, y)
        suppression, promotion = self.pse_terms(logits, logits_adv, y)
        drift = self.unit_drift(units, units_adv)
        loss = ce + self.lambda_s * suppression + self.lambda_p * promotion + self.lambda_u * drift
        return loss, {
            "loss": loss.detach(),
            "ce_adv": ce.detach(),
            "suppression": suppression.detach(),
            "promotion": promotion.detach(),
            "unit_drift": drift.detach(),
            "adv_acc": _accuracy(logits_adv, y).detach(),
        }


def logit_drift(logits: Tensor, logits_adv: Tensor) -> Tensor:
    """Mean absolute clean-vs-adversarial logit change, ``mean_i mean_k |Z_k(x'_i) - Z_k(x_i)|``:
    every class alike, no true class, no runner-up, no unit (no PSE information)."""
    return (logits_adv - logits).abs().mean()


class MatchedDriftObjective(PSEObjective):
    """The matched-strength control of pse_at (docs/METHODS.md §6.4): PGD-AT plus an
    unweighted logit-drift penalty as strong as pse_at's penalty, carrying no PSE information.

    ``L = CE(f(x'), y) + c * D(x, x')``, ``D`` = :func:`logit_drift`,
    ``c = stopgrad(P / D)`` with ``P = lambda_s S + lambda_p P_t + lambda_u U`` the penalty
    :class:`PSEObjective` with the same lambdas takes on the same batch (0 when ``D`` = 0).

    "Matched" means: on every training batch the control's penalty has exactly the value of
    pse_at's penalty (``c * D = P``), so the two add the same amount to the loss; its gradient
    is that of an unweighted drift, ``c / (B K) * sign(Z(x') - Z(x))`` on each adversarial logit
    (B images, K classes), so what differs from pse_at is where the penalty pushes (every
    logit alike against the true logit, the runner-up and the sensitive units), not how much.
    The scale ``c`` is one detached number per batch, the only thing taken from the PSE terms.

    Args: as :class:`PSEObjective` (the lambdas set the strength to match).
    """

    def forward(
        self, model: nn.Module, x: Tensor, y: Tensor, index: Tensor | None = None
    ) -> tuple[Tensor, Logs]:
        logits, logits_adv, units, units_adv = self.clean_and_adversarial(model, x, y, index)
        ce = F.cross_entropy(logits_adv, y)
        drift = logit_drift(logits, logits_adv)
        with torch.no_grad():
            suppression, promotion = self.pse_terms(logits, logits_adv, y)
            units_drift = self.unit_drift(units, units_adv)
            matched = (
                self.lambda_s * suppression + self.lambda_p * promotion
                + self.lambda_u * units_drift
            )  # fmt: skip
            scale = self.matched_scale(matched, drift)
        penalty = scale * drift
        loss = ce + penalty
        return loss, {
            "loss": loss.detach(),
            "ce_adv": ce.detach(),
            "logit_drift": drift.detach(),
            "penalty": penalty.detach(),
            "pse_penalty": matched,
            "adv_acc": _accuracy(logits_adv, y).detach(),
        }

    @staticmethod
    def matched_scale(target: Tensor, drift: Tensor) -> Tensor:
        """``target / drift`` detached, 0 where the drift is 0 (then both penalties are 0
        up to the unit term, and nothing can be matched by scaling a zero)."""
        drift = drift.detach()
        return torch.where(drift > 0, target.detach() / drift.clamp_min(1e-12), 0.0)
