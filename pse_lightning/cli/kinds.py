"""Which YAML values a Python annotation admits, read from the annotation's source text.

The config holds only YAML values (int, float, bool, str, null, lists, mappings), so an
annotation reduces to a set of those kinds, plus the allowed values of a ``Literal``.
Anything else (a class such as ``Accelerator``, ``Any``) admits every value: the
constructor checks it later.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from dataclasses import dataclass

from pse_lightning.cli.source import NO_VALUE, Source, literal, resolve_expr

_NAMED: dict[str, frozenset[str]] = {
    "int": frozenset({"int"}),
    "float": frozenset({"int", "float"}),
    "bool": frozenset({"bool"}),
    "str": frozenset({"str"}),
    "Path": frozenset({"str"}),
    "list": frozenset({"list"}),
    "tuple": frozenset({"list"}),
    "dict": frozenset({"dict"}),
}
_CONTAINERS: dict[str, str] = {
    **dict.fromkeys(("list", "List", "tuple", "Tuple", "Sequence", "Iterable", "set"), "list"),
    **dict.fromkeys(("dict", "Dict", "Mapping", "MutableMapping"), "dict"),
}
_WORDS = {
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "str": "a string",
    "list": "a list",
    "dict": "a mapping",
    "none": "null",
}


@dataclass(frozen=True)
class Kind:
    """The YAML kinds a parameter admits and, for a ``Literal``, its values."""

    kinds: frozenset[str]
    choices: tuple | None = None

    def admits(self, value: object) -> bool:
        if self.choices is not None:
            return any(value == c and kind_of(value) == kind_of(c) for c in self.choices)
        return kind_of(value) in self.kinds

    def describe(self) -> str:
        if self.choices is not None:
            return f"one of {list(self.choices)}"
        kinds = set(self.kinds)
        if {"int", "float"} <= kinds:
            kinds.discard("int")
        order = ["int", "float", "bool", "str", "list", "dict", "none"]
        return " or ".join(_WORDS[k] for k in order if k in kinds)


def kind_of(value: object) -> str:
    """The YAML kind of a config value."""
    if value is None:
        return "none"
    for python, name in ((bool, "bool"), (int, "int"), (float, "float"), (str, "str")):
        if isinstance(value, python):
            return name
    if isinstance(value, dict) or hasattr(value, "keys"):
        return "dict"
    return "list"


def _union(parts: Iterable[Kind | None]) -> Kind | None:
    kinds: set[str] = set()
    choices: list = []
    any_choices = False
    for part in parts:
        if part is None:
            return None
        kinds |= part.kinds
        if part.choices is not None:
            any_choices = True
            choices += part.choices
    if any_choices and kinds - {kind_of(c) for c in choices}:
        return Kind(frozenset(kinds))  # Literal mixed with open types: kinds only
    return Kind(frozenset(kinds), tuple(choices) if any_choices else None)


def kind(source: Source | None, node: ast.expr | None, depth: int = 0) -> Kind | None:
    """What annotation ``node`` (written in ``source``) admits; None: anything."""
    if node is None or depth > 8:
        return None
    if isinstance(node, ast.Constant):
        if node.value is None:
            return Kind(frozenset({"none"}))
        if isinstance(node.value, str):  # a string annotation
            try:
                return kind(source, ast.parse(node.value, mode="eval").body, depth + 1)
            except SyntaxError:
                return None
        return None
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return _union([kind(source, node.left, depth + 1), kind(source, node.right, depth + 1)])
    if isinstance(node, ast.Subscript):
        return _subscript(source, node, depth)
    name = node.id if isinstance(node, ast.Name) else getattr(node, "attr", None)
    if name in _NAMED:
        return Kind(_NAMED[name])
    if name in _CONTAINERS:
        return Kind(frozenset({_CONTAINERS[name]}))
    if source is not None and isinstance(node, (ast.Name, ast.Attribute)):
        alias = resolve_expr(source, node)  # Norm = Literal["linf", "l2"]
        if alias is not None and isinstance(alias.node, (ast.Subscript, ast.BinOp)):
            return kind(alias.source, alias.node, depth + 1)
    return None


def _subscript(source: Source | None, node: ast.Subscript, depth: int) -> Kind | None:
    head = node.value
    name = head.id if isinstance(head, ast.Name) else getattr(head, "attr", None)
    items = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
    if name == "Optional":
        return _union([kind(source, items[0], depth + 1), Kind(frozenset({"none"}))])
    if name == "Union":
        return _union(kind(source, item, depth + 1) for item in items)
    if name == "Annotated":
        return kind(source, items[0], depth + 1)
    if name == "Literal":
        values = [literal(source, item) if source else ast.literal_eval(item) for item in items]
        if any(v is NO_VALUE for v in values):
            return None
        return Kind(frozenset(kind_of(v) for v in values), tuple(values))
    if name in _CONTAINERS:
        return Kind(frozenset({_CONTAINERS[name]}))
    return None
