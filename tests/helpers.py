"""Helpers shared by test modules (importable as ``helpers``; pytest puts tests/ on the path)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"


def group_choices(group: str) -> list[str]:
    """Every choice of a config group, one per YAML file."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def choices_setting(group: str, key: str) -> list[str]:
    """The choices of a config group whose file sets ``key`` at its top level (what the
    CLI's "key is a setting of group=..." hint lists)."""
    from omegaconf import OmegaConf

    return [
        c for c in group_choices(group) if key in OmegaConf.load(CONF_DIR / group / f"{c}.yaml")
    ]
