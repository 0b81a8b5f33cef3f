"""Experiment loggers: W&B (offline by default), with clean teardown for multiruns.

A W&B run is named from the run's choices and other overrides
(``cw-resnet50-imagenet-standard-s0-attack.eps=0.01``), carries the choices as config keys
(``choices/attack``), is typed by
what the job does (``job_type`` ``train`` or ``evaluate``) and, in a Hydra multirun, grouped
with the other jobs of its sweep. The run starts only when the first stage does
(:func:`start_run`), so a job that fails its checks leaves no W&B run behind. Offline
makes no network access and leaves no W&B file outside the run directory
(:func:`wandb_environment`).
"""

from __future__ import annotations

import logging
import os
import re
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pytorch_lightning.loggers import Logger, WandbLogger

from pse_lightning.reporting.adapters.wandb_logger import init_kwargs, run_started, set_run_name
from pse_lightning.validation import require_choice

log = logging.getLogger(__name__)
WANDB_MODES = ("offline", "online", "disabled")
# W&B's older names for two modes, still accepted in WANDB_MODE.
_WANDB_MODE_ALIASES = {"dryrun": "offline", "run": "online"}
JOB_TYPES = ("train", "evaluate")
# W&B's folders outside its run: kept in <run dir>/wandb/<folder> (see wandb_environment).
WANDB_FOLDERS = {
    "WANDB_DATA_DIR": "data",
    "WANDB_CACHE_DIR": "cache",
    "WANDB_ARTIFACT_DIR": "artifacts",
}
# The W&B variables this process set itself (a user's are never changed).
_OWN_ENVIRONMENT: dict[str, str] = {}
# The tag of a W&B run that did not complete (interrupted or failed).
INCOMPLETE_TAG = "incomplete"
# Lightning adds these to every log call; an evaluation has no epochs or optimiser steps.
TRAINING_COUNTERS = ("epoch", "trainer/global_step")


class RunLogger(WandbLogger):
    """Lightning's WandbLogger whose name and job type are set when the first stage starts,
    and whose evaluation metrics carry no training counters.

    Lightning logs ``epoch`` and ``trainer/global_step`` with every metric; for the ``test/``
    metrics of an evaluation they would read ``epoch 0`` in the run summary.
    """

    @property
    def started(self) -> bool:
        """Whether the W&B run exists (its name and job type are then fixed)."""
        return run_started(self)

    def set_identity(self, *, name: str | None, job_type: str, group: str | None = None) -> None:
        """Name, type and group the run before it starts; a started run keeps its own, and
        a name or group given in the logger's config wins over the job's."""
        require_choice("job_type", job_type, JOB_TYPES)
        if self.started:
            return
        if name and not init_kwargs(self).get("name"):
            set_run_name(self, name)
        if group and not init_kwargs(self).get("group"):
            init_kwargs(self)["group"] = group
        init_kwargs(self)["job_type"] = job_type

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        results = {k: v for k, v in metrics.items() if k not in TRAINING_COUNTERS}
        if results and all(str(key).startswith("test/") for key in results):
            metrics, step = results, None
        super().log_metrics(metrics, step)


def wandb_logger(
    *,
    project: str = "pse_lightning",
    entity: str | None = None,
    mode: str = "offline",
    group: str | None = None,
    name: str | None = None,
    tags: Sequence[str] = (),
    save_dir: str = ".",
    config: dict[str, Any] | None = None,
) -> RunLogger:
    """A Lightning WandbLogger whose run lives inside the run directory.

    Offline mode writes a complete run under ``<save_dir>/wandb/offline-run-*`` that
    ``wandb sync`` uploads later; online mode needs ``WANDB_API_KEY`` or ``wandb login``.
    ``name=None`` names the run from its choices when it starts (see :func:`start_run`);
    ``group=None`` groups the jobs of a Hydra multirun by their sweep directory, also when
    the run starts (the entry point hands the group down: :func:`sweep_group`).
    """
    require_choice("logger.mode", mode, WANDB_MODES)
    mode = wandb_environment(mode, Path(save_dir))
    if mode == "online" and not (os.environ.get("WANDB_API_KEY") or _netrc_has_wandb()):
        raise ValueError(
            "logger.mode=online needs W&B credentials: run `wandb login` or set WANDB_API_KEY, "
            "or keep logger.mode=offline and upload later with `wandb sync`"
        )
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    import wandb  # after wandb_environment: W&B reads some settings once, at import

    # A run left open by an earlier job of the same process would be silently reused
    # (wandb #1314): every job starts its own.
    if wandb.run is not None:
        wandb.finish()
    logger = RunLogger(
        # W&B's banner and end-of-run summary (30 lines) would bury the report's path;
        # finish_logger names where the run is kept instead.
        settings=wandb.Settings(silent=True),
        project=project,
        entity=entity,
        mode=mode,
        group=group,
        name=name,
        tags=list(tags),
        save_dir=save_dir,
        config=config,
    )
    # Lightning always passes anonymous=None to wandb.init, which wandb >= 0.19 answers with
    # a deprecation warning on every run; an absent key means the same.
    if init_kwargs(logger).get("anonymous", False) is None:
        del init_kwargs(logger)["anonymous"]
    return logger


