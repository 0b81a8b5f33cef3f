"""Every test is marked unit, pipeline or cli by what it calls (tests/conftest.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import pytorch_lightning as pl  # imported before the test: the guard patches what is imported
from conftest import exercised_kind


@dataclass
class FakeItem:
    """What the marking reads from a collected test."""

    function: object
    fixturenames: list[str] = field(default_factory=list)
    marks: tuple[str, ...] = ()

    def get_closest_marker(self, name: str) -> object | None:
        return name if name in self.marks else None


def _runs_the_cli(run_cli, tmp_path) -> None:
    run_cli(["--help"], tmp_path)


def _trains(pipeline, make_cfg) -> None:
    pipeline.run(make_cfg())


def _shares_a_checkpoint(make_cfg) -> None:
    make_cfg("attack=cw", shared=True)


def _computes(x) -> None:
    assert x + 1 == 2


def _runs_a_bad_input(run_bad, tmp_path) -> None:
    run_bad(["seed=-1"], tmp_path)


def _reads_wandb_back(wandb_inspect, tmp_path) -> None:
    wandb_inspect(tmp_path)


def _draws_a_report(metric, result, tmp_path) -> None:
    metric.report(result, tmp_path, [])


@pytest.mark.parametrize(
    ("item", "kind"),
    [
        (FakeItem(_runs_the_cli), "cli"),
        (FakeItem(_trains), "pipeline"),
        (FakeItem(_shares_a_checkpoint), "pipeline"),
        (FakeItem(_computes, fixturenames=["trained_checkpoint"]), "pipeline"),
        (FakeItem(_computes), "unit"),
        (FakeItem(_runs_a_bad_input), "cli"),
        (FakeItem(_reads_wandb_back), "cli"),
        (FakeItem(_draws_a_report), "pipeline"),
        (FakeItem(_trains, marks=("unit",)), "unit"),  # a mark set by hand wins
    ],
)
def test_a_test_is_marked_by_what_it_calls(item: FakeItem, kind: str) -> None:
    assert exercised_kind(item) == kind


def test_this_test_is_a_unit_test(request: pytest.FixtureRequest) -> None:
    marks = {m.name for m in request.node.iter_markers()}
    assert "unit" in marks and not marks & {"pipeline", "cli"}


@pytest.mark.unit
def test_a_unit_test_that_starts_a_process_fails() -> None:
    """The guard in tests/conftest.py: a test marked unit cannot start a process (nor run a
    Lightning loop), so a mark that says less than what a test does fails."""
    import subprocess as process

    with pytest.raises(AssertionError, match=r"^a test marked unit starts a process: mark it cli"):
        process.run(["true"], check=True)


@pytest.mark.unit
def test_a_unit_test_that_fits_fails(tmp_path) -> None:
    with pytest.raises(AssertionError, match=r"runs Trainer\.fit: mark it pipeline"):
        pl.Trainer(default_root_dir=tmp_path, logger=False).fit(None)
