"""A hint for an override Hydra rejects because the chosen file lacks the key.

``attack=cw attack.eps=0.1`` fails in Hydra's composition ("Key 'eps' is not in struct"),
whose advice, ``+attack.eps``, only moves the failure to the attack's constructor. The
useful answer is which choices of the group have the key.
"""

from __future__ import annotations

from pathlib import Path

from pse_lightning.cli.check import ConfigFiles, descend
from pse_lightning.cli.signature import signature_of


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
        return _unlisted_key(files, group, choice, key, arg)
    return None


def _unlisted_key(files: ConfigFiles, group: str, choice: str, key: str, arg: str) -> str:
    """A key no choice file lists: the target may still take it (``trainer.max_epochs``)."""
    targets = [
        node.get("_target_")
        for pkg, content in files.placed(group, choice)
        if isinstance(node := descend(content, pkg, group), dict)
    ]
    target = next((t for t in reversed(targets) if t), None)
    signature = signature_of(target) if target else None
    if signature is not None and (key in signature.params or signature.open):
        return f"{target} takes {key}, but {group}={choice} does not list it: add it with +{arg}"
    keys = ", ".join(sorted(signature.params)) if signature is not None else "see --help"
    return f"{group}={choice} has no setting {key} (its keys: {keys})"
