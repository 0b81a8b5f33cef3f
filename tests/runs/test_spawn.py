"""The spawn launcher's pipe: grown so rank zero's results come home, or a clear error."""

from __future__ import annotations

import multiprocessing
import sys

import pytest

from pse_lightning.modules.spawn import DEFAULT_PIPE_BYTES, grow_pipe


@pytest.mark.skipif(sys.platform != "linux", reason="pipe sizes are a Linux feature")
def test_the_pipe_grows_past_a_payload_that_would_have_blocked() -> None:
    queue = multiprocessing.get_context("spawn").SimpleQueue()
    capacity = grow_pipe(queue)
    assert capacity > DEFAULT_PIPE_BYTES
    # With nobody reading, a put of more than 64 KiB would block forever on a default pipe.
    payload = b"x" * (4 * DEFAULT_PIPE_BYTES)
    queue.put(payload)
    assert queue.get() == payload
