"""FAB and FAB-T: the exact projection, FAB's minimal norms on linear models where the box
binds, the budget, targeted success, early stop, and AutoAttack's standard version against
the authors' pyautoattack."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from helpers import CONF_DIR
from hydra.utils import instantiate
from known_answers import LinearNet, boxed_problem, exact_optimum
from omegaconf import OmegaConf
from scipy.optimize import linprog
from test_attack_known_answers import _one_thread  # noqa: F401 (tiny models: one thread)
from torch import nn

from pse_lightning.attacks import FAB, PGD, AutoAttack
from pse_lightning.attacks.autoattack import STAGES
from pse_lightning.attacks.fab import project_onto_hyperplane
from pse_lightning.attacks.norms import flat_norm

HAS_AUTHORS = importlib.util.find_spec("pyautoattack") is not None
NO_AUTHORS = "pyautoattack (the authors' AutoAttack) is not installed; extra 'peers'"


def linf_optimum(t: torch.Tensor, a: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """(N,) min ||d||_inf s.t. a . d = m, 0 <= t + d <= 1, by linear programming (HiGHS);
    inf where infeasible. Variables (d, rho): minimise rho with -rho <= d_i <= rho."""
    out = []
    for ti, ai, mi in zip(t.double().numpy(), a.double().numpy(), m.double().numpy(),
                          strict=True):  # fmt: skip
        d = len(ti)
        cost = np.r_[np.zeros(d), 1.0]
        eye = np.eye(d)
        a_ub = np.block([[eye, -np.ones((d, 1))], [-eye, -np.ones((d, 1))]])
        res = linprog(cost, A_ub=a_ub, b_ub=np.zeros(2 * d), A_eq=np.r_[ai, 0.0][None],
                      b_eq=[mi], bounds=[*zip(-ti, 1 - ti, strict=True), (0, None)],
                      method="highs")  # fmt: skip
        out.append(res.fun if res.status == 0 else np.inf)
    return torch.tensor(out, dtype=torch.float64)


def pair_problem(k: int = 2, **kw) -> tuple[LinearNet, torch.Tensor, torch.Tensor, list]:
    """A boxed linear problem and, per class j, (a, m): class j wins once a . d >= m."""
    model, x, y = boxed_problem(k=k, **kw)
    weight = model.fc.weight.detach().double()
    flat = x.flatten(1).double()
    logits = flat @ weight.T + model.fc.bias.detach().double()
    pairs = []
    for j in range(k):
        a = weight[j][None] - weight[y]
        m = logits.gather(1, y[:, None])[:, 0] - logits[:, j]
        pairs.append((a, m))
    return model, x, y, pairs


def linf_minimal(x: torch.Tensor, y: torch.Tensor, pairs: list) -> torch.Tensor:
    """(N,) the minimal untargeted L-inf perturbation of a linear model in the box."""
    flat = x.flatten(1).double()
    best = torch.full((len(x),), torch.inf, dtype=torch.float64)
    for j, (a, m) in enumerate(pairs):
        value = linf_optimum(flat, a, m)
        best = torch.where(y == j, best, torch.minimum(best, value))
    return best


def minimal_norm(model: LinearNet, x: torch.Tensor, y: torch.Tensor, pairs: list,
                 norm: str) -> torch.Tensor:  # fmt: skip
    """(N,) the exact minimal untargeted perturbation norm of a linear model in the box."""
    return exact_optimum(model, x, y, 0.0)[1].sqrt() if norm == "l2" else linf_minimal(x, y, pairs)


# -- the projection --------------------------------------------------------------------------


def test_projection_is_the_exact_minimal_perturbation_where_the_box_binds() -> None:
    """The hyperplane of a two-class linear model: the projection is the exact minimal
    perturbation (L2: the KKT bisection of known_answers; L-inf: an LP), lies on the
    hyperplane and in the box, and the box binds for most samples."""
    model, x, y, pairs = pair_problem(k=2, n=10)
    flat = x.flatten(1).double()
    a = torch.stack([pairs[1 - int(c)][0][i] for i, c in enumerate(y)])
    m = torch.stack([pairs[1 - int(c)][1][i] for i, c in enumerate(y)])
    b = (a * flat).sum(1) + m
    d2 = project_onto_hyperplane(flat, a, b, "l2")
    delta, value = exact_optimum(model, x, y, 0.0)
    torch.testing.assert_close(d2, delta.flatten(1), atol=1e-7, rtol=0)
    dinf = project_onto_hyperplane(flat, a, b, "linf")
    torch.testing.assert_close(flat_norm(dinf, "linf"), linf_optimum(flat, a, m), atol=1e-9,
                               rtol=1e-7)  # fmt: skip
    for d in (d2, dinf):
        torch.testing.assert_close((a * (flat + d)).sum(1), b, atol=1e-9, rtol=0)
        assert (flat + d).min() >= 0 and (flat + d).max() <= 1
    clipped = ((flat + d2 == 0) | (flat + d2 == 1)) & (d2 != 0)
    assert int(clipped.any(1).sum()) >= 5, "the box must bind for this test to mean much"
    # The clipped coordinates matter: the unclipped projection is shorter than the optimum.
    free = m / a.norm(dim=1)
    assert (free < value.sqrt() - 1e-6).sum() >= 5


def test_projection_reaches_for_the_nearest_corner_when_the_box_cannot_cross() -> None:
    t = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    w = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    for norm in ("l2", "linf"):
        d = project_onto_hyperplane(t, w, torch.tensor([5.0], dtype=torch.float64), norm)
        torch.testing.assert_close(t + d, torch.tensor([[1.0, 0.0]], dtype=torch.float64))
        d = project_onto_hyperplane(t, w, torch.tensor([0.0], dtype=torch.float64), norm)
        assert torch.equal(d, torch.zeros_like(d))


# -- FAB on linear models --------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_first_step_lands_at_the_exact_minimal_perturbation(norm: str) -> None:
    """Two classes, one step from x: both projections are the optimum d*, so FAB's step is
    x + eta d* (clipped): adversarial at eta ||d*||, here with eta 1.01."""
    model, x, y, pairs = pair_problem(k=2, n=10)
    minimal = minimal_norm(model, x, y, pairs, norm)
    result = FAB(norm=norm, eps=100.0 if norm == "l2" else 1.0, steps=1, eta=1.01,
                 early_stop=False)(model, x, y)  # fmt: skip
    assert result.success.all()
    found = result.extras["norm"].double()
    assert (found >= minimal * (1 - 1e-5)).all() and (found <= minimal * 1.0101).all()


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_untargeted_fab_finds_the_minimal_norm_of_a_multiclass_linear_model(norm: str) -> None:
    """Five classes, the box binding: after 100 iterations FAB's smallest adversarial norm
    is within 2% of the exact optimum over all classes (measured: within 0.7%)."""
    model, x, y, pairs = pair_problem(k=5, n=12)
    minimal = minimal_norm(model, x, y, pairs, norm)
    attack = FAB(norm=norm, eps=100.0 if norm == "l2" else 1.0, target_classes=0, steps=100,
                 early_stop=False)  # fmt: skip
    found = attack(model, x, y).extras["norm"].double()
    assert (found >= minimal * (1 - 1e-5)).all() and (found <= minimal * 1.02).all()


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_a_point_counts_only_within_eps(norm: str) -> None:
    """With eps at the median minimal norm about half the samples break; a sample is broken
    exactly when FAB's smallest norm is within eps (early stop off), and the budget holds."""
    model, x, y, pairs = pair_problem(k=5, n=12)
    minimal = minimal_norm(model, x, y, pairs, norm)
    eps = float(minimal.median())
    result = FAB(norm=norm, eps=eps, target_classes=0, early_stop=False)(model, x, y)
    assert torch.equal(result.success, result.extras["norm"] <= eps)
    assert 3 <= int(result.success.sum()) <= 9
    assert (flat_norm(result.x_adv - x, norm) <= eps * (1 + 1e-5)).all()
    assert torch.equal(result.x_adv[~result.success], x[~result.success])


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_targeted_fab_reaches_the_target(norm: str) -> None:
    model, x, y, _ = pair_problem(k=5, n=12)
    attack = FAB(norm=norm, eps=100.0 if norm == "l2" else 1.0, steps=50, targeted=True,
                 target_rule="least_likely")  # fmt: skip
    result = attack(model, x, y)
    with torch.no_grad():
        assert torch.equal(model(result.x_adv).argmax(1), result.target)
    assert result.success.all()


