"""What an analysis declares about its own metrics, for the readers that are not the analysis.

An analysis logs its scalars as ``test/<name>/<key>``; the report, the W&B run and a sweep's
comparison print them without knowing any analysis. Each analysis therefore declares, on its
class (:class:`~pse_lightning.analysis.base.Analysis`), with its *un-prefixed* keys:

- :class:`Term`: its glossary entries (metrics matched by a regular expression, and words its
  report uses);
- ``key_results``: the headline numbers (the W&B run summary, ``results/<name>_<key>``);
- :class:`SweepTable`: the tables (and stacked-share figures) of a sweep's comparison.

A run writes the :class:`ReportContract` of each analysis it ran into ``contract.json`` beside
``metrics.json``, so a sweep reads what each job declared instead of naming keys itself.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class Term:
    """One glossary entry.

    Attributes:
        name: the term as the report shows it (placeholders in angle brackets); a metric's
            names in backticks.
        meaning: its definition: what is measured, over which images, in which unit.
        scope: the part of the run it belongs to: ``attack`` (always shown), or an
            analysis name (shown when that analysis ran).
        pattern: for a metric, a regular expression matched in full against the key without
            ``test/``; None for a word of the report's text.
        ref: the section of docs/METHODS.md that specifies it.
    """

    name: str
    meaning: str
    scope: str = "attack"
    pattern: str | None = None
    ref: str = ""

    def matches(self, key: str) -> bool:
        return self.pattern is not None and re.fullmatch(self.pattern, key) is not None

    def under(self, prefix: str) -> Term:
        """This term of an analysis logged under ``test/<prefix>/``: its scope is ``prefix``,
        its pattern and shown names gain the prefix (a name part after the first that starts
        with ``…`` continues the previous one and stays as it is)."""
        if self.pattern is None:
            return replace(self, scope=prefix)
        parts = self.name.strip("`").split(", ")
        shown = ", ".join(
            p if i and p.startswith("…") else f"{prefix}/{p}" for i, p in enumerate(parts)
        )
        return replace(
            self,
            name=f"`{shown}`",
            scope=prefix,
            pattern=f"{re.escape(prefix)}/(?:{self.pattern})",
        )


def metric(name: str, pattern: str, meaning: str, ref: str) -> Term:
    """A metric's entry: ``name`` shown in backticks, ``pattern`` its (un-prefixed) keys."""
    return Term(f"`{name}`", meaning, pattern=pattern, ref=ref)


def word(name: str, meaning: str, ref: str = "") -> Term:
    """An entry for a word of the report's text."""
    return Term(name, meaning, ref=ref)


@dataclass(frozen=True)
class SweepTable:
    """A table of a sweep's comparison (variants as rows) declared by an analysis.

    Attributes:
        title: the table's heading.
        keys: the un-prefixed metric keys shown, in column order.
        pattern: instead of ``keys``, a regular expression (full match) selecting the
            columns among the keys the jobs logged, sorted.
        per_attack: one row per variant and attack (the metric depends on the attack),
            else one per variant (the mean over all its jobs).
        figure: file stem of a stacked-share figure of ``keys`` (one bar per variant and
            attack), ``comparison_<figure>.png``; empty: none.
        legend: the figure's names of ``keys`` (default: the keys).
        ylabel: the figure's y axis.
    """

    title: str
    keys: tuple[str, ...] = ()
    pattern: str = ""
    per_attack: bool = True
    figure: str = ""
    legend: tuple[str, ...] = ()
    ylabel: str = ""

    def selects(self, key: str) -> bool:
        if self.keys:
            return key in self.keys
        return bool(self.pattern) and re.fullmatch(self.pattern, key) is not None


@dataclass(frozen=True)
class ReportContract:
    """What one analysis of a run declared, as its ``contract.json`` entry stores it.

    Attributes:
        prefix: where its scalars are logged (``test/<prefix>/<key>``).
        key_results: its headline keys, un-prefixed.
        sweep_tables: its tables in a sweep's comparison.
    """

    prefix: str
    key_results: tuple[str, ...] = ()
    sweep_tables: tuple[SweepTable, ...] = field(default_factory=tuple)

    def full_keys(self) -> list[str]:
        """``key_results`` as logged without the stage: ``<prefix>/<key>``."""
        return [f"{self.prefix}/{key}" for key in self.key_results]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ReportContract:
        tables = tuple(
            SweepTable(**{k: tuple(v) if isinstance(v, list) else v for k, v in t.items()})
            for t in data.get("sweep_tables", ())
        )
        return cls(str(data["prefix"]), tuple(data.get("key_results", ())), tables)
