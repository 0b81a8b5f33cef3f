"""Exclusive locks on shared caches, so concurrent jobs build each cache entry once.

Generated data and trained checkpoints are cached under ``outputs/`` and shared by every
run (and every job of a sweep). Their writes are atomic (a temporary file beside the
cache, then ``os.replace``), so a reader never sees half a file; the lock adds that a
second job needing the same entry waits for the first to write it, then reads it,
instead of doing the same work again. The lock is ``fcntl.flock`` on ``<cache>.lock``
beside the cache file: the kernel releases it when its holder exits, even on a crash,
so a killed job never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

# Set by launchers of a process group (torchrun, SLURM, Lightning's DDP children).
_RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID")
_SIZE_VARIABLES = ("WORLD_SIZE", "SLURM_NTASKS")


def lock_path(path: str | Path) -> Path:
    """``<cache file>.lock``: the lock file beside a cache file."""
    path = Path(path)
    return path.with_name(f"{path.name}.lock")


@contextmanager
def cache_lock(path: str | Path, what: str = "it") -> Iterator[None]:
    """Hold the exclusive lock of the cache file ``path`` for the ``with`` block.

    Waits while another process holds it, saying so in the log once.

    Args:
        path: the cache file (it need not exist); the lock is ``<path>.lock``.
        what: what the holder is doing, for the waiting message (``training the model``).
    """
    lock = lock_path(path)
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)  # less the umask
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another job %s (it holds %s)", what, lock)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def single_process_world() -> bool:
    """Whether this process runs alone, not as one rank of a group started from outside.

    A lock held across a collective (training under DDP) must be taken by one process of
    the group only, or the ranks would wait for each other; under torchrun, SLURM tasks or
    a Lightning DDP child (any rank variable other than 0, or a world of several) this is
    false.
    """
    env = os.environ
    if any(int(env.get(name, "1") or 1) > 1 for name in _SIZE_VARIABLES):
        return False
    return all(env.get(name, "0") in ("", "0") for name in _RANK_VARIABLES)
