"""docs/API.md: the documented names exist, and its notebook example runs as written."""

from __future__ import annotations

import contextlib
import importlib
import io
import pkgutil
import re
import subprocess
import sys

import pytest
from helpers import ROOT

import pse_lightning

API_DOC = ROOT / "docs" / "API.md"


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.S)


def test_the_example_runs_and_prints_fractions_that_sum_to_one() -> None:
    (code,) = python_blocks(API_DOC.read_text())
    namespace: dict = {}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(API_DOC), "exec"), namespace)
    scalars = namespace["scalars"]
    fractions = [
        float(scalars[f"frac_{k}"]) for k in ("suppression", "promotion", "balanced", "none")
    ]
    assert sum(fractions) == pytest.approx(1.0)
    result, x = namespace["result"], namespace["x"]
    assert (result.x_adv - x).abs().max() <= 0.03 + 1e-6
    assert re.match(r"attack success \d\.\d\d\n\{'frac_", out.getvalue())


@pytest.mark.parametrize("name", [n for n in pse_lightning.__all__ if n != "__version__"])
def test_every_public_name_resolves_and_is_documented(name: str) -> None:
    assert getattr(pse_lightning, name).__name__ == name
    assert f"`{name}" in API_DOC.read_text(), f"{name} is exported but not in docs/API.md"


#: The packages whose ``__all__`` is public API (docs/API.md names each of their exports),
#: and every analysis package (``pse_lightning.analysis.<name>``).
PUBLIC_PACKAGES = ("pse_lightning", "pse_lightning.attacks", "pse_lightning.models",
                   "pse_lightning.data")  # fmt: skip


def exported_names() -> set[str]:
    import pse_lightning.analysis

    analyses = pkgutil.iter_modules(pse_lightning.analysis.__path__, "pse_lightning.analysis.")
    packages = [*PUBLIC_PACKAGES, *(m.name for m in analyses if m.ispkg)]
    names = set()
    for package in packages:
        names |= set(getattr(importlib.import_module(package), "__all__", ()))
    return names - {"__version__"}


def test_docs_api_lists_exactly_the_exported_names() -> None:
    """Both ways: every export of a public package is in docs/API.md, and every class name
    the page shows bare (`` `Name`` ``, not ``pse_lightning.core.x.Name``) is exported."""
    doc = API_DOC.read_text()
    exported = exported_names()
    assert not sorted(n for n in exported if f"`{n}" not in doc), "exported, not documented"
    shown = set(re.findall(r"`([A-Z][A-Za-z0-9]*[a-z][A-Za-z0-9]*)\b", doc))
    assert not sorted(shown - exported), "documented in docs/API.md, not exported"


def test_importing_the_package_does_not_import_torch() -> None:
    code = "import sys, pse_lightning; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == "False"
