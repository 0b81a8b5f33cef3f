"""Bench suite ``ddp``: evaluation throughput with 2 gloo processes versus 1 process.

``python -m pse_lightning.bench ddp [--samples 512] [--steps 10] [--threads 1] [--rounds 3]``

Runs the evaluation stage as ``python -m pse_lightning`` does (the real ``conf/``, the
``EvaluationModule`` under a Lightning trainer, PGD with ``--steps`` steps on ``small_cnn``
and ``shapes``, no analyses, no logger) once with ``trainer=cpu`` and once with
``trainer=ddp_cpu`` (``ddp_spawn`` over gloo), alternating in rounds so a busy machine slows
both alike, and prints images/s and the 2-process / 1-process ratio, best round of each.

Two figures per setting:

- *test loop*: images / seconds between the start and the end of the test epoch, measured on
  global rank zero between barriers: the speed-up data parallelism itself gives (ideal 2.0
  with 2 processes on 2 free cores).
- *end to end*: images / wall time of ``trainer.test`` in the calling process, including
  spawning the workers and setting up gloo: what a short job sees.

Each process uses ``--threads`` torch threads (``OMP_NUM_THREADS``, which spawned workers
inherit and Lightning respects), so 2 processes with 1 thread each compare fairly with 1
process with 1 thread; also try ``--threads 2`` for 1 process using both cores. The ratio is
honest only on a quiet machine with at least 2 free cores. The model has random weights
(the attack's cost does not depend on them: PGD runs all its steps on every sample).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir

from pse_lightning import pipeline
from pse_lightning.bench.common import format_table
from pse_lightning.models.checkpoint import load_weights, save_checkpoint
from pse_lightning.modules.evaluation import EvaluationModule, EvaluationResult

log = logging.getLogger(__name__)

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
TRAINERS = {"1 process": "cpu", "2 processes (ddp_cpu)": "ddp_cpu"}


class TestLoopTimer(pl.Callback):
    """Times the test loop on global rank zero and writes ``{"seconds", "samples"}`` to
    ``path`` (spawned workers cannot return values to the caller).

    The number of samples comes from the evaluation's result, handed to :meth:`receive`
    (the module's ``on_result``), not read from the module."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.start = 0.0
        self.samples: int | None = None

    def receive(self, result: EvaluationResult) -> None:
        """The evaluation's reduced result (``EvaluationModule(on_result=...)``)."""
        self.samples = int(result.scalars["test/samples"])

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.strategy.barrier("bench start")
        self.start = time.perf_counter()

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # EvaluationModule's epoch end (compute, all-reduce) has run: every shard is done.
        trainer.strategy.barrier("bench end")
        seconds = time.perf_counter() - self.start
        if trainer.is_global_zero:
            if self.samples is None:
                raise RuntimeError("the evaluation handed no result to TestLoopTimer.receive")
            self.path.write_text(json.dumps({"seconds": seconds, "samples": self.samples}))


def _config(trainer: str, root: Path, args: argparse.Namespace):
    overrides = [
        f"paths.root={root}",
        f"paths.run_dir={root}/run",
        f"paths.data_dir={args.data_dir or root / 'data'}",
        "logger=none",
        "analysis=none",
        "attack=pgd",
        f"attack.steps={args.steps}",
        f"trainer={trainer}",
        "trainer.enable_progress_bar=false",
        "stage=evaluate",
        "dataset.num_train=64",
        "dataset.num_val=64",
        "dataset.num_probe=16",
        f"dataset.num_test={args.samples}",
        f"dataset.eval_samples={args.samples}",
        f"dataset.batch_size={args.batch}",
        "log_examples=0",
    ]
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        return compose("config", overrides=overrides)


def _evaluate_once(
    trainer_choice: str, root: Path, weights: Path, args: argparse.Namespace
) -> tuple[float, float, int]:
    """One evaluation; returns (test-loop seconds, end-to-end seconds, samples)."""
    cfg = _config(trainer_choice, root, args)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    parts = pipeline.build(cfg)
    load_weights(parts.model, weights)
    out = root / f"timer-{trainer_choice}.json"
    out.unlink(missing_ok=True)
    timer = TestLoopTimer(out)
    # One pickle carries the module and the trainer to each spawned worker, so the worker's
    # module hands its result to that worker's timer.
    module = EvaluationModule(
        parts.model, parts.attack, {}, log_examples=0, on_result=timer.receive
    )
    trainer = pipeline.make_trainer(cfg, None, callbacks=[timer])
    start = time.perf_counter()
    trainer.test(module, datamodule=parts.datamodule, verbose=False)
    end_to_end = time.perf_counter() - start
    timed = json.loads(out.read_text())
    return timed["seconds"], end_to_end, timed["samples"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pse_lightning.bench ddp")
    parser.add_argument("--samples", type=int, default=512, help="evaluated test images")
    parser.add_argument("--batch", type=int, default=64, help="dataset.batch_size per process")
    parser.add_argument("--steps", type=int, default=10, help="PGD steps")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--data-dir", default=None, help="shapes cache (default: a temp dir)")
    args = parser.parse_args(argv)
    # Spawned workers inherit the environment; Lightning keeps an OMP_NUM_THREADS it finds.
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("WANDB_MODE", "disabled")
    torch.set_num_threads(args.threads)
    for name in ("pytorch_lightning", "lightning_fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)

    with tempfile.TemporaryDirectory(prefix="pse_bench_ddp_") as tmp:
        root = Path(tmp)
        cfg = _config("cpu", root, args)
        weights = save_checkpoint(root / "random.pt", pipeline.build(cfg).model, {})
        loop: dict[str, list[float]] = {name: [] for name in TRAINERS}
        total: dict[str, list[float]] = {name: [] for name in TRAINERS}
        samples = 0
        # One untimed evaluation per setting first: dataset cache, imports, gloo warm-up.
        for round_ in range(args.rounds + 1):
            for name, choice in TRAINERS.items():
                seconds, end_to_end, samples = _evaluate_once(choice, root, weights, args)
                if round_ > 0:
                    loop[name].append(seconds)
                    total[name].append(end_to_end)
                    log.info(
                        "round %d, %s: test loop %.2f s, end to end %.2f s",
                        round_,
                        name,
                        seconds,
                        end_to_end,
                    )

    rows: list[list[object]] = []
    for name in TRAINERS:
        rows.append([name, samples / min(loop[name]), samples / min(total[name])])
    single, double = (rows[0][1], rows[0][2]), (rows[1][1], rows[1][2])
    rows.append(["ratio 2 / 1 processes", double[0] / single[0], double[1] / single[1]])
    log.info(
        "\nPGD-%d on small_cnn / shapes 32x32, %d images, batch %d per process, %d torch "
        "thread(s) per process, %d CPU cores visible; best of %d interleaved rounds (on a "
        "shared or busy machine the ratio understates the speed-up)\n",
        args.steps, samples, args.batch, args.threads, os.cpu_count(), args.rounds,
    )  # fmt: skip
    log.info(format_table(["setting", "test loop images/s", "end-to-end images/s"], rows))