def wandb_environment(mode: str, save_dir: Path) -> str:
    """Set W&B's environment for this process and return the mode the run uses.

    W&B reads its mode, its error reporting and its folders from the environment (some of
    them once, when wandb is imported or its service starts), so they are set here, before
    the first ``import wandb``, for the whole process (DDP ranks inherit them):

    - ``WANDB_MODE``: a value the user set wins over ``logger.mode`` (W&B's own banner
      tells users to set it); else ``logger.mode``.
    - ``WANDB_ERROR_REPORTING=false``: W&B's crash and usage telemetry would otherwise
      reach the network even offline (its Python side and its service each resolve the
      telemetry host).
    - ``WANDB_DATA_DIR``, ``WANDB_CACHE_DIR``, ``WANDB_ARTIFACT_DIR``: W&B's artifact
      staging (copies of every logged file, kept for ``wandb sync``), cache and downloads
      go to ``<save_dir>/wandb/{data,cache,artifacts}`` instead of the home directory, so a
      run directory holds all of its run and deleting it frees the space.
      ``WANDB_CONFIG_DIR`` (the user's W&B settings) is left alone.

    A variable the user set is never changed; one set here for an earlier job of the same
    process (a multirun) follows the new job's directory.

    Raises:
        ValueError: ``WANDB_MODE`` holds a value pse_lightning does not know.
    """
    user_mode = _user_value("WANDB_MODE")
    if user_mode is not None:
        user_mode = _WANDB_MODE_ALIASES.get(user_mode, user_mode)
        require_choice("WANDB_MODE (environment)", user_mode, WANDB_MODES)
        if user_mode != mode:
            log.info("WANDB_MODE=%s (environment) overrides logger.mode=%s", user_mode, mode)
        mode = user_mode
    _set_own("WANDB_MODE", mode)
    _set_own("WANDB_ERROR_REPORTING", "false")
    for variable, folder in WANDB_FOLDERS.items():
        _set_own(variable, str((save_dir / "wandb" / folder).resolve()))
    return mode


def _user_value(variable: str) -> str | None:
    """The variable's value when the user set it (not this module, for an earlier job)."""
    value = os.environ.get(variable)
    return None if value is None or _OWN_ENVIRONMENT.get(variable) == value else value


def _set_own(variable: str, value: str) -> None:
    """Set ``variable`` unless the user did; remember it as set here."""
    if _user_value(variable) is None:
        os.environ[variable] = value
        _OWN_ENVIRONMENT[variable] = value


def _netrc_has_wandb() -> bool:
    netrc = Path.home() / ".netrc"
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def sweep_group(hydra_cfg: Any) -> str | None:
    """``sweep-<date>-<time>`` (the sweep directory's last two parts) in a Hydra multirun.

    Every job of one sweep gets the same group, so W&B shows them together; a single run
    gets none.

    Args:
        hydra_cfg: the job's ``hydra`` config node, as the entry point hands it down
            (:meth:`~pse_lightning.pipeline.JobContext.from_hydra`); nothing here reads
            Hydra's global state.
    """
    if not str(hydra_cfg.mode).endswith("MULTIRUN"):
        return None
    parts = Path(str(hydra_cfg.sweep.dir)).parts[-2:]
    return "sweep-" + "-".join(safe_key(p) for p in parts)


def group_choices(choices: Mapping[str, Any]) -> dict[str, str]:
    """The job's config-group choices as a user types them (``attack`` -> ``cw``): Hydra's
    own groups (``hydra/...``) and unset groups (``experiment`` null) left out, in the order
    of the defaults list (Hydra records the choices last to first)."""
    return {
        str(group): str(choice)
        for group, choice in reversed(list(choices.items()))
        if choice is not None and not str(group).startswith("hydra/")
    }


def _override_key(override: str) -> str:
    """``attack.eps`` of ``attack.eps=0.01``; ``experiment`` of ``+experiment=x``."""
    return override.split("=", 1)[0].lstrip("+~")


def command_args(choices: Mapping[str, Any], overrides: Sequence[str]) -> list[str]:
    """The arguments that rerun a job: every group choice (so a later change of a default
    cannot change the rerun), then the job's other overrides. An override of a group choice
    is already among the choices; a list of options (``analysis=[pse,cam]``), which Hydra
    leaves out of the choices, comes with the overrides."""
    chosen = group_choices(choices)
    args = [f"{group}={choice}" for group, choice in chosen.items()]
    return args + [o for o in overrides if _override_key(o) not in chosen]


