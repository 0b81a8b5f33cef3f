"""Bench suite ``dissection``: probe-pass cost against a plain forward, and flat memory.

Two figures, each at two probe-set sizes, with the activation cache on and off:

- time: the whole ``prepare`` divided by one plain forward pass of the model over the same
  loader (target <= 1.5), in interleaved rounds (median), with each probe pass's share;
  with the cache the model runs once, and the later passes read the cached activations;
- memory: the peak resident set size that ``prepare`` adds to the process (``ru_maxrss``
  after minus before), measured in a fresh subprocess per row so the peaks do not mix.
  It must stay flat as the probe set grows: tallies have fixed size, and the cache is
  read through a per-batch buffer, not memory-mapped.

The probe images are generated from their index on access (coloured squares on noise,
with object / colour / texture / background labels), so the data itself takes no memory
and the measurement shows the dissection's own footprint. Run:
``python -m pse_lightning.bench dissection --threads 1 [--sizes 512 4096] [--cache both]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from pse_lightning.analysis.dissection import Dissection
from pse_lightning.bench.common import format_table
from pse_lightning.core.distributed import rank_world
from pse_lightning.data.base import Concept, ShardSampler
from pse_lightning.models import SmallCNN

log = logging.getLogger(__name__)

_SHAPES, _COLOURS, _TEXTURES, _BACKGROUNDS = 2, 6, 2, 2
CATEGORIES = ["object", "colour", "texture", "background"]
CONCEPTS = (
    [Concept(f"shape{i}", "object") for i in range(_SHAPES)]
    + [Concept(f"colour{i}", "colour") for i in range(_COLOURS)]
    + [Concept(f"texture{i}", "texture") for i in range(_TEXTURES)]
    + [Concept(f"background{i}", "background") for i in range(_BACKGROUNDS)]
)


class SyntheticProbe(Dataset):
    """Probe images rendered from their index: nothing is stored, memory stays flat."""

    def __init__(self, length: int, image_size: int) -> None:
        self.length, self.size = length, image_size
        coords = torch.arange(image_size, dtype=torch.float32) + 0.5
        self.ys, self.xs = coords.view(-1, 1), coords.view(1, -1)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, int]:
        gen = torch.Generator().manual_seed(i)
        u = torch.rand(8, generator=gen)
        size = self.size
        shape, colour = int(u[0] * _SHAPES), int(u[1] * _COLOURS)
        texture, background = int(u[2] * _TEXTURES), int(u[3] * _BACKGROUNDS)
        cy, cx = (0.3 + 0.4 * u[4]) * size, (0.3 + 0.4 * u[5]) * size
        r = (0.15 + 0.1 * u[6]) * size
        if shape == 0:
            inside = ((self.ys - cy) ** 2 + (self.xs - cx) ** 2) <= r * r
        else:
            inside = ((self.ys - cy).abs() <= r) & ((self.xs - cx).abs() <= r)
        if texture == 1:
            inside_pattern = ((self.ys + self.xs).long() // 3) % 2 == 0
        else:
            inside_pattern = torch.ones(size, size, dtype=torch.bool)
        hue = torch.tensor([(colour >> b) & 1 for b in range(3)], dtype=torch.float32)
        rgb = 0.15 + 0.7 * hue.view(3, 1, 1) * (0.6 + 0.4 * inside_pattern.float())
        noise = torch.rand(3, size, size, generator=gen) * 0.3
        back = noise + (0.2 * self.xs / size if background == 1 else 0.1)
        x = torch.where(inside, rgb, back).clamp(0, 1)
        labels = torch.zeros(4, size, size, dtype=torch.long)
        labels[0][inside] = 1 + shape
        labels[1][inside] = 1 + _SHAPES + colour
        labels[2][inside] = 1 + _SHAPES + _COLOURS + texture
        labels[3][~inside] = 1 + _SHAPES + _COLOURS + _TEXTURES + background
        return x, labels, i


class SyntheticProbeData:
    """The datamodule facts dissection reads: a sharded probe loader and the concepts."""

    name = "synthetic"
    concepts, categories = CONCEPTS, CATEGORIES

    def __init__(self, length: int, image_size: int, batch_size: int) -> None:
        self.dataset = SyntheticProbe(length, image_size)
        self.batch_size = batch_size

    def probe_dataloader(self) -> DataLoader:
        rank, world = rank_world()
        sampler = ShardSampler(len(self.dataset), rank, world)
        return DataLoader(self.dataset, self.batch_size, sampler=sampler)


def _forward_pass(model: torch.nn.Module, loader: DataLoader) -> tuple[float, float]:
    """(wall, CPU) seconds of one plain no-grad forward pass over the loader."""
    start, cpu_start = time.perf_counter(), time.process_time()
    with torch.no_grad():
        for x, _labels, _index in loader:
            model(x)
    return time.perf_counter() - start, time.process_time() - cpu_start


def measure(
    size: int, image_size: int, batch_size: int, bins: int, cache: bool, rounds: int
) -> dict[str, Any]:
    """Interleaved rounds of (plain forward, full ``prepare``), and the peak RSS it adds.

    Each round times a plain forward over the loader, then ``prepare`` over the same
    loader; the ratio is taken per round and the median reported, so a busy spell on a
    shared machine hits both sides of a ratio alike. CPU time (``time.process_time``) is
    reported next to wall time: on a shared machine it is steadier. The peak RSS is read
    around the first ``prepare`` (``ru_maxrss`` only grows), after a warm-up forward.
    """
    torch.manual_seed(0)
    model = SmallCNN(num_classes=6, in_channels=3, mean=[0.5] * 3, std=[0.25] * 3).eval()
    data = SyntheticProbeData(size, image_size, batch_size)
    loader = data.probe_dataloader()
    with torch.no_grad():  # warm-up of kernels and allocator, outside every measurement
        model(next(iter(loader))[0])
    rows = []
    before = after = 0
    probe = None
    for r in range(rounds):
        forward = _forward_pass(model, loader)
        dissection = Dissection(bins=bins, top_units=0, cache_features=cache)
        if r == 0:
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start, cpu_start = time.perf_counter(), time.process_time()
        dissection.prepare(model, data)
        total, total_cpu = time.perf_counter() - start, time.process_time() - cpu_start
        if r == 0:
            after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        probe = dissection.probe
        rows.append(
            (
                forward[0],
                total / forward[0],
                total_cpu / forward[1],
                [p / forward[1] for p in probe.pass_cpu_seconds],
            )
        )
    mid = sorted(range(rounds), key=lambda i: rows[i][2])[rounds // 2]  # median CPU round
    return {
        "images": size,
        "cache": cache,
        "forward_s": statistics.median(row[0] for row in rows),
        "total_ratio": statistics.median(row[1] for row in rows),
        "total_cpu_ratio": rows[mid][2],
        "pass_cpu_ratios": rows[mid][3],
        "passes": len(probe.pass_cpu_seconds),
        "baseline_mb": before / 1024,
        "added_peak_mb": (after - before) / 1024,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pse_lightning.bench dissection")
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 4096])
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--bins", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--cache",
        choices=["on", "off", "both"],
        default="both",
        help="analysis.cache_features: on, off, or both (one row each)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's own choice)"
    )
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-cache", type=int, default=1, help=argparse.SUPPRESS)
    args, _ = parser.parse_known_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child is not None:
        result = measure(
            args.child,
            args.image_size,
            args.batch_size,
            args.bins,
            bool(args.child_cache),
            args.rounds,
        )
        sys.stdout.write(json.dumps(result) + "\n")
        return
    modes = {"on": [True], "off": [False], "both": [True, False]}[args.cache]
    rows = []
    for size in args.sizes:
        for cache in modes:
            # A fresh process per row: peak RSS only grows, so rows must not share one.
            command = [
                sys.executable,
                "-m",
                "pse_lightning.bench.dissection",
                "--child",
                str(size),
                "--child-cache",
                str(int(cache)),
                "--image-size",
                str(args.image_size),
                "--batch-size",
                str(args.batch_size),
                "--bins",
                str(args.bins),
                "--rounds",
                str(args.rounds),
            ]
            if args.threads:
                command += ["--threads", str(args.threads)]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            r = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(
                [
                    size,
                    "on" if cache else "off",
                    r["forward_s"],
                    r["passes"],
                    " / ".join(f"{v:.2f}" for v in r["pass_cpu_ratios"]),
                    r["total_ratio"],
                    r["total_cpu_ratio"],
                    r["baseline_mb"],
                    r["added_peak_mb"],
                ]
            )
    headers = [
        "probe images",
        "cache",
        "forward s",
        "passes",
        "pass / forward (CPU)",
        "prepare / forward (wall)",
        "prepare / forward (CPU)",
        "RSS before MB",
        "RSS added by prepare MB",
    ]
    log.info(
        "small_cnn, %d px, batch %d, bins %d, %d threads, median of %d interleaved rounds\n%s",
        args.image_size,
        args.batch_size,
        args.bins,
        torch.get_num_threads(),
        args.rounds,
        format_table(headers, rows),
    )
    for cache in ("on", "off"):
        mine = [row for row in rows if row[1] == cache]
        if len(mine) > 1:
            first, last = mine[0], mine[-1]
            log.info(
                "cache %s: %dx the probe images: %+.1f MB added peak RSS; prepare / forward "
                "(CPU) %.2f and %.2f (target <= 1.5)",
                cache,
                last[0] // first[0],
                last[-1] - first[-1],
                first[-3],
                last[-3],
            )


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main(sys.argv[1:])
