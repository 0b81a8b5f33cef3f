"""Progress off a terminal: a line with the count and an ETA at a steady interval."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from pse_lightning.modules.progress import (
    TEST_LABEL,
    LineProgress,
    format_duration,
    progress_callbacks,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FixedTotals(LineProgress):
    """Totals given, not read from a trainer."""

    def __init__(self, total: float, **kwargs) -> None:
        super().__init__(**kwargs)
        self.total = total

    @property
    def total_train_batches(self) -> float:
        return self.total

    @property
    def total_test_batches_current_dataloader(self) -> float:
        return self.total


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_lines_at_the_interval_with_count_and_eta() -> None:
    stream, clock = io.StringIO(), FakeClock()
    bar = FixedTotals(100, interval=10, stream=stream, clock=clock)
    bar.on_test_epoch_start(None, None)
    # 100 batches of 2 s each: a line when 10 s have passed since the last one, not before.
    for i in range(100):
        clock.now += 2
        bar.on_test_batch_end(None, None, None, None, i)
    bar.on_test_epoch_end(None, None)
    lines = stream.getvalue().splitlines()
    # every 5th batch (10 s), the last one once, as the final line (not also "ETA 0:00")
    assert len(lines) == 20 and len(set(lines)) == 20
    assert lines[0] == f"{TEST_LABEL}: 5/100 batches (5%), 0:10 elapsed, ETA 3:10"
    assert lines[9] == f"{TEST_LABEL}: 50/100 batches (50%), 1:40 elapsed, ETA 1:40"
    assert lines[-1] == f"{TEST_LABEL}: 100/100 batches (100%), 3:20 elapsed, done"


def test_training_lines_name_the_epoch_and_unknown_totals_say_so() -> None:
    stream, clock = io.StringIO(), FakeClock()
    bar = FixedTotals(float("inf"), interval=1, stream=stream, clock=clock)
    trainer = SimpleNamespace(current_epoch=1, max_epochs=3)
    bar.on_train_epoch_start(trainer, None)
    clock.now += 3725
    bar.on_train_batch_end(trainer, None, None, None, 6)
    assert stream.getvalue() == "train epoch 2/3: 7 batches, 1:02:05 elapsed, ETA unknown\n"


def test_disabled_bar_writes_nothing() -> None:
    stream, clock = io.StringIO(), FakeClock()
    bar = FixedTotals(4, interval=1, stream=stream, clock=clock)
    bar.disable()  # Lightning does this on every rank but zero
    bar.on_test_epoch_start(None, None)
    clock.now += 5
    bar.on_test_batch_end(None, None, None, None, 0)
    bar.on_test_epoch_end(None, None)
    assert stream.getvalue() == ""


def test_line_progress_only_off_a_terminal() -> None:
    (bar,) = progress_callbacks(True, io.StringIO())
    assert isinstance(bar, LineProgress)
    assert progress_callbacks(True, Terminal()) == []
    assert progress_callbacks(False, io.StringIO()) == []
    assert format_duration(59.6) == "1:00" and format_duration(3600) == "1:00:00"


class TinyModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).sum()

    def test_step(self, batch, batch_idx):
        self.layer(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_drives_it_in_place_of_its_bar() -> None:
    """A real Trainer: its totals and hooks reach the lines (6 batches of 4 samples)."""
    stream, clock = io.StringIO(), FakeClock()

    class Ticking(LineProgress):  # every batch takes 4 s of the fake clock
        def on_train_batch_end(self, *args) -> None:
            clock.now += 4
            super().on_train_batch_end(*args)

        def on_test_batch_end(self, *args) -> None:
            clock.now += 4
            super().on_test_batch_end(*args)

    data = DataLoader(TensorDataset(torch.randn(24, 2)), batch_size=4)
    trainer = pl.Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[Ticking(interval=10, stream=stream, clock=clock)],
    )
    trainer.fit(TinyModule(), data)
    trainer.test(TinyModule(), data, verbose=False)
    assert stream.getvalue().splitlines() == [
        "train epoch 1/1: 3/6 batches (50%), 0:12 elapsed, ETA 0:12",
        "train epoch 1/1: 6/6 batches (100%), 0:24 elapsed, done",
        f"{TEST_LABEL}: 3/6 batches (50%), 0:12 elapsed, ETA 0:12",
        f"{TEST_LABEL}: 6/6 batches (100%), 0:24 elapsed, done",
    ]
