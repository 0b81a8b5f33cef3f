"""The ``attack.compile`` table of the ``attacks`` bench: compile cost apart from step cost.

``python -m pse_lightning.bench attacks --only compile`` (or ``--compile`` with the other
tables). For PGD (whole step compiled: forward, objective, input gradient, update,
projection) and CW-L2 (forward, objective and input gradient compiled; Adam and the box
eager), on the bench's model and batch:

- ``compile s``: wall time of the first call of each compiled step (tracing, inductor code
  generation and one execution), summed over the attack's steps; paid once per process for
  a (step, model, input shape), since later batches reuse it;
- ``first call s``: the attack's whole first call (compilation included);
- ``steady call s``: the fastest of ``--repeats`` later calls (eager and compiled calls
  interleaved, so load drift hits both);
- ``iter/floor``: steady call / iterations / the eager floor (one forward + input-gradient
  backward of the batch);
- ``success``: share of the batch misclassified on the returned images;
- ``max |dx|``, ``share |dx| > 1e-6``: the largest coordinate difference between the
  compiled and the eager adversarial images, and the share of coordinates that differ
  (docs/METHODS.md §1.14: one step agrees to float rounding; a sign step that flips on a
  gradient coordinate within rounding of 0 sends the later iterates apart).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pse_lightning.attacks import CWL2, PGD, Attack
from pse_lightning.bench.common import format_table, forward_backward_floor, synchronize

MODES = ("off", "on")  # attack.compile


@dataclass(frozen=True)
class Spec:
    """An attack of the table: its name, iterations per call, and its constructor."""

    name: str
    iterations: int
    make: Callable[..., Attack]


def compile_specs(pgd_steps: int, cw_steps: int, eps: float) -> list[Spec]:
    pgd = dict(norm="linf", eps=eps, step_size=eps / 4, steps=pgd_steps)
    cw = dict(steps=cw_steps, binary_search_steps=1, lr=0.05, initial_const=0.1)
    return [
        Spec(f"PGD-linf {pgd_steps}", pgd_steps, lambda **kw: PGD(**pgd, **kw)),
        Spec(f"CW-L2 {cw_steps}", cw_steps, lambda **kw: CWL2(**cw, abort_early=False, **kw)),
    ]


def _timed(attack: Attack, model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, Tensor]:
    synchronize(x.device)
    start = time.perf_counter()
    x_adv = attack(model, x, y).x_adv
    synchronize(x.device)
    return time.perf_counter() - start, x_adv


def compile_rows(
    model: nn.Module, x: Tensor, y: Tensor, specs: list[Spec], repeats: int
) -> tuple[list[list[object]], float]:
    """One eager and one compiled row per attack (see the module docstring), and the
    floor in seconds (the fastest of the rounds: each round times the floor and every
    attack, so load drift hits all of them alike)."""
    attacks = {(s.name, mode): s.make(compile=mode == "on") for s in specs for mode in MODES}
    first, steady, x_adv = {}, {}, {}
    floor = float("inf")
    for round_ in range(repeats + 1):  # round 0: the first calls (compilation)
        if round_:
            floor = min(floor, forward_backward_floor(model, x, y, repeats=3))
        for key, attack in attacks.items():
            seconds, x_adv[key] = _timed(attack, model, x, y)
            if round_ == 0:
                first[key] = seconds
            else:
                steady[key] = min(steady.get(key, float("inf")), seconds)
    with torch.no_grad():
        success = {k: float((model(v).argmax(1) != y).float().mean()) for k, v in x_adv.items()}
    rows = []
    for spec in specs:
        diff = (x_adv[spec.name, "on"] - x_adv[spec.name, "off"]).abs()
        for mode in MODES:
            key = (spec.name, mode)
            rows.append([spec.name, mode, attacks[key].gradients.compile_seconds, first[key],
                         steady[key], steady[key] / spec.iterations / floor, success[key],
                         float(diff.max()) if mode == "on" else "",
                         float((diff > 1e-6).float().mean()) if mode == "on" else ""])  # fmt: skip
    return rows, floor


def print_compile_table(
    model: nn.Module, x: Tensor, y: Tensor, specs: list[Spec], repeats: int
) -> None:
    rows, floor = compile_rows(model, x, y, specs, repeats)
    print(
        f"\nattack.compile on {x.device} ({torch.get_num_threads()} threads), batch "
        f"{tuple(x.shape)}: compile s = first call of each compiled step (paid once per "
        "process, model and input shape); iter/floor = steady time per iteration / one eager "
        f"forward+backward (floor {1e3 * floor:.1f} ms)\n"
    )
    headers = ["attack", "compile", "compile s", "first call s", "steady call s", "iter/floor",
               "success", "max |dx|", "share |dx| > 1e-6"]  # fmt: skip
    print(format_table(headers, rows), flush=True)
