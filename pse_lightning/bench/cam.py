"""Bench suite ``cam``: the cost of class activation maps over the plain forward pass.

CAM reads the feature layer during the forward pass that produces the logits and combines
its channels with the head's weights (an einsum over K channels at h x w cells), then
upsamples and normalises; the target is < 10% over the no-grad forward pass of the batch.
Grad-CAM needs one backward pass to the features and is compared with the forward +
backward floor instead. Every figure is a ratio measured in the same process.

``python -m pse_lightning.bench cam [--batch 128] [--image-size 32] [--device cpu] [--threads 1]``
"""

from __future__ import annotations

import argparse
import logging
import statistics
from collections.abc import Callable

import torch

from pse_lightning.bench.common import format_table, time_call
from pse_lightning.core import activation_maps as amaps
from pse_lightning.core.activation_maps import CAM, GradCAM
from pse_lightning.core.hooks import capture_activations
from pse_lightning.models import SmallCNN, TorchvisionClassifier

log = logging.getLogger(__name__)

TARGET_OVERHEAD = 0.10


def _models(image_size: int, num_classes: int) -> dict[str, torch.nn.Module]:
    stats = dict(num_classes=num_classes, in_channels=3, mean=[0.5] * 3, std=[0.25] * 3,
                 image_size=image_size)  # fmt: skip
    torch.manual_seed(0)
    return {
        "small_cnn": SmallCNN(**stats),
        "resnet18": TorchvisionClassifier(arch="resnet18", **stats),
        "vgg16": TorchvisionClassifier(arch="vgg16", **stats),
    }


def _after_forward(
    mapper: CAM, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor
) -> Callable[[], object]:
    """The CAM work that follows the forward pass, on features captured once."""
    with torch.no_grad(), capture_activations(model, [model.feature_layer]) as acts:
        logits = model(x)
    features = acts[model.feature_layer]
    size = (x.shape[-2], x.shape[-1])

    def work() -> None:
        weights = mapper.channel_weights(model, features, logits, y)
        raw = amaps.weighted_channel_sum(features, weights)
        amaps.threshold_mask(amaps.image_maps(raw, size), 0.2)

    return work


def paired_overhead(
    floor: Callable[[], object],
    method: Callable[[], object],
    *,
    repeats: int,
    device: torch.device,
) -> tuple[float, float, float]:
    """(floor s, method s, median of per-pair ratios - 1) from interleaved runs.

    Timing the two calls back to back, ``repeats`` times, and taking the median of the
    per-pair ratios cancels most of the drift of a shared machine, which a separate median
    of each does not.
    """
    floor(), method()  # warm-up
    pairs = [
        (
            time_call(floor, repeats=1, warmup=0, device=device),
            time_call(method, repeats=1, warmup=0, device=device),
        )
        for _ in range(repeats)
    ]
    ratios = sorted(m / f for f, m in pairs)
    return (statistics.median(f for f, _ in pairs), statistics.median(m for _, m in pairs),
            ratios[len(ratios) // 2] - 1.0)  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pse_lightning.bench cam")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="*", default=["small_cnn", "resnet18", "vgg16"])
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads (default: torch's); 1 is steadier on a busy machine",
    )
    args, _ = parser.parse_known_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch, 3, args.image_size, args.image_size, generator=gen).to(device)
    y = torch.randint(0, args.num_classes, (args.batch,), generator=gen).to(device)
    rows = []
    for name, model in _models(args.image_size, args.num_classes).items():
        if name not in args.models:
            continue
        model = model.to(device).eval()

        def forward(model: torch.nn.Module = model) -> None:
            with torch.no_grad():
                model(x)

        def forward_backward(model: torch.nn.Module = model) -> None:
            x_var = x.detach().requires_grad_(True)
            loss = torch.nn.functional.cross_entropy(model(x_var), y, reduction="sum")
            torch.autograd.grad(loss, x_var)

        for mapper, floor, floor_name in ((CAM(), forward, "forward"),
                                          (GradCAM(), forward_backward, "fwd+bwd")):  # fmt: skip
            if isinstance(mapper, CAM) and model.head is None:
                continue

            def run(mapper: CAM | GradCAM = mapper, model: torch.nn.Module = model) -> None:
                # The analysis' per-batch work: maps at input size and the binary mask.
                amaps.threshold_mask(mapper(model, x, y), 0.2)

            base, seconds, overhead = paired_overhead(floor, run, repeats=args.repeats,
                                                      device=device)  # fmt: skip
            after = "-"
            if isinstance(mapper, CAM):
                # What CAM adds after the forward pass, timed alone: on a busy machine the
                # end-to-end difference of two nearly equal timings is mostly noise.
                work = _after_forward(mapper, model, x, y)
                after = f"{time_call(work, repeats=args.repeats, device=device) / base:+.2%}"
            verdict = "-" if after == "-" else ("yes" if overhead < TARGET_OVERHEAD else "no")
            rows.append([name, type(mapper).__name__, floor_name, base * 1e3, seconds * 1e3,
                         f"{overhead:+.1%}", after, verdict])  # fmt: skip
    headers = ["model", "method", "floor", "floor ms", "map ms", "end-to-end overhead",
               "after-forward work / forward", "< 10%"]  # fmt: skip
    log.info("batch %d, %d px, device %s, %d threads\n%s", args.batch, args.image_size, device,
             torch.get_num_threads(), format_table(headers, rows))  # fmt: skip


if __name__ == "__main__":
    main()
