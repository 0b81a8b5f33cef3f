"""Compose the run's objects from the config and run its stages.

``run(cfg)`` is the whole program behind ``python -m pse_lightning``: instantiate every
component first (so a bad value fails before any heavy work), get a trained model (given
checkpoint, a ready model evaluated as it is, cached checkpoint, or train one), evaluate
it under attack with the analyses, and write the report. A ready model (pretrained
weights or ``model.weights`` whose head has the dataset's classes) is never retrained by
``stage=auto`` or ``stage=evaluate``; ``training=none`` evaluates only such a model.
The logger is finished in ``finally`` so a failed job cannot stall or merge into the next
job of a multirun. From the start of its work to its end the run directory carries the
``INCOMPLETE`` marker (:mod:`~pse_lightning.core.run_status`), naming the stage; a run that
stops early (a signal, a full disk, an error) keeps it and closes its W&B run as failed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import Checkpoint, ProgressBar
from pytorch_lightning.loggers import Logger
from torch import nn

from pse_lightning.analysis.base import Analysis
from pse_lightning.attacks import Attack
from pse_lightning.core.locks import cache_lock, single_process_world
from pse_lightning.core.run_status import TRAINING, Interrupted, RunMarker, describe
from pse_lightning.data.base import ImageDataModule
from pse_lightning.defenses.base import Defense
from pse_lightning.models.checkpoint import (
    cache_path,
    config_digest,
    load_weights,
    save_checkpoint,
)
from pse_lightning.models.classifier import Classifier
from pse_lightning.modules.evaluation import EvaluationModule
from pse_lightning.modules.progress import progress_callbacks
from pse_lightning.modules.report_writer import ReportWriter
from pse_lightning.modules.training import (
    ResumeCheckpoint,
    TrainingModule,
    check_partial_checkpoint,
    partial_checkpoint_path,
)
from pse_lightning.reporting.loggers import (
    command_args,
    finish_logger,
    log_checkpoint,
    name_overrides,
    reproduce_command,
    run_config,
    run_name,
    start_run,
    sweep_group,
)
from pse_lightning.reporting.report import flatten_params
from pse_lightning.validation import (
    InputError,
    constructor_error,
    require_at_least,
    require_choice,
    require_value,
)

log = logging.getLogger(__name__)
STAGES = ("auto", "fit", "evaluate")
# Dataset keys that change how data is served, not what the model learns from.
_SERVING_KEYS = ("batch_size", "num_workers", "eval_samples", "root", "download", "probe")


@dataclass(frozen=True)
class JobContext:
    """What the entry point knows of the job beyond its config, handed to :func:`run`.

    Attributes:
        choices: the group choices (``attack`` -> ``cw``), as Hydra records them; empty for
            the Python API (the report then names what was built).
        overrides: the job's command-line overrides as typed (``attack.eps=0.01``).
        path_keys: the keys Hydra leaves out of a job's folder name (paths), left out of
            run names too.
        group: the experiment logger's group for the jobs of one multirun
            (``sweep-<date>-<time>``, :func:`~pse_lightning.reporting.loggers.sweep_group`);
            None for a single run and the Python API.
        shared: the keys every job of the multirun was given the same value of (the command
            line's, without a sweep), left out of run names: a name says what the job varies.
    """

    choices: Mapping[str, str] = field(default_factory=dict)
    overrides: tuple[str, ...] = ()
    path_keys: tuple[str, ...] = ()
    group: str | None = None
    shared: tuple[str, ...] = ()

    @classmethod
    def from_hydra(cls, hydra_cfg: Any) -> JobContext:
        """The context of a job from its ``hydra`` config node (``HydraConfig.get()`` in the
        entry point, or a composed config's ``hydra`` node)."""
        choices = {str(k): str(v) for k, v in hydra_cfg.runtime.choices.items() if v}
        exclude = hydra_cfg.job.config.override_dirname.exclude_keys
        return cls(
            choices=choices,
            overrides=tuple(str(o) for o in hydra_cfg.overrides.task),
            path_keys=tuple(str(k) for k in exclude),
            group=sweep_group(hydra_cfg),
            shared=shared_overrides(hydra_cfg),
        )


def shared_overrides(hydra_cfg: Any) -> tuple[str, ...]:
    """The keys a multirun's command line set without a sweep (the same for every job), read
    from the sweep's ``multirun.yaml`` (Hydra writes it before the first job, for every
    launcher). Empty for a single run."""
    if sweep_group(hydra_cfg) is None:  # not a multirun
        return ()
    saved = Path(str(hydra_cfg.sweep.dir)) / "multirun.yaml"
    if not saved.is_file():
        return ()
    from hydra.core.override_parser.overrides_parser import OverridesParser

    typed = OmegaConf.select(OmegaConf.load(saved), "hydra.overrides.task", default=None) or []
    parsed = OverridesParser.create().parse_overrides([str(o) for o in typed])
    return tuple(o.key_or_group for o in parsed if not o.is_sweep_override())


@dataclass
class Components:
    """Everything a run is made of, instantiated and validated."""

    datamodule: ImageDataModule
    model: Classifier
    attack: Attack
    analyses: dict[str, Analysis]
    logger: Logger | None
    defense: Defense | None
    # The run directory's INCOMPLETE marker, once the run's work has begun (None before).
    marker: RunMarker | None = None


def _analysis_configs(cfg: DictConfig) -> dict[str, DictConfig]:
    """``analysis`` is empty (none), or maps names to analysis configs."""
    node = cfg.get("analysis")
    if node is None:
        return {}
    if "_target_" in node:
        raise ValueError(
            "the analysis group must map names to configs (analysis.pse, ...); "
            "start each single-analysis file with `# @package analysis.<name>`"
        )
    return {name: sub for name, sub in node.items() if sub is not None}


def model_name(cfg: DictConfig) -> str:
    """The architecture (torchvision), the zoo name (RobustBench) or the model class."""
    model = cfg.model
    return str(model.get("arch") or model.get("name") or model._target_.rsplit(".", 1)[-1].lower())


def build(cfg: DictConfig) -> Components:
    """Instantiate and validate every component; heavy work (data, training) comes later."""
    require_choice("stage", cfg.stage, STAGES)
    require_at_least("log_examples", cfg.log_examples, 0)
    for key in ("model_checkpoint", "paths.root"):
        require_value(key, OmegaConf.select(cfg, key))
    datamodule = instantiate(cfg.dataset)
    # The data come from data_seed (dataset.seed); the batch order is training randomness.
    datamodule.shuffle_seed = int(cfg.seed)
    attack = instantiate(cfg.attack)
    analyses = {name: instantiate(sub) for name, sub in _analysis_configs(cfg).items()}
    defense = instantiate(cfg.defense) if cfg.get("defense") else None
    logger = instantiate(cfg.logger) if cfg.get("logger") else None
    datamodule.prepare_data()
    # Evaluation needs the test split only (ImageNet: val/, train/ not even scanned);
    # training sets the rest up when it starts.
    datamodule.setup("fit" if cfg.stage == "fit" else "test")
    model = build_model(cfg, datamodule, analyses)
    return Components(datamodule, model, attack, analyses, logger, defense)


def build_model(
    cfg: DictConfig, datamodule: ImageDataModule, analyses: dict[str, Analysis]
) -> Classifier:
    """Instantiate the model for the dataset; the data adopts the transform its weights
    expect (Inception-v3: 299 px crops), and an analysis that needs a convolutional
    feature map fails now on a network without one."""
    model = instantiate(
        cfg.model,
        num_classes=datamodule.num_classes,
        in_channels=datamodule.in_channels,
        mean=list(datamodule.mean),
        std=list(datamodule.std),
        image_size=datamodule.image_size,
        class_names=list(datamodule.class_names),
    )
    prep = getattr(model, "preprocessing", None)
    adopt = getattr(datamodule, "use_preprocessing", None)
    if prep is not None and adopt is not None:
        adopt(prep.crop_size, prep.resize_size, prep.interpolation)
        log.info(
            "dataset=%s serves the weights' own transform: resize %d (%s), crop %d",
            datamodule.name,
            prep.resize_size,
            prep.interpolation,
            prep.crop_size,
        )
    note = getattr(model, "layer_note", None)
    for name in ("cam", "dissection"):
        analysis = analyses.get(name)
        if (
            note
            and analysis is not None
            and not (getattr(analysis, "layer", None) or getattr(analysis, "layers", None))
        ):
            raise ValueError(f"analysis={name}: {note}")
    return model


def checkpoint_identity(cfg: DictConfig, datamodule: ImageDataModule) -> dict[str, Any]:
    """What a cached checkpoint must match: names plus a hash of every learning-relevant key."""
    dataset = {
        k: v
        for k, v in OmegaConf.to_container(cfg.dataset, resolve=True).items()
        if k not in _SERVING_KEYS
    }
    # Data found on disk (not in the config) that defines what is learned, e.g. the class
    # folders of an ImageFolder tree: two trees at different roots must not share weights.
    content = getattr(datamodule, "content_fingerprint", None)
    if content is not None:
        dataset["content"] = content
    training = OmegaConf.to_container(cfg.training, resolve=True)
    model = {
        k: v
        for k, v in OmegaConf.to_container(cfg.model, resolve=True).items()
        if k != "download"  # where the weights came from, not which they are
    }
    return {
        "model": model_name(cfg),
        "dataset": datamodule.name,
        "training": str(cfg.training.name),
        "num_classes": datamodule.num_classes,
        "digest": config_digest(model, dataset, training, cfg.seed),
    }


def configured_callbacks(cfg: DictConfig) -> list[pl.Callback]:
    """The callbacks of the ``callbacks`` group (name -> callback config), in file order;
    a null entry (``~callbacks.lr_monitor`` or ``callbacks.lr_monitor=null``) is skipped."""
    node = cfg.get("callbacks")
    if not node:
        return []
    return [instantiate(sub) for sub in node.values() if sub is not None]


def make_trainer(cfg: DictConfig, logger: Logger | None, **overrides: Any) -> pl.Trainer:
    """The configured Trainer with the pipeline's own callbacks (``callbacks=`` here) and
    those of the ``callbacks`` config group; off a terminal, progress is a line with an ETA
    every 30 s unless a configured callback draws progress itself (``callbacks=rich_progress``).
    A configured checkpoint callback turns on ``enable_checkpointing``, which Lightning
    requires of it."""
    configured = configured_callbacks(cfg)
    progress = bool(cfg.trainer.get("enable_progress_bar", True))
    if any(isinstance(c, ProgressBar) for c in configured):
        progress = False  # the configured bar draws it; Lightning allows one
    callbacks = [*overrides.pop("callbacks", []), *configured, *progress_callbacks(progress)]
    if any(isinstance(c, Checkpoint) for c in configured):
        overrides.setdefault("enable_checkpointing", True)
    logger = logger if logger is not None else False
    return instantiate(cfg.trainer, logger=logger, callbacks=callbacks, **overrides)


def start_stage(
    cfg: DictConfig, parts: Components, job_type: str, job: JobContext | None = None
) -> None:
    """Start the logger's run for a stage: named from the job's choices (class and config
    names outside Hydra) and its other overrides (what a sweep varies), typed ``train`` or
    ``evaluate``, with the resolved config and the group choices (``choices/attack``)."""
    job = job or JobContext()
    choices = dict(job.choices)
    name = run_name(
        attack=choices.get("attack") or type(parts.attack).__name__.lower(),
        # A zoo model is named by its zoo name: the jobs of a comparison share model=robustbench.
        model=(None if cfg.model.get("name") else choices.get("model")) or model_name(cfg),
        dataset=choices.get("dataset") or parts.datamodule.name,
        training=choices.get("training") or str(cfg.training.name),
        seed=cfg.seed,
        overrides=name_overrides(list(job.overrides), [*job.path_keys, *job.shared]),
    )
    config = run_config(OmegaConf.to_container(cfg, resolve=True), choices)
    start_run(parts.logger, name=name, job_type=job_type, config=config, group=job.group)


def resume_key(cfg: DictConfig, identity: dict[str, Any]) -> dict[str, Any]:
    """What a partial (resumable) checkpoint must match: the checkpoint identity plus the
    settings outside its digest that shape how training continues (batches per epoch and
    the one-cycle schedule's length depend on them)."""
    return {
        **identity,
        "dataset.batch_size": int(cfg.dataset.batch_size),
        "trainer.devices": str(cfg.trainer.get("devices")),
        "trainer.num_nodes": str(cfg.trainer.get("num_nodes", 1)),
        "trainer.limit_train_batches": str(cfg.trainer.get("limit_train_batches")),
    }


def log_interval(cfg: DictConfig, batches: int) -> dict[str, int]:
    """``log_every_n_steps`` lowered to an epoch's training batches when it is longer (so
    every epoch logs its training metrics, and Lightning does not warn), with a notice;
    otherwise no override."""
    every = cfg.trainer.get("log_every_n_steps")
    limit = cfg.trainer.get("limit_train_batches")
    if isinstance(limit, int) and not isinstance(limit, bool):
        batches = min(batches, limit)
    elif isinstance(limit, float):
        batches = int(batches * limit)
    devices = cfg.trainer.get("devices")
    if isinstance(devices, int) and devices > 1:  # each process trains on its share
        batches = -(-batches // devices)
    if every is None or batches < 1 or int(every) <= batches:
        return {}
    log.info(
        "training metrics logged every %d steps, once per epoch (trainer.log_every_n_steps=%d "
        "is more than the %d batches of an epoch)",
        batches,
        every,
        batches,
    )
    return {"log_every_n_steps": batches}


def fit(
    cfg: DictConfig,
    parts: Components,
    path: Path,
    identity: dict[str, Any],
    job: JobContext | None = None,
) -> None:
    """Train the model with the configured objective and cache its weights at ``path``.

    A full trainer checkpoint is kept beside ``path`` while training (see
    :func:`~pse_lightning.modules.training.partial_checkpoint_path`); with ``resume=true`` an
    interrupted training continues from it. With ``resume=true`` and no partial checkpoint,
    training starts from scratch: the same command then serves the first submission and every
    requeue of a preemptible job. The partial checkpoint is removed once ``path`` is written.
    """
    require_at_least("training.epochs", cfg.training.epochs, 1)
    module = TrainingModule(
        parts.model,
        objective=instantiate(cfg.training.objective),
        optimizer=instantiate(cfg.training.optimizer),
        scheduler=instantiate(cfg.training.scheduler) if cfg.training.get("scheduler") else None,
    )
    partial, key = partial_checkpoint_path(path), resume_key(cfg, identity)
    ckpt_path = None
    if cfg.get("resume", False) and partial.exists():
        epochs_done = check_partial_checkpoint(partial, key)
        log.info(
            "resuming training from %s (%d of %d epochs done)",
            partial,
            epochs_done,
            cfg.training.epochs,
        )
        ckpt_path = str(partial)
    elif cfg.get("resume", False):
        log.info("resume=true, but no partial checkpoint at %s: training from scratch", partial)
    elif partial.exists():
        log.info(
            "an interrupted training left %s; starting over (resume=true continues it)", partial
        )
    if parts.marker is not None:
        parts.marker.enter(TRAINING)
    start_stage(cfg, parts, "train", job)
    trainer = make_trainer(
        cfg,
        parts.logger,
        max_epochs=cfg.training.epochs,
        callbacks=[ResumeCheckpoint(partial, key)],
        **log_interval(cfg, len(parts.datamodule.train_dataloader())),
    )
    # weights_only: the partial checkpoint is data (tensors, numbers, strings), never code.
    trainer.fit(module, datamodule=parts.datamodule, ckpt_path=ckpt_path, weights_only=True)
    val_acc = trainer.callback_metrics.get("val/acc")
    meta = {**identity, "val_acc": None if val_acc is None else float(val_acc)}
    if trainer.is_global_zero:
        save_checkpoint(path, parts.model, meta)
        partial.unlink(missing_ok=True)
        log.info("checkpoint saved to %s (val/acc %s)", path, meta["val_acc"])
        log_checkpoint(parts.logger, path, meta)


def defend(parts: Components) -> tuple[nn.Module, dict[str, Analysis]]:
    """Calibrate the defense on the validation split and apply it.

    Returns the defended model (evaluated next, so the attack is adaptive: it differentiates
    through the defense) and the defense's own evaluation (its controls and curve), an
    analysis that runs in the same test pass and writes its own report section.
    """
    defense, model = parts.defense, parts.model
    if defense.name in parts.analyses:
        raise ValueError(
            f"analysis.{defense.name} clashes with the defense's own section; "
            "rename the analysis or choose another defense"
        )
    calibration = defense.calibrate(model, parts.attack, parts.datamodule.val_dataloader())
    log.info("defense %s: %s", defense.name, defense.describe(calibration))
    evaluation = defense.evaluation(model, parts.attack, calibration)
    extra = {} if evaluation is None else {defense.name: evaluation}
    return defense.apply(model, calibration), extra


def report_setup(
    cfg: DictConfig, parts: Components, job: JobContext | None = None
) -> dict[str, str | None]:
    """The report's setup as ``key=value`` entries that paste back onto the command line:
    the group choices and overrides as typed (:func:`command_args`; outside Hydra, the
    components' names), then the attack's and defense's parameters and the seed, without
    Hydra's ``_target_``."""
    job = job or JobContext()
    choices, overrides = dict(job.choices), list(job.overrides)
    if choices or overrides:
        # ``~group`` (a deletion) has no value: kept as a key alone
        setup = {k: v if eq else None for k, eq, v in
                 (arg.partition("=") for arg in command_args(choices, overrides))}  # fmt: skip
    else:  # the Python API: no choices to quote, so name what was built
        setup = {
            "dataset": parts.datamodule.name,
            "model": model_name(cfg),
            "training": str(cfg.training.name),
            "attack": type(parts.attack).__name__.lower(),
            "analysis": "[" + ",".join(parts.analyses) + "]" if parts.analyses else "none",
            "defense": "none" if parts.defense is None else type(parts.defense).__name__.lower(),
        }
    setup.update(flatten_params("attack", OmegaConf.to_container(cfg.attack, resolve=True)))
    if parts.defense is not None:
        setup.update(flatten_params("defense", OmegaConf.to_container(cfg.defense, resolve=True)))
    setup["seed"] = str(cfg.seed)
    return setup


def reproduce(job: JobContext | None = None) -> str:
    """The command line that reruns this job (empty outside Hydra: nothing was typed)."""
    job = job or JobContext()
    if not (job.choices or job.overrides):
        return ""
    return reproduce_command(dict(job.choices), list(job.overrides))


def evaluate(
    cfg: DictConfig, parts: Components, checkpoint: Path | str, job: JobContext | None = None
) -> dict[str, float]:
    """Attack the test split, run the analyses and write the report; returns the scalars."""
    run_dir = Path(cfg.paths.run_dir)
    if parts.marker is not None:
        parts.marker.enter("evaluation")
    model, defense_analyses = parts.model, {}
    if parts.defense is not None:
        model, defense_analyses = defend(parts)
    analyses = {**defense_analyses, **parts.analyses}
    writer = ReportWriter(
        run_dir,
        analyses=analyses,
        title=f"{parts.attack.name} on {model_name(cfg)} / {parts.datamodule.name}",
        setup=report_setup(cfg, parts, job),
        reproduce=reproduce(job),
        checkpoint=str(checkpoint),
        class_names=getattr(parts.model, "class_names", None) or parts.datamodule.class_names,
        budget=None if parts.attack.norm is None else (parts.attack.norm, parts.attack.eps),
        marker=parts.marker,
    )
    module = EvaluationModule(
        model, parts.attack, analyses, log_examples=cfg.log_examples, on_result=writer.receive
    )
    start_stage(cfg, parts, "evaluate", job)
    trainer = make_trainer(cfg, parts.logger, callbacks=[writer])
    # trainer.test returns rank zero's logged metrics on every strategy, ddp_spawn included
    # (whose workers' module objects never come back to this process).
    (logged,) = trainer.test(module, datamodule=parts.datamodule, verbose=False)
    return {key: float(value) for key, value in logged.items()}


def not_ready_error(cfg: DictConfig, model: Classifier, dataset: ImageDataModule) -> str:
    """Why ``training=none`` cannot evaluate this model, and which way to go."""
    source = getattr(model, "source", None)
    if source:
        return (
            f"training=none evaluates a ready model, but the head of {source} does not have "
            f"the {dataset.num_classes} classes of dataset={dataset.name}: fine-tune it "
            "(training=standard) or pass training=none with the dataset of its classes"
        )
    return (
        f"training=none evaluates a ready model, but model={model_name(cfg)} has no trained "
        "weights: pass model.pretrained=true, model.weights=<file> or "
        "model_checkpoint=<file>, or train it (training=standard)"
    )


def trained_model(cfg: DictConfig, parts: Components, job: JobContext | None = None) -> Path | str:
    """Load, keep or train the model's weights; returns where they came from.

    A given ``model_checkpoint`` is loaded; a ready model is kept as it is (never
    retrained, and no cache is looked up); otherwise the cache is loaded, or, with
    ``stage=auto`` and no cache entry, the model is trained first.
    """
    no_training = str(cfg.training.name) == "none"
    if cfg.stage == "fit" and (cfg.model_checkpoint or no_training):
        raise ValueError(
            "stage=fit trains a new model: drop model_checkpoint=... and pick a training "
            "(training=standard); stage=evaluate evaluates a model as it is"
        )
    if cfg.model_checkpoint:
        checkpoint = Path(cfg.model_checkpoint)
        expect = {"model": model_name(cfg), "num_classes": parts.datamodule.num_classes}
        load_weights(parts.model, checkpoint, expect=expect)
        log.info("loaded %s", checkpoint)
        return checkpoint
    if cfg.stage != "fit" and getattr(parts.model, "ready", False):
        log.info("%s is ready: evaluating it as it is (no training)", parts.model.source)
        return str(parts.model.source)
    if no_training:
        raise ValueError(not_ready_error(cfg, parts.model, parts.datamodule))
    identity = checkpoint_identity(cfg, parts.datamodule)
    checkpoint = cache_path(
        cfg.paths.checkpoint_dir,
        identity["model"],
        identity["dataset"],
        identity["training"],
        identity["digest"],
    )
    if cfg.stage == "fit" or (cfg.stage == "auto" and not checkpoint.exists()):
        with training_lock(checkpoint):
            # A job that waited for the lock finds the model another job trained meanwhile.
            if cfg.stage == "fit" or not checkpoint.exists():
                if cfg.stage == "auto":
                    log.info(
                        "no trained model cached at %s: training it first (stage=fit)",
                        checkpoint,
                    )
                parts.datamodule.setup("fit")
                fit(cfg, parts, checkpoint, identity, job)
                return checkpoint
            log.info("another job has trained this model meanwhile")
    load_weights(
        parts.model, checkpoint, expect={k: identity[k] for k in ("model", "num_classes")}
    )
    log.info("loaded %s", checkpoint)
    return checkpoint


def training_lock(checkpoint: Path) -> AbstractContextManager[None]:
    """The checkpoint cache entry's lock, held while its model trains, so a concurrent job
    that needs the same model waits for it instead of training it again. Under DDP only the
    launching process takes it (the ranks train together); ranks started from outside
    (torchrun, SLURM tasks) take none."""
    if not single_process_world():
        return nullcontext()
    return cache_lock(checkpoint, "to finish training this model")


def run(cfg: DictConfig, job: JobContext | None = None) -> dict[str, float]:
    """Run the configured stages; see the module docstring. ``job``: what the entry point
    knows of the job (its choices and overrides as typed, for the report's setup, the
    Reproduce line and the run name); None for the Python API."""
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    try:
        parts = build(cfg)
    except InstantiationException as err:
        raise constructor_error(err) from err
    except (ValueError, TypeError, FileNotFoundError) as err:
        # Bad values the config check cannot see and missing data: the user's to fix.
        raise InputError(str(err)) from err
    parts.marker = marker = RunMarker(cfg.paths.run_dir, rerun=reproduce(job))
    try:
        marker.enter("loading the model")
        checkpoint = trained_model(cfg, parts, job)
        results: dict[str, float] = {}
        if cfg.stage in ("auto", "evaluate"):
            if parts.defense is not None:
                parts.datamodule.setup("fit")  # the defense calibrates on the val split
            results = evaluate(cfg, parts, checkpoint, job)
        marker.enter("closing the run")
    except BaseException as err:
        marker.fail(err)
        exit_code = err.exit_code if isinstance(err, Interrupted) else 1
        finish_logger(parts.logger, failed=True, exit_code=exit_code, reason=describe(err))
        raise
    try:
        finish_logger(parts.logger)
    except BaseException as err:
        marker.fail(err)
        raise
    marker.complete()
    return results
