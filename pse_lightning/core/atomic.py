"""Atomic file writes: a reader never sees a half-written file.

Every file is written to a temporary file beside its destination, then renamed into place
(``os.replace``): a write that fails (a full disk, a signal) leaves the temporary file
removed and the destination as it was. :func:`write_files_atomic` writes several files
and renames them only once all of them are written, so a report is never found without
the files written with it. Files get the permissions of any file the user creates
(``0o666`` less the umask), not ``tempfile``'s private ``0o600``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any


def _umask() -> int:
    """The process's umask, read without changing it (``/proc`` on Linux); elsewhere set
    and restored at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode of a new file under the user's umask (``0o644`` under umask ``022``)."""
    return 0o666 & ~_umask()


def temporary_beside(path: Path) -> tuple[int, str]:
    """An open temporary file in ``path``'s folder (created if needed) with the user's file
    mode: (descriptor, name)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, file_mode())
    return fd, tmp


def temporaries_beside(path: Path) -> list[Path]:
    """The temporary files :func:`temporary_beside` made for ``path`` and left there: a
    writer killed before it could remove its own."""
    return sorted(path.parent.glob(f".{path.name}.*.tmp"))


def write_atomic(path: str | Path, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call ``write`` on a binary temporary file beside ``path``, then rename it into place."""
    path = Path(path)
    fd, tmp = temporary_beside(path)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_files_atomic(files: Mapping[str | Path, str]) -> list[Path]:
    """Write every ``path -> text`` to its temporary file, then rename them all into place
    in the given order; if any write fails, none is renamed (and no temporary is left)."""
    staged: list[tuple[str, Path]] = []
    try:
        for path, text in files.items():
            fd, tmp = temporary_beside(Path(path))
            staged.append((tmp, Path(path)))
            with os.fdopen(fd, "w") as handle:
                handle.write(text)
        for tmp, path in staged:
            os.replace(tmp, path)
    finally:
        for tmp, _ in staged:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return [path for _, path in staged]


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to a temporary file beside ``path``, then rename it into place."""
    return write_files_atomic({path: text})[0]
