"""The Attack contract, checked for every attack config in conf/attack/."""

from __future__ import annotations

import pytest
import torch
from helpers import CONF_DIR, group_choices
from hydra.utils import instantiate
from omegaconf import OmegaConf

from pse_lightning.attacks import CWL2, EAD, FGSM, PGD, Attack, StrAttack
from pse_lightning.attacks.base import AttackBatch, Perturbation
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
QUICK_CAPS = {
    "steps": 5,
    "binary_search_steps": 2,
    "refine_steps": 5,
    "refine_search_steps": 1,
    "n_queries": 20,
    "square_queries": 20,
}


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


def mixed_batch(model, n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Even rows labelled with the model's prediction (attacked), odd rows with another
    class (clean-misclassified), so both kinds of row are checked."""
    x, _ = batch(n)
    with torch.no_grad():
        pred = model(x).argmax(1)
    odd = torch.arange(n) % 2 == 1
    return x, torch.where(odd, (pred + 1) % 5, pred)


def expected_success(model, x, x_adv, y, target=None) -> torch.Tensor:
    """docs/METHODS.md §1.1: the clean prediction was right and the adversarial one is wrong
    (targeted: equals the target)."""
    with torch.no_grad():
        clean, adv = model(x).argmax(1), model(x_adv).argmax(1)
    hit = adv != y if target is None else adv == target
    return hit & (clean == y)


@pytest.mark.parametrize("name", ATTACKS)
def test_box_budget_and_success(name: str) -> None:
    model = tiny_model()
    x, y = mixed_batch(model)
    attack = attack_from_yaml(name)
    result = attack(model, x, y)
    assert result.x_adv.shape == x.shape and result.x_adv.dtype == x.dtype
    assert result.x_adv.min() >= 0 and result.x_adv.max() <= 1
    if attack.ball is not None:
        assert (flat_norm(result.x_adv - x, attack.norm) <= attack.eps * (1 + 1e-5) + 1e-7).all()
    with torch.no_grad():
        logits = model(result.x_adv)
    torch.testing.assert_close(result.logits_adv, logits)
    assert torch.equal(result.success, expected_success(model, x, result.x_adv, y))
    assert torch.equal(result.attacked, torch.arange(len(y)) % 2 == 0)
    assert not result.success[1::2].any(), "a clean-misclassified row counted as a success"
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
    model = tiny_model()
    x, y = mixed_batch(model)
    targets = {}
    for rule in ("random", "least_likely", "next"):
        result = attack_from_yaml(name, targeted=True, target_rule=rule)(model, x, y)
        assert (result.target != y).all()
        want = expected_success(model, x, result.x_adv, y, result.target)
        assert torch.equal(result.success, want)
        targets[rule] = result.target
    with torch.no_grad():
        clean = model(x)
    assert torch.equal(targets["next"], (y + 1) % 5)
    least_likely = clean.scatter(1, y[:, None], float("inf")).argmin(1)
    assert torch.equal(targets["least_likely"], least_likely)


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
    model, (x, _) = LinearNet(), batch(16)
    with torch.no_grad():
        y = model(x).argmax(1)
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
    [
        ({"eps": -0.1}, "attack.eps"),
        ({"eps": 8}, "attack.eps"),
        ({"steps": 0}, "attack.steps"),
        ({"norm": "l3"}, "attack.norm"),
        ({"target_rule": "best"}, "attack.target_rule"),
    ],
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


@pytest.mark.parametrize("name", ATTACKS)
def test_explicit_target_equal_to_y_is_an_error(name: str) -> None:
    model, (x, y) = tiny_model(), batch()
    target = (y + 1) % 5
    target[2] = y[2]
    with pytest.raises(ValueError, match=r"target equals y in rows \[2\]"):
        attack_from_yaml(name, targeted=True)(model, x, y, target=target)


def test_clean_logits_from_the_caller_cost_no_forward() -> None:
    """The evaluation loop passes its clean logits: ``attacked`` is read from them."""
    model = tiny_model()
    x, y = mixed_batch(model)
    counter = CountingNet(model)
    with torch.no_grad():
        clean = model(x)
    result = FGSM(eps=0.03)(counter, x, y, logits_clean=clean)
    _ = result.success
    assert counter.rows == 2 * len(x)  # gradient step + scoring; no clean forward
    assert torch.equal(result.attacked, clean.argmax(1) == y)
    with pytest.raises(ValueError, match="logits_clean must have shape"):
        FGSM()(model, x, y, logits_clean=clean[:, :3])


# -- what _perturb sees and returns -----------------------------------------------------------


class CountingNet(torch.nn.Module):
    """Counts the rows the wrapped model evaluates."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.num_classes, self.rows = model, 5, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rows += len(x)
        return self.model(x)


class Scripted(Attack):
    """Returns a fixed image batch with fixed (possibly wrong or NaN) logits; records the
    AttackBatch it was given."""

    def __init__(self, x_adv, logits, **kw) -> None:
        super().__init__(norm="linf", eps=0.1, **kw)
        self.out, self.logits, self.seen = x_adv, logits, None

    def _perturb(self, model, batch: AttackBatch):
        self.seen = batch
        return Perturbation(self.out, self.logits)


def test_handed_logits_are_used_only_for_rows_the_enforcement_kept() -> None:
    """Success is measured on the returned (projected) image: rows the projection changed,
    and rows with NaN logits, are forwarded again; the other rows cost no forward pass."""
    model, (x, y) = tiny_model(), batch(6)
    counter = CountingNet(model)
    x_adv = x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    x_adv = PGD(eps=0.1).enforce_constraints(x, x_adv)
    x_adv[1] = x[1] + 0.5  # outside the 0.1 ball and the box: projected
    with torch.no_grad():
        honest = model(x_adv)
    handed = honest.clone()
    handed[1] = 100.0  # stale: describes the unprojected image
    handed[3] = float("nan")  # unknown
    handed[4] = torch.tensor([0.0, 0.0, 0.0, 0.0, 9.0])  # a lie on an unchanged row is kept
    result = Scripted(x_adv, handed)(counter, x, y)
    _ = result.logits_adv
    assert counter.rows == 2  # rows 1 and 3 only
    with torch.no_grad():
        fresh = model(result.x_adv)
    keep = torch.tensor([True, False, True, False, False, True])
    torch.testing.assert_close(result.logits_adv[keep], fresh[keep])
    torch.testing.assert_close(result.logits_adv[1], fresh[1])
    torch.testing.assert_close(result.logits_adv[3], fresh[3])
    assert torch.equal(result.logits_adv[4], handed[4])  # trusted as the attack's own pass
    with torch.no_grad():
        clean_ok = model(x).argmax(1) == y
    assert torch.equal(result.success, (result.logits_adv.argmax(1) != y) & clean_ok)
    # Without logits every row is forwarded once (and x once, for the clean prediction).
    counter.rows = 0
    _ = Scripted(x_adv, None)(counter, x, y).success
    assert counter.rows == 12


def test_perturb_sees_true_labels_and_targets() -> None:
    model, (x, y) = tiny_model(), batch(6)
    spy = Scripted(x, None, targeted=True, target_rule="next")
    spy(model, x, y, index=torch.arange(10, 16))
    assert torch.equal(spy.seen.y, y) and torch.equal(spy.seen.target, (y + 1) % 5)
    assert torch.equal(spy.seen.label, (y + 1) % 5)
    assert torch.equal(spy.seen.index, torch.arange(10, 16)) and spy.seen.support is None
    spy = Scripted(x, None)
    spy(model, x, y)
    assert spy.seen.target is None and torch.equal(spy.seen.label, y)


@pytest.mark.parametrize(
    ("attack", "steps"),
    [(FGSM(eps=0.03), 1), (PGD(steps=3, random_start=True), 3),
     (PGD(steps=3, random_start=False, targeted=True, target_rule="random"), 3),
     (PGD(steps=2, restarts=2, eps=0.3, step_size=0.1), 4)],
)  # fmt: skip
def test_budget_attacks_pay_one_scoring_forward(attack: Attack, steps: int) -> None:
    """FGSM/PGD: one forward per gradient step, plus one for the returned image of each
    row whose returned iterate was not already scored (PGD hands over the logits of a
    successful best iterate); with the caller's clean logits, no clean forward."""
    counter, (x, y) = CountingNet(tiny_model()), batch(6)
    with torch.no_grad():
        clean = counter.model(x)
    result = attack(counter, x, y, logits_clean=clean)
    gradient_rows = counter.rows
    assert gradient_rows == steps * len(x)
    _ = result.success
    unscored = len(x) if isinstance(attack, FGSM) else int((~result.success).sum())
    assert counter.rows - gradient_rows <= unscored


@pytest.mark.parametrize("abort_early", [False, True])
@pytest.mark.parametrize("cls", [CWL2, EAD, StrAttack])
def test_min_norm_attacks_forward_only_the_rows_they_never_solved(cls, abort_early) -> None:
    """The tracked logits of the best iterate spare the scoring forward of every found row."""
    counter, (x, y) = CountingNet(tiny_model()), batch(6)
    kw = {"refine": False} if cls is StrAttack else {}
    attack = cls(steps=4, binary_search_steps=2, abort_early=abort_early, **kw)
    rows_per_eval: list[int] = []
    model = counter.model

    class Recorder(torch.nn.Module):
        num_classes = 5

        def forward(self, xx):
            rows_per_eval.append(len(xx))
            return model(xx)

    result = attack(Recorder(), x, y)
    _ = result.logits_adv  # the scoring forward, if any, is the last one
    found = torch.isfinite(result.extras["const"])
    iterations = sum(rows_per_eval[: len(rows_per_eval) - (0 if found.all() else 1)])
    if not abort_early:
        # FISTA scores the proximal iterate x^k with its own forward (gradient at y^k); CW
        # evaluates its first iterate, x, once for both constants.
        per_sample = {CWL2: 1 + 2 * 3, EAD: 4 * 2 * 2, StrAttack: 4 * 2}[cls]
        assert iterations == len(x) * per_sample
    assert sum(rows_per_eval) == iterations + int((~found).sum())
    with torch.no_grad():
        torch.testing.assert_close(result.logits_adv, model(result.x_adv), atol=1e-5, rtol=1e-5)


def random_support(x: torch.Tensor, channels: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    return torch.rand(len(x), channels, *x.shape[2:], generator=gen) < 0.4


@pytest.mark.parametrize("name", ATTACKS)
def test_support_mask_confines_every_attack(name: str) -> None:
    model, (x, _) = tiny_model(), batch()
    with torch.no_grad():
        y = model(x).argmax(1)  # correctly classified: a success must move the image
    attack = attack_from_yaml(name)
    support = random_support(x)
    result = attack(model, x, y, support=support)
    delta = result.x_adv - x
    assert torch.all(delta * ~support == 0), "perturbation outside the support"
    moved = delta.abs().flatten(1).amax(1) > 0
    # Minimum-norm attacks (no budget, a search over constants, or FAB's boundary search,
    # which returns x where it found nothing within eps): exactly the found examples moved.
    if attack.ball is None or "const" in result.extras or "norm" in result.extras:
        assert torch.equal(moved, result.success)
        if "const" in result.extras:
            assert torch.equal(moved, torch.isfinite(result.extras["const"]))
    else:
        assert moved.all(), "nothing was perturbed inside"
    with torch.no_grad():
        torch.testing.assert_close(result.logits_adv, model(result.x_adv))
    assert torch.equal(result.success, result.logits_adv.argmax(1) != y)


def test_l2_pgd_spends_its_whole_budget_inside_the_support() -> None:
    """Masked gradients and starts, not post-hoc masking: the L2 step and the random start
    live in the support, so a saturating attack reaches ||delta|| = eps there."""
    model, (x, _) = tiny_model(), batch()
    x = 0.25 + 0.5 * x  # far from the box, so only the ball binds
    with torch.no_grad():
        y = model(x).argmax(1)  # correctly classified: the start itself is no success
    support = random_support(x, channels=3)
    result = PGD(norm="l2", eps=0.5, step_size=0.5, steps=3)(model, x, y, support=support)
    norms = flat_norm(result.x_adv - x, "l2")
    torch.testing.assert_close(norms, torch.full_like(norms, 0.5), atol=1e-4, rtol=0)


def test_masked_cw_with_early_abort_is_batch_independent() -> None:
    """The support is compacted with the rows, so early abort and masks combine (the old
    reparametrised CAM wrapper needed abort_early=false)."""
    model, (x, y) = tiny_model(), batch()
    support = random_support(x)
    attack = CWL2(steps=20, binary_search_steps=2, abort_early=True, initial_const=1.0)
    full = attack(model, x, y, support=support)
    assert torch.all((full.x_adv - x) * ~support == 0)
    half = attack(model, x[2:], y[2:], support=support[2:])
    torch.testing.assert_close(half.x_adv, full.x_adv[2:], atol=1e-5, rtol=0)


def test_bad_support_names_its_shape() -> None:
    model, (x, y) = tiny_model(), batch()
    with pytest.raises(ValueError, match="support must be a bool tensor"):
        PGD()(model, x, y, support=torch.ones(len(x), 2, 16, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match="support must be a bool tensor"):
        PGD()(model, x, y, support=torch.ones(len(x), 1, 16, 16))


def test_scoring_forward_runs_only_when_success_is_read() -> None:
    """x_adv alone (adversarial training) costs no scoring forward; the first read of
    success/logits_adv/target pays it once, in eval mode, on exactly x_adv."""
    model, (x, y) = tiny_model(), batch(6)
    counter = CountingNet(model)
    result = FGSM(eps=0.03)(counter, x, y)
    assert counter.rows == 6 and not result.scored  # the gradient step only
    counter.train()
    target = result.target
    assert counter.rows == 12 and result.scored and counter.training
    with torch.no_grad():
        fresh = model.eval()(result.x_adv)
    torch.testing.assert_close(result.logits_adv, fresh)
    assert torch.equal(target, fresh.scatter(1, y[:, None], float("-inf")).argmax(1))
    clean_ok = model(x).argmax(1) == y
    assert torch.equal(result.success, (fresh.argmax(1) != y) & clean_ok)
    assert counter.rows == 18  # the clean prediction, once, on the first read of success
    _ = result.success
    assert counter.rows == 18


def test_late_scoring_refuses_a_changed_model() -> None:
    model, (x, y) = tiny_model(), batch(6)
    result = PGD(steps=2)(model, x, y)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)  # an optimizer step
    with pytest.raises(RuntimeError, match="before updating the model"):
        _ = result.success
