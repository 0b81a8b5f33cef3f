"""Analyses own what the report says about them (issue 24, item 1): ``reporting/`` and the
report writer iterate over what the analyses declare and name no metric key of any analysis."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers import ROOT

from pse_lightning.core.contract import ReportContract, SweepTable, Term, metric
from pse_lightning.glossary import all_terms, analysis_classes

PACKAGE = ROOT / "pse_lightning"
# Where the report, the W&B run and the sweep are written: no analysis is known there.
READERS = [
    *sorted((PACKAGE / "reporting").rglob("*.py")),
    PACKAGE / "modules" / "example_panels.py",
    PACKAGE / "modules" / "report_writer.py",
]
# What an analysis's key looks like when someone hard-codes it.
SHAPES = (r"pse/", r"cam/", r"dissection/", r"neuron_mask/", r"frac_", r"lift_")


def declared_keys() -> set[str]:
    """Every literal key the package's analyses declare: key results and sweep columns."""
    keys: set[str] = set()
    for cls in analysis_classes():
        keys |= set(cls.key_results)
        keys |= {k for table in cls.sweep_tables for k in table.keys}
    return keys


def test_the_package_declares_keys_to_look_for() -> None:
    names = {cls.name for cls in analysis_classes()}
    assert {"pse", "cam", "dissection", "neuron_mask"} <= names
    assert {"frac_suppression", "lift_true"} <= declared_keys()


@pytest.mark.parametrize("path", READERS, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_readers_name_no_metric_key_of_an_analysis(path: Path) -> None:
    words = [*SHAPES, *(f"{cls.name}/" for cls in analysis_classes())]
    quoted = [rf"['\"]{re.escape(k)}['\"]" for k in declared_keys()]
    found = [
        f"{path.name}:{n}: {line.strip()}"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if any(w in line for w in words) or any(re.search(q, line) for q in quoted)
    ]
    assert not found, "declare it on the Analysis instead:\n" + "\n".join(found)


@pytest.mark.parametrize("cls", analysis_classes(), ids=lambda c: c.name)
def test_declared_keys_are_explained_by_the_analysis_own_glossary(cls: type) -> None:
    """A key result or sweep column that the analysis never computes would be silently
    absent; its own glossary (which a real run's keys must match) must explain it."""
    terms = cls.glossary()
    for key in {*cls.key_results, *(k for table in cls.sweep_tables for k in table.keys)}:
        assert any(t.matches(key) for t in terms), f"{cls.name}: {key} has no glossary entry"
    for table in cls.sweep_tables:
        assert table.keys or table.pattern, f"{cls.name}: {table.title} selects no column"


def test_a_term_moves_under_its_analysis_name() -> None:
    term = metric("frac_<type>, …_low", r"frac_(a|b)(_low)?", "Shares.", "§2.6").under("pse")
    assert term.name == "`pse/frac_<type>, …_low`" and term.scope == "pse"
    assert term.matches("pse/frac_a") and term.matches("pse/frac_b_low")
    assert not term.matches("frac_a") and not term.matches("cam/frac_a")
    word = Term("IS", "A word.").under("cam")
    assert word.scope == "cam" and word.pattern is None


def test_every_term_of_the_package_has_a_unique_scope_and_pattern() -> None:
    patterns = [t.pattern for t in all_terms() if t.pattern is not None]
    assert len(patterns) == len(set(patterns))
    assert {t.scope for t in all_terms()} == {"attack", *(c.name for c in analysis_classes())}


def test_a_contract_survives_its_json_file() -> None:
    contract = ReportContract(
        "pse",
        ("frac_suppression",),
        (SweepTable("Types", keys=("frac_a", "frac_b"), figure="types", legend=("a", "b")),),
    )
    assert ReportContract.from_json(contract.to_json()) == contract
