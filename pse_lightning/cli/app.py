"""``python -m pse_lightning`` / ``pse-lightning``: check everything, then run the pipeline.

Order of work, so that a mistake costs a second and leaves nothing behind:

1. Hydra composes the config (``--help``, ``--cfg job`` and tab completion stop here; this
   module imports nothing heavy).
2. :class:`Preflight` (a Hydra callback, before the run directory exists) checks the config
   against the code (:mod:`~pse_lightning.cli.check`) and what it points at: the accelerator,
   the output folders, the checkpoint, a sample of the data files and the model built
   without data (:mod:`~pse_lightning.cli.preflight`). A multirun checks every job's config
   this way before its first job starts (and each job again when it starts).
3. Only then is the pipeline (torch, Lightning, W&B, matplotlib) imported and run.

A user error (:class:`~pse_lightning.validation.InputError`) prints one line and no
traceback; ``HYDRA_FULL_ERROR=1`` shows the traceback. Every error of a run is also
written, with its traceback, to the run's log file.

``SIGINT`` (Ctrl+C) and ``SIGTERM`` (a scheduler's stop) end a run like an error: the
pipeline keeps the run directory's ``INCOMPLETE`` marker and closes the W&B run as failed;
the console gets one line naming the signal, the stage, the run directory and the command
that reruns (or resumes) it, and the process exits with 128 + the signal's number (130,
143), as a shell reports a process the signal ended. A full disk or quota (or a read-only
or failing one) is one line too. A completed run's last line names its report.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
import traceback
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException, ConfigCompositionException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from pse_lightning.cli.check import check_config, check_required_values
from pse_lightning.cli.hints import override_hint, quoting_hint, typo_hint
from pse_lightning.cli.preflight import check_environment
from pse_lightning.cli.run_dirs import register_resolvers
from pse_lightning.core.process import freeze_live_objects, keep_freed_memory
from pse_lightning.core.run_status import (
    DISK_ERRNOS,
    MARKER,
    Interrupted,
    describe,
    read_marker,
)
from pse_lightning.validation import InputError

log = logging.getLogger("pse_lightning")
_FULL_ERROR = "HYDRA_FULL_ERROR"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# conf/config.yaml names run and sweep directories with ${unique:...}: registered before
# Hydra composes the config, here and in every process that imports the task.
register_resolvers()


def config_dir() -> Path:
    """The configs shipped inside an installed wheel, else the checkout's ``conf/``."""
    package = Path(__file__).resolve().parents[1]
    packaged = package / "conf"
    return packaged if packaged.is_dir() else package.parent / "conf"


class UserError(CompactHydraException):
    """An :class:`InputError` as Hydra prints it: the message alone, no traceback."""


def check(cfg: DictConfig, choices: dict[str, Any], searchpath: Sequence[str] = ()) -> None:
    """All checks that need no data: the config (``searchpath``: Hydra's search path when
    ``cfg`` has no ``hydra`` node), the accelerator, the checkpoint."""
    check_config(cfg, choices, config_dir(), searchpath)
    check_environment(cfg, choices.get("trainer"))


def one_line(err: BaseException) -> str:
    """The message of a user error as one line: an error raised in a DataLoader worker
    comes back with the worker's traceback in its message; its last line is the error."""
    text = str(err)
    if "Original Traceback" not in text:
        return text
    last = [line for line in text.splitlines() if line.strip()][-1]
    name = type(err).__name__
    return last.split(f"{name}: ", 1)[1] if f"{name}: " in last else last


def report_and_exit(err: InputError) -> NoReturn:
    """Print a user error as one line (and its traceback with ``HYDRA_FULL_ERROR=1``), exit 1.

    Exiting here, rather than raising to Hydra, spares the console Hydra's header and
    traceback; SystemExit passes Hydra's handlers, which catch ``Exception`` only.
    """
    if os.environ.get(_FULL_ERROR) == "1":
        traceback.print_exception(err)
    sys.stderr.write(f"Error: {one_line(err)}\n")
    raise SystemExit(1) from err


_BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


