"""APGD and AutoAttack: the schedule, the losses, and the authors' implementation as referee."""

from __future__ import annotations

import importlib.util
from functools import partial

import pytest
import torch
from helpers import CONF_DIR
from hydra.utils import instantiate
from omegaconf import OmegaConf
from test_attacks_minnorm import _one_thread, digits_model  # noqa: F401 (autouse)
from torch import nn

from pse_lightning.attacks import APGD, PGD, AutoAttack
from pse_lightning.attacks.apgd import apgd_run, checkpoints, dlr_loss, targeted_dlr_loss
from pse_lightning.attacks.base import AttackBatch
from pse_lightning.attacks.norms import LpBall

HAS_AUTHORS = importlib.util.find_spec("pyautoattack") is not None
NO_AUTHORS = "pyautoattack (the authors' AutoAttack) is not installed; extra 'peers'"
HAS_TA = importlib.util.find_spec("torchattacks") is not None


@pytest.fixture(scope="module")
def digits() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    return digits_model()


def robust(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor) -> int:
    with torch.no_grad():
        return int((model(x_adv).argmax(1) == y).sum())


# -- the schedule and the losses -------------------------------------------------------------


def test_checkpoints_follow_the_paper() -> None:
    """p = 0, .22, .41, .57, .70, .80, .87, .93, .99 of 100 iterations (each period the
    previous one less .03, at least .06); the dict maps the closing iteration to its
    period."""
    assert checkpoints(100) == {21: 22, 40: 19, 56: 16, 69: 13, 79: 10, 86: 7, 92: 6, 98: 6}
    assert checkpoints(10) == {1: 2, 2: 1, 3: 1, 4: 1, 5: 1, 6: 1, 7: 1, 8: 1, 9: 1}


def test_dlr_values_and_invariance() -> None:
    logits = torch.tensor([[3.0, 1.0, 0.0, -1.0], [0.0, 2.0, 1.0, -2.0]])
    y = torch.tensor([0, 0])
    # Row 0: correct, -(3 - 1) / (3 - 0); row 1: wrong, -(0 - 2) / (2 - 0).
    torch.testing.assert_close(dlr_loss(logits, y), torch.tensor([-2 / 3, 1.0]))
    target = torch.tensor([3, 1])
    # -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)
    expected = torch.tensor([-(3 + 1) / (3 - (0 - 1) / 2), -(0 - 2) / (2 - (0 - 2) / 2)])
    torch.testing.assert_close(targeted_dlr_loss(logits, y, target), expected)
    shifted = 7.0 * logits - 4.0  # a model cannot hide behind the logit scale
    torch.testing.assert_close(dlr_loss(shifted, y), dlr_loss(logits, y))
    torch.testing.assert_close(targeted_dlr_loss(shifted, y, target), expected)


# -- the authors' implementation as referee ------------------------------------------------


@pytest.mark.skipif(not HAS_AUTHORS, reason=NO_AUTHORS)
@pytest.mark.pipeline  # a full-size run against the authors' (or a peer's) code: seconds
@pytest.mark.parametrize(
    ("norm", "eps", "loss"),
    [("linf", 0.12, "ce"), ("l2", 0.8, "ce"), ("linf", 0.12, "dlr"), ("linf", 0.12, "dlr-t")],
)
def test_one_run_equals_the_authors_from_the_same_start(digits, norm, eps, loss) -> None:
    """Given the same start, the whole trajectory (step halving, restarts from the best
    point, momentum) matches: the same best objective and the same broken samples."""
    from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted

    model, x, y = digits
    gen = torch.Generator().manual_seed(0)
    ball = LpBall(norm, eps)
    noise = torch.rand(len(x), ball.noise_size(x[0].numel()), generator=gen)
    start = ball.sample(x, noise)
    with torch.no_grad():
        aim = model(x).argsort(dim=1, descending=True)[:, 1]
    name = "Linf" if norm == "linf" else "L2"
    if loss == "dlr-t":
        ref = APGDAttack_targeted(model, n_iter=100, eps=eps, norm=name, device="cpu")
        ref.y_target = aim
        ref.loss = "dlr-targeted"
    else:
        ref = APGDAttack(model, n_iter=100, eps=eps, norm=name, loss=loss, device="cpu")
    ref.init_hyperparam(x)
    _, still, best_ref, _ = ref.attack_single_run(x, y, x_init=start)
    ours = apgd_run(
        model,
        AttackBatch(x, y, None, torch.arange(len(x))),
        start,
        ball=LpBall(norm, eps),
        steps=100,
        loss="dlr" if loss == "dlr-t" else loss,
        aim=aim if loss == "dlr-t" else None,
    )
    assert 0 < int(still.sum()) < len(x)  # the comparison is not vacuous
    if norm == "linf" and loss == "ce":  # sign steps of the same gradients: bit for bit
        torch.testing.assert_close(ours.loss, best_ref, atol=1e-5, rtol=1e-5)
        assert torch.equal(~ours.found, still.bool())
        return
    # L2 normalisations, the DLR gradient (sorted vs masked logits) and the L-inf bounds
    # (ours rounded towards x, exact in any dtype; theirs a float32 clamp) round
    # differently; one rounding difference can flip a sign or a step-halving decision,
    # after which that sample's trajectory parts from the authors'. Most still agree, and
    # the broken samples agree within one in 64 (below).
    same = torch.isclose(ours.loss, best_ref, atol=1e-5, rtol=1e-5)
    assert same.float().mean() >= 0.75
    assert abs(int((~ours.found).sum()) - int(still.sum())) <= len(x) / 64


