"""Bench suite ``cam``: the cost of class activation maps over the plain forward pass.

CAM reads the feature layer during the forward pass that produces the logits and combines
its channels with the head's weights (an einsum over K channels at h x w cells), then
upsamples and normalises; the target is < 10% over the no-grad forward pass of the batch.
Grad-CAM needs one backward pass to the features and is compared with the forward +
backward floor instead. Every figure is a ratio measured in the same process.

``python -m pse_lightning.bench cam [--batch 128] [--image-size 32] [--device cpu]``
"""

from __future__ import annotations

import argparse
import logging

import torch

from pse_lightning.analysis.cam import CAM, GradCAM
from pse_lightning.analysis.functional import cam as core
from pse_lightning.bench.common import (
    format_table,
    forward_backward_floor,
    forward_floor,
    time_call,
)
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pse_lightning.bench cam")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="*", default=["small_cnn", "resnet18", "vgg16"])
    args, _ = parser.parse_known_args(argv)
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch, 3, args.image_size, args.image_size, generator=gen).to(device)
    y = torch.randint(0, args.num_classes, (args.batch,), generator=gen).to(device)
    rows = []
    for name, model in _models(args.image_size, args.num_classes).items():
        if name not in args.models:
            continue
        model = model.to(device).eval()
        fwd = forward_floor(model, x, repeats=args.repeats)
        fwd_bwd = forward_backward_floor(model, x, y, repeats=args.repeats)
        for mapper, floor, floor_name in ((CAM(), fwd, "forward"),
                                          (GradCAM(), fwd_bwd, "fwd+bwd")):  # fmt: skip
            if isinstance(mapper, CAM) and model.head is None:
                continue

            def run(mapper: CAM | GradCAM = mapper, model: torch.nn.Module = model) -> None:
                # The analysis' per-batch work: maps at input size and the binary mask.
                core.threshold_mask(mapper(model, x, y), 0.2)

            seconds = time_call(run, repeats=args.repeats, device=device)
            overhead = seconds / floor - 1
            ok = "yes" if overhead < TARGET_OVERHEAD else "no"
            rows.append([name, type(mapper).__name__, floor_name, floor * 1e3, seconds * 1e3,
                         f"{overhead:+.1%}", ok if isinstance(mapper, CAM) else "-"])  # fmt: skip
    headers = ["model", "method", "floor", "floor ms", "map ms", "overhead", "< 10%"]
    log.info("batch %d, %d px, device %s, %d threads\n%s", args.batch, args.image_size, device,
             torch.get_num_threads(), format_table(headers, rows))  # fmt: skip


if __name__ == "__main__":
    main()
