"""Bench suite ``pse``: PSE attribution cost as ratios to the forward+backward floor.

``python -m pse_lightning.bench pse [--batch 32] [--steps 32] [--model small_cnn]``

Targets (issue 4): first-order PSE (both logits' gradients) at most 2.5 x the floor;
integrated gradients with m steps at most 1.2 x m x the floor, and faster than captum's
``IntegratedGradients`` at the same steps on the same batch (when captum is installed).
Every number is measured in one run on one random batch; the model has random weights.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable

import torch
from torch import nn

from pse_lightning.analysis.functional.pse import PAIR_MODES, pse_attributions
from pse_lightning.bench.common import format_table, synchronize
from pse_lightning.models import SmallCNN, TorchvisionClassifier

log = logging.getLogger(__name__)

FIRST_ORDER_TARGET = 2.5
IG_TARGET = 1.2


def build_model(name: str, image_size: int, num_classes: int, device: torch.device) -> nn.Module:
    facts = dict(num_classes=num_classes, in_channels=3, mean=[0.5] * 3, std=[0.25] * 3)
    if name == "small_cnn":
        model = SmallCNN(**facts, image_size=image_size)
    else:
        model = TorchvisionClassifier(arch=name, image_size=image_size, **facts)
    return model.to(device).eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pse_lightning.bench pse")
    parser.add_argument("--model", default="small_cnn", help="small_cnn, resnet18, ...")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--chunk-sizes", default="16,64,256", help="IG images per pass")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: keep)")
    parser.add_argument("--no-captum", action="store_true")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)  # one thread is steadier on a shared machine

    torch.manual_seed(0)
    device = torch.device(args.device)
    model = build_model(args.model, args.image_size, args.classes, device)
    n, m = args.batch, args.steps
    x = 0.1 + 0.8 * torch.rand(n, 3, args.image_size, args.image_size, device=device)
    y = torch.randint(0, args.classes, (n,), device=device)
    target = (y + 1) % args.classes
    x_adv = (x + 0.03 * torch.randn_like(x).sign()).clamp(0, 1)
    with torch.no_grad():
        logits_clean, logits_adv = model(x), model(x_adv)

    def ours(method: str, mode: str, chunk: int = 64) -> Callable[[], object]:
        return lambda: pse_attributions(
            model, x, x_adv, y, target, method=method, steps=m, max_steps=m, mode=mode,
            chunk_size=chunk, logits_clean=logits_clean, logits_adv=logits_adv,
        )  # fmt: skip

    # name -> (function, floor multiple, target ratio or None)
    cases: dict[str, tuple[Callable[[], object], int, float | None]] = {}
    for mode in PAIR_MODES:
        cases[f"first-order PSE ({mode})"] = (ours("grad", mode), 1, FIRST_ORDER_TARGET)
    for chunk in [int(c) for c in args.chunk_sizes.split(",")]:
        for mode in PAIR_MODES:
            name = f"IG {m} steps ({mode}, chunk {chunk})"
            cases[name] = (ours("ig", mode, chunk), m, IG_TARGET)
    if not args.no_captum:
        cases.update(_captum_cases(model, x, x_adv, y, target, m))
    floor_step = _floor_step(model, x, y)
    times = _interleaved({"floor": floor_step} | {k: v[0] for k, v in cases.items()},
                         rounds=args.rounds, device=device)  # fmt: skip
    floor = min(times["floor"])
    ours_ig = min((min(times[k]) for k in cases if k.startswith("IG")), default=float("nan"))
    rows: list[list[object]] = [["forward+backward floor", floor, 1.0, "", ""]]
    for name, (_, multiple, goal) in cases.items():
        best = min(times[name])
        ratio = best / (multiple * floor)
        if goal is None:
            rows.append([name, best, ratio, f"ours faster: {best / ours_ig:.2f}x",
                         _verdict(ours_ig < best)])  # fmt: skip
        else:
            rows.append([name, best, ratio, f"<= {goal}", _verdict(ratio <= goal)])
    log.info(
        "model %s, batch %d x 3 x %d x %d, %d steps, device %s, %d threads; best of %d "
        "interleaved rounds (robust to a shared machine)\n",
        args.model, n, args.image_size, args.image_size, m, device, torch.get_num_threads(),
        args.rounds,
    )  # fmt: skip
    headers = ["what", "seconds", "ratio to floor (IG: to steps x floor)", "target", "verdict"]
    log.info(format_table(headers, rows))


def _floor_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """One step of ``bench.common.forward_backward_floor``: the same work, timed here in
    rounds interleaved with the candidates."""

    def step() -> None:
        x_var = x.detach().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(model(x_var), y, reduction="sum")
        torch.autograd.grad(loss, x_var)

    return step


def _interleaved(
    fns: dict[str, Callable[[], object]], *, rounds: int, device: torch.device
) -> dict[str, list[float]]:
    """Wall times of each function, one call per round, rounds interleaved after a warm-up,
    so a slow phase of a shared machine hits every candidate alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def _captum_cases(model, x, x_adv, y, target, m) -> dict[str, tuple]:
    try:
        from captum.attr import IntegratedGradients
    except ImportError:
        log.info("captum is not installed: skipping the comparison (pip install captum)")
        return {}
    ig = IntegratedGradients(model)
    cases = {}
    for internal in (None, 256):

        def both(internal: int | None = internal) -> None:
            for cls in (y, target):  # captum attributes one output per call
                ig.attribute(x_adv, baselines=x, target=cls, n_steps=m,
                             method="riemann_middle", internal_batch_size=internal)  # fmt: skip

        cases[f"captum IG {m} steps, both logits (internal batch {internal})"] = (both, m, None)
    return cases


def _verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"
