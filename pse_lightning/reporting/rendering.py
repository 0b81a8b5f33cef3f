"""Figures rendered in the background while the report goes on.

Saving a figure (layout, drawing, PNG encoding) is two thirds of the report's work and runs
on one core. Inside :func:`background_figures`, :func:`~pse_lightning.reporting.figures.save`
hands each figure to a forked child process that renders and writes it (atomically, as
inline), while this process draws the next one; the child shares the figure's memory, so
nothing is copied or pickled, and renders the same bytes. :func:`wait_for_figures` (the
report calls it before ``report.md`` names the figures) waits for every child and re-raises
a child's exception (caused by a :class:`FigureError` naming the figure), so a full disk is
the same error as inline. Where ``fork`` is missing (Windows, or unsafe: macOS's frameworks)
figures are saved inline.
"""

from __future__ import annotations

import logging
import os
import pickle
import select
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path

from pse_lightning.core.atomic import temporaries_beside

log = logging.getLogger(__name__)

# Children rendering at once: with this process drawing the next figure, a 2-core machine
# is busy; more would only queue.
WORKERS = 2
# A figure renders in seconds. A child silent for this long is stuck (a lock that another
# thread of this process held when it forked, say): it is stopped and its figure rendered
# here instead, so the report is late, never hung.
STUCK_SECONDS = 300.0


class FigureError(RuntimeError):
    """A figure rendered in the background failed: the cause of the child's own exception
    (re-raised in this process, so a full disk is still an ``OSError``), with its traceback."""


@dataclass
class _Child:
    """A figure being rendered: its path, the read end of its pipe, the save to run here if
    it gets stuck, and when it started."""

    path: Path
    pipe: int
    save: Callable[[], Path]
    started: float = field(default_factory=time.monotonic)


class ForkedRenderer:
    """Runs each figure's save in a forked child, at most ``workers`` at once; a child that
    fails sends its exception and traceback back through a pipe."""

    def __init__(self, workers: int = WORKERS, stuck_seconds: float = STUCK_SECONDS) -> None:
        self.workers = max(1, workers)
        self.stuck_seconds = stuck_seconds
        self.running: dict[int, _Child] = {}  # by pid
        self.failed: list[BaseException] = []

    def submit(self, save: Callable[[], Path], path: Path) -> Path:
        """Start ``save`` in a child (once a slot is free); returns ``path`` at once."""
        while len(self.running) >= self.workers:
            self._reap()
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: render, write, and leave without running any exit handler
            code = 0
            try:
                save()
            except BaseException as err:
                code = 1
                _send(write, err)
            finally:
                os._exit(code)
        os.close(write)
        self.running[pid] = _Child(path, read, save)
        return path

    def wait(self) -> None:
        """Wait for every child; re-raise the first failure (see :class:`FigureError`)."""
        while self.running:
            self._reap()
        failed, self.failed = self.failed, []
        if failed:
            raise failed[0]

    def _reap(self) -> None:
        """Collect the finished children, waiting for one if none has finished (and
        rendering the oldest's figure here if it is stuck): only this renderer's own, never
        another child of the process (W&B's service)."""
        finished: dict[int, tuple[int, bytes]] = {}
        for pid, child in self.running.items():
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                finished[pid] = (status, _receive(child.pipe))
        if not finished:
            oldest = next(iter(self.running))
            left = self.running[oldest].started + self.stuck_seconds - time.monotonic()
            pipes = {child.pipe: pid for pid, child in self.running.items()}
            # A pipe turns readable when its child reports a failure or exits (end of file).
            ready, _, _ = select.select(list(pipes), [], [], max(0.0, left))
            if not ready:
                self._render_here(oldest)
                return
            for pipe in ready:
                report = _receive(pipe)  # first: a child blocks until its report is read
                finished[pipes[pipe]] = (os.waitpid(pipes[pipe], 0)[1], report)
        for pid, (status, report) in finished.items():
            child = self.running.pop(pid)
            os.close(child.pipe)
            code = os.waitstatus_to_exitcode(status)
            if code != 0:
                self.failed.append(_failure(child.path, code, report))

    def _render_here(self, pid: int) -> None:
        """Stop a stuck child, remove what it left half-written, and save its figure here."""
        child = self.running.pop(pid)
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(child.pipe)
        for partial in temporaries_beside(child.path):
            partial.unlink(missing_ok=True)
        log.warning(
            "rendering %s in a background process took over %.0f s: rendering it here",
            child.path,
            self.stuck_seconds,
        )
        try:
            child.save()
        except Exception as err:
            self.failed.append(err)


def _send(fd: int, err: BaseException) -> None:
    """Write the child's exception and traceback to the parent (in the child)."""
    try:
        error = pickle.dumps(err)
    except Exception:  # an exception that cannot be pickled: its traceback only
        error = b""
    view = memoryview(pickle.dumps((traceback.format_exc(), error)))
    while view:
        view = view[os.write(fd, view) :]


def _receive(fd: int) -> bytes:
    """Everything a child wrote to its pipe, read until it closed it (at its exit)."""
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def _failure(path: Path, code: int, report: bytes) -> BaseException:
    """The exception to raise for a failed child: its own, caused by a FigureError that
    names the figure and holds the child's traceback; a FigureError alone if none came."""
    trace, error = pickle.loads(report) if report else ("", b"")
    err = None
    with suppress(Exception):  # one that cannot be rebuilt here: its traceback only
        err = pickle.loads(error) if error else None
    if not trace:
        return FigureError(f"rendering {path} failed: its process ended with code {code}")
    cause = FigureError(f"rendering {path} failed in a background process:\n{trace}")
    if err is None:
        return cause
    err.__cause__ = cause
    return err


_ACTIVE: ContextVar[ForkedRenderer | None] = ContextVar("background_figures", default=None)


def can_fork() -> bool:
    """Whether figures may be rendered in forked children (Linux; see the module docstring)."""
    return hasattr(os, "fork") and sys.platform.startswith("linux")


@contextmanager
def background_figures(workers: int = WORKERS) -> Iterator[None]:
    """Within the block, figures are saved in the background (inline where ``fork`` is
    missing); every one is written, or a failure re-raised, when the block ends."""
    if not can_fork() or _ACTIVE.get() is not None:
        yield
        return
    renderer = ForkedRenderer(workers)
    token = _ACTIVE.set(renderer)
    try:
        yield
    except BaseException:
        with suppress(Exception):  # the block's own error is the one to report
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
    :func:`background_figures`); re-raises the first failure (see :class:`FigureError`)."""
    renderer = _ACTIVE.get()
    if renderer is not None:
        renderer.wait()
