"""``ddp_spawn`` whose results always come home (the CPU multi-process strategy).

Lightning's spawn launcher joins the worker processes before it reads rank zero's results
from a pipe, so a result larger than the pipe's buffer (64 KiB on Linux) deadlocks: rank
zero blocks in ``put``, the main process in ``join``. An evaluation with every analysis
logs a few hundred metrics, past that size. This strategy grows the pipe to the system's
maximum (``/proc/sys/fs/pipe-max-size``, 1 MiB by default) and, should a result still not
fit, fails at once with the reason instead of hanging.
"""

from __future__ import annotations

import fcntl
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Any

from pytorch_lightning.strategies import DDPStrategy
from pytorch_lightning.strategies.launchers.multiprocessing import _MultiProcessingLauncher

F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ (Python >= 3.10 on Linux names it)
DEFAULT_PIPE_BYTES = 1 << 16


def grow_pipe(queue: Any) -> int:
    """Grow the pipe under a multiprocessing ``SimpleQueue`` as far as the system allows;
    returns its capacity in bytes (the default where the platform cannot change it)."""
    limit_file = Path("/proc/sys/fs/pipe-max-size")
    try:
        limit = int(limit_file.read_text()) if limit_file.exists() else DEFAULT_PIPE_BYTES
        return fcntl.fcntl(queue._writer.fileno(), getattr(fcntl, "F_SETPIPE_SZ", F_SETPIPE_SZ),
                           limit)  # fmt: skip
    except (OSError, AttributeError, ValueError):
        return DEFAULT_PIPE_BYTES


class SpawnLauncher(_MultiProcessingLauncher):
    """The spawn launcher with a pipe large enough for rank zero's results."""

    capacity: int = DEFAULT_PIPE_BYTES

    def _wrapping_function(self, process_idx: int, *rest: Any) -> None:
        """Lightning's worker entry point, with rank zero's pipe grown first."""
        if process_idx == 0:  # rest: trainer, function, args, kwargs, return_queue, [states]
            self.capacity = grow_pipe(rest[4])
        super()._wrapping_function(process_idx, *rest)

    def _collect_rank_zero_results(self, trainer: Any, results: Any) -> Any:
        output = super()._collect_rank_zero_results(trainer, results)
        size = len(ForkingPickler.dumps(output))
        if output is not None and size > self.capacity:
            raise RuntimeError(
                f"rank zero's results ({size} bytes) exceed the {self.capacity}-byte pipe to the "
                "main process, where ddp_spawn would hang; log fewer metrics, or use "
                "trainer=ddp (one process per rank, no pipe)"
            )
        return output


class SpawnDDPStrategy(DDPStrategy):
    """``ddp_spawn`` (``start_method='spawn'``) launched by :class:`SpawnLauncher`."""

    def _configure_launcher(self) -> None:
        self._launcher = SpawnLauncher(self, start_method=self._start_method)
