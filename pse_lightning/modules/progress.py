"""Progress for logs and batch jobs: one line with the count and an ETA every few seconds.

An interactive bar redraws one line with carriage returns; written to a file or a job
scheduler's log it either shows nothing for minutes or floods the log. When the output
is not a terminal, :func:`progress_callbacks` swaps Lightning's bar for
:class:`LineProgress`.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.callbacks.progress import ProgressBar

from pse_lightning.validation import require_positive

TEST_LABEL = "test (attack + analyses)"


def format_duration(seconds: float) -> str:
    """``75`` -> ``1:15``, ``3725`` -> ``1:02:05``."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class LineProgress(ProgressBar):
    """Prints ``<loop>: <done>/<total> batches (<pct>), <elapsed> elapsed, ETA <left>``
    at most every ``interval`` seconds, and once when a loop ends.

    The ETA assumes the remaining batches take as long as the mean batch so far.

    Args:
        interval: seconds between two lines of one loop.
        stream: where lines go (default: standard output at the time of writing).
        clock: monotonic seconds (a fake one in tests).
    """

    def __init__(
        self,
        interval: float = 30.0,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.interval = require_positive("progress interval", interval)
        self.stream = stream
        self.clock = clock
        self.enabled = True
        self._start = self._last = 0.0
        self._done = 0

    def disable(self) -> None:
        self.enabled = False

    def enable(self) -> None:
        self.enabled = True

    def _begin(self) -> None:
        self._start = self._last = self.clock()
        self._done = 0

    def _write(self, label: str, done: int, total: int | float, final: bool = False) -> None:
        now = self.clock()
        if not self.enabled or (not final and now - self._last < self.interval):
            return
        if not final and math.isfinite(total) and done >= total:
            return  # the loop's end prints this count once, as "done"
        self._last = now
        elapsed = now - self._start
        if math.isfinite(total) and total > 0:
            left = elapsed / max(done, 1) * (total - done)
            count = f"{done}/{int(total)} batches ({done / total:.0%})"
            eta = "done" if final else f"ETA {format_duration(left)}"
        else:
            count, eta = f"{done} batches", "ETA unknown"
        stream = self.stream or sys.stdout
        stream.write(f"{label}: {count}, {format_duration(elapsed)} elapsed, {eta}\n")
        stream.flush()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self._begin()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._done = batch_idx + 1
        self._write(self._train_label(trainer), self._done, self.total_train_batches)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        label = self._train_label(trainer)
        self._write(label, self._done, self.total_train_batches, final=True)

    @staticmethod
    def _train_label(trainer: pl.Trainer) -> str:
        return f"train epoch {trainer.current_epoch + 1}/{trainer.max_epochs}"

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self._begin()

    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: Any,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self.has_dataloader_changed(dataloader_idx)  # tells the base class which loader
        self._done = batch_idx + 1
        self._write(TEST_LABEL, self._done, self.total_test_batches_current_dataloader)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        total = self.total_test_batches_current_dataloader
        self._write(TEST_LABEL, self._done, total, final=True)


def progress_callbacks(enabled: bool, stream: TextIO | None = None) -> list[Callback]:
    """``[LineProgress()]`` when progress is wanted and ``stream`` (default standard output)
    is not a terminal; otherwise none, leaving Lightning's interactive bar (or nothing)."""
    stream = stream or sys.stdout
    isatty = getattr(stream, "isatty", None)
    if not enabled or (callable(isatty) and isatty()):
        return []
    return [LineProgress(stream=stream)]
