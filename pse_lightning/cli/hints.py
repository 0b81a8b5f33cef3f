"""A hint for an override Hydra rejects because the chosen file lacks the key.

``attack=cw attack.eps=0.1`` fails in Hydra's composition ("Key 'eps' is not in struct"),
whose advice, ``+attack.eps``, only moves the failure to the attack's constructor. The
useful answer is which choices of the group have the key.
"""

from __future__ import annotations

from pathlib import Path

from pse_lightning.cli.check import ConfigFiles, descend


def _default_choice(files: ConfigFiles, group: str) -> str | None:
    for entry in files.main.get("defaults", []):
        if isinstance(entry, dict) and group in entry:
            return entry[group]
    return None


def override_hint(argv: list[str], conf_dir: Path) -> str | None:
    """The hint for the first ``group.key=value`` in ``argv`` that the chosen file of
    ``group`` does not have, or None."""
    files = ConfigFiles(conf_dir)
    groups = set(files.groups())
    overrides = [a for a in argv if "=" in a and not a.startswith(("-", "+", "~"))]
    chosen = {g: _default_choice(files, g) for g in groups}
    for arg in overrides:
        key, value = arg.split("=", 1)
        if key in groups:
            chosen[key] = value
    for arg in overrides:
        group, _, rest = arg.split("=", 1)[0].partition(".")
        choice = chosen.get(group)
        if group not in groups or not rest or not choice or "," in choice:
            continue
        key = rest.split(".")[0]
        placed = files.placed(group, choice)
        if any(key in (descend(content, pkg, group) or {}) for pkg, content in placed):
            continue
        others = files.choices_with(group, key)
        if others:
            return (
                f"{group}={choice} has no setting {key}; {key} is a setting of "
                f"{group}={', '.join(others)}: choose one of those (e.g. {group}={others[0]} "
                f"{arg})"
            )
        return f"{group}={choice} has no setting {key} (see python -m pse_lightning --help)"
    return None
