"""Bench suite ``models``: the cost of real models, with stand-in weights (issue 14).

Measured in one process, with random tensors in the real key layout written to a temporary
torch hub cache (speed does not depend on the values):

- **load**: ``model.pretrained=true`` (weights read ``weights_only``, head kept, layers
  found) against torchvision's own ``resnet50(weights=DEFAULT)`` from the same cache file;
  target <= 1.1. With robustbench installed, ``model=robustbench`` against robustbench's
  own ``load_model`` of the same WRN-28-10 file is reported too.
- **CW iteration**: the marginal cost of one iteration of ``attack=cw`` on the pretrained
  ResNet-50 at 224 px, divided by the floor (one forward + backward to the input); target
  <= 1.10. On a CPU a small batch (``--batch``, default 4) keeps this to a minute.
- **memory**: the peak resident set size for one CW iteration on a batch of
  ``--memory-batch`` (64) at 224 px on the CPU (the process's high-water mark, so it runs
  last); ``python -m pse_lightning.gpu_check`` measures peak GPU memory on a GPU.

``python -m pse_lightning.bench models [--batch 4] [--memory-batch 64] [--repeats 3]``
"""

from __future__ import annotations

import argparse
import logging
import resource
import sys
import tempfile
from pathlib import Path

import torch
import torchvision

from pse_lightning.attacks import CWL2
from pse_lightning.bench.common import format_table, forward_backward_floor, time_call
from pse_lightning.models import RobustBenchClassifier, TorchvisionClassifier
from pse_lightning.models.pretrained import cached_file, default_weights, imagenet_wnids

log = logging.getLogger(__name__)

LOAD_TARGET = 1.1
ITERATION_TARGET = 1.10
IMAGENET = {"num_classes": 1000, "in_channels": 3, "mean": [0.5] * 3, "std": [0.25] * 3}


def stand_in_file(path: Path, net: torch.nn.Module) -> None:
    """``net``'s keys and shapes with random values (running variances kept positive)."""
    state = {
        k: torch.rand_like(v) + 0.5 if k.endswith("running_var") else torch.randn_like(v)
        for k, v in net.state_dict().items()
        if v.is_floating_point()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**net.state_dict(), **state}, path)


def ours(image_size: int = 224) -> TorchvisionClassifier:
    return TorchvisionClassifier(
        arch="resnet50",
        pretrained=True,
        image_size=image_size,
        class_names=list(imagenet_wnids()),
        **IMAGENET,
    )


def load_rows(repeats: int) -> list[list[object]]:
    """Our pretrained load / torchvision's; zoo load / robustbench's when it is installed."""
    weights = default_weights("resnet50")
    stand_in_file(cached_file(weights), torchvision.models.resnet50())
    mine = time_call(ours, repeats=repeats)
    theirs = time_call(lambda: torchvision.models.resnet50(weights=weights), repeats=repeats)
    rows = [["resnet50 pretrained", mine, theirs, mine / theirs, LOAD_TARGET]]
    try:
        from pse_lightning.models.zoo_registry import import_robustbench, zoo_entry

        utils = import_robustbench()
    except ValueError as err:
        log.info("zoo load not measured: %s", err)
        return rows
    model_dir = Path(torch.hub.get_dir()) / "robustbench"
    stand_in_file(model_dir / "cifar10" / "Linf" / "Standard.pt", zoo_entry(
        "Standard", "cifar10", "Linf").build())  # fmt: skip
    cifar = {**IMAGENET, "num_classes": 10}
    mine = time_call(lambda: RobustBenchClassifier(name="Standard", image_size=32, **cifar),
                     repeats=repeats)  # fmt: skip
    theirs = time_call(lambda: utils.load_model("Standard", model_dir=model_dir), repeats=repeats)
    return rows + [["robustbench Standard (WRN-28-10)", mine, theirs, mine / theirs, LOAD_TARGET]]


def cw_iteration_ratio(model: torch.nn.Module, batch: int, repeats: int) -> tuple[float, float]:
    """(seconds per CW iteration / floor, floor seconds) on a ``batch`` of 224 px images.

    The iteration's cost is the marginal one, (T(5 steps) - T(1 step)) / 4: set-up, the
    constant search's bookkeeping and the final scoring forward cancel. Rounds interleave
    the floor and both runs, and each keeps its fastest round, so load drifting on a
    shared machine hits all three alike.
    """
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, 224, 224, generator=gen)
    y = torch.randint(0, 1000, (batch,), generator=gen)
    short, long = (CWL2(steps=n, binary_search_steps=1, abort_early=False) for n in (1, 5))
    short(model, x, y)  # warm-up
    best = [float("inf")] * 3
    for _ in range(repeats):
        round_ = (
            forward_backward_floor(model, x, y, repeats=1, warmup=0),
            time_call(lambda: short(model, x, y), repeats=1, warmup=0),
            time_call(lambda: long(model, x, y), repeats=1, warmup=0),
        )
        best = [min(b, r) for b, r in zip(best, round_, strict=True)]
    floor, t_short, t_long = best
    return (t_long - t_short) / 4 / floor, floor


def rss_high_water_mib() -> float:
    """The process's peak resident set size (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


def peak_memory_mib(model: torch.nn.Module, batch: int) -> float:
    """Peak RSS (MiB) after one CW iteration on ``batch`` images of 224 px."""
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(batch, 3, 224, 224, generator=gen)
    y = torch.randint(0, 1000, (batch,), generator=gen)
    CWL2(steps=1, binary_search_steps=1, abort_early=False)(model, x, y)
    return rss_high_water_mib()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pse_lightning.bench models")
    parser.add_argument("--batch", type=int, default=4, help="CW timing batch (224 px)")
    parser.add_argument("--memory-batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args, _ = parser.parse_known_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    previous = torch.hub.get_dir()
    with tempfile.TemporaryDirectory() as hub:
        torch.hub.set_dir(hub)
        try:
            rows = load_rows(args.repeats)
            model = ours().eval()
        finally:
            torch.hub.set_dir(previous)
    print(format_table(["model", "ours s", "reference s", "ratio", "target <="], rows))
    ratio, floor = cw_iteration_ratio(model, args.batch, args.repeats)
    print(
        f"\nCW iteration on ResNet-50, batch {args.batch} x 224 px ({torch.get_num_threads()} "
        f"threads): {ratio:.3f} x the floor ({floor * 1e3:.0f} ms per forward+backward); "
        f"target <= {ITERATION_TARGET}"
    )
    before = rss_high_water_mib()
    peak = peak_memory_mib(model, args.memory_batch)
    print(
        f"memory: one CW iteration on {args.memory_batch} x 224 px: peak RSS {peak:.0f} MiB "
        f"(the process's high-water mark before it: {before:.0f} MiB)"
    )
