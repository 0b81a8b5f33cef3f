"""``python -m pse_lightning.bench [SUITE ...]``: run benchmark suites and print ratios.

Each suite is a module ``pse_lightning.bench.<suite>`` with ``main(argv) -> None``; with no
argument every available suite runs.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys

import pse_lightning.bench as bench_pkg

# optimality, compilation: tables of the attacks suite, not suites of their own.
_NOT_SUITES = {"common", "__main__", "optimality", "compilation"}


def available_suites() -> list[str]:
    return sorted(
        m.name
        for m in pkgutil.iter_modules(bench_pkg.__path__)
        if m.name not in _NOT_SUITES and not m.name.startswith("_")
    )


def main(argv: list[str] | None = None) -> None:
    suites = available_suites()
    parser = argparse.ArgumentParser(prog="python -m pse_lightning.bench", description=__doc__)
    parser.add_argument("suites", nargs="*", help=f"suites to run (default: all of {suites})")
    args, rest = parser.parse_known_args(argv)
    chosen = args.suites or suites
    unknown = sorted(set(chosen) - set(suites))
    if unknown:
        parser.error(f"unknown suite(s) {unknown}; available: {suites}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for suite in chosen:
        print(f"\n## bench {suite}\n", flush=True)
        importlib.import_module(f"pse_lightning.bench.{suite}").main(rest)


if __name__ == "__main__":
    main(sys.argv[1:])