# -- FAB-T, early stop and AutoAttack ---------------------------------------------------------


def small_cnn_batch() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    from test_attack_contract import tiny_model

    model = tiny_model()
    x = torch.rand(16, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_early_stop_breaks_the_same_samples(norm: str) -> None:
    model, x, y = small_cnn_batch()
    eps = 0.7 if norm == "linf" else 7.0
    fast = FAB(norm=norm, eps=eps, steps=10, target_classes=2)(model, x, y)
    full = FAB(norm=norm, eps=eps, steps=10, target_classes=2, early_stop=False)(model, x, y)
    assert torch.equal(fast.success, full.success)
    assert 0 < int(fast.success.sum()) < len(x)


def test_fab_t_aims_at_the_runner_up_classes_in_order() -> None:
    """FAB-T with one target class aims at the clean runner-up only: on a linear model it
    breaks exactly the samples whose runner-up boundary lies within eps."""
    model, x, y, pairs = pair_problem(k=5, n=12)
    with torch.no_grad():
        second = model(x).argsort(1, descending=True)[:, 1]
    flat = x.flatten(1).double()
    a = torch.stack([pairs[int(j)][0][i] for i, j in enumerate(second)])
    m = torch.stack([pairs[int(j)][1][i] for i, j in enumerate(second)])
    to_second = linf_optimum(flat, a, m)
    eps = float(to_second.median())
    result = FAB(eps=eps, target_classes=1, steps=100, early_stop=False)(model, x, y)
    far, near = to_second > eps * 1.03, to_second < eps * 0.97
    assert result.success[near].all()
    assert torch.equal(result.success[far], result.extras["norm"][far] <= eps)


def test_standard_autoattack_runs_fab_t_and_square_and_fast_does_not() -> None:
    model, x, y = small_cnn_batch()
    std = AutoAttack(eps=0.004, steps=5, square_queries=50)
    fast = AutoAttack(eps=0.004, steps=5, version="fast")
    assert std.stages == ("apgd-ce", "apgd-t", "fab-t", "square")
    assert fast.stages == ("apgd-ce", "apgd-t")
    assert AutoAttack(version="fast", square=True).stages[-1] == "square"
    a, b = std(model, x, y), fast(model, x, y)
    assert (a.success >= b.success).all()
    assert set(b.extras["stage"].tolist()) <= {-1, 0, 1, 2}
    added = a.success & ~b.success
    assert torch.equal(added, (a.extras["stage"] >= STAGES.index("fab-t")))


def test_the_autoattack_config_is_the_standard_version() -> None:
    cfg = OmegaConf.load(CONF_DIR / "attack" / "autoattack.yaml")
    cfg.seed = 0
    attack = instantiate(cfg)
    assert attack.version == "standard" and attack.stages == STAGES[1:]
    assert (attack.steps, attack.target_classes, attack.square_queries) == (100, 9, 5000)
    fast = OmegaConf.load(CONF_DIR / "attack" / "autoattack_fast.yaml")
    assert fast.keys() == cfg.keys() and fast.version == "fast"
    assert all(fast[k] == cfg[k] for k in cfg if k not in ("version", "seed"))
    fab = OmegaConf.load(CONF_DIR / "attack" / "fab.yaml")
    fab.seed = 0
    fab = instantiate(fab)
    assert (fab.steps, fab.target_classes, fab.restarts) == (100, 9, 1)
    assert (fab.alpha_max, fab.eta, fab.beta) == (0.1, 1.05, 0.9)


@pytest.mark.parametrize(
    ("cls", "bad", "key"),
    [
        (FAB, {"target_classes": -1}, "attack.target_classes"),
        (FAB, {"beta": 0.0}, "attack.beta"),
        (FAB, {"alpha_max": 1.5}, "attack.alpha_max"),
        (AutoAttack, {"version": "plus"}, "attack.version"),
        (AutoAttack, {"fab": "yes"}, "attack.fab"),
    ],
)
def test_bad_settings_name_the_key(cls, bad: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key):
        cls(**bad)


# -- the authors' standard version as referee -------------------------------------------------


def robust_digits(norm: str, eps: float) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """An MLP adversarially trained (PGD-7 at eps, 60 epochs, about 20 s) on 1200 of
    scikit-learn's bundled digits; the other 597 are the test images."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    adversary = PGD(norm=norm, eps=eps, step_size=eps / 4, steps=7)
    for epoch in range(60):
        for i in range(0, 1200, 100):
            xb, yb = x[i : i + 100], y[i : i + 100]
            x_adv = adversary(net, xb, yb, index=torch.arange(i, i + 100) + 10000 * epoch).x_adv
            net.train()
            opt.zero_grad()
            nn.functional.cross_entropy(net(x_adv), yb).backward()
            opt.step()
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net, x[1200:], y[1200:]


@pytest.mark.slow
@pytest.mark.skipif(not HAS_AUTHORS, reason=NO_AUTHORS)
@pytest.mark.parametrize(("norm", "eps"), [("linf", 0.1), ("l2", 0.5)])
def test_standard_autoattack_matches_the_authors_standard_version(norm: str, eps: float) -> None:
    """Robust accuracy of our standard AutoAttack and pyautoattack 0.2.0's
    ``version='standard'`` on 597 test digits of an adversarially trained MLP: equal within
    1 image in 100 (docs/METHODS.md gives the measured numbers)."""
    from pyautoattack import AutoAttack as AuthorsAutoAttack

    net, x, y = robust_digits(norm, eps)
    ours = AutoAttack(norm=norm, eps=eps, seed=0)(net, x, y)
    with torch.no_grad():
        ours_robust = float((net(ours.x_adv).argmax(1) == y).float().mean())
    ref = AuthorsAutoAttack(net, norm="Linf" if norm == "linf" else "L2", eps=eps,
                            version="standard", seed=0, device="cpu")  # fmt: skip
    x_ref, _ = ref.run_standard_evaluation(x, y, batch_size=1000)
    with torch.no_grad():
        theirs = float((net(x_ref).argmax(1) == y).float().mean())
        clean = float((net(x).argmax(1) == y).float().mean())
    assert theirs < clean - 0.1, "the referee must break a good share for this to mean much"
    assert theirs > 0.2, "an adversarially trained model must keep some robustness"
    assert abs(ours_robust - theirs) <= 0.01


def test_more_targets_than_other_classes_is_capped_with_one_notice(caplog) -> None:
    """AutoAttack's 9 targets on 6 classes: 5 targets, and one line saying so (not silent,
    not once per batch)."""
    import logging

    import torch

    from pse_lightning.attacks.losses import capped_targets_notice, runner_up_aims

    capped_targets_notice.cache_clear()
    logits = torch.randn(4, 6)
    with caplog.at_level(logging.WARNING, logger="pse_lightning.attacks.losses"):
        aims = runner_up_aims(logits, 9)
        runner_up_aims(logits, 9)
    assert [rank for _, rank in aims] == [1, 2, 3, 4, 5]
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "attack.target_classes=9 is more than the 5 other classes of this dataset: "
        "5 targets are attacked (the authors' AutoAttack caps it the same way)"
    ]
    caplog.clear()
    runner_up_aims(torch.randn(2, 10), 9)
    assert not caplog.records
