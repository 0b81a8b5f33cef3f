"""Write a finished (or interrupted) multirun's comparison again from its saved tables.

``python -m pse_lightning.compare <sweep dir>`` reads what the jobs left on disk
(``metrics.json``, ``outcomes.json``, Hydra's files) and the sweep's own ``multirun.yaml``
(its comparison callback's ``selection``), and rewrites ``comparison.md``, ``comparison.json``
and the figures, as the sweep's callback would have: after an interrupted sweep whose
callback never ran, or to read old runs with the current statistics, without retraining.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from omegaconf import OmegaConf

from pse_lightning.reporting.sweep import write_comparison
from pse_lightning.reporting.sweep_jobs import collect_jobs
from pse_lightning.reporting.sweep_selection import Selection


def sweep_selection(sweep_dir: Path) -> Selection | None:
    """The selection stage the sweep's comparison callback was configured with, if any."""
    saved = sweep_dir / "multirun.yaml"
    if not saved.is_file():
        return None
    callbacks = OmegaConf.select(OmegaConf.load(saved), "hydra.callbacks", default=None) or {}
    for callback in callbacks.values():
        if str(callback.get("_target_", "")).endswith(".SweepComparison"):
            return Selection.from_config(callback.get("selection"))
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pse_lightning.compare",
        description="Rewrite a multirun's comparison.md from its jobs' saved tables.",
    )
    parser.add_argument("sweep_dir", type=Path, help="the multirun's sweep directory")
    args = parser.parse_args(argv)
    sweep_dir: Path = args.sweep_dir
    if not sweep_dir.is_dir():
        print(
            f"Error: {sweep_dir} is not a folder; give the sweep directory of a multirun "
            "(the folder that holds multirun.yaml and the numbered job folders).",
            file=sys.stderr,
        )
        return 2
    if not collect_jobs(sweep_dir):
        print(
            f"Error: no completed job (a folder with metrics.json) under {sweep_dir}; "
            "nothing to compare. Run or resume the multirun first.",
            file=sys.stderr,
        )
        return 1
    print(f"comparison: {write_comparison(sweep_dir, sweep_selection(sweep_dir))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
