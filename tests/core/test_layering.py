"""The package's import directions, read from the source (no import is executed).

Each package may import only from the packages listed for it; ``core`` sits at the bottom,
so a helper every layer needs never creates a cycle. ``analysis`` (and everything else
outside ``attacks``) may use only the public attack API, ``pse_lightning.attacks``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "pse_lightning"

# package -> the pse_lightning packages it may import (besides itself).
ALLOWED: dict[str, set[str]] = {
    "validation": set(),
    "core": {"validation"},
    "data": {"core", "validation"},
    "models": {"core", "validation"},
    "attacks": {"core", "validation"},
    "analysis": {"core", "validation", "attacks", "reporting"},
    "defenses": {"core", "validation", "attacks", "analysis", "models", "reporting"},
    "reporting": {"core", "validation"},
    "modules": {"core", "validation", "attacks", "analysis", "models", "reporting"},
    "pipeline": {"core", "validation", "attacks", "analysis", "data", "defenses", "models",
                 "modules", "reporting"},
    "cli": {"core", "validation", "pipeline"},
    "__main__": {"core", "validation", "pipeline", "cli"},
    "glossary": {"core", "validation", "analysis", "reporting"},
    "compare": {"core", "validation", "reporting"},
    "gpu_check": {"core", "validation", "attacks", "models", "bench", "pipeline"},
    "bench": {"core", "validation", "attacks", "analysis", "data", "defenses", "models",
              "modules", "reporting", "pipeline"},
}  # fmt: skip


def _layer(module: str) -> str:
    """'pse_lightning.attacks.base' -> 'attacks'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports_of(path: Path) -> list[str]:
    """Absolute names of the pse_lightning modules ``path`` imports (also inside functions)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
            names += [f"{node.module}.{alias.name}" for alias in node.names]
    return [name for name in names if name.startswith("pse_lightning.")]


def source_files() -> list[Path]:
    return sorted(
        p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE
    )


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    return ".".join(rel.parts)


@pytest.mark.parametrize("path", source_files(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_follow_the_layers(path: Path) -> None:
    own = _layer(_module_name(path))
    assert own in ALLOWED, f"{own} has no row in ALLOWED: add the new package's layer"
    for name in imports_of(path):
        layer = _layer(name)
        if layer == own or layer == "__init__":
            continue
        assert layer in ALLOWED[own], f"{path.name}: {own} must not import {name}"


@pytest.mark.parametrize("path", source_files(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_outside_attacks_only_the_public_attack_api(path: Path) -> None:
    if _layer(_module_name(path)) in ("attacks", "bench"):
        return
    private = [
        name for name in imports_of(path)
        if name.startswith("pse_lightning.attacks.")
        and name.split(".")[2] not in _public_attack_names()
    ]  # fmt: skip
    assert not private, (
        f"{path.name} imports attack internals {private}; use pse_lightning.attacks"
    )


def _public_attack_names() -> set[str]:
    import pse_lightning.attacks as attacks

    return set(attacks.__all__)


def test_the_layer_check_catches_a_violation(tmp_path: Path) -> None:
    """The reader sees imports at any depth, so a function-local import cannot hide one."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from pse_lightning.analysis.cam import CAMAnalysis\n")
    assert "pse_lightning.analysis.cam" in imports_of(bad)
