"""Training objectives: each lowers its loss, and the PSE terms have the intended signs."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import group_choices
from hydra.utils import instantiate

from pse_lightning.attacks import PGD
from pse_lightning.models import SmallCNN
from pse_lightning.modules.objectives import AdversarialObjective, PSEObjective


def model_and_batch(seed: int = 0):
    torch.manual_seed(seed)
    model = SmallCNN(num_classes=3, in_channels=3, mean=[0.5] * 3, std=[0.25] * 3, widths=[8, 16])
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(16, 3, 16, 16, generator=gen)
    y = torch.randint(0, 3, (16,), generator=gen)
    return model, x, y, torch.arange(16)


@pytest.mark.parametrize("choice", [c for c in group_choices("training") if c != "none"])
def test_training_step_lowers_the_loss(composed, choice: str) -> None:
    cfg = copy.deepcopy(composed(f"training={choice}"))  # the session's, shared
    if "attack" in cfg.training.objective:
        cfg.training.objective.attack.steps = 2  # the descent, not the attack, is under test
    objective = instantiate(cfg.training.objective)
    model, x, y, index = model_and_batch()
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    first, _ = objective(model, x, y, index)
    for _ in range(8):
        optimizer.zero_grad()
        loss, logs = objective(model, x, y, index)
        loss.backward()
        optimizer.step()
    last, _ = objective(model, x, y, index)
    assert torch.isfinite(last) and float(last.detach()) < float(first.detach())
    assert all(torch.isfinite(v) for v in logs.values())


def test_pse_terms_have_the_intended_signs() -> None:
    objective = PSEObjective(PGD(eps=0.03, steps=1), lambda_s=1, lambda_p=1, lambda_u=0)
    y = torch.tensor([0])
    logits = torch.tensor([[3.0, 1.0, 0.0]])
    # Adversarial logits: the true class fell by 2, the runner-up (class 2) rose by 4.
    logits_adv = torch.tensor([[1.0, 1.0, 4.0]])
    suppression, promotion = objective.pse_terms(logits, logits_adv, y)
    assert float(suppression) == pytest.approx(2.0) and float(promotion) == pytest.approx(4.0)
    # A perturbation that raises the true logit and lowers every other is penalised by neither.
    suppression, promotion = objective.pse_terms(logits, torch.tensor([[5.0, 0.5, -1.0]]), y)
    assert float(suppression) == 0 and float(promotion) == 0


def test_unit_drift_weights_the_most_sensitive_units() -> None:
    objective = PSEObjective(PGD(eps=0.03, steps=1), momentum=1.0)
    units = torch.randn(64, 4)
    moved = units.clone()
    moved[:, 2] += 3.0  # only unit 2 is moved by the attack
    drift = objective.unit_drift(units, moved)
    omega = objective.unit_sensitivity / objective.unit_sensitivity.sum()
    assert int(omega.argmax()) == 2 and float(omega[2]) == pytest.approx(1.0)
    assert float(drift) == pytest.approx(3.0 / float(objective.unit_var[2].sqrt()), rel=1e-4)


@pytest.mark.parametrize("weight", [0.0, 1e-6])
def test_pse_at_tends_to_pgd_at_as_the_weights_vanish(weight: float) -> None:
    """No special case for zero weights: the same code path, loss and BatchNorm buffers."""
    attack = PGD(eps=0.03, step_size=0.01, steps=3)
    model, x, y, index = model_and_batch()
    model.train()
    twin = copy.deepcopy(model)  # train-mode forwards move BatchNorm statistics
    pse = PSEObjective(attack, lambda_s=weight, lambda_p=weight, lambda_u=weight)
    pse_loss, logs = pse(model, x, y, index)
    pgd_loss, _ = AdversarialObjective(attack)(twin, x, y, index)
    assert "unit_drift" in logs  # the PSE terms were computed, not skipped
    assert abs(float(pse_loss) - float(pgd_loss)) <= 1e-4
    buffers = dict(twin.named_buffers())
    for name, buffer in model.named_buffers():
        torch.testing.assert_close(buffer, buffers[name], atol=1e-4, rtol=0)
    # And the terms do act when the weights are not small.
    strong, _ = PSEObjective(attack, lambda_s=1.0, lambda_p=1.0, lambda_u=1.0)(
        copy.deepcopy(twin), x, y, index
    )
    assert float(strong) > float(pgd_loss) + 1e-3
