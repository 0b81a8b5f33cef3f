"""reporting.rendering: figures saved in the background are the bytes saved inline, all are
on disk when the block ends, and a figure that fails to render fails the report, naming
it, without leaving a file behind."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from matplotlib.artist import Artist

from pse_lightning.reporting.figures import new_figure, save, summary_bar_figure
from pse_lightning.reporting.rendering import (
    WORKERS,
    FigureError,
    background_figures,
    can_fork,
    wait_for_figures,
)

pytestmark = pytest.mark.skipif(not can_fork(), reason="renders in forked children (Linux)")


def draw_all(out: Path, count: int) -> list[Path]:
    """``count`` different bar charts (more than the children that render at once)."""
    return [
        summary_bar_figure(
            {"test/clean_acc": 0.9, "test/robust_acc": i / count, "test/success_rate": 0.5},
            out / f"summary_{i}.png",
        )
        for i in range(count)
    ]


def test_background_figures_are_the_inline_bytes(tmp_path: Path) -> None:
    count = 2 * WORKERS + 1
    inline = draw_all(tmp_path / "inline", count)
    with background_figures():
        background = draw_all(tmp_path / "background", count)
        wait_for_figures()
        assert all(p.is_file() for p in background)
    assert [p.read_bytes() for p in background] == [p.read_bytes() for p in inline]
    assert sorted(p.name for p in (tmp_path / "background").iterdir()) == sorted(
        p.name for p in background
    )  # no temporary file left


class Broken(Artist):
    """An artist whose drawing fails, as a rendering bug would."""

    def draw(self, renderer: object) -> None:
        raise RuntimeError("cannot draw")


def test_a_failed_figure_raises_its_error_naming_it_and_leaves_nothing(tmp_path: Path) -> None:
    fig, _ = new_figure(width=2, height=2)
    fig.add_artist(Broken())
    with pytest.raises(RuntimeError, match="cannot draw") as raised, background_figures():
        good = draw_all(tmp_path, 1)
        save(fig, tmp_path / "broken.png")
    cause = raised.value.__cause__
    assert isinstance(cause, FigureError) and "broken.png" in str(cause)
    assert "in draw" in str(cause)  # the child's traceback
    assert [p.name for p in tmp_path.iterdir()] == [good[0].name]


def test_a_full_disk_in_a_child_is_an_oserror_here(tmp_path: Path, monkeypatch) -> None:
    """The command line turns a full disk into one line: the child's OSError comes back."""

    def full(path: Path, write: object) -> Path:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("pse_lightning.reporting.figures.write_atomic", full)
    with pytest.raises(OSError) as raised, background_figures():
        draw_all(tmp_path, 1)
    assert raised.value.errno == errno.ENOSPC


def test_the_blocks_own_error_is_the_one_raised(tmp_path: Path) -> None:
    fig, _ = new_figure(width=2, height=2)
    fig.add_artist(Broken())
    with pytest.raises(KeyError), background_figures():
        save(fig, tmp_path / "broken.png")
        raise KeyError("the report's own error")
    assert list(tmp_path.iterdir()) == []  # and the children were waited for


def test_outside_the_block_a_figure_is_saved_at_once(tmp_path: Path) -> None:
    (path,) = draw_all(tmp_path, 1)
    assert path.is_file()


def test_a_stuck_child_is_stopped_and_its_figure_rendered_here(tmp_path: Path, caplog) -> None:
    """A child that hangs (a lock held by another thread at the fork) costs the report a
    delay, not the run: it is killed, its half-written file removed, the figure saved here."""
    from pse_lightning.core.atomic import temporary_beside
    from pse_lightning.reporting.rendering import ForkedRenderer

    parent = os.getpid()
    path = tmp_path / "figure.png"

    def save() -> Path:
        if os.getpid() != parent:  # the child: leave a temporary behind and hang
            temporary_beside(path)
            import time

            time.sleep(60)
        path.write_bytes(b"drawn here")
        return path

    renderer = ForkedRenderer(workers=1, stuck_seconds=0.5)
    renderer.submit(save, path)
    renderer.wait()
    assert path.read_bytes() == b"drawn here"
    assert [p.name for p in tmp_path.iterdir()] == ["figure.png"]
    assert "rendering it here" in caplog.text
