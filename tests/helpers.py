"""Helpers shared by test modules (importable as ``helpers``; pytest puts tests/ on the path)."""

from __future__ import annotations

import sys
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


def constructor_keys(obj: object) -> set[str]:
    """The keyword arguments of a class (or function), with the keys of a
    ``**common: Unpack[SomeOptions]`` typed dict counted as its own (the config keys it
    takes)."""
    import inspect
    import re
    import sys

    target = obj.__init__ if isinstance(obj, type) else obj
    keys: set[str] = set()
    for p in inspect.signature(target).parameters.values():
        if p.name in ("self", "cls") or p.kind == p.VAR_POSITIONAL:
            continue
        if p.kind != p.VAR_KEYWORD:
            keys.add(p.name)
            continue
        found = re.fullmatch(r"Unpack\[(\w+)\]", str(p.annotation))
        assert found, f"{obj} takes **{p.name} without Unpack[<TypedDict>]: its keys are unknown"
        options = getattr(sys.modules[target.__module__], found.group(1))
        keys |= options.__required_keys__ | options.__optional_keys__
    return keys


#: The wandb command line of this environment (reads offline runs back).
WANDB_CLI = Path(sys.executable).with_name("wandb")


def wandb_inspect(run_dir: Path) -> tuple[dict, list[dict]]:
    """(state and summary, every record) of the one offline W&B run under ``run_dir``."""
    import json
    import subprocess

    (run,) = (run_dir / "wandb").glob("offline-run-*")

    def leet(*flags: str) -> str:
        return subprocess.run(
            [str(WANDB_CLI), "leet", "inspect", *flags, "--json", str(run)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout

    records = leet()
    return json.loads(leet("--summary")), [json.loads(x) for x in records.splitlines() if x]
