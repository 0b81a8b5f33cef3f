"""A hint for an override Hydra rejects because the chosen file lacks the key.

``attack=cw attack.eps=0.1`` fails in Hydra's composition ("Key 'eps' is not in struct"),
whose advice, ``+attack.eps``, only moves the failure to the attack's constructor. The
useful answer is which choices of the group have the key, or, for a typo, the key meant
("did you mean attack.steps?"). A value Hydra's lexer rejects (non-ASCII characters,
brackets) gets the quoting that makes it a string.
"""

from __future__ import annotations

import difflib
import re
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
        name, value = arg.split("=", 1)
        if "." in name or "," in value:
            continue
        if name in groups and value not in files.choices(name):
            close = difflib.get_close_matches(value, files.choices(name), n=1)
            if close:
                return f"{name}={value} is not a choice of {name}: did you mean {name}={close[0]}?"
        elif name not in groups and name not in files.top_level_keys():
            close = difflib.get_close_matches(name, sorted(files.top_level_keys()), n=1)
            if close:
                return f"{name} is not a setting: did you mean {close[0]}? ({close[0]}={value})"
    for arg in overrides:
        name, value = arg.split("=", 1)
        group, _, rest = name.partition(".")
        choice = chosen.get(group)
        if group not in groups or not rest or not choice or "," in choice:
            continue
        parent, _, leaf = name.rpartition(".")
        keys = _keys_at(files, group, choice, parent)
        if leaf in keys or (parent != group and not keys):
            continue
        others = files.choices_with(group, leaf) if parent == group else []
        if others:
            return (
                f"{group}={choice} has no setting {leaf}; {leaf} is a setting of "
                f"{group}={', '.join(others)}: choose one of those (e.g. {group}={others[0]} "
                f"{arg})"
            )
        close = difflib.get_close_matches(leaf, sorted(keys), n=1)
        if close:
            return (
                f"{name} is not a setting of {group}={choice}: did you mean {parent}.{close[0]}? "
                f"({parent}.{close[0]}={value})"
            )
        if parent == group:
            return _unlisted_key(files, group, choice, leaf, arg)
    return None


def typo_hint(argv: list[str], conf_dir: Path) -> str | None:
    """:func:`override_hint` when it is a "did you mean", else None."""
    hint = override_hint(argv, conf_dir)
    return hint if hint is not None and "did you mean" in hint else None


# Characters Hydra's override lexer takes in an unquoted value (besides letters, digits).
# What Hydra's lexer reads in an unquoted value; ',' separates the values of a sweep (-m).
_UNQUOTED = re.compile(r"[A-Za-z0-9_\-+./\\:%@?$&~ *<>!#^|,]*")


def quoting_hint(argv: list[str]) -> str | None:
    """For the first ``key=value`` whose value Hydra's lexer rejects unquoted (non-ASCII
    letters, brackets, quotes): the same override with the value quoted for Hydra."""
    for arg in argv:
        if "=" not in arg or arg.startswith("-"):
            continue
        key, value = arg.split("=", 1)
        if not value or value[0] in "'\"[{" or _UNQUOTED.fullmatch(value):
            continue
        odd = "".join(sorted({c for c in value if not _UNQUOTED.fullmatch(c)}))
        return (
            f"{key}={value}: Hydra reads {odd!r} only inside quotes: quote the value for Hydra "
            f"and the whole override for the shell, e.g. \"{key}='{value}'\""
        )
    return None


def _keys_at(files: ConfigFiles, group: str, choice: str, parent: str) -> set[str]:
    """The keys the chosen file of ``group`` (and the files it includes) puts at ``parent``."""
    keys: set[str] = set()
    for pkg, content in files.placed(group, choice):
        node = descend(content, pkg, parent)
        if isinstance(node, dict):
            keys |= set(node)
    return keys


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
