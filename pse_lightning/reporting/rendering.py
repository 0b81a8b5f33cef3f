"""Figures rendered in the background while the report goes on.

Saving a figure (layout, drawing, PNG encoding) is two thirds of the report's work and runs
on one core. Inside :func:`background_figures`, :func:`~pse_lightning.reporting.figures.save`
hands each figure to a forked child process that renders and writes it (atomically, as
inline), while this process draws the next one; the child shares the figure's memory, so
nothing is copied or pickled, and renders the same bytes. :func:`wait_for_figures` (the
report calls it before ``report.md`` names the figures) waits for every child and raises
:class:`FigureError` naming any figure that failed. Where ``fork`` is missing (Windows,
macOS's frameworks make it unsafe) figures are saved inline.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from contextvars import ContextVar
from pathlib import Path

# Children rendering at once: with this process drawing the next figure, a 2-core machine
# is busy; more would only queue.
WORKERS = 2


class FigureError(RuntimeError):
    """A figure rendered in the background failed (its child's traceback is on stderr)."""


class ForkedRenderer:
    """Runs each figure's save in a forked child, at most ``workers`` at once."""

    def __init__(self, workers: int = WORKERS) -> None:
        self.workers = max(1, workers)
        self.running: dict[int, Path] = {}
        self.failed: list[Path] = []

    def submit(self, save: Callable[[], Path], path: Path) -> Path:
        """Start ``save`` in a child (once a slot is free); returns ``path`` at once."""
        while len(self.running) >= self.workers:
            self._reap()
        pid = os.fork()
        if pid == 0:  # the child: render, write, and leave without running any exit handler
            code = 1
            try:
                save()
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stderr.flush()
                os._exit(code)
        self.running[pid] = path
        return path

    def wait(self) -> None:
        """Wait for every child; raise :class:`FigureError` naming the figures that failed."""
        while self.running:
            self._reap()
        failed, self.failed = self.failed, []
        if failed:
            names = ", ".join(str(p) for p in failed)
            raise FigureError(f"rendering failed (traceback above): {names}")

    def _reap(self) -> None:
        """Collect the finished children (the oldest, waited for, if none has finished): only
        this renderer's own, never another child of the process (W&B's service)."""
        finished = {}
        for pid in self.running:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                finished[pid] = status
        if not finished:
            oldest = next(iter(self.running))
            finished[oldest] = os.waitpid(oldest, 0)[1]
        for pid, status in finished.items():
            path = self.running.pop(pid)
            if os.waitstatus_to_exitcode(status) != 0:
                self.failed.append(path)


_ACTIVE: ContextVar[ForkedRenderer | None] = ContextVar("background_figures", default=None)


def can_fork() -> bool:
    """Whether figures may be rendered in forked children (Linux; see the module docstring)."""
    return hasattr(os, "fork") and sys.platform.startswith("linux")


@contextmanager
def background_figures(workers: int = WORKERS) -> Iterator[None]:
    """Within the block, figures are saved in the background (inline where ``fork`` is
    missing); every one is written, or :class:`FigureError` raised, when the block ends."""
    if not can_fork() or _ACTIVE.get() is not None:
        yield
        return
    renderer = ForkedRenderer(workers)
    token = _ACTIVE.set(renderer)
    try:
        yield
    except BaseException:
        with suppress(FigureError):  # the block's own error is the one to report
            renderer.wait()
        raise
    finally:
        _ACTIVE.reset(token)
    renderer.wait()


def submit(save: Callable[[], Path], path: Path) -> Path:
    """Run ``save`` (which writes ``path``) in the background inside
    :func:`background_figures`, else now; returns ``path``."""
    renderer = _ACTIVE.get()
    if renderer is None:
        return save()
    return renderer.submit(save, path)


def wait_for_figures() -> None:
    """Wait for the figures being rendered in the background (none outside
    :func:`background_figures`); raises :class:`FigureError` if any failed."""
    renderer = _ACTIVE.get()
    if renderer is not None:
        renderer.wait()
