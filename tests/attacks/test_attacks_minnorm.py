"""Minimum-norm attacks (CW-L2, EAD, StrAttack): known answers, invariants, peers."""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Iterator

import pytest
import torch
from helpers import CONF_DIR
from hydra.utils import instantiate
from known_answers import LinearNet
from omegaconf import OmegaConf
from torch import nn

from pse_lightning.analysis.pse.statistics import grid_group_map
from pse_lightning.attacks import CWL2, EAD, Attack, StrAttack
from pse_lightning.attacks.losses import margin
from pse_lightning.attacks.search import BestSoFar, ConstantSearch, EarlyAbort, binary_search
from pse_lightning.attacks.strattack import PixelGroups, support_above_quantile


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """These models are tiny: on a busy 2-core machine, intra-op threading of 36-wide
    matmuls costs more than the maths (tens of ms per call), so run them single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def two_class_problem(
    n: int = 8, side: int = 6
) -> tuple[LinearNet, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A two-class linear model and images well inside the box near its boundary.

    Returns (model, x, y, l2_star) where l2_star = |Z_1 - Z_0| / ||w_1 - w_0|| is the exact
    minimal L2 distance to the decision boundary (the box never binds: the largest
    coordinate of the minimal perturbation is < 0.1 while pixels are in [0.45, 0.55]).
    """
    gen = torch.Generator().manual_seed(0)
    d = side * side
    weight = torch.randn(2, d, generator=gen)
    w_diff = weight[1] - weight[0]
    bias = torch.tensor([0.0, float(-0.5 * w_diff.sum() + 0.15 * w_diff.norm())])
    model = LinearNet(weight, bias)
    x = 0.5 + 0.1 * (torch.rand(n, 1, side, side, generator=gen) - 0.5)
    with torch.no_grad():
        logits = model(x)
    y = logits.argmax(1)
    l2_star = (logits[:, 1] - logits[:, 0]).abs() / w_diff.norm()
    move = l2_star[:, None] * (w_diff.abs() / w_diff.norm())[None]
    assert float(move.max()) < 0.1  # the analytic answer is inside the box
    return model, x, y, l2_star


