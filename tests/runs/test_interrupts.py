"""Runs stopped early (SIGINT, SIGTERM, a full disk) and the files every run leaves.

A stopped run ends with one line naming the signal, the stage, the run directory and the
command that resumes it; exits 130 or 143; keeps the ``INCOMPLETE`` marker; closes its W&B
run as failed and tagged ``incomplete``; and leaves no report, findings or metrics file that
looks complete. A completed run removes the marker; files get the user's umask.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
from conftest import TINY
from helpers import ROOT, wandb_inspect

from pse_lightning import pipeline
from pse_lightning.cli.app import stop_signals_raise, stopped_early
from pse_lightning.core import atomic
from pse_lightning.core.atomic import file_mode, write_files_atomic, write_text_atomic
from pse_lightning.core.run_status import MARKER, Interrupted, RunMarker, read_marker
from pse_lightning.models.checkpoint import save_checkpoint
from pse_lightning.reporting.sweep_jobs import collect_jobs

REPORT_FILES = ("report.md", "findings.json", "metrics.json")


# --- in-process: the mechanisms ------------------------------------------------------------


def test_stop_signals_raise_interrupted_and_are_restored() -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for signum, code in ((signal.SIGTERM, 143), (signal.SIGINT, 130)):
        with pytest.raises(Interrupted) as stop, stop_signals_raise():
            os.kill(os.getpid(), signum)
            time.sleep(5)  # the handler raises before this ends
        assert stop.value.exit_code == code and stop.value.signal_name == signum.name
    assert {s: signal.getsignal(s) for s in before} == before


def test_a_marker_names_stage_status_and_the_resume_command(tmp_path: Path) -> None:
    marker = RunMarker(tmp_path, rerun="python -m pse_lightning seed=1")
    assert read_marker(tmp_path) is None
    assert stopped_early(_paths(tmp_path), "Interrupted (SIGINT)") == (
        "Interrupted (SIGINT) before the run began its work; nothing was written to resume"
    )
    marker.enter("training")
    assert read_marker(tmp_path)["status"] == "running"
    marker.fail(Interrupted(signal.SIGTERM))
    state = read_marker(tmp_path)
    assert state == {
        "status": "interrupted",
        "stage": "training",
        "reason": "SIGTERM",
        "rerun": "python -m pse_lightning seed=1 resume=true",
    }
    assert stopped_early(_paths(tmp_path), "Interrupted (SIGTERM)") == (
        f"Interrupted (SIGTERM) during training: the run directory {tmp_path} is marked "
        f"incomplete ({MARKER}); resume with: python -m pse_lightning seed=1 resume=true"
    )
    marker.enter("evaluation")  # no training left to resume: the same command reruns it
    marker.fail(OSError(errno.ENOSPC, "No space left on device", "/x/report.md"))
    state = read_marker(tmp_path)
    assert state["status"] == "failed" and state["rerun"] == "python -m pse_lightning seed=1"
    assert state["reason"] == "no space left on device (/x/report.md)"
    marker.complete()
    assert not (tmp_path / MARKER).exists()


def test_only_the_first_process_of_a_run_writes_its_marker(tmp_path: Path, monkeypatch) -> None:
    """A DDP child (LOCAL_RANK=1) shares the run directory: it must not mark or unmark it."""
    RunMarker(tmp_path).enter("training")
    monkeypatch.setenv("LOCAL_RANK", "1")
    child = RunMarker(tmp_path)
    child.enter("evaluation")
    child.complete()
    assert read_marker(tmp_path)["stage"] == "training"


def test_files_written_together_appear_all_or_none(tmp_path: Path, monkeypatch) -> None:
    files = {tmp_path / name: f"{name}\n" for name in REPORT_FILES}
    _fill_disk_at(monkeypatch, "findings.json")
    with pytest.raises(OSError) as err:
        write_files_atomic(files)
    assert err.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == [], "a file (or a temporary) was left"
    monkeypatch.undo()
    write_files_atomic(files)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(REPORT_FILES)


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_files_get_the_users_umask(tmp_path: Path, umask: int) -> None:
    """Not tempfile's 0600: a report shared with a group is readable by it."""
    old = os.umask(umask)
    try:
        assert file_mode() == 0o666 & ~umask
        text = write_text_atomic(tmp_path / "report.md", "x")
        weights = save_checkpoint(tmp_path / "w.pt", pl.LightningModule(), {})
        plain = tmp_path / "plain"
        plain.touch()  # what the user's umask gives any new file
    finally:
        os.umask(old)
    for path in (text, weights):
        assert path.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777 == 0o666 & ~umask