@pytest.mark.pipeline  # a full-size run against the authors' (or a peer's) code: seconds
@pytest.mark.skipif(not HAS_AUTHORS, reason=NO_AUTHORS)
@pytest.mark.parametrize(("norm", "eps"), [("linf", 0.1), ("l2", 0.8)])
def test_autoattack_robust_accuracy_matches_the_authors(digits, norm, eps) -> None:
    """The authors' standard sequence restricted to APGD-CE + APGD-T (one restart, 9
    targets, as its 'standard' version sets them): robust accuracy within 1 image in 64."""
    from pyautoattack import AutoAttack as AuthorsAutoAttack

    model, x, y = digits
    ours = AutoAttack(norm=norm, eps=eps, version="fast")(model, x, y)
    ref = AuthorsAutoAttack(model, eps=eps, norm="Linf" if norm == "linf" else "L2",
                            version="custom", attacks=["apgd-ce", "apgd-t"], seed=0)  # fmt: skip
    ref.apgd.n_restarts = 1  # what version='standard' sets; 'custom' keeps 5
    ref.verbose = False
    x_ref, _ = ref.run_standard_evaluation(x, y, batch_size=len(x))
    theirs = robust(model, x_ref, y)
    assert 0 < theirs < len(x)
    assert abs(int((~ours.success).sum()) - theirs) <= len(x) / 64


@pytest.mark.pipeline  # a full-size run against the authors' (or a peer's) code: seconds
@pytest.mark.skipif(not HAS_TA, reason="torchattacks is not installed; extra 'peers'")
def test_autoattack_robust_accuracy_matches_torchattacks(digits) -> None:
    """torchattacks' APGD (CE) and APGDT (9 targets), worst case per sample."""
    import torchattacks

    model, x, y = digits
    eps = 0.1
    ours = AutoAttack(eps=eps, version="fast")(model, x, y)
    ce = torchattacks.APGD(model, eps=eps, steps=100, loss="ce", seed=0)(x, y)
    t = torchattacks.APGDT(model, eps=eps, steps=100, n_classes=10, seed=0)(x, y)
    with torch.no_grad():
        survive = (model(ce).argmax(1) == y) & (model(t).argmax(1) == y)
    assert abs(int((~ours.success).sum()) - int(survive.sum())) <= len(x) / 64


# -- behaviour -------------------------------------------------------------------------------


def test_apgd_is_at_least_as_strong_as_pgd(digits) -> None:
    """On the same inputs, PGD at attack=pgd's step size eps / 4 (10 and 100 steps) and at
    a poor one (eps / 40, 20 steps) against untuned APGD and AutoAttack: AutoAttack's
    robust accuracy is never above PGD's or APGD's; one APGD run (one random start, as one
    PGD run) is not above PGD's by more than one image in 64, and is far below PGD's with
    the poor step size (the schedule adapts it)."""
    model, x, y = digits
    slack = len(x) / 64
    for eps in (0.05, 0.1, 0.15):
        apgd = int((~APGD(eps=eps)(model, x, y).success).sum())
        aa = int((~AutoAttack(eps=eps, version="fast")(model, x, y).success).sum())
        assert aa <= apgd
        for steps in (10, 100):
            pgd = int((~PGD(eps=eps, step_size=eps / 4, steps=steps)(model, x, y).success).sum())
            assert apgd <= pgd + slack and aa <= pgd, (eps, steps, apgd, aa, pgd)
        poor = PGD(eps=eps, step_size=eps / 40, steps=20)
        assert apgd + slack < int((~poor(model, x, y).success).sum())


