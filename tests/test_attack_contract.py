"""The Attack contract, checked for every attack config in conf/attack/."""

from __future__ import annotations

import pytest
import torch
from helpers import CONF_DIR, group_choices
from hydra.utils import instantiate
from omegaconf import OmegaConf

from pse_lightning.attacks import PGD
from pse_lightning.attacks.norms import flat_norm
from pse_lightning.models import SmallCNN

ATTACKS = group_choices("attack")


def tiny_model(seed: int = 0) -> SmallCNN:
    torch.manual_seed(seed)
    model = SmallCNN(num_classes=5, in_channels=3, mean=[0.5] * 3, std=[0.25] * 3, widths=[8, 16])
    # Non-trivial BatchNorm statistics so a wrong train/eval mode changes the outputs.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return model.eval()


# The contract does not depend on how long an attack runs: cap every iteration count.
QUICK_CAPS = {"steps": 5, "binary_search_steps": 2, "refine_steps": 5, "refine_search_steps": 1}


def _cap_iterations(node) -> None:
    for key in list(node.keys()):
        if key in QUICK_CAPS:
            node[key] = min(int(node[key]), QUICK_CAPS[key])
        elif OmegaConf.is_dict(node[key]):
            _cap_iterations(node[key])


def attack_from_yaml(name: str, **overrides):
    cfg = OmegaConf.load(CONF_DIR / "attack" / f"{name}.yaml")
    cfg.seed = 3
    _cap_iterations(cfg)
    return instantiate(cfg, **overrides)


def batch(n: int = 6, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 16, 16, generator=gen), torch.randint(0, 5, (n,), generator=gen)


@pytest.mark.parametrize("name", ATTACKS)
def test_box_budget_and_success(name: str) -> None:
    model, (x, y) = tiny_model(), batch()
    attack = attack_from_yaml(name)
    result = attack(model, x, y)
    assert result.x_adv.shape == x.shape and result.x_adv.dtype == x.dtype
    assert result.x_adv.min() >= 0 and result.x_adv.max() <= 1
    if attack.ball is not None:
        assert (flat_norm(result.x_adv - x, attack.norm) <= attack.eps * (1 + 1e-5) + 1e-7).all()
    with torch.no_grad():
        logits = model(result.x_adv)
    torch.testing.assert_close(result.logits_adv, logits)
    assert torch.equal(result.success, logits.argmax(1) != y)
    assert (result.target != y).all()


@pytest.mark.parametrize("name", ATTACKS)
def test_model_untouched(name: str) -> None:
    model, (x, y) = tiny_model(), batch()
    model.train()
    model.net.features[0][1].eval()  # a deliberately frozen BatchNorm must stay frozen
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    attack_from_yaml(name)(model, x, y)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "attack changed the model"
    assert [m.training for m in model.modules()] == modes
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("name", ATTACKS)
def test_deterministic_and_batch_independent(name: str) -> None:
    model, (x, y) = tiny_model(), batch()
    index = torch.arange(100, 106)
    attack = attack_from_yaml(name)
    first = attack(model, x, y, index=index)
    again = attack(model, x, y, index=index)
    assert torch.equal(first.x_adv, again.x_adv)
    half = attack(model, x[3:], y[3:], index=index[3:])
    torch.testing.assert_close(half.x_adv, first.x_adv[3:], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ATTACKS)
def test_targeted_rules(name: str) -> None:
    model, (x, y) = tiny_model(), batch()
    for rule in ("random", "least_likely", "next"):
        result = attack_from_yaml(name, targeted=True, target_rule=rule)(model, x, y)
        assert (result.target != y).all()
        assert torch.equal(result.success, result.logits_adv.argmax(1) == result.target)
    with torch.no_grad():
        clean = model(x)
    nxt = attack_from_yaml(name, targeted=True, target_rule="next")(model, x, y)
    assert torch.equal(nxt.target, (y + 1) % 5)
    ll = attack_from_yaml(name, targeted=True, target_rule="least_likely")(model, x, y)
    assert torch.equal(ll.target, clean.scatter(1, y[:, None], float("inf")).argmin(1))


class LinearNet(torch.nn.Module):
    """Z = W x + b on flattened images: every class is reachable with a large enough budget."""

    num_classes = 5

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(3 * 16 * 16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def test_targeted_pgd_lands_on_target_with_enough_budget() -> None:
    model, (x, y) = LinearNet(), batch(16)
    attack = PGD(eps=0.5, step_size=0.05, steps=40, targeted=True, target_rule="next")
    result = attack(model, x, y)
    assert result.success.all()
    assert torch.equal(result.logits_adv.argmax(1)[result.success], ((y + 1) % 5)[result.success])


def test_pgd_increases_loss_over_fgsm_start() -> None:
    """More PGD steps never lower the attack's loss much below one step (sanity of ascent)."""
    model, (x, y) = tiny_model(), batch(16)
    ce = torch.nn.functional.cross_entropy
    with torch.no_grad():
        clean_loss = ce(model(x), y)
    result = PGD(eps=0.05, step_size=0.01, steps=20)(model, x, y)
    assert ce(result.logits_adv, y) > clean_loss


@pytest.mark.parametrize(
    ("bad", "key"),
    [({"eps": -0.1}, "attack.eps"), ({"eps": 8}, "attack.eps"), ({"steps": 0}, "attack.steps"),
     ({"norm": "l3"}, "attack.norm"), ({"target_rule": "best"}, "attack.target_rule")],
)
def test_bad_hyperparameters_name_the_key(bad: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key):
        PGD(**bad)


def test_rejects_normalised_or_nan_inputs() -> None:
    model, (x, y) = tiny_model(), batch()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        PGD()(model, (x - 0.5) / 0.25, y)
    x_nan = x.clone()
    x_nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        PGD()(model, x_nan, y)
    with pytest.raises(ValueError, match="untargeted"):
        PGD()(model, x, y, target=(y + 1) % 5)
