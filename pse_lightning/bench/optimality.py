"""Optimality of the minimum-L2 attacks as AttackBench measures it (Cinà et al. 2024), run by
the ``attacks`` suite (``python -m pse_lightning.bench attacks [--quick]``).

Every attack, ours and the peers' (foolbox's DDN, FMN and C&W, torchattacks' C&W), attacks
the same correctly classified images of the same model in one process, at the same budget
of gradient evaluations per image (100 and 500). Per image, ``best`` is the smallest L2 of a
successful example found by any attack in the run; an attack's optimality is the median over
the images of L2 / best, a failure counting as infinite (so a median above 1 can also mean
failures), and 1.00 means it found the best example on at least half of them. Its time per
model evaluation (forward rows counted by a wrapper / images, from the fastest of
``--repeats`` rounds) is divided by the floor, one forward + input-gradient backward of the
batch, measured just before and after that attack's rounds (a shared machine drifts).

The main job's attack (``conf/attack/cw.yaml`` as shipped) runs at its own budget. Our CW
runs with its constructor defaults except the iteration counts (5 x budget / 5 below 500, 9 x
budget / 9 from 500, no early abort); foolbox's C&W with the same counts and the peers'
usual lr 0.01 and initial constant 0.01.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import Tensor, nn

import pse_lightning
from pse_lightning.attacks import CWL2, DDN, FMN
from pse_lightning.bench.common import format_table, forward_backward_floor

log = logging.getLogger(__name__)

MAIN_JOB_ATTACK = "cw"


@dataclass
class Contender:
    library: str
    attack: str
    budget: int | str
    fn: Callable[[nn.Module], Tensor]


def main_job_attack() -> object:
    """The attack of ``conf/attack/<MAIN_JOB_ATTACK>.yaml`` as shipped (seed 0)."""
    root = Path(pse_lightning.__file__).resolve().parents[1]
    path = root / "conf" / "attack" / f"{MAIN_JOB_ATTACK}.yaml"
    cfg = OmegaConf.load(path)
    cfg.seed = 0
    return instantiate(cfg)


def search_steps(budget: int) -> int:
    """Outer constant-search steps of the CW runs at a budget (5 at 100, 9 from 500)."""
    return 5 if budget < 500 else 9


def ours(x: Tensor, y: Tensor, budget: int) -> list[Contender]:
    """Our minimum-L2 attacks with ``budget`` gradient evaluations per image."""

    def run(attack: object) -> Callable[[nn.Module], Tensor]:
        return lambda m: attack(m, x, y).x_adv  # type: ignore[operator]

    search = search_steps(budget)
    cw = CWL2(steps=budget // search, binary_search_steps=search, abort_early=False)
    us = "pse_lightning"
    return [
        Contender(us, "DDN", budget, run(DDN(steps=budget))),
        Contender(us, "FMN-L2", budget, run(FMN(norm="l2", steps=budget))),
        Contender(us, f"CW {search}x{budget // search}", budget, run(cw)),
    ]


def peers(x: Tensor, y: Tensor, budget: int) -> list[Contender]:
    """The peers' minimum-L2 attacks with the same budget, when importable."""
    out: list[Contender] = []
    try:
        import foolbox as fb
    except ImportError:
        log.warning("foolbox is not installed (pip install foolbox): skipped")
    else:

        def fb_run(attack: object) -> Callable[[nn.Module], Tensor]:
            return lambda m: attack.run(fb.PyTorchModel(m, bounds=(0, 1)), x, y)

        search = search_steps(budget)
        fb_cw = fb.attacks.L2CarliniWagnerAttack(
            binary_search_steps=search,
            steps=budget // search,
            stepsize=0.01,
            initial_const=0.01,
            abort_early=False,
        )
        out += [
            Contender("foolbox", "DDN", budget, fb_run(fb.attacks.DDNAttack(steps=budget))),
            Contender("foolbox", "FMN-L2", budget, fb_run(fb.attacks.L2FMNAttack(steps=budget))),
            Contender("foolbox", f"CW {search}x{budget // search}", budget, fb_run(fb_cw)),
        ]
    try:
        import torchattacks as ta
    except ImportError:
        log.warning("torchattacks is not installed (pip install torchattacks): skipped")
    else:
        # One constant, no search: its whole budget in one run.
        def ta_cw(m: nn.Module) -> Tensor:
            return ta.CW(m, c=1.0, kappa=0.0, steps=budget, lr=0.01)(x, y)

        out.append(Contender("torchattacks", "CW c=1", budget, ta_cw))
    return out


@dataclass
class Measured:
    contender: Contender
    seconds: float
    evals: float
    floor: float  # the floor measured around this contender's runs (the machine drifts)
    l2: Tensor  # (N,), inf where the attack failed


def measure(
    contender: Contender, model: nn.Module, x: Tensor, y: Tensor, repeats: int
) -> Measured:
    """Fastest of ``repeats`` runs, its forward rows per image, and per-image L2 (inf where
    the returned image is not misclassified, or is foolbox's blank placeholder)."""
    from pse_lightning.bench.attacks import CountingModel, time_once

    counter = CountingModel(model).eval()
    seconds = floor = math.inf
    for _ in range(repeats):
        floor = min(floor, forward_backward_floor(model, x, y, repeats=3))
        elapsed, x_adv = time_once(contender.fn, counter, x.device)
        seconds = min(seconds, elapsed)
    floor = min(floor, forward_backward_floor(model, x, y, repeats=3))
    evals = counter.rows / len(x) / repeats
    model.eval()
    with torch.no_grad():
        success = (model(x_adv).argmax(1) != y) & (x_adv.flatten(1).abs().sum(1) > 0)
    l2 = (x_adv - x).flatten(1).norm(dim=1)
    return Measured(contender, seconds, evals, floor, torch.where(success, l2, math.inf))


def optimality_table(
    model: nn.Module, x: Tensor, y: Tensor, budgets: list[int], repeats: int, with_peers: bool
) -> None:
    """Run every contender at every budget and print the AttackBench table."""
    main_job = main_job_attack()
    name = f"attack={MAIN_JOB_ATTACK} (main job)"
    plan = [Contender("pse_lightning", name, "own", lambda m: main_job(m, x, y).x_adv)]
    for budget in budgets:
        plan += ours(x, y, budget) + (peers(x, y, budget) if with_peers else [])
    measured = []
    for contender in plan:
        log.info("optimality: %s %s @ %s", contender.library, contender.attack, contender.budget)
        measured.append(measure(contender, model, x, y, repeats))
    best = torch.stack([m.l2 for m in measured]).amin(dim=0)
    rows = []
    for m in measured:
        found = m.l2 < math.inf
        median_l2 = float(m.l2[found].median()) if found.any() else math.nan
        c = m.contender
        success = float(found.float().mean())
        per_eval = m.seconds / m.evals / m.floor
        ratio = float((m.l2 / best).median())
        rows.append([c.library, c.attack, c.budget, m.evals, success, ratio, median_l2, per_eval])
    print(
        f"\nAttackBench optimality: {len(x)} correctly classified images, best = smallest "
        f"successful L2 per image over all {len(measured)} runs; floor (measured around each "
        f"attack, min of {2 * 3} calls) {min(m.floor for m in measured) * 1000:.1f} ms at best "
        "per forward+backward of the batch\n"
    )
    headers = ["library", "attack", "budget", "evals/img", "success", "median L2/best",
               "median L2", "s per eval / floor"]  # fmt: skip
    print(format_table(headers, rows), flush=True)