def multi_class_problem(
    n: int = 8, k: int = 4, side: int = 8
) -> tuple[LinearNet, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(k, side * side, generator=gen) * 0.5
    model = LinearNet(weight, torch.zeros(k))
    x = 0.2 + 0.6 * torch.rand(n, 1, side, side, generator=gen)
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y


def fast(name: str, **kw: object) -> Attack:
    """Small but converging settings for the linear problems."""
    if name == "cw":
        return CWL2(**{"steps": 200, "binary_search_steps": 9, "lr": 0.01, **kw})
    if name == "ead":
        return EAD(**{"steps": 200, "binary_search_steps": 9, "beta": 1e-2, **kw})
    return StrAttack(
        **{"steps": 100, "binary_search_steps": 6, "refine_steps": 50, "eps": 0.3, **kw}
    )


ATTACKS = ("cw", "ead", "strattack")


def l_norm(delta: torch.Tensor, p: float) -> torch.Tensor:
    return delta.flatten(1).norm(p=p, dim=1)


# -- known answers ---------------------------------------------------------------------------


def test_cw_reaches_the_analytic_minimal_l2() -> None:
    model, x, y, l2_star = two_class_problem()
    result = fast("cw")(model, x, y)
    assert result.success.all()
    ratio = l_norm(result.x_adv - x, 2) / l2_star
    # A successful example can never be closer than the boundary; CW gets within 3%.
    assert (ratio >= 1 - 1e-4).all(), ratio
    assert (ratio <= 1.03).all(), ratio


def test_cw_boundary_constant_is_the_linear_threshold() -> None:
    """const_unit='boundary' measures c in units of 2 m / ||w_1 - w_0||^2, the constant at
    which the minimiser of ||delta||^2 + c max(m - a . delta, 0) reaches the boundary: one
    run below it never succeeds, one above it lands on the exact minimal L2; and the unit
    makes the run blind to the logit scale (weights x 100: the same examples)."""
    model, x, y, l2_star = two_class_problem()
    kw = {"steps": 200, "binary_search_steps": 1, "lr": 0.005, "const_unit": "boundary"}
    assert not CWL2(initial_const=0.7, **kw)(model, x, y).success.any()
    above = CWL2(initial_const=1.5, **kw)(model, x, y)
    assert above.success.all()
    torch.testing.assert_close(l_norm(above.x_adv - x, 2), l2_star, rtol=2e-3, atol=0)
    steep = LinearNet(model.fc.weight.detach() * 100, model.fc.bias.detach() * 100)
    torch.testing.assert_close(CWL2(initial_const=1.5, **kw)(steep, x, y).x_adv, above.x_adv)
    absolute = {**kw, "const_unit": "absolute"}
    assert not torch.allclose(
        CWL2(initial_const=1.5, **absolute)(steep, x, y).x_adv,
        CWL2(initial_const=1.5, **absolute)(model, x, y).x_adv,
    )


def test_ead_is_sparser_than_cw() -> None:
    model, x, y, _ = two_class_problem()
    cw = fast("cw")(model, x, y)
    ead = fast("ead")(model, x, y)
    assert cw.success.all() and ead.success.all()
    d_cw, d_ead = cw.x_adv - x, ead.x_adv - x
    assert (l_norm(d_ead, 1) < l_norm(d_cw, 1)).all()
    assert ((d_ead != 0).flatten(1).sum(1) < (d_cw != 0).flatten(1).sum(1)).all()


def test_ead_l1_rule_gives_no_larger_l1_than_en_rule() -> None:
    model, x, y, _ = two_class_problem()
    en = fast("ead", decision_rule="EN")(model, x, y)
    l1 = fast("ead", decision_rule="L1")(model, x, y)
    assert en.success.all() and l1.success.all()
    assert (l_norm(l1.x_adv - x, 1) <= l_norm(en.x_adv - x, 1) + 1e-6).all()


@pytest.mark.parametrize("name", ATTACKS)
def test_targeted_lands_on_the_target(name: str) -> None:
    model, x, y = multi_class_problem()
    result = fast(name, targeted=True, target_rule="next")(model, x, y)
    assert torch.equal(result.target, (y + 1) % 4)
    assert result.success.all()
    assert torch.equal(result.logits_adv.argmax(1), result.target)


@pytest.mark.parametrize("name", ATTACKS)
def test_returned_examples_are_strictly_adversarial(name: str) -> None:
    """A tracked success (extras const finite) has a strictly negative margin; ties fail."""
    model, x, y = multi_class_problem()
    attack = fast(name)
    result = attack(model, x, y)
    found = torch.isfinite(result.extras["const"])
    assert found.all()
    assert (margin(result.logits_adv, y, False)[found] < 0).all()
    assert result.success[found].all()


def test_exact_ties_count_as_failures() -> None:
    """Constant logits: every class ties, argmax picks class 0, but no margin is < 0."""
    model = LinearNet(torch.zeros(3, 16), torch.zeros(3))
    x = torch.full((4, 1, 4, 4), 0.5)
    y = torch.tensor([1, 2, 1, 2])
    for attack in (
        CWL2(steps=5, binary_search_steps=2),
        EAD(steps=5, binary_search_steps=2),
        StrAttack(steps=5, binary_search_steps=2),
    ):
        result = attack(model, x, y)
        assert torch.isnan(result.extras["const"]).all()
        assert torch.equal(result.x_adv, x)  # nothing was found, so the clean image is returned


# -- invariants ------------------------------------------------------------------------------


class TinyConv(nn.Module):
    num_classes = 5

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(32, 5),
        )
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def saturated_batch(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Images with many pixels exactly at 0 and 1, where a box violation would show."""
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(n, 3, 8, 8, generator=gen)
    x = torch.where(x < 0.3, torch.zeros_like(x), torch.where(x > 0.7, torch.ones_like(x), x))
    with torch.no_grad():  # correctly classified: only those rows are attacked
        y = TinyConv().eval()(x).argmax(1)
    return x, y


@pytest.mark.parametrize("name", ATTACKS)
def test_box_budget_and_success_invariants(name: str) -> None:
    model, (x, y) = TinyConv().eval(), saturated_batch()
    # This random net's logits barely move: the constants must start large to succeed, and
    # the perturbations are large (L2 about 2 on 192 pixels), beyond the reach of 30 CW
    # steps whose cosine lr falls from 0.01 (about 0.15 per pixel): start it at 0.02.
    reach = {"lr": 0.02} if name == "cw" else {}
    attack = fast(name, steps=30, binary_search_steps=3, initial_const=10.0, **reach)
    result = attack(model, x, y)
    assert result.x_adv.min() >= 0 and result.x_adv.max() <= 1
    if attack.eps is not None:
        assert ((result.x_adv - x).abs().amax(dim=(1, 2, 3)) <= attack.eps + 1e-6).all()
    with torch.no_grad():
        logits = model(result.x_adv)
    torch.testing.assert_close(result.logits_adv, logits)
    assert torch.equal(result.success, logits.argmax(1) != y)
    assert result.success.float().mean() >= 0.75  # minimum-norm attacks nearly always succeed


@pytest.mark.parametrize("name", ATTACKS)
def test_deterministic_and_batch_independent(name: str) -> None:
    model, (x, y) = TinyConv().eval(), saturated_batch()
    attack = fast(name, steps=30, binary_search_steps=3)
    first = attack(model, x, y)
    again = attack(model, x, y)
    assert torch.equal(first.x_adv, again.x_adv)
    for i in (0, 5):
        alone = attack(model, x[i : i + 1], y[i : i + 1])
        torch.testing.assert_close(alone.x_adv[0], first.x_adv[i], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ATTACKS)
def test_model_untouched(name: str) -> None:
    model, (x, y) = TinyConv(), saturated_batch(4)
    model.train()
    model.net[1].eval()  # a deliberately frozen BatchNorm stays frozen
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    fast(name, steps=10, binary_search_steps=2)(model, x, y)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [m.training for m in model.modules()] == modes
    assert all(p.grad is None for p in model.parameters())


# -- StrAttack's group structure -------------------------------------------------------------


def reference_group_norms(delta: torch.Tensor, size: int) -> torch.Tensor:
    """Group norms by explicit loops over patches (independent of PixelGroups)."""
    n, _, h, w = delta.shape
    out = []
    for r in range(0, h, size):
        for c in range(0, w, size):
            out.append(delta[:, :, r : r + size, c : c + size].flatten(1).norm(dim=1))
    return torch.stack(out, dim=1)


def test_strattack_is_group_sparse_and_reports_its_groups() -> None:
    gen = torch.Generator().manual_seed(3)
    # Weights concentrated on a few pixels make a sparse set of groups sufficient.
    sparse = torch.rand(3 * 8 * 8, generator=gen) > 0.8
    weight = torch.randn(3, 3 * 8 * 8, generator=gen) * sparse
    model = LinearNet(weight, torch.zeros(3))
    x = 0.3 + 0.4 * torch.rand(6, 3, 8, 8, generator=gen)
    with torch.no_grad():
        y = model(x).argmax(1)
    attack = StrAttack(eps=0.3, group_size=2, steps=100, binary_search_steps=5, tau=1.0)
    result = attack(model, x, y)
    assert result.success.all()
    delta = result.x_adv - x
    assert (delta.abs().amax(dim=(1, 2, 3)) <= 0.3 + 1e-6).all()
    groups, index = result.extras["groups"], result.extras["group_map"]
    assert groups.shape == (6, 16) and index.shape == (8, 8)
    expected_index = (torch.arange(8)[:, None] // 2) * 4 + torch.arange(8)[None, :] // 2
    assert torch.equal(index, expected_index)
    # The PSE analysis reads extras["group_map"] with its own grid convention.
    assert torch.equal(index, grid_group_map(8, 8, 2, index.device))
    torch.testing.assert_close(groups, reference_group_norms(delta, 2), atol=1e-6, rtol=1e-5)
    selected = groups > 0
    assert (selected.sum(1) < 16).all(), "expected a group-sparse perturbation"
    # Zero outside the selected groups, pixel by pixel through the index map.
    pixel_selected = selected.gather(1, index.flatten()[None].expand(6, -1)).view(6, 1, 8, 8)
    assert (delta[~pixel_selected.expand_as(delta)] == 0).all()


def test_strattack_refinement_never_hurts() -> None:
    model, x, y = multi_class_problem()
    plain = fast("strattack", refine=False)(model, x, y)
    refined = fast("strattack", refine=True)(model, x, y)
    assert plain.success.all() and refined.success.all()
    assert (l_norm(refined.x_adv - x, 2) <= l_norm(plain.x_adv - x, 2) + 1e-6).all()
    # Refinement only shrinks the support, so no new group is touched.
    assert ((refined.extras["groups"] > 0) <= (plain.extras["groups"] > 0)).all()


def test_strattack_refinement_rounds_reprune_and_improve() -> None:
    """The authors' refinement: every round prunes the current best again and
    re-optimises on what is left. The L2 objective without the group penalty moves the
    ADMM solution 6% closer (median; measured 0.937), more rounds never lose ground and the
    support never grows."""
    model, x, y = multi_class_problem()  # at the defaults: a short ADMM run to refine
    plain = StrAttack(refine=False)(model, x, y)
    one = StrAttack(refine_rounds=1)(model, x, y)
    three = StrAttack(refine_rounds=3)(model, x, y)
    assert plain.success.all() and one.success.all() and three.success.all()
    l2_plain, l2_one = l_norm(plain.x_adv - x, 2), l_norm(one.x_adv - x, 2)
    l2_three = l_norm(three.x_adv - x, 2)
    assert float((l2_one / l2_plain).median()) <= 0.97
    assert (l2_three <= l2_one + 1e-6).all()
    nonzero = lambda r: ((r.x_adv - x) != 0).flatten(1).sum(1)  # noqa: E731
    assert (nonzero(three) <= nonzero(one)).all() and (nonzero(one) <= nonzero(plain)).all()
    assert (nonzero(three) < nonzero(one)).any()  # later rounds pruned again


def test_pixel_groups_with_ragged_edges() -> None:
    groups = PixelGroups(3, 7, 8)  # 3 x 3 patches, last row/column smaller
    delta = torch.randn(2, 3, 7, 8)
    torch.testing.assert_close(groups.norms(delta).flatten(1), reference_group_norms(delta, 3))
    assert groups.index_map(delta.device).max() == groups.count - 1
    shrunk = groups.shrink(delta, 1e9)
    assert (shrunk == 0).all()


def test_support_quantile_drops_the_smallest_nonzero() -> None:
    delta = torch.zeros(2, 1, 1, 101)
    delta[0, 0, 0, :100] = torch.arange(1, 101, dtype=torch.float32)  # 100 nonzero
    support = support_above_quantile(delta, 0.03)
    assert int(support[0].sum()) == 97  # values 1, 2, 3 drop: threshold is the 3rd smallest
    assert not support[1].any()


# -- the shared search machinery -------------------------------------------------------------


def test_constant_search_moves_each_sample_on_its_own() -> None:
    search = ConstantSearch(1.0, 3, grow=10.0, device=torch.device("cpu"))
    search.update(torch.tensor([True, False, False]))
    assert torch.allclose(search.const, torch.tensor([0.5, 10.0, 10.0]))
    search.update(torch.tensor([True, True, False]))
    assert torch.allclose(search.const, torch.tensor([0.25, 5.5, 100.0]))


@pytest.mark.parametrize(("repeat", "last"), [(False, [0.375, 0.55]), (True, [0.5, 1.0])])
def test_carlini_last_step_reruns_at_the_upper_bound(repeat: bool, last: list[float]) -> None:
    """Carlini's rule: the last outer step uses the smallest constant known to succeed."""
    seen: list[torch.Tensor] = []

    def inner(const: torch.Tensor, best: BestSoFar) -> torch.Tensor:
        seen.append(const.clone())
        return const >= 0.3  # a sample succeeds exactly when c >= 0.3

    best = BestSoFar(torch.zeros(2, 1, 1, 1))
    initial = torch.tensor([1.0, 0.01])
    binary_search(
        best, inner, initial_const=initial, search_steps=4, grow=10.0, repeat_last=repeat
    )
    assert torch.allclose(seen[-1], torch.tensor(last))


def test_early_abort_is_per_sample() -> None:
    abort = EarlyAbort(3, steps=10, enabled=True, device=torch.device("cpu"))
    assert abort.keep(0, torch.tensor([1.0, 1.0, 1.0])).all()
    assert abort.keep(1, torch.tensor([0.5, 1.0, 0.9])).tolist() == [True, False, True]
    assert abort.keep(2, torch.tensor([0.1, 0.9])).tolist() == [True, False]


# -- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "cls"), [("cw", CWL2), ("ead", EAD), ("strattack", StrAttack)])
def test_yaml_instantiates_the_class(name: str, cls: type) -> None:
    cfg = OmegaConf.load(CONF_DIR / "attack" / f"{name}.yaml")
    cfg.seed = 0
    attack = instantiate(cfg)
    assert type(attack) is cls


@pytest.mark.parametrize(
    ("cls", "bad", "key"),
    [
        (CWL2, {"steps": 0}, "attack.steps"),
        (CWL2, {"initial_const": 0}, "attack.initial_const"),
        (CWL2, {"const_unit": "relative"}, "attack.const_unit"),
        (CWL2, {"lr_schedule": "linear"}, "attack.lr_schedule"),
        (EAD, {"decision_rule": "L2"}, "attack.decision_rule"),
        (EAD, {"beta": -1}, "attack.beta"),
        (StrAttack, {"group_size": 0}, "attack.group_size"),
        (StrAttack, {"eps": 2}, "attack.eps"),
    ],
)
def test_bad_hyperparameters_name_the_key(cls: type, bad: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key):
        cls(**bad)


# -- cross-check against independent implementations ----------------------------------------


def _digits_net() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


@functools.cache
def _trained_digits() -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """The trained weights and the correctly classified test digits, computed once per
    process (the training is deterministic; every caller gets its own copies)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(digits.target)
    torch.manual_seed(0)
    net = _digits_net()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x[:1500]), y[:1500]).backward()
        opt.step()
    net.eval()
    x_test, y_test = x[1500:1628], y[1500:1628]
    with torch.no_grad():
        correct = net(x_test).argmax(1) == y_test
    assert correct.float().mean() > 0.85
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    return state, x_test[correct], y_test[correct]


def digits_model() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A small MLP trained in about a second on scikit-learn's bundled digits (8 x 8): a
    fresh copy of the one trained model of this process, in eval mode, weights frozen."""
    state, x, y = _trained_digits()
    torch.manual_seed(0)  # leaves the global generator where training it from scratch did
    net = _digits_net()
    net.load_state_dict(state)
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net, x.clone(), y.clone()


def median_l2_on(delta: torch.Tensor, mask: torch.Tensor) -> float:
    return float(l_norm(delta[mask], 2).median())


def peer_success(
    net: nn.Module, x: torch.Tensor, x_peer: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """Misclassified and not foolbox's placeholder: foolbox's CW initialises its best
    examples to zeros and returns a blank image where it found nothing; a blank image is
    misclassified but is no perturbation of x, so such rows count as failures."""
    with torch.no_grad():
        wrong = net(x_peer).argmax(1) != y
    return wrong & (x_peer.flatten(1).abs().sum(1) > 0)


# 5 x 50 = 250 gradient evaluations per sample for every implementation; lr 0.05 lets 50
# Adam steps travel far enough to reach every sample of this model.
SEARCH_STEPS, STEPS, LR, C0 = 5, 50, 0.05, 1e-2


@pytest.mark.pipeline  # a full-size run against the authors' (or a peer's) code: seconds
@pytest.mark.skipif(
    importlib.util.find_spec("foolbox") is None,
    reason="foolbox is not installed (pip install foolbox; extra 'peers')",
)
def test_cw_matches_or_beats_foolbox_at_equal_gradient_evaluations() -> None:
    import foolbox as fb

    net, x, y = digits_model()
    ours = CWL2(
        steps=STEPS, binary_search_steps=SEARCH_STEPS, lr=LR, initial_const=C0, abort_early=False
    )(net, x, y)
    theirs = fb.attacks.L2CarliniWagnerAttack(
        binary_search_steps=SEARCH_STEPS,
        steps=STEPS,
        stepsize=LR,
        initial_const=C0,
        abort_early=False,
    )
    x_theirs = theirs.run(fb.PyTorchModel(net, bounds=(0, 1)), x, y)
    theirs_success = peer_success(net, x, x_theirs, y)
    assert ours.success.float().mean() >= theirs_success.float().mean()
    both = ours.success & theirs_success
    assert both.sum() >= 0.9 * len(x)
    assert median_l2_on(ours.x_adv - x, both) <= 1.05 * median_l2_on(x_theirs - x, both)


@pytest.mark.pipeline  # a full-size run against the authors' (or a peer's) code: seconds
@pytest.mark.skipif(
    importlib.util.find_spec("torchattacks") is None,
    reason="torchattacks is not installed (pip install torchattacks; extra 'peers')",
)
def test_cw_matches_or_beats_torchattacks_at_equal_gradient_evaluations() -> None:
    import torchattacks

    net, x, y = digits_model()
    ours = CWL2(
        steps=STEPS, binary_search_steps=SEARCH_STEPS, lr=LR, initial_const=C0, abort_early=False
    )(net, x, y)
    # torchattacks has no search over c: one constant, all evaluations in one run.
    theirs = torchattacks.CW(net, c=1.0, kappa=0.0, steps=SEARCH_STEPS * STEPS, lr=LR)
    x_theirs = theirs(x, y)
    theirs_success = peer_success(net, x, x_theirs, y)
    assert ours.success.float().mean() >= theirs_success.float().mean()
    both = ours.success & theirs_success
    assert both.sum() >= 0.9 * len(x)
    assert median_l2_on(ours.x_adv - x, both) <= 1.05 * median_l2_on(x_theirs - x, both)