def test_eval_samples_above_the_test_split_is_said_once(make_cfg, caplog) -> None:
    cfg = make_cfg("dataset.num_test=16", "dataset.eval_samples=20")
    datamodule = pipeline.instantiate(cfg.dataset)
    datamodule.prepare_data()
    datamodule.setup("test")
    with caplog.at_level(logging.INFO, logger="pse_lightning"):
        sizes = [len(datamodule.test_dataloader().dataset) for _ in range(2)]
    assert sizes == [16, 16]
    (notice,) = [r.getMessage() for r in caplog.records if "eval_samples" in r.getMessage()]
    assert notice == (
        "dataset.eval_samples=20 is more than the 16 test images of dataset=shapes: "
        "evaluating all 16"
    )
    assert pipeline.log_interval(cfg, 24) == {}  # trainer.log_every_n_steps=10 fits an epoch
    with caplog.at_level(logging.INFO, logger="pse_lightning"):
        assert pipeline.log_interval(cfg, 6) == {"log_every_n_steps": 6}
    assert "trainer.log_every_n_steps=10 is more than the 6 batches" in caplog.text


def test_disk_full_mid_report_leaves_nothing_that_looks_complete(
    make_cfg, monkeypatch, tmp_path: Path
) -> None:
    """ENOSPC while writing findings.json: no report.md, findings.json or metrics.json, no
    temporary file, the marker names the report stage and the full disk; with space again
    the same run completes and the marker goes."""
    weights = save_checkpoint(tmp_path / "random.pt", pipeline.build(make_cfg()).model, {})
    cfg = make_cfg(
        "attack=fgsm", "dataset.eval_samples=16", "stage=evaluate", f"model_checkpoint={weights}"
    )
    run_dir = Path(cfg.paths.run_dir)
    _fill_disk_at(monkeypatch, "findings.json")
    with pytest.raises(OSError) as err:
        pipeline.run(cfg)
    assert err.value.errno == errno.ENOSPC
    assert not [name for name in REPORT_FILES if (run_dir / name).exists()]
    assert not list(run_dir.rglob("*.tmp"))
    state = read_marker(run_dir)
    assert state["status"] == "failed" and state["stage"] == "report"
    assert state["reason"].startswith("no space left on device")
    monkeypatch.undo()
    pipeline.run(cfg)
    assert all((run_dir / name).is_file() for name in REPORT_FILES)
    assert not (run_dir / MARKER).exists()


