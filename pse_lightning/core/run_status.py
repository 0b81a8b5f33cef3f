"""Whether a run directory holds a complete run: the ``INCOMPLETE`` marker.

A run writes ``<run dir>/INCOMPLETE`` when its work begins (after its checks and set-up)
and rewrites it at each stage (training, evaluation, report, closing the W&B run). Only a
run that wrote its report and closed its W&B run removes it. So a run stopped by
anything (Ctrl+C, ``SIGTERM`` from a scheduler, a full disk, a crash, even ``SIGKILL`` or
a power cut) leaves the marker behind, and readers of run directories (the sweep
comparison) skip the directory. The marker is JSON, for people and scripts alike::

    {"status": "interrupted", "stage": "training", "reason": "SIGTERM",
     "rerun": "python -m pse_lightning ... resume=true"}

``status`` is ``running`` while the run works (or when it was killed without a chance to
say more), ``interrupted`` after a stop signal, ``failed`` after an error.

Only the standard library here: the command line reads the marker without importing
torch.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
from pathlib import Path
from typing import Any

from pse_lightning.core.atomic import write_text_atomic
from pse_lightning.core.locks import _RANK_VARIABLES

log = logging.getLogger(__name__)
MARKER = "INCOMPLETE"
# Errors of the disk, not of the program: reported in one line, without a traceback.
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO)
TRAINING = "training"


class Interrupted(BaseException):
    """A stop signal (``SIGINT``, ``SIGTERM``) raised where the program was.

    A ``BaseException``, like ``KeyboardInterrupt``, so no ``except Exception`` swallows it,
    but not a ``KeyboardInterrupt``, which Lightning turns into ``sys.exit(1)``: raised
    through ``trainer.fit``/``trainer.test``, it reaches the pipeline, which marks the run
    directory and closes the W&B run like after any failure.
    """

    def __init__(self, signum: int) -> None:
        self.signum = int(signum)
        super().__init__(f"interrupted by {self.signal_name}")

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        """The shell's code for a process ended by the signal: 128 + its number."""
        return 128 + self.signum


def describe(err: BaseException) -> str:
    """What stopped the run, in a few words: ``SIGTERM``, ``no space left on device
    (<file>)``, or the error's type and message."""
    if isinstance(err, Interrupted):
        return err.signal_name
    if is_interruption(err):  # Ctrl+C outside the command line
        return "SIGINT"
    if isinstance(err, OSError) and err.errno in DISK_ERRNOS:
        where = f" ({err.filename})" if err.filename else ""
        return f"{(err.strerror or str(err)).lower()}{where}"
    return f"{type(err).__name__}: {err}"


def is_interruption(err: BaseException) -> bool:
    """A stop signal, also a ``KeyboardInterrupt`` that Lightning turned into ``sys.exit(1)``
    (outside the command line, whose handler raises :class:`Interrupted` instead)."""
    if isinstance(err, SystemExit) and isinstance(err.__context__, KeyboardInterrupt):
        return True
    return isinstance(err, (Interrupted, KeyboardInterrupt))


def global_rank_zero() -> bool:
    """Whether this process is the first (or only) of its run: no rank variable of a
    launcher (torchrun, SLURM, Lightning's DDP children) other than 0."""
    return all(os.environ.get(name, "0") in ("", "0") for name in _RANK_VARIABLES)


class RunMarker:
    """The ``INCOMPLETE`` marker of one run directory (see the module docstring).

    Only the run's first process writes it (the other ranks of a DDP run share the
    directory); in the others every method does nothing.

    Args:
        run_dir: the run directory.
        rerun: the command line that reruns the job (empty: none known).
    """

    def __init__(self, run_dir: str | Path, rerun: str = "") -> None:
        self.path = Path(run_dir) / MARKER
        self.rerun = rerun
        self.stage = ""
        self.writes = global_rank_zero()

    def enter(self, stage: str) -> None:
        """The run starts ``stage``: the marker says so (and exists from now on)."""
        self.stage = stage
        if self.writes:
            self._write("running", "")

    def fail(self, err: BaseException) -> None:
        """The run stopped in its current stage because of ``err``. A marker that cannot be
        rewritten (a full disk) keeps its last content, which still marks the run."""
        status = "interrupted" if is_interruption(err) else "failed"
        if not self.writes:
            return
        try:
            self._write(status, describe(err))
        except OSError as write_error:
            log.debug("could not update %s: %s", self.path, write_error)

    def complete(self) -> None:
        """The run completed: remove the marker."""
        if self.writes:
            self.path.unlink(missing_ok=True)

    def _write(self, status: str, reason: str) -> None:
        rerun = self.rerun
        if rerun and self.stage == TRAINING and "resume=true" not in rerun.split():
            rerun += " resume=true"  # continues from the last finished epoch
        state = {"status": status, "stage": self.stage, "reason": reason, "rerun": rerun}
        write_text_atomic(self.path, json.dumps(state, indent=2) + "\n")


def read_marker(run_dir: str | Path) -> dict[str, Any] | None:
    """The marker of ``run_dir`` (None: the run completed, or never started its work).
    An unreadable marker (cut short by a full disk) still marks the run."""
    path = Path(run_dir) / MARKER
    if not path.exists():
        return None
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return {"status": "unknown", "stage": "", "reason": "", "rerun": ""}


def is_incomplete(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` holds a run that did not complete."""
    return (Path(run_dir) / MARKER).exists()
