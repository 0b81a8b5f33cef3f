"""DDN and FMN: exact optima where the box binds, their cost, and the shared geometry."""

from __future__ import annotations

import pytest
import torch
from helpers import CONF_DIR
from hydra.utils import instantiate
from omegaconf import OmegaConf
from test_attacks_minnorm import _one_thread  # noqa: F401 (an autouse fixture)
from torch import nn

from pse_lightning.attacks import DDN, FMN
from pse_lightning.attacks.minnorm import cosine_anneal, project_l1, project_lp


class TwoClassLinear(nn.Module):
    """Logits (0, w.x + b): class 1 exactly where f(x) = w.x + b > 0."""

    num_classes = 2

    def __init__(self, w: torch.Tensor, b: float) -> None:
        super().__init__()
        self.w, self.b = w, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = x.flatten(1) @ self.w + self.b
        return torch.stack([torch.zeros_like(f), f], dim=1)


def saturated_problem(n: int = 16, seed: int = 0):
    """A linear two-class model and images with 40% of pixels exactly at 0 or 1.

    Returns (model, x, y, v, m, room) in float64 for the exact solvers: crossing the
    boundary means v.delta <= -m with v = sign(f) w and m = |f(x)|, and coordinate i can
    move by at most room_i against v_i (to 0 where v_i > 0, to 1 where v_i < 0).
    """
    gen = torch.Generator().manual_seed(seed)
    d = 3 * 8 * 8
    w = torch.randn(d, generator=gen)
    x = torch.rand(n, d, generator=gen)
    r = torch.rand(n, d, generator=gen)
    x = torch.where(r < 0.2, torch.zeros_like(x), torch.where(r < 0.4, torch.ones_like(x), x))
    f = x @ w
    b = -float(f.median())
    f = f + b
    keep = f.abs() > 0.5  # not on the boundary already
    x, f = x[keep], f[keep]
    v = (torch.sign(f)[:, None] * w).double()
    room = torch.where(v > 0, x.double(), 1 - x.double())
    y = (f > 0).long()
    return TwoClassLinear(w, b), x.view(-1, 3, 8, 8), y, v, f.abs().double(), room


def exact_l2(v: torch.Tensor, m: torch.Tensor, room: torch.Tensor) -> torch.Tensor:
    """min ||d||_2 s.t. v.d <= -m, x + d in the box: by KKT d_i = -clip(lambda v_i) within
    the room, and v.d falls monotonically in lambda, so bisect on the multiplier."""
    lo = torch.zeros_like(m)
    hi = torch.full_like(m, 1e4)
    for _ in range(200):
        lam = (lo + hi) / 2
        gain = (v.abs() * torch.minimum(lam[:, None] * v.abs(), room)).sum(1)
        hi, lo = torch.where(gain >= m, lam, hi), torch.where(gain >= m, lo, lam)
    return torch.minimum(hi[:, None] * v.abs(), room).norm(dim=1)


def exact_linf(v: torch.Tensor, m: torch.Tensor, room: torch.Tensor) -> torch.Tensor:
    """min ||d||_inf: at radius t the best gain is sum |v_i| min(t, room_i); bisect on t."""
    lo, hi = torch.zeros_like(m), torch.ones_like(m)
    for _ in range(100):
        t = (lo + hi) / 2
        gain = (v.abs() * torch.minimum(room, t[:, None])).sum(1)
        hi, lo = torch.where(gain >= m, t, hi), torch.where(gain >= m, lo, t)
    return hi


def exact_l1(v: torch.Tensor, m: torch.Tensor, room: torch.Tensor) -> torch.Tensor:
    """min ||d||_1: a fractional knapsack, filled by decreasing |v_i| up to each room_i."""
    order = v.abs().argsort(dim=1, descending=True)
    rate, cap = v.abs().gather(1, order), room.gather(1, order)
    gain = rate * cap
    still_needed = (m[:, None] - (gain.cumsum(1) - gain)).clamp_min(0)
    return torch.minimum(cap, still_needed / rate).sum(1)


EXACT = {"l2": exact_l2, "linf": exact_linf, "l1": exact_l1}
P = {"l2": 2.0, "linf": float("inf"), "l1": 1.0}


def test_the_box_binds_in_the_problem() -> None:
    """Without the box the optima would be |f| / ||w||_dual: the box makes them larger, so
    an attack that ignores it (or cannot move saturated pixels) is measured."""
    _, _, _, v, m, room = saturated_problem()
    for norm, dual in (("l2", 2.0), ("linf", 1.0), ("l1", float("inf"))):
        free = m / v.norm(p=dual, dim=1)
        assert float((EXACT[norm](v, m, room) / free).median()) > 1.05, norm


@pytest.mark.parametrize(
    ("attack", "norm"),
    [(DDN(), "l2"), (FMN(norm="l2"), "l2"), (FMN(norm="linf"), "linf"), (FMN(norm="l1"), "l1")],
    ids=["ddn", "fmn-l2", "fmn-linf", "fmn-l1"],
)
def test_default_budget_reaches_the_exact_optimum(attack, norm: str) -> None:
    model, x, y, v, m, room = saturated_problem()
    result = attack(model, x, y)
    assert result.success.all()
    ratio = (result.x_adv - x).flatten(1).double().norm(p=P[norm], dim=1) / EXACT[norm](v, m, room)
    assert (ratio >= 1 - 1e-4).all(), ratio  # nothing beats the optimum: checks the solver
    assert float(ratio.median()) <= 1.02, ratio
    assert float(ratio.max()) <= 1.05, ratio