def sweep_jobs(config: DictConfig) -> list[list[str]] | None:
    """The overrides of every job of a multirun, as Hydra's basic sweeper will expand them
    (its ``hydra.sweeper.params`` first, then the command line's); None for another sweeper
    (an optimiser chooses its jobs as it goes)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if OmegaConf.select(config, "hydra.sweeper._target_") != _BASIC_SWEEPER:
        return None
    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    arguments = [f"{key}={value}" for key, value in params.items()]
    arguments += list(OmegaConf.to_container(config.hydra.overrides.task, resolve=False))
    parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
    batches = BasicSweeper.split_arguments(parser.parse_overrides(arguments), None)
    return [list(job) for batch in batches for job in batch]


def check_sweep(config: DictConfig) -> None:
    """Compose and check every job of a multirun before the first one starts, so a bad
    value in job 5 fails in seconds, not after jobs 0 to 4 have run: first the configs of
    all jobs (fast), then what each points at (folders, data, the model).

    A job that evaluates a cached model which an earlier job of the sweep trains
    (``-m stage=fit,evaluate``) passes here; it is checked again when it starts.
    """
    from hydra.core.global_hydra import GlobalHydra

    from pse_lightning.cli.preflight import NothingToEvaluate

    jobs = sweep_jobs(config)
    if not jobs:
        return
    loader = GlobalHydra.instance().config_loader()
    varied = {arg for overrides in jobs for arg in overrides if any(arg not in o for o in jobs)}

    def where(number: int) -> str:
        shown = [arg for arg in jobs[number] if arg in varied]
        return f"job {number} of {len(jobs)} ({' '.join(shown) or 'no overrides'})"

    configs = []
    for number, overrides in enumerate(jobs):
        try:
            configs.append(loader.load_sweep_config(config, overrides))
        except ConfigCompositionException as err:  # as a single run's refusal: one line
            text = f"{err}\n{err.__cause__ or ''}"
            raise InputError(f"{where(number)}: {one_line_hydra_error(text)}") from err

    for number, job in enumerate(configs):
        try:
            choices = OmegaConf.to_container(job.hydra.runtime.choices)
            check_config(job, choices, config_dir())  # type: ignore[arg-type]
        except InputError as err:
            raise InputError(f"{where(number)}: {err}") from err
    trains = False
    for number, job in enumerate(configs):
        try:
            check_environment(job, job.hydra.runtime.choices.get("trainer"))
        except NothingToEvaluate as err:
            if not trains:
                raise InputError(f"{where(number)}: {err}") from err
        except InputError as err:
            raise InputError(f"{where(number)}: {err}") from err
        trains = trains or (
            str(job.get("stage")) != "evaluate"
            and not job.get("model_checkpoint")
            and str(OmegaConf.select(job, "training.name")) != "none"
        )


class Preflight(Callback):
    """Runs :func:`check` before Hydra creates the run directory (single runs), or on every
    job of a multirun before Hydra creates the sweep directory (:func:`check_sweep`).

    Hydra turns a callback's exception into a warning, so a failed check prints its
    message and exits here; nothing has been written yet.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        global _CHECKED
        restore_stderr()
        choices = OmegaConf.to_container(config.hydra.runtime.choices)
        try:
            check(config, choices)  # type: ignore[arg-type]
        except InputError as err:
            report_and_exit(err)
        _CHECKED = True

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        restore_stderr()
        try:
            check_required_values(config)
            check_sweep(config)
        except InputError as err:
            report_and_exit(err)


#: Whether :class:`Preflight` has checked this process's single run (not checked twice).
_CHECKED = False


class _DropMessages(logging.Filter):
    """Drops a logger's messages that contain one of ``parts``."""

    def __init__(self, *parts: str) -> None:
        super().__init__()
        self.parts = parts

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(part in str(record.msg) for part in self.parts)


# One instance per logger: addFilter ignores a filter already present, so every job of a
# multirun calling quiet_third_party_noise() leaves one filter, not one per job.
_DROPPED = {
    # Lightning's cloud-logger advertisement on every Trainer is not a message, nor is its
    # report of accelerators that are absent (a GPU that is present but unused still shows).
    "pytorch_lightning.utilities.rank_zero": _DropMessages(
        "💡 Tip:", "GPU available: False, used: False", "TPU available: False"
    ),
    # The interruption's own line names the signal (see stop_signals_raise).
    "pytorch_lightning.trainer.connectors.signal_connector": _DropMessages("Received SIGTERM"),
}


