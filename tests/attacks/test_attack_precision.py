"""Attacks stay exact under mixed precision: autocast is off inside the attack, so a
bf16-mixed run crafts the same examples, within the same budget and box, as a float32 run."""

from __future__ import annotations

import pytest
import torch

from pse_lightning.attacks import CWL2, FGSM, PGD, flat_norm
from pse_lightning.models import SmallCNN


def model_and_batch():
    torch.manual_seed(0)
    model = SmallCNN(num_classes=4, in_channels=3, mean=[0.5] * 3, std=[0.25] * 3, widths=[8, 16])
    model.eval()
    x = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x).argmax(1)  # clean-correct by construction: every row is attacked
    return model, x, y


@pytest.mark.parametrize(
    "attack",
    [FGSM(eps=0.03), PGD(norm="linf", eps=0.03, steps=3), PGD(norm="l2", eps=0.5, steps=3),
     CWL2(steps=5, binary_search_steps=1)],
    ids=["fgsm", "pgd_linf", "pgd_l2", "cw"],
)  # fmt: skip
def test_bf16_autocast_changes_nothing_and_the_budget_holds(attack) -> None:
    model, x, y = model_and_batch()
    plain = attack(model, x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = attack(model, x, y)
        logits = mixed.logits_adv  # scored inside autocast too
    assert logits.dtype == torch.float32
    assert torch.equal(plain.x_adv, mixed.x_adv) and torch.equal(plain.success, mixed.success)
    assert mixed.x_adv.min() >= 0 and mixed.x_adv.max() <= 1
    if attack.norm is not None:
        assert (flat_norm(mixed.x_adv - x, attack.norm) <= attack.eps * (1 + 1e-6)).all()


def test_low_precision_weights_are_refused_before_the_test_loop() -> None:
    from pse_lightning.modules.evaluation import EvaluationModule
    from pse_lightning.validation import InputError

    model, _, _ = model_and_batch()
    module = EvaluationModule(model.to(torch.bfloat16), FGSM(eps=0.03))
    with pytest.raises(InputError, match="trainer.precision"):
        module.on_test_start()