def reproduce_command(choices: Mapping[str, Any], overrides: Sequence[str]) -> str:
    """``python -m pse_lightning <choices> <overrides>``, quoted for a POSIX shell."""
    args = command_args(choices, overrides)
    return " ".join(["python -m pse_lightning", *(shlex.quote(a) for a in args)])


def run_config(config: Mapping[str, Any], choices: Mapping[str, Any]) -> dict[str, Any]:
    """The W&B run config: the resolved config plus each group choice as a plain key
    (``choices/attack: cw``), since the resolved config holds only ``_target_`` paths and
    runs are filtered by what was chosen."""
    chosen = group_choices(choices)
    return {**config, **{f"choices/{group}": choice for group, choice in chosen.items()}}


def name_overrides(overrides: Sequence[str], exclude: Sequence[str] = ()) -> list[str]:
    """The overrides that tell jobs of a sweep apart, for the run name: all but the group
    choices already in the name, ``seed`` and the ``exclude`` keys (paths)."""
    named = {"attack", "model", "dataset", "training", "seed", *exclude}
    return [o for o in overrides if _override_key(o) not in named]


def run_name(
    *,
    attack: str,
    model: str,
    dataset: str,
    training: str,
    seed: int,
    overrides: Sequence[str] = (),
) -> str:
    """``<attack>-<model>-<dataset>-<training>-s<seed>``: ``cw-resnet50-imagenet-standard-s0``,
    then the job's other overrides (``-attack.eps=0.01``) so the jobs of a sweep differ."""
    parts = [attack, model, dataset, training]
    name = "-".join(safe_key(p).replace("/", "_") for p in parts) + f"-s{seed}"
    return "-".join([name, *(safe_key(o) for o in overrides)])


def safe_key(key: str) -> str:
    """A W&B key without spaces or odd characters: ``Promotion effect`` -> ``promotion_effect``.

    Keys with spaces are awkward to query and to type in W&B panels; the slash (W&B's section
    separator), dots, dashes and equals signs are kept.
    """
    return re.sub(r"[^a-z0-9_./=-]+", "_", key.strip().lower()).strip("_")


def start_run(
    logger: Logger | None,
    *,
    name: str,
    job_type: str,
    config: dict[str, Any],
    group: str | None = None,
) -> None:
    """Start the experiment logger's run for the first stage and log the resolved config.

    Called by each stage (training, then evaluation); the first call names, types and
    groups (``group``: the job's sweep group, None outside a multirun) the W&B run, later
    ones only refresh the config.
    """
    if logger is None:
        return
    if isinstance(logger, RunLogger):
        logger.set_identity(name=name, job_type=job_type, group=group)
    logger.log_hyperparams(config)


def finish_logger(
    logger: Logger | None, *, failed: bool = False, exit_code: int = 1, reason: str = ""
) -> None:
    """Close the logger's run, so the next job of a multirun starts a fresh one.

    A failed run's W&B run ends with ``exit_code`` (state ``failed``; 130 or 143 after
    ``SIGINT`` or ``SIGTERM``), the tag ``incomplete`` and ``reason`` (what stopped it) as its
    notes, so it can be filtered out of comparisons. Then its location is logged: W&B itself
    is silent (``silent``), so its banner and summary do not bury the report's path.
    """
    if isinstance(logger, WandbLogger):
        import wandb

        run = wandb.run
        if run is not None:
            if run.job_type == "evaluate":
                _drop_training_counters(run.summary)
            if failed:
                run.tags = (*run.tags, INCOMPLETE_TAG)
                if reason:
                    run.notes = f"incomplete: {reason}"
            where = _run_location(run)
            wandb.finish(exit_code=exit_code if failed else 0)
            if where:
                log.info("%s", where)
    elif logger is not None:
        logger.finalize("failed" if failed else "success")


def _run_location(run: Any) -> str:
    """Where a W&B run is kept, and how to upload it if offline ("" when disabled)."""
    if run.disabled:
        return ""
    if run.offline:
        files = Path(run.dir).parent  # <save_dir>/wandb/offline-run-<time>-<id>
        return f"W&B run saved offline in {files} (upload: wandb sync {files})"
    return f"W&B run: {run.url}"


def _drop_training_counters(summary: Any) -> None:
    """Remove ``epoch`` and ``trainer/global_step`` from an evaluation's summary.

    Lightning ties every W&B key to ``trainer/global_step`` (``define_metric(step_sync=True)``),
    so each ``log`` call writes the counter back; a run that never trained should not show
    ``global_step 0``, so the counters go just before the run closes.
    """
    present = set(summary.keys())  # wandb's Summary has no __contains__
    for key in TRAINING_COUNTERS:
        if key in present:
            del summary[key]


def log_checkpoint(logger: Logger | None, path: Path, meta: dict[str, Any]) -> None:
    """Log a trained checkpoint as a W&B ``model`` artifact carrying its identity."""
    if not isinstance(logger, WandbLogger):
        return
    from pse_lightning.reporting.wandb_run import model_artifact

    logger.experiment.log_artifact(model_artifact(path, meta))
