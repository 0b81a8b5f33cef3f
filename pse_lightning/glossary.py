"""Every glossary entry of the package: the attack's and each shipped analysis's own.

A report shows the entries of the parts that ran (its analyses' declarations). This module
gathers all of them, for ``docs/GLOSSARY.md`` (written by
``python -m pse_lightning.glossary docs/GLOSSARY.md`` and checked by a test to be up to date)
and for the tests that every key of a real run's ``metrics.json`` is explained. The analyses
are found, not listed: every :class:`~pse_lightning.analysis.base.Analysis` defined in the
package's ``analysis`` and ``defenses`` modules, each under its ``name``, so a new analysis
needs no edit here.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from pse_lightning.analysis.base import Analysis
from pse_lightning.core.contract import Term
from pse_lightning.reporting import glossary as report_glossary

PACKAGES = ("pse_lightning.analysis", "pse_lightning.defenses")


def _subclasses(cls: type) -> list[type]:
    return [c for sub in cls.__subclasses__() for c in (sub, *_subclasses(sub))]


@functools.cache
def analysis_classes() -> tuple[type[Analysis], ...]:
    """The package's analysis classes that declare a glossary, one per ``name`` (the first
    by module path), sorted by name."""
    for package in PACKAGES:
        root = importlib.import_module(package)
        for info in pkgutil.walk_packages(root.__path__, f"{package}."):
            importlib.import_module(info.name)
    found: dict[str, type[Analysis]] = {}
    own = sorted(
        (c for c in _subclasses(Analysis) if c.__module__.startswith("pse_lightning.")),
        key=lambda c: (c.__module__, c.__qualname__),
    )
    for cls in own:
        if cls.glossary():
            found.setdefault(cls.name, cls)
    return tuple(found[name] for name in sorted(found))


def all_terms() -> tuple[Term, ...]:
    """The attack's entries, then each analysis's under its name."""
    declared = [t.under(cls.name) for cls in analysis_classes() for t in cls.glossary()]
    return (*report_glossary.TERMS, *declared)


def explain(key: str) -> Term | None:
    """The entry that explains metric ``key`` (with or without ``test/``), or None."""
    return report_glossary.explain(key, all_terms())


def unexplained(keys: Iterable[str]) -> list[str]:
    """The keys no entry of the package explains, sorted."""
    return report_glossary.unexplained(keys, all_terms())


def document() -> str:
    """The whole glossary as ``docs/GLOSSARY.md``."""
    return report_glossary.document(all_terms())


def main(argv: Sequence[str]) -> None:
    """Write :func:`document` to the path given (``docs/GLOSSARY.md``)."""
    if len(argv) != 1:
        raise SystemExit("usage: python -m pse_lightning.glossary docs/GLOSSARY.md")
    Path(argv[0]).write_text(document())


if __name__ == "__main__":
    main(sys.argv[1:])
