"""Offline means offline: no network access, and no W&B files outside the run directory.

W&B's mode reached only ``wandb.init``; its service still reported errors and usage over
the network (a DNS query per run), staged artifact copies under ``~/.local/share/wandb``
and ignored ``WANDB_MODE`` from the environment. :func:`wandb_environment` sets the
process's W&B environment before wandb is imported.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT

from pse_lightning.reporting import loggers
from pse_lightning.reporting.loggers import WANDB_FOLDERS, wandb_environment, wandb_logger

WANDB_VARIABLES = ("WANDB_MODE", "WANDB_ERROR_REPORTING", *WANDB_FOLDERS)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No W&B variable set (the test session's are restored afterwards), none set here."""
    for variable in (*WANDB_VARIABLES, "WANDB_API_KEY"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(loggers, "_OWN_ENVIRONMENT", {})
    return monkeypatch


def test_offline_by_default_with_every_wandb_folder_in_the_run_dir(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert wandb_environment("offline", tmp_path) == "offline"
    assert os.environ["WANDB_MODE"] == "offline"
    assert os.environ["WANDB_ERROR_REPORTING"] == "false"
    for variable, folder in WANDB_FOLDERS.items():
        assert Path(os.environ[variable]) == tmp_path.resolve() / "wandb" / folder
    assert "WANDB_CONFIG_DIR" not in WANDB_FOLDERS  # the user's W&B settings stay theirs


@pytest.mark.parametrize("user_mode", ["online", "disabled", "offline"])
def test_the_users_wandb_mode_wins_over_the_config(
    clean_env: pytest.MonkeyPatch, tmp_path: Path, user_mode: str
) -> None:
    clean_env.setenv("WANDB_MODE", user_mode)
    for configured in ("offline", "online"):
        assert wandb_environment(configured, tmp_path) == user_mode
        assert os.environ["WANDB_MODE"] == user_mode


def test_wandb_mode_online_from_the_environment_reaches_the_run(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """W&B's banner says "set WANDB_MODE=online": with it, logger.mode=offline runs online,
    so without credentials the logger asks for them (it used to stay offline)."""
    clean_env.setenv("WANDB_MODE", "online")
    clean_env.setenv("HOME", str(tmp_path))  # no ~/.netrc
    with pytest.raises(ValueError, match="logger.mode=online needs W&B credentials"):
        wandb_logger(mode="offline", save_dir=str(tmp_path))
    clean_env.setenv("WANDB_MODE", "disabled")
    logger = wandb_logger(mode="offline", save_dir=str(tmp_path))
    assert logger._wandb_init["mode"] == "disabled"


def test_a_wandb_mode_no_one_knows_is_refused(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    clean_env.setenv("WANDB_MODE", "ofline")
    with pytest.raises(ValueError, match=r"WANDB_MODE \(environment\) must be one of"):
        wandb_environment("offline", tmp_path)
    clean_env.setenv("WANDB_MODE", "dryrun")  # W&B's old name of offline
    assert wandb_environment("online", tmp_path) == "offline"


def test_the_users_variables_are_kept_and_own_ones_follow_each_job(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    clean_env.setenv("WANDB_CACHE_DIR", "/users/cache")
    clean_env.setenv("WANDB_ERROR_REPORTING", "true")
    wandb_environment("offline", tmp_path / "job0")
    wandb_environment("online", tmp_path / "job1")  # the next job of a multirun
    assert os.environ["WANDB_CACHE_DIR"] == "/users/cache"
    assert os.environ["WANDB_ERROR_REPORTING"] == "true"
    assert os.environ["WANDB_MODE"] == "online"
    assert Path(os.environ["WANDB_DATA_DIR"]) == (tmp_path / "job1" / "wandb" / "data").resolve()


# Loaded by the child (first on its PYTHONPATH): every attempt at the network from Python
# (name resolution, a connection or datagram that is not a local socket) is recorded in
# $NETWORK_LOG and fails.
SITECUSTOMIZE = """
import os
import socket

_log = os.environ["NETWORK_LOG"]


def _record(what):
    with open(_log, "a") as handle:
        handle.write(f"{os.getpid()} {what}\\n")
    raise OSError(f"network blocked by the test: {what}")


def _resolve(*args, **kwargs):
    _record(f"resolve {args[:2]}")


for _name in ("getaddrinfo", "gethostbyname", "gethostbyname_ex", "gethostbyaddr"):
    setattr(socket, _name, _resolve)
_connect, _connect_ex, _sendto = (
    socket.socket.connect, socket.socket.connect_ex, socket.socket.sendto
)


def _guarded(original, what):
    def call(self, *args):
        if self.family != socket.AF_UNIX:
            _record(f"{what} {args[:1]}")
        return original(self, *args)
    return call


socket.socket.connect = _guarded(_connect, "connect")
socket.socket.connect_ex = _guarded(_connect_ex, "connect_ex")
socket.socket.sendto = _guarded(_sendto, "sendto")
"""


def _strace() -> str | None:
    """strace, when present and allowed to trace here (containers may forbid ptrace)."""
    path = shutil.which("strace")
    if path is None:
        return None
    probe = subprocess.run([path, "-f", "-o", os.devnull, "true"], capture_output=True)
    return path if probe.returncode == 0 else None


# connect/sendto of an IPv4 or IPv6 socket in strace's output (wandb-core, W&B's Go
# service, resolves names itself: only a system-call trace sees its queries).
INET_CALL = re.compile(r"(connect|sendto|sendmsg)\(.*sa_family=AF_INET6?\b")


@pytest.mark.slow
def test_a_default_run_touches_no_network_and_writes_wandb_files_only_in_its_run_dir(
    tmp_path: Path,
) -> None:
    """A default (offline W&B) training and evaluation with the network blocked: no name
    resolution or connection is attempted (Python's, and, when strace can trace,
    wandb-core's too), and W&B writes nothing under the home directory."""
    site, home, work = tmp_path / "site", tmp_path / "home", tmp_path / "work"
    for folder in (site, home, work):
        folder.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    network_log, trace = tmp_path / "network.log", tmp_path / "strace.txt"
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("WANDB_", "XDG_")) and key != "PYTHONPATH"
    }
    env.update(
        HOME=str(home),
        PYTHONPATH=os.pathsep.join([str(site), str(ROOT)]),
        NETWORK_LOG=str(network_log),
    )
    command = [
        sys.executable,
        "-m",
        "pse_lightning",
        "experiment=smoke",
        "dataset.eval_samples=8",
        "analysis=none",
        "attack=fgsm",
        "trainer.enable_progress_bar=false",
        f"paths.root={work}",
    ]
    strace = _strace()
    if strace is not None:
        trace_calls = ["-f", "-qq", "-e", "trace=connect,sendto,sendmsg", "-o", str(trace)]
        command = [strace, *trace_calls, *command]
    result = subprocess.run(
        command, cwd=work, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert not network_log.exists(), network_log.read_text()
    if strace is not None:
        inet = [line for line in trace.read_text().splitlines() if INET_CALL.search(line)]
        assert inet == [], "\n".join(inet[:10])
    (run,) = (p.parent for p in (work / "outputs").glob("*/*/.hydra"))
    assert len(list((run / "wandb").glob("offline-run-*"))) == 1
    # The trained model's artifact was staged inside the run directory...
    assert any((run / "wandb" / "data" / "artifacts" / "staging").iterdir())
    # ... and W&B wrote nothing under the home directory (~/.local/share, ~/.cache, ...).
    assert [str(p) for p in home.rglob("*wandb*")] == []
