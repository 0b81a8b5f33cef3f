"""Settings of the command line's process that cut its overhead and change no number.

Only the entry point applies them (the process is the job's); the library leaves a caller's
process as it finds it.

- :func:`keep_freed_memory`: torch allocates a CPU tensor with ``malloc`` per operation.
  glibc serves blocks above a moving threshold with ``mmap`` and hands freed memory back to
  the system, so each new tensor faults in freshly zeroed pages: the main job spent 13-24 s
  of system CPU (3.8-5 M page faults) on it. Kept for reuse, that memory costs 3-4 s (0.5-0.8
  M faults), for up to 15 % more peak memory.
- :func:`freeze_live_objects`: a full garbage collection traverses every live object, and
  the modules of torch, Lightning and W&B hold half a million; the interpreter's shutdown
  runs several (2 s of a finished job's wall time, 0.3 s once frozen). Frozen after the
  pipeline's import, they are also skipped by the collections the report's figures set off.
"""

from __future__ import annotations

import ctypes
import gc
import os

# mallopt(3) parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# The largest mmap threshold glibc accepts on 64-bit systems (half its heap size).
_MMAP_THRESHOLD = 32 * 1024 * 1024
# Free memory above the heap's top kept for reuse rather than given back.
_TRIM_THRESHOLD = 1024 * 1024 * 1024
# A user's own tuning of glibc's allocator, left as it is.
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def glibc() -> bool:
    """Whether this process runs on glibc (whose allocator :func:`keep_freed_memory` tunes)."""
    try:
        return os.confstr("CS_GNU_LIBC_VERSION") is not None
    except (ValueError, OSError, AttributeError):  # no such name here (musl, macOS, Windows)
        return False


def keep_freed_memory() -> bool:
    """Have glibc keep freed blocks of up to 32 MiB for reuse instead of returning them to
    the system (see the module docstring); True when set. A no-op on other C libraries and
    where the user set glibc's ``MALLOC_*_`` variables."""
    if not glibc() or any(name in os.environ for name in _USER_SETTINGS):
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # The mmap threshold first: set, it also stops glibc from moving it.
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)
    )


def freeze_live_objects() -> None:
    """Collect the garbage once, then exempt every object alive now from later collections
    (they are still freed when no longer referenced, and exit handlers still run)."""
    gc.collect()
    gc.freeze()
