"""Helpers shared by test modules (importable as ``helpers``; pytest puts tests/ on the path)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"


def group_choices(group: str) -> list[str]:
    """Every choice of a config group, one per YAML file."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