class StopTraining(pl.Callback):
    """SIGTERM's exception, raised at the second training batch."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if batch_idx == 1:
            raise Interrupted(signal.SIGTERM)


def test_an_interrupted_run_is_marked_and_left_out_of_a_sweep(
    make_cfg, monkeypatch, tmp_path: Path
) -> None:
    """Interrupted passes Lightning (not turned into sys.exit(1) like KeyboardInterrupt),
    the marker says where, and the sweep comparison skips the job even with metrics.json."""
    make_trainer = pipeline.make_trainer
    monkeypatch.setattr(
        pipeline,
        "make_trainer",
        lambda cfg, logger, **kw: make_trainer(
            cfg, logger, **{**kw, "callbacks": [*kw.get("callbacks", []), StopTraining()]}
        ),
    )
    cfg = make_cfg(f"paths.run_dir={tmp_path}/sweep/0_job")
    with pytest.raises(Interrupted):
        pipeline.run(cfg)
    job = Path(cfg.paths.run_dir)
    assert read_marker(job) == {
        "status": "interrupted",
        "stage": "training",
        "reason": "SIGTERM",
        "rerun": "",  # outside Hydra: no command was typed
    }
    (job / "metrics.json").write_text(json.dumps({"metrics": {"test/clean_acc": 1.0}}))
    assert collect_jobs(tmp_path / "sweep") == []


# --- real processes --------------------------------------------------------------------------


def _cli(tmp_path: Path, *args: str, umask: int | None = None) -> subprocess.Popen:
    """``python -m pse_lightning <args>`` from ``tmp_path``, as a user starts it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HYDRA_FULL_ERROR": "0"}
    env.pop("WANDB_SILENT", None)  # the user's default: W&B must keep quiet by itself
    return subprocess.Popen(
        [sys.executable, "-m", "pse_lightning", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=None if umask is None else lambda: os.umask(umask),
    )


def _finish(child: subprocess.Popen, timeout: float = 900) -> tuple[str, str]:
    """(stdout, stderr) of ``child`` once it ends; killed if it outlives ``timeout``."""
    try:
        return child.communicate(timeout=timeout)
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()


def _run_dirs(root: Path) -> list[Path]:
    return sorted(p.parent for p in (root / "outputs").glob("*/*/.hydra"))


def _wait_for_first_epoch(root: Path, child: subprocess.Popen) -> Path:
    """The run directory once its marker says training and the first epoch's partial
    checkpoint (what a resume continues from) is written (polled)."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and child.poll() is None:
        partial = list((root / "outputs" / "checkpoints").glob("*.last.ckpt"))
        for run_dir in _run_dirs(root):
            state = read_marker(run_dir)
            if partial and state and state["stage"] == "training":
                return run_dir
        time.sleep(0.2)
    child.kill()
    raise AssertionError(f"never finished an epoch: {child.communicate()}")


# Epochs of 8 batches: a signal sent once the first has ended finds the run still training.
TRAIN = [
    *TINY,
    "dataset.num_train=256",
    "training.epochs=5",
    "attack=fgsm",
    "analysis=none",
    "logger=wandb",
]


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_during_training_ends_in_one_line_and_resumes(
    tmp_path: Path, signum: signal.Signals
) -> None:
    child = _cli(tmp_path, f"paths.root={tmp_path}", *TRAIN)
    run_dir = _wait_for_first_epoch(tmp_path, child)
    child.send_signal(signum)
    out, err = _finish(child)
    assert child.returncode == 128 + signum, (out, err)
    (line,) = err.strip().splitlines()  # one line, no traceback, no W&B banner
    assert line.startswith(f"Interrupted ({signum.name}) during training: the run directory ")
    assert str(run_dir) in line and line.endswith("resume=true")
    state = read_marker(run_dir)
    assert state["status"] == "interrupted" and state["reason"] == signum.name
    assert not [name for name in REPORT_FILES if (run_dir / name).exists()]
    summary, _ = wandb_inspect(run_dir)
    assert summary["exit_code"] == 128 + signum and summary["state"] == "failed"
    assert summary["tags"] == ["incomplete"]

    if signum != signal.SIGTERM:
        return
    command = line.split("resume with: ", 1)[1].split()
    assert command[:3] == ["python", "-m", "pse_lightning"]
    resumed = _cli(tmp_path, *command[3:])
    out, err = _finish(resumed)
    assert resumed.returncode == 0, (out, err)
    (new_dir,) = set(_run_dirs(tmp_path)) - {run_dir}
    assert "resuming training from" in out
    assert not (new_dir / MARKER).exists() and (run_dir / MARKER).exists()
    assert (out + err).strip().splitlines()[-1].endswith(f"report: {new_dir / 'report.md'}")


# More images asked for than the test split has: evaluated are all 32, with a notice.
CAPPED = ["dataset.num_test=32", "dataset.eval_samples=40"]


@pytest.mark.slow
@pytest.mark.cli  # through _cli (subprocess.Popen)
def test_a_default_run_is_quiet_ends_with_the_report_and_follows_the_umask(
    tmp_path: Path,
) -> None:
    """No library warning, no W&B banner or summary, the cap of eval_samples said once, the
    last line names the report, every file written follows the umask (here 027)."""
    args = [f"paths.root={tmp_path}", *TINY, "trainer.enable_progress_bar=true"]
    child = _cli(tmp_path, *args, "logger=wandb", *CAPPED, umask=0o027)
    out, err = _finish(child)
    assert child.returncode == 0, (out, err)
    lines = (out + err).strip().splitlines()
    noise = [
        line
        for line in lines
        if re.search(r"Warning\b|warn\(|^wandb:", line)
        or ("[WARNING]" in line and "][pse_lightning." not in line)
    ]
    assert noise == []
    caps = [line for line in lines if "dataset.eval_samples=40 is more than the 32 " in line]
    assert len(caps) == 1
    dissection = [line for line in lines if "interpretable units" in line]
    assert len(dissection) == 2 and "random-weights baseline" in dissection[1]
    finished = [line for line in lines if "(100%)" in line]
    assert finished and all(line.endswith("done") for line in finished)  # each loop's once
    (run_dir,) = _run_dirs(tmp_path)
    assert lines[-1].endswith(f"report: {run_dir / 'report.md'}")
    assert not (run_dir / MARKER).exists()
    ours = [
        *(run_dir / name for name in (*REPORT_FILES, "outcomes.json")),
        *(run_dir / "figures").glob("*.png"),
        *(tmp_path / "outputs" / "checkpoints").glob("*.pt"),
        *(tmp_path / "outputs" / "data").rglob("*.npz"),
    ]
    assert len(ours) > 6
    modes = {str(p): oct(p.stat().st_mode & 0o777) for p in ours}
    assert set(modes.values()) == {oct(0o640)}, modes


# --- helpers ---------------------------------------------------------------------------------


def _paths(run_dir: Path):
    from omegaconf import OmegaConf

    return OmegaConf.create({"paths": {"run_dir": str(run_dir)}})


def _fill_disk_at(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Writes to the temporary file of ``name`` fail with ENOSPC, as on a full disk."""
    real = os.fdopen

    class Full:
        def __init__(self, handle) -> None:
            self.handle = handle

        def write(self, data) -> int:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            self.handle.close()

    def fdopen(fd, *args, **kwargs):
        handle = real(fd, *args, **kwargs)
        target = os.readlink(f"/proc/self/fd/{fd}")
        return Full(handle) if Path(target).name.startswith(f".{name}.") else handle

    monkeypatch.setattr(atomic.os, "fdopen", fdopen)


# A sitecustomize for the CLI process below: writes to findings.json's temporary file fail
# with ENOSPC, as on a disk that fills up during the report.
_FULL_DISK_SITE = """
import errno, os
_real = os.fdopen
class _Full:
    def __init__(self, handle):
        self.handle = handle
    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        self.handle.close()
def _fdopen(fd, *args, **kwargs):
    handle = _real(fd, *args, **kwargs)
    target = os.readlink(f"/proc/self/fd/{fd}")
    return _Full(handle) if os.path.basename(target).startswith(".findings.json.") else handle
os.fdopen = _fdopen
"""


@pytest.mark.slow  # a CLI evaluation run (about 15 s)
def test_a_full_disk_mid_report_is_one_line_from_the_cli(make_cfg, tmp_path: Path) -> None:
    """The command line's view of a full disk during the report: exit 1, one ``Error:``
    line naming the full disk and the stage, no traceback, no complete-looking report file,
    the run directory marked incomplete."""
    weights = save_checkpoint(tmp_path / "random.pt", pipeline.build(make_cfg()).model, {})
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_FULL_DISK_SITE)
    env = {**os.environ, "PYTHONPATH": f"{site}:{ROOT}", "HYDRA_FULL_ERROR": "0"}
    result = subprocess.run(
        [sys.executable, "-m", "pse_lightning", f"paths.root={tmp_path}/root", "attack=fgsm",
         "analysis=none", "logger=none", "stage=evaluate", "dataset.eval_samples=16",
         f"model_checkpoint={weights}", "trainer.enable_progress_bar=false"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    output = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 1, output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), output
    assert "no space left on device" in lines[0].lower() and "report" in lines[0], output
    assert "Traceback" not in result.stderr, output
    (run_dir,) = _run_dirs(tmp_path / "root")
    assert not [name for name in REPORT_FILES if (run_dir / name).exists()], output
    assert read_marker(run_dir)["status"] == "failed"


def test_lightning_lines_with_nothing_to_say_are_dropped(caplog) -> None:
    """Lightning's advertisement and its report of absent accelerators are dropped; a GPU
    that is present but unused (worth knowing) still shows."""
    from pse_lightning.cli.app import quiet_third_party_noise

    quiet_third_party_noise()
    lightning = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    with caplog.at_level(logging.INFO, logger="pytorch_lightning.utilities.rank_zero"):
        for line in ("💡 Tip: try the cloud", "GPU available: False, used: False",
                     "TPU available: False, using: 0 TPU cores",
                     "GPU available: True (cuda), used: False"):  # fmt: skip
            lightning.info(line)
    assert [r.getMessage() for r in caplog.records] == ["GPU available: True (cuda), used: False"]