def test_targeted_fmn_reaches_the_target_class() -> None:
    gen = torch.Generator().manual_seed(4)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 5))
    x = torch.rand(8, 3, 8, 8, generator=gen)
    with torch.no_grad():
        y = model(x).argmax(1)
    for attack in (FMN(targeted=True, target_rule="next"), DDN(targeted=True, target_rule="next")):
        result = attack(model, x, y)
        assert result.success.all()
        assert torch.equal(result.logits_adv.argmax(1), (y + 1) % 5)


class Counting(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.num_classes, self.rows = model, model.num_classes, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rows += len(x)
        return self.model(x)


@pytest.mark.parametrize(
    "attack", [DDN(steps=3, init_norm=0.3), FMN(steps=3, init_step=0.1)], ids=["ddn", "fmn"]
)
def test_cost_is_steps_and_found_rows_need_no_scoring_forward(attack) -> None:
    """One forward row per step and image; the tracked logits score the found rows, only
    rows never found are forwarded once more, and they come back unchanged."""
    model, x, y, *_ = saturated_problem()
    counter = Counting(model)
    with torch.no_grad():  # as the evaluation loop does: success needs the clean prediction
        clean = model(x)
    result = attack(counter, x, y, logits_clean=clean)
    assert counter.rows == 3 * len(x)
    never = ~result.success
    assert never.any() and result.success.any()  # 3 steps: some found, some not
    _ = result.logits_adv
    assert counter.rows == 3 * len(x) + int(never.sum())
    assert torch.equal(result.x_adv[never], x[never])
    with torch.no_grad():
        torch.testing.assert_close(result.logits_adv, model(result.x_adv))


def test_more_steps_never_hurt_much() -> None:
    """The best iterate is kept: a longer run is at least as good on this convex problem."""
    model, x, y, *_ = saturated_problem()
    short = FMN(steps=30)(model, x, y)
    long = FMN(steps=120)(model, x, y)
    size = lambda r: (r.x_adv - x).flatten(1).norm(dim=1)  # noqa: E731
    assert short.success.all() and long.success.all()
    assert float(size(long).median()) <= float(size(short).median())


@pytest.mark.parametrize("norm", ["l1", "linf"])
def test_fmn_other_norms_respect_a_support_mask(norm: str) -> None:
    """(The contract suite covers FMN's YAML default, L2.) Only allowed pixels move, and
    exactly the found examples move."""
    model, x, y, *_ = saturated_problem()
    support = torch.rand(x.shape, generator=torch.Generator().manual_seed(5)) < 0.5
    result = FMN(norm=norm, steps=30)(model, x, y, support=support)
    delta = result.x_adv - x
    assert torch.all(delta[~support] == 0)
    moved = delta.flatten(1).abs().amax(1) > 0
    assert torch.equal(moved, result.success) and result.success.float().mean() >= 0.5


# -- the shared geometry ---------------------------------------------------------------------


def test_cosine_anneal_ends() -> None:
    assert cosine_anneal(0, 10, 1.0, 0.01) == 1.0
    assert cosine_anneal(5, 10, 1.0, 0.01) == pytest.approx(0.505)
    assert cosine_anneal(10, 10, 1.0, 0.01) == pytest.approx(0.01)


def test_l1_projection_is_the_euclidean_one() -> None:
    """Against an independent construction: soft-thresholding with theta found by
    bisection on ||soft(v, theta)||_1 = r; rows already inside are untouched."""
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(6, 2, 5, 5, generator=gen, dtype=torch.float64)
    r = torch.tensor([0.5, 2.0, 10.0, 100.0, 1e-3, 7.0], dtype=torch.float64)
    out = project_l1(v, r)
    lo, hi = torch.zeros(6, dtype=torch.float64), v.flatten(1).abs().amax(1)
    for _ in range(200):
        theta = (lo + hi) / 2
        norm = (v.flatten(1).abs() - theta[:, None]).clamp_min(0).sum(1)
        lo, hi = torch.where(norm > r, theta, lo), torch.where(norm > r, hi, theta)
    inside = v.flatten(1).abs().sum(1) <= r
    theta = torch.where(inside, torch.zeros_like(hi), hi)
    expected = v.sign() * (v.abs() - theta.view(-1, 1, 1, 1)).clamp_min(0)
    torch.testing.assert_close(out, expected)
    assert inside[3] and torch.equal(out[3], v[3])


@pytest.mark.parametrize("norm", ["l2", "linf", "l1"])
def test_projection_lands_in_the_ball_and_keeps_inside_rows(norm: str) -> None:
    gen = torch.Generator().manual_seed(1)
    v = torch.randn(4, 3, 4, 4, generator=gen)
    radius = torch.tensor([0.1, 1.0, 3.0, 1e4])
    out = project_lp(v, radius, norm)
    sizes = out.flatten(1).norm(p=P[norm], dim=1)
    assert (sizes <= radius * (1 + 1e-5)).all()
    assert torch.equal(out[3], v[3])


# -- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "cls"), [("ddn", DDN), ("fmn", FMN)])
def test_yaml_instantiates_the_class(name: str, cls: type) -> None:
    cfg = OmegaConf.load(CONF_DIR / "attack" / f"{name}.yaml")
    cfg.seed = 0
    assert type(instantiate(cfg)) is cls


@pytest.mark.parametrize(
    ("cls", "bad", "key"),
    [
        (DDN, {"steps": 0}, "attack.steps"),
        (DDN, {"gamma": 1.5}, "attack.gamma"),
        (DDN, {"init_norm": -1.0}, "attack.init_norm"),
        (FMN, {"norm": "l0"}, "attack.norm"),
        (FMN, {"init_step": 0.0}, "attack.init_step"),
        (FMN, {"final_gamma": 0.0}, "attack.final_gamma"),
    ],
)
def test_bad_hyperparameters_name_the_key(cls: type, bad: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key):
        cls(**bad)