class Scaled(nn.Module):
    """The digits model with logits times 1000: cross-entropy saturates, so its input
    gradient vanishes in float32 on confident samples (gradient masking)."""

    num_classes = 10

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 1000.0 * self.model(x)


def test_autoattack_sees_through_logit_scaling(digits) -> None:
    """Scaling the logits changes no prediction, so true robustness is unchanged: the
    CE-only attacks are fooled by the vanished gradients, the DLR stage of AutoAttack is
    not (it is invariant to the scale)."""
    model, x, y = digits
    eps = 0.1
    plain = int((~AutoAttack(eps=eps, version="fast")(model, x, y).success).sum())
    scaled = Scaled(model)
    masked_pgd = int((~PGD(eps=eps, step_size=eps / 4, steps=100)(scaled, x, y).success).sum())
    result = AutoAttack(eps=eps, version="fast")(scaled, x, y)
    assert masked_pgd > plain + len(x) / 16  # the masking is real
    assert abs(int((~result.success).sum()) - plain) <= len(x) / 64


class Counting(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.num_classes, self.rows = model, 10, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rows += len(x)
        return self.model(x)


def test_autoattack_runs_each_stage_on_the_survivors_only(digits) -> None:
    model, x, y = digits
    counter = Counting(model)
    steps = 20
    result = AutoAttack(eps=0.1, version="fast", steps=steps, target_classes=1, early_stop=False)(
        counter, x, y
    )
    stage = result.extras["stage"]
    after_ce = int((stage != 1).sum())  # survivors of APGD-CE (none is clean-misclassified)
    assert (stage != 0).all() and 0 < after_ce < len(x)
    assert counter.rows == len(x) + (steps + 1) * (len(x) + after_ce)
    _ = result.logits_adv
    assert counter.rows == len(x) + (steps + 1) * (len(x) + after_ce)  # no scoring forward
    with torch.no_grad():
        torch.testing.assert_close(result.logits_adv, model(result.x_adv))


@pytest.mark.parametrize("cls", [APGD, partial(AutoAttack, version="fast")], ids=["apgd", "aa"])
def test_early_stop_breaks_the_same_samples_for_less(digits, cls: type) -> None:
    """Each sample's schedule is its own, so stopping a broken sample changes nobody
    else's trajectory: the same samples break, the survivors return the very same points,
    every returned image is adversarial or the survivor's best point, and fewer rows pass
    through the model."""
    model, x, y = digits
    full_count, stop_count = Counting(model), Counting(model)
    full = cls(eps=0.1, steps=20, early_stop=False)(full_count, x, y)
    stop = cls(eps=0.1, steps=20, early_stop=True)(stop_count, x, y)
    assert 0 < int(full.success.sum()) < len(x)  # not vacuous
    assert torch.equal(stop.success, full.success)
    survivors = ~full.success
    assert torch.equal(stop.x_adv[survivors], full.x_adv[survivors])
    with torch.no_grad():
        assert (model(stop.x_adv[stop.success]).argmax(1) != y[stop.success]).all()
    assert (stop.x_adv - x).abs().amax() <= 0.1 + 1e-6
    assert stop_count.rows < full_count.rows


def test_restarts_only_help(digits) -> None:
    model, x, y = digits
    one = APGD(eps=0.12, steps=20)(model, x, y)
    three = APGD(eps=0.12, steps=20, restarts=3)(model, x, y)
    assert (three.success >= one.success).all()  # restart 0 is the same run


# -- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "cls"), [("apgd", APGD), ("autoattack", AutoAttack)])
def test_yaml_instantiates_the_class(name: str, cls: type) -> None:
    cfg = OmegaConf.load(CONF_DIR / "attack" / f"{name}.yaml")
    cfg.seed = 0
    attack = instantiate(cfg)
    assert type(attack) is cls
    pgd = OmegaConf.load(CONF_DIR / "attack" / "pgd.yaml")
    assert attack.eps == pgd.eps and attack.norm == pgd.norm  # comparable with attack=pgd


@pytest.mark.parametrize(
    ("cls", "bad", "key"),
    [
        (APGD, {"loss": "margin"}, "attack.loss"),
        (APGD, {"restarts": 0}, "attack.restarts"),
        (APGD, {"rho": 2.0}, "attack.rho"),
        (AutoAttack, {"target_classes": 0}, "attack.target_classes"),
        (AutoAttack, {"eps": 0.0}, "attack.eps"),
    ],
)
def test_bad_hyperparameters_name_the_key(cls: type, bad: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key):
        cls(**bad)
