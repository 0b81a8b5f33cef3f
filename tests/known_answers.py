"""Exact minimal perturbations of a linear classifier in the box [0, 1], for known-answer
tests of the minimum-norm attacks where the box binds.

For logits Z = W x + b, a sample of class y becomes class j exactly when a . delta >= m
with a = w_j - w_y and m = Z_y(x) - Z_j(x) > 0. The elastic-net problem for that class,

    min  beta ||delta||_1 + ||delta||_2^2   s.t.  a . delta >= m,  -x <= delta <= 1 - x,

is convex and separable once the constraint is dualised: for a multiplier lam >= 0 each
coordinate minimises beta |d| + d^2 - lam a_i d over [-x_i, 1 - x_i]. A convex scalar
function's minimiser over an interval is its unconstrained minimiser clipped to the
interval, and the unconstrained minimiser is the soft-threshold
sign(a_i) max(lam |a_i| - beta, 0) / 2. So delta(lam) = clip(soft(lam a, beta) / 2, box);
a . delta(lam) is continuous and nondecreasing in lam, and since m > 0 the constraint is
active at the optimum: bisection on lam solves a . delta(lam) = m (KKT). The untargeted
optimum is the best class j != y; beta = 0 gives the minimal L2 perturbation (CW).
Everything here is float64 and independent of the attack code.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class LinearNet(nn.Module):
    """Z = W x + b on flattened images."""

    def __init__(self, weight: Tensor, bias: Tensor) -> None:
        super().__init__()
        self.fc = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.fc.weight.copy_(weight)
            self.fc.bias.copy_(bias)
        self.num_classes = weight.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x.flatten(1))


def boxed_problem(
    n: int = 12,
    k: int = 5,
    shape: tuple[int, int, int] = (3, 8, 8),
    seed: int = 0,
    logit_scale: float = 1.0,
) -> tuple[LinearNet, Tensor, Tensor]:
    """A k-class linear model and images with about 40% of the pixels at exactly 0 or 1
    (so the box binds), labelled with the model's own prediction.

    ``logit_scale`` multiplies the weights: the decision boundaries, and so the exact
    optima, do not change, but the logits (and any penalty weighed against them) do; a
    trained network's logits move by about 10 per unit of L2 (``logit_scale`` 10)."""
    gen = torch.Generator().manual_seed(seed)
    d = shape[0] * shape[1] * shape[2]
    weight = torch.randn(k, d, generator=gen) / d**0.5 * logit_scale
    model = LinearNet(weight, torch.zeros(k))
    x = torch.rand(n, *shape, generator=gen)
    pick = torch.rand(n, *shape, generator=gen)
    x = torch.where(pick < 0.2, torch.zeros_like(x), torch.where(pick > 0.8, 1.0, x))
    with torch.no_grad():
        y = model(x).argmax(1)
    return model.eval(), x, y


def _delta(lam: Tensor, a: Tensor, beta: float, low: Tensor, high: Tensor) -> Tensor:
    z = lam[:, None] * a
    soft = z.sign() * (z.abs() - beta).clamp_min(0.0) / 2
    return torch.minimum(torch.maximum(soft, low), high)


def _solve_pair(a: Tensor, m: Tensor, beta: float, low: Tensor, high: Tensor) -> Tensor:
    """(N, d) optimal delta for one class per sample; NaN rows where infeasible."""
    reach = (torch.where(a > 0, high, low) * a).sum(1)
    lo = torch.zeros_like(m)
    hi = torch.ones_like(m)
    for _ in range(200):  # grow hi until the constraint holds (or the box caps it)
        short = (_delta(hi, a, beta, low, high) * a).sum(1) < m
        if not bool(short.any()):
            break
        hi = torch.where(short, hi * 2, hi)
    for _ in range(200):
        mid = (lo + hi) / 2
        ok = (_delta(mid, a, beta, low, high) * a).sum(1) >= m
        hi, lo = torch.where(ok, mid, hi), torch.where(ok, lo, mid)
    out = _delta(hi, a, beta, low, high)
    return torch.where((reach >= m)[:, None], out, torch.nan)


def exact_optimum(model: LinearNet, x: Tensor, y: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """The minimal ``beta ||delta||_1 + ||delta||_2^2`` untargeted perturbation per sample.

    Returns:
        ``(delta, value)``: (N, C, H, W) float64 optimal perturbations and (N,) their
        objective values (sqrt of it is the minimal L2 when beta = 0).
    """
    weight = model.fc.weight.detach().double()
    bias = model.fc.bias.detach().double()
    flat = x.flatten(1).double()
    logits = flat @ weight.T + bias
    low, high = -flat, 1 - flat
    best = torch.full((len(x),), torch.inf, dtype=torch.float64)
    best_delta = torch.zeros_like(flat)
    for j in range(weight.shape[0]):
        a = weight[j][None] - weight[y]
        m = logits.gather(1, y[:, None])[:, 0] - logits[:, j]
        delta = _solve_pair(a, m, beta, low, high)
        value = beta * delta.abs().sum(1) + delta.pow(2).sum(1)
        better = (j != y) & ~value.isnan() & (value < best)
        best = torch.where(better, value, best)
        best_delta = torch.where(better[:, None], delta, best_delta)
    return best_delta.view_as(x), best


def boundary_share(delta: Tensor, x: Tensor) -> Tensor:
    """(N,) share of the squared L2 of ``delta`` spent on pixels at exactly 0 or 1."""
    at_edge = ((x == 0) | (x == 1)).flatten(1)
    sq = delta.flatten(1).pow(2)
    return (sq * at_edge).sum(1) / sq.sum(1)
