"""Find a dotted name's definition in Python source without importing anything.

Why: checking a config against the classes its ``_target_`` keys name must not import
them. Importing ``pse_lightning.attacks`` imports torch, which costs seconds before a typo
can be reported; parsing the few source files involved costs milliseconds. The source is
the truth the constructors run, so the check never drifts from the code.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Source:
    """One parsed module file."""

    name: str
    path: Path
    tree: ast.Module
    is_package: bool

    def absolute(self, node: ast.ImportFrom) -> str:
        """The absolute module name of ``from <node.module> import ...`` written here."""
        if node.level == 0:
            return node.module or ""
        parts = self.name.split(".")
        base = parts if self.is_package else parts[:-1]
        base = base[: len(base) - (node.level - 1)]
        return ".".join(base + ([node.module] if node.module else []))


@dataclass(frozen=True)
class Definition:
    """Where a name is defined: the module and the defining node (a class, a function, the
    value of an assignment, or a whole module for an imported submodule)."""

    source: Source
    node: ast.AST


@functools.cache
def module_source(name: str) -> Source | None:
    """The parsed source of module ``name``, or None when it is not plain Python source."""
    top, *rest = name.split(".")
    try:
        spec = importlib.util.find_spec(top)  # a top-level name is found, not imported
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        return None
    path, is_package = Path(spec.origin), spec.submodule_search_locations is not None
    for part in rest:
        if not is_package:
            return None
        folder = path.parent / part
        if (folder / "__init__.py").is_file():
            path, is_package = folder / "__init__.py", True
        elif (path.parent / f"{part}.py").is_file():
            path, is_package = path.parent / f"{part}.py", False
        else:
            return None
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (OSError, SyntaxError, UnicodeDecodeError):
        return None
    return Source(name, path, tree, is_package)


def _top_statements(body: list[ast.stmt]) -> list[ast.stmt]:
    """Module-level statements, including those under ``if``/``try`` (TYPE_CHECKING, optional
    imports), where definitions also live."""
    out: list[ast.stmt] = []
    for node in body:
        out.append(node)
        if isinstance(node, ast.If):
            out += _top_statements(node.body) + _top_statements(node.orelse)
        elif isinstance(node, ast.Try):
            out += _top_statements(node.body)
    return out


def _assigned(node: ast.stmt, name: str) -> ast.expr | None:
    if isinstance(node, ast.Assign) and any(
        isinstance(t, ast.Name) and t.id == name for t in node.targets
    ):
        return node.value
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return node.value if node.target.id == name else None
    return None


@functools.cache
def find_definition(module: str, name: str, depth: int = 0) -> Definition | None:
    """Where ``name`` as seen from ``module`` is defined, following re-exports."""
    src = module_source(module)
    if src is None or depth > 8:
        return None
    for node in _top_statements(src.tree.body):
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)) and node.name == name:
            return Definition(src, node)
        value = _assigned(node, name)
        if value is not None:
            return Definition(src, value)
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if (alias.asname or alias.name) == name:
                    origin = src.absolute(node)
                    sub = module_source(f"{origin}.{alias.name}")
                    if sub is not None:
                        return Definition(sub, sub.tree)
                    return find_definition(origin, alias.name, depth + 1)
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname == name:
                    sub = module_source(alias.name)
                    return None if sub is None else Definition(sub, sub.tree)
    return None


def locate(dotted: str) -> Definition | None:
    """The definition of a ``_target_`` such as ``pse_lightning.attacks.PGD``."""
    parts = dotted.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        if module_source(".".join(parts[:cut])) is not None:
            found = find_definition(".".join(parts[:cut]), parts[cut])
            for attr in parts[cut + 1 :]:
                if found is None or not isinstance(found.node, ast.Module):
                    return None
                found = find_definition(found.source.name, attr)
            return found
    return None


def resolve_expr(source: Source, node: ast.expr) -> Definition | None:
    """The definition a name (``Norm``) or attribute (``amaps.METHODS``) refers to."""
    if isinstance(node, ast.Name):
        return find_definition(source.name, node.id)
    if isinstance(node, ast.Attribute):
        owner = resolve_expr(source, node.value)
        if owner is not None and isinstance(owner.node, ast.Module):
            return find_definition(owner.source.name, node.attr)
    return None


#: ``literal()`` of an expression that is not a literal.
NO_VALUE = object()


def literal(source: Source, node: ast.expr | None, depth: int = 0) -> object:
    """The value of a literal expression, following module constants (``ATTACK_LOSSES``);
    ``NO_VALUE`` when it is not a literal."""
    if node is None or depth > 8:
        return NO_VALUE
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        pass
    if isinstance(node, (ast.Name, ast.Attribute)):
        found = resolve_expr(source, node)
        if found is not None and isinstance(found.node, ast.expr):
            return literal(found.source, found.node, depth + 1)
    return NO_VALUE
