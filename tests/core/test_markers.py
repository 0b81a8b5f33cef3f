"""Every test is marked unit, pipeline or cli by what it calls (tests/conftest.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
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


@pytest.mark.parametrize(
    ("item", "kind"),
    [
        (FakeItem(_runs_the_cli), "cli"),
        (FakeItem(_trains), "pipeline"),
        (FakeItem(_shares_a_checkpoint), "pipeline"),
        (FakeItem(_computes, fixturenames=["trained_checkpoint"]), "pipeline"),
        (FakeItem(_computes), "unit"),
        (FakeItem(_trains, marks=("unit",)), "unit"),  # a mark set by hand wins
    ],
)
def test_a_test_is_marked_by_what_it_calls(item: FakeItem, kind: str) -> None:
    assert exercised_kind(item) == kind


def test_this_test_is_a_unit_test(request: pytest.FixtureRequest) -> None:
    marks = {m.name for m in request.node.iter_markers()}
    assert "unit" in marks and not marks & {"pipeline", "cli"}
