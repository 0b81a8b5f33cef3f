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
from collections.abc import Callable

import torch
from torch import nn

from pse_lightning.analysis.functional.pse import PAIR_MODES, pse_attributions
from pse_lightning.bench.common import format_table, forward_backward_floor, time_call
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
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--chunk-sizes", default="256,1024", help="IG images per pass")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-captum", action="store_true")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    device = torch.device(args.device)
    model = build_model(args.model, args.image_size, args.classes, device)
    for p in model.parameters():
        p.requires_grad_(True)  # as in training code: the floor pays for it too
    n, m = args.batch, args.steps
    x = 0.1 + 0.8 * torch.rand(n, 3, args.image_size, args.image_size, device=device)
    y = torch.randint(0, args.classes, (n,), device=device)
    target = (y + 1) % args.classes
    x_adv = (x + 0.03 * torch.randn_like(x).sign()).clamp(0, 1)
    with torch.no_grad():
        logits_clean, logits_adv = model(x), model(x_adv)

    def timed(fn: Callable[[], object]) -> float:
        return time_call(fn, repeats=args.repeats, device=device)

    floor = forward_backward_floor(model, x, y, repeats=args.repeats)
    rows: list[list[object]] = [["forward+backward floor", floor, 1.0, "", ""]]

    def ours(method: str, mode: str, chunk: int = 256) -> Callable[[], object]:
        return lambda: pse_attributions(
            model, x, x_adv, y, target, method=method, steps=m, max_steps=m, mode=mode,
            chunk_size=chunk, logits_clean=logits_clean, logits_adv=logits_adv,
        )  # fmt: skip

    for mode in PAIR_MODES:
        t = timed(ours("grad", mode))
        ratio = t / floor
        rows.append([f"first-order PSE ({mode})", t, ratio, f"<= {FIRST_ORDER_TARGET}",
                     _verdict(ratio <= FIRST_ORDER_TARGET)])  # fmt: skip
    best_ig = float("inf")
    for chunk in [int(c) for c in args.chunk_sizes.split(",")]:
        for mode in PAIR_MODES:
            t = timed(ours("ig", mode, chunk))
            best_ig = min(best_ig, t)
            ratio = t / (m * floor)
            rows.append([f"IG {m} steps, both logits ({mode}, chunk {chunk})", t, ratio,
                         f"<= {IG_TARGET} (per step)", _verdict(ratio <= IG_TARGET)])  # fmt: skip
    if not args.no_captum:
        rows += _captum_rows(model, x, x_adv, y, target, m, floor, best_ig, timed)
    log.info(
        "model %s, batch %d x 3 x %d x %d, %d steps, device %s, %d threads\n",
        args.model, n, args.image_size, args.image_size, m, device, torch.get_num_threads(),
    )  # fmt: skip
    headers = ["what", "seconds", "ratio to floor (IG: to m x floor)", "target", "verdict"]
    log.info(format_table(headers, rows))


def _captum_rows(model, x, x_adv, y, target, m, floor, best_ig, timed) -> list[list[object]]:
    try:
        from captum.attr import IntegratedGradients
    except ImportError:
        log.info("captum is not installed: skipping the comparison (pip install captum)")
        return []
    ig = IntegratedGradients(model)
    rows = []
    for internal in (None, 256):

        def both(internal: int | None = internal) -> None:
            for cls in (y, target):  # captum attributes one output per call
                ig.attribute(x_adv, baselines=x, target=cls, n_steps=m,
                             method="riemann_middle", internal_batch_size=internal)  # fmt: skip

        t = timed(both)
        rows.append([f"captum IG {m} steps, both logits (internal batch {internal})", t,
                     t / (m * floor), f"ours faster: {t / best_ig:.2f}x",
                     _verdict(best_ig < t)])  # fmt: skip
    return rows


def _verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"