def quiet_third_party_noise() -> None:
    """Silence messages users cannot act on (kept out of the library: only the CLI does it)."""
    for name, dropped in _DROPPED.items():
        logging.getLogger(name).addFilter(dropped)
    # Lightning 2.6 calls a torch pytree API that torch 2.14 deprecates; fixed upstream.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")


def log_to_files(message: str, exc_info: Any = None) -> None:
    """Write an error to the run's log file only (the console gets Hydra's one line); a log
    file that cannot be written (a full disk) is skipped without a word on the console."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, (), exc_info)
    raise_exceptions, logging.raiseExceptions = logging.raiseExceptions, False
    try:
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.FileHandler):
                handler.handle(record)
    finally:
        logging.raiseExceptions = raise_exceptions


@contextmanager
def stop_signals_raise() -> Iterator[None]:
    """Within the block, ``SIGINT`` and ``SIGTERM`` raise :class:`Interrupted` in this
    process, so the run cleans up as after an error (``SIGTERM`` would otherwise end it at
    once). A second signal during that clean-up acts as without this handler. Processes
    forked from this one (data loader workers) keep the default behaviour."""
    owner = os.getpid()
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}

    defaults = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}

    def _raise(signum: int, frame: Any) -> None:
        if os.getpid() != owner:  # a forked worker: ends as without this handler
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        for other, handler in defaults.items():
            signal.signal(other, handler)
        raise Interrupted(signum)

    for signum in STOP_SIGNALS:
        signal.signal(signum, _raise)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def stopped_early(cfg: DictConfig, what: str) -> str:
    """One line on a run that stopped early: ``what`` happened, in which stage, where the
    run directory is (marked incomplete) and the command that reruns or resumes it."""
    run_dir = Path(str(cfg.paths.run_dir))
    marker = read_marker(run_dir)
    if marker is None:
        return f"{what} before the run began its work; nothing was written to resume"
    stage = f" during {marker['stage']}" if marker.get("stage") else ""
    line = f"{what}{stage}: the run directory {run_dir} is marked incomplete ({MARKER})"
    if marker.get("rerun"):
        verb = "resume" if "resume=true" in str(marker["rerun"]).split() else "rerun"
        line += f"; {verb} with: {marker['rerun']}"
    return line


def run_job(cfg: DictConfig) -> float | None:
    """One job: check (again, for multirun jobs: an earlier job may have changed what it
    finds), import the pipeline, run it.

    The only place that reads Hydra's global state (``HydraConfig``): what the job needs of
    it (choices, overrides, search path, sweep group) is handed down explicitly."""
    hydra_cfg = HydraConfig.get()
    try:
        with stop_signals_raise():
            if not (_CHECKED and hydra_cfg.mode == RunMode.RUN):
                check(cfg, dict(hydra_cfg.runtime.choices), list(hydra_cfg.searchpath))
            quiet_third_party_noise()
            keep_freed_memory()
            from pse_lightning import pipeline

            freeze_live_objects()  # the modules just imported: see core/process.py

            results = pipeline.run(cfg, pipeline.JobContext.from_hydra(hydra_cfg))
    except Interrupted as stop:
        line = stopped_early(cfg, f"Interrupted ({stop.signal_name})")
        log_to_files(line)
        sys.stderr.write(line + "\n")
        raise SystemExit(stop.exit_code) from None
    except InputError as err:
        log_to_files(str(err), sys.exc_info())
        if hydra_cfg.mode == RunMode.MULTIRUN:
            raise UserError(one_line(err)) from err  # Hydra names the job's overrides first
        report_and_exit(err)
    except OSError as err:
        if err.errno not in DISK_ERRNOS:
            log_to_files(f"{type(err).__name__}: {err}", sys.exc_info())
            raise
        log_to_files(describe(err), sys.exc_info())
        report_and_exit(InputError(stopped_early(cfg, describe(err).capitalize())))
    except Exception as err:
        log_to_files(f"{type(err).__name__}: {err}", sys.exc_info())
        raise
    report = Path(str(cfg.paths.run_dir)) / "report.md"
    if report.is_file():
        log.info("report: %s", report)  # the last line: where to look
    # Returned to Hydra so sweepers that optimise an objective can read it.
    value = results.get("test/robust_acc")
    return None if value is None else float(value)


_task = hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")(
    run_job
)


class _WithoutAppendAdvice:
    """``sys.stderr`` while Hydra composes the config: what Hydra writes is held back until
    the config has composed (then passed on unchanged) or Hydra has refused it (then
    :func:`one_line_hydra_error` prints it as one ``Error:`` line). Hydra's advice for a key
    the chosen file lacks ("To append to your config use +key=value") is dropped when the
    key is a typo of one it has (the hint says which)."""

    _ADVICE = "\nTo append to your config use +"

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.held: list[str] = []

    def write(self, text: str) -> int:
        if self._ADVICE in text and typo_hint(sys.argv[1:], config_dir()):
            head, _, tail = text.partition(self._ADVICE)
            _, newline, rest = tail.partition("\n")  # the advice ends at its line's end
            text = head + newline + rest
        self.held.append(text)
        return len(text)

    def flush(self) -> None:
        """Nothing to flush while held (the stream is flushed when it is put back)."""

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


#: Lines of Hydra's and OmegaConf's error text that locate rather than explain.
_HYDRA_DETAIL = ("full_key:", "object_type=", "reference_type=", "provider=",
                 "Set the environment variable HYDRA_FULL_ERROR")  # fmt: skip


#: Hydra's refusal of an override whose key the config lacks.
_UNKNOWN_KEY = re.compile(r"Could not override '([^']+)'.*is not in struct", re.DOTALL)
#: Where the settings are listed, for a key that is not one of them.
SETTINGS_HELP = "`python -m pse_lightning --help` lists the settings and the config groups"


def one_line_hydra_error(text: str) -> str:
    """Hydra's refusal (several lines: the message, OmegaConf's location details, a list
    of available options, advice about HYDRA_FULL_ERROR) as one line: the message, and the
    options joined after it.

    An override of a key the config lacks becomes ``<key> is not a setting: <where the
    settings are listed>``, phrased as the "did you mean" hint; Hydra's advice to append it
    with ``+key`` is left out (the constructor would refuse it next; the Hint line says when
    a target does take such a key)."""
    unknown = _UNKNOWN_KEY.search(text)
    if unknown:
        return f"{unknown.group(1)} is not a setting: {SETTINGS_HELP}"
    parts: list[str] = []
    options: list[str] = []
    for raw in text.splitlines():
        line = raw.strip().removesuffix(".")
        if line.startswith("Config search path"):
            break  # then Hydra's table of where it looked: not the user's to fix
        if not line or line.startswith(_HYDRA_DETAIL):
            continue
        if raw.startswith("\t") and parts and parts[-1].endswith(":"):
            options.append(line)
            continue
        if options:
            parts[-1] += " " + ", ".join(options)
            options = []
        parts.append(line.removeprefix("In 'config': "))
    if options:
        parts[-1] += " " + ", ".join(options)
    return "; ".join(parts)


def restore_stderr(refused: bool = False) -> None:
    """Put back the ``sys.stderr`` :func:`main` wrapped, once the config has composed
    (Hydra's held text passed on as written) or been refused (as one ``Error:`` line)."""
    wrapped = sys.stderr
    if not isinstance(wrapped, _WithoutAppendAdvice):
        return
    sys.stderr = wrapped.stream
    text = "".join(wrapped.held)
    if refused and text.strip() and not text.startswith("Error: "):
        text = f"Error: {one_line_hydra_error(text)}\n"
    sys.stderr.write(text)


def main() -> None:
    """The console entry point; adds a hint when Hydra rejects a key of the chosen file
    (a "did you mean" for a typo, instead of Hydra's advice to add it) or a value its
    lexer cannot read unquoted."""
    sys.stderr = _WithoutAppendAdvice(sys.stderr)
    try:
        _task()
    except SystemExit as stop:
        restore_stderr(refused=stop.code not in (0, None))
        if stop.code not in (0, None):
            hint = override_hint(sys.argv[1:], config_dir()) or quoting_hint(sys.argv[1:])
            if hint:
                sys.stderr.write(f"Hint: {hint}\n")
        raise
    finally:
        restore_stderr()
        freeze_live_objects()  # the process ends next: see core/process.py
