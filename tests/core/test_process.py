"""core.process: freed memory is reused (no fresh page faults), a user's allocator settings
win, and the exit handlers still run after the last collection is spared."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pse_lightning.core.process import glibc

ROOT = Path(__file__).resolve().parents[2]
# Each test starts a fresh interpreter (numpy only, well under a second).
pytestmark = pytest.mark.cli

# 20 rounds of six 16 MiB blocks written then freed together (as a training step's
# activations are); prints whether memory is kept, then the page faults of the rounds.
FAULTS = """
import resource
import numpy as np
from pse_lightning.core.process import keep_freed_memory
print(keep_freed_memory())
def round():
    blocks = [np.ones(2_000_000) for _ in range(6)]
    del blocks
round()  # the heap's one-off growth is not counted
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    round()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
PAGES_PER_BLOCK = 16 * 1024 * 1024 // 4096


def run_python(code: str, **env: str) -> list[str]:
    """Run ``code`` in a fresh interpreter (the package from this checkout); its stdout lines."""
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_"):
        if name not in env:
            environment.pop(name, None)
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=environment,
                          capture_output=True, text=True, check=True, timeout=60)  # fmt: skip
    return done.stdout.split()


def faults(code: str, **env: str) -> tuple[str, int]:
    applied, count = run_python(code, **env)
    return applied, int(count)


@pytest.mark.skipif(not glibc(), reason="tunes glibc's allocator only")
def test_freed_blocks_are_reused_without_new_page_faults() -> None:
    applied, kept = faults(FAULTS)
    _, default = faults(FAULTS.replace("print(keep_freed_memory())", "print(False)"))
    assert applied == "True"
    # By default glibc hands the freed blocks back, and the next round faults them in again.
    assert default > 5 * PAGES_PER_BLOCK
    assert kept < PAGES_PER_BLOCK


@pytest.mark.skipif(not glibc(), reason="tunes glibc's allocator only")
def test_a_users_own_allocator_settings_are_left_alone() -> None:
    applied, _ = faults(FAULTS, MALLOC_TRIM_THRESHOLD_="131072")
    assert applied == "False"


def test_logs_are_written_out_after_freeze(tmp_path: Path) -> None:
    """The run's log is flushed and closed by logging's exit handler, which still runs."""
    log_file = tmp_path / "run.log"
    run_python(f"""
        import logging
        from pse_lightning.core.process import freeze_live_objects
        handler = logging.FileHandler({str(log_file)!r})
        logging.getLogger().addHandler(handler)
        logging.getLogger().warning("last line")
        freeze_live_objects()
    """)
    assert log_file.read_text() == "last line\n"
