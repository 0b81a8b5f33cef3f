"""Checks of what the config points at outside itself: the accelerator, the output folders,
the checkpoint, the data root (and a sample of its files), a zoo model's weights file, and
the model itself.

They run after the config check and before the run directory, the data and any W&B run,
so a machine without a GPU, a wrong checkpoint path, a read-only or full ``paths.root``, a
data root with unreadable files or a layer the model lacks costs seconds, not a data
set-up or a training, and leaves nothing behind. The model is built (without data) to check
the CAM, dissection, defense and objective layers, the checkpoint's weights and that an
evaluation has a model to evaluate.
"""

from __future__ import annotations

import difflib
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pse_lightning.validation import (
    InputError,
    constructor_error,
    refused_load,
    weights_file_problem,
)

_GPU_ACCELERATORS = ("gpu", "cuda")
_ZOO_MODEL = ".RobustBenchClassifier"
#: Free space a run needs under each output folder before it starts: its run directory,
#: a checkpoint, generated data. Less fails at once instead of in the middle of a report.
MIN_FREE_BYTES = 256 * 2**20
#: The output folders checked for writability and free space, with their keys.
OUTPUT_KEYS = ("paths.root", "paths.data_dir", "paths.checkpoint_dir")


def check_environment(cfg: DictConfig, trainer_choice: str | None) -> None:
    """Raise :class:`InputError` when the trainer's accelerator, an output folder, the
    checkpoint, the data or the model is unusable."""
    trainer = cfg.get("trainer")
    if isinstance(trainer, DictConfig):
        check_accelerator(trainer, trainer_choice)
    check_output_dirs(cfg)
    if cfg.get("model_checkpoint"):
        check_checkpoint(Path(str(cfg.model_checkpoint)))
    model = cfg.get("model")
    if isinstance(model, DictConfig) and str(model.get("_target_", "")).endswith(_ZOO_MODEL):
        check_zoo_weights(model)
    check_components(cfg)
    dataset = cfg.get("dataset")
    datamodule = check_data_root(dataset) if isinstance(dataset, DictConfig) else None
    if datamodule is not None and isinstance(model, DictConfig) and "_target_" in model:
        check_model(cfg, datamodule)


#: The components built from the config alone (no data, no model): their constructors'
#: own checks run here, as the pipeline would run them after the run directory exists.
COMPONENT_KEYS = ("attack", "defense", "training.objective")


def check_components(cfg: DictConfig) -> None:
    """Instantiate the attack, each analysis, the defense and the training objective, so
    every constructor check (also those the static config check cannot read) runs now."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    nodes = [(key, OmegaConf.select(cfg, key, default=None)) for key in COMPONENT_KEYS]
    analysis = cfg.get("analysis")
    if isinstance(analysis, DictConfig) and "_target_" not in analysis:
        nodes += [(f"analysis.{name}", node) for name, node in analysis.items()]
    for _key, node in nodes:
        if not isinstance(node, DictConfig) or "_target_" not in node:
            continue
        try:
            instantiate(node)
        except InstantiationException as err:
            raise constructor_error(err) from err
        except (ValueError, TypeError) as err:
            raise InputError(str(err)) from err


def _resolved(cfg: DictConfig, key: str) -> object:
    """``cfg.<key>`` resolved, or None when it cannot be resolved yet (``${hydra:...}``)."""
    try:
        return OmegaConf.select(cfg, key, default=None)
    except OmegaConfBaseException:
        return None


def check_output_dirs(cfg: DictConfig) -> None:
    """``paths.root`` (and the data and checkpoint caches) must be a directory, or a path
    that can be created as one, writable, with :data:`MIN_FREE_BYTES` free."""
    seen: set[Path] = set()
    for key in OUTPUT_KEYS:
        value = _resolved(cfg, key)
        if not isinstance(value, str) or not value.strip():
            continue  # unset, or empty (check_required_values says so)
        path = Path(value).expanduser().absolute()
        if path not in seen:
            seen.add(path)
            problem = output_dir_problem(key, path)
            if problem is not None:
                raise InputError(problem)


def output_dir_problem(key: str, path: Path, min_free: int = MIN_FREE_BYTES) -> str | None:
    """Why the run could not write under ``path`` (given as ``key``), or None."""
    where = f"{key}={path}"
    existing = path
    while not existing.exists() and not existing.is_symlink():
        existing = existing.parent
    if not existing.is_dir():
        what = "a file" if existing.is_file() else "not a directory"
        at = "" if existing == path else f" ({existing} on its way)"
        return f"{where} is {what}{at}: pass a directory (or a path that can be created as one)"
    if not os.access(existing, os.W_OK | os.X_OK):
        at = "" if existing == path else f" (the nearest existing folder, {existing})"
        return (
            f"{where} is not writable{at} for this user: pass a directory you can write to "
            f"(paths.root=<dir>), or make it writable (chmod u+w {existing})"
        )
    free = shutil.disk_usage(existing).free
    if free < min_free:
        return (
            f"{where} has {free / 2**20:.0f} MiB free; a run needs at least "
            f"{min_free / 2**20:.0f} MiB (run directory, data and checkpoint caches): free "
            "some space or pass a folder on another disk (paths.root=<dir>)"
        )
    return None


def check_data_root(dataset: DictConfig) -> Any:
    """Instantiate the datamodule (cheap: no data is read) and return it.

    A dataset read from ``dataset.root`` (and a probe from ``dataset.probe.root``) must find
    its files there: the datamodule's own layout check (``check_layout`` or
    ``check_files``), which only looks at the disk, then its ``check_readable`` on a sample
    of the files (a few images per class of an image tree, the checksums of torchvision's
    files). Generated datasets (shapes, digits) are left to the run, and so is a dataset
    that will download its missing files (``dataset.download=true``).
    """
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        datamodule = instantiate(dataset)
    except InstantiationException as err:
        raise constructor_error(err) from err
    except (ValueError, TypeError) as err:
        raise InputError(str(err)) from err
    if "root" not in dataset and not isinstance(dataset.get("probe"), DictConfig):
        return datamodule
    parts = [datamodule] if not getattr(datamodule, "download", False) else []
    probe = getattr(datamodule, "probe", None)
    if probe is not None and not getattr(probe, "download", False):
        parts.append(probe)
    try:
        for part in parts:
            # Only the layout check: a generated dataset (shapes, digits) has none, and is
            # generated by the run, into its log, not here.
            check = getattr(part, "check_layout", None) or getattr(part, "check_files", None)
            if check is not None:
                check()
        for part in parts:
            readable = getattr(part, "check_readable", None)
            if readable is not None:
                readable()
    except FileNotFoundError as err:
        raise InputError(str(err)) from err
    return datamodule


def dataset_facts(datamodule: Any) -> dict[str, Any]:
    """What the model is built from (as the pipeline passes it), without loading data; an
    image tree's classes are its folder names."""
    try:
        names = list(datamodule.class_names)
    except RuntimeError:  # known after setup only: read the class folders instead
        names = list(datamodule.scan_classes())
    return {
        "num_classes": len(names) if names else datamodule.num_classes,
        "in_channels": datamodule.in_channels,
        "mean": list(datamodule.mean),
        "std": list(datamodule.std),
        "image_size": datamodule.image_size,
        "class_names": names,
    }


def check_model(cfg: DictConfig, datamodule: Any) -> None:
    """Build the model (no data) and check what the run will ask of it: the layers the
    analyses, the defense and the training objective hook, the checkpoint's weights, and,
    for an evaluation, that there is a trained model to evaluate."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        with warnings.catch_warnings():  # the pipeline builds it again, and warns then
            warnings.simplefilter("ignore")
            model = instantiate(cfg.model, **dataset_facts(datamodule))
    except InstantiationException as err:
        raise constructor_error(err) from err
    except (ValueError, TypeError, FileNotFoundError) as err:
        raise InputError(str(err)) from err
    check_layers(cfg, model)
    if cfg.get("model_checkpoint"):
        from pse_lightning.pipeline import load_weights

        path = Path(str(cfg.model_checkpoint)).expanduser()
        expect = {"model": _model_name(cfg), "num_classes": model.num_classes}
        try:
            load_weights(model, path, expect=expect)
        except InputError as err:  # CheckpointError: corrupt, another model, wrong keys
            raise InputError(f"model_checkpoint: {err}") from err
        return
    check_something_to_evaluate(cfg, model, datamodule)


def _model_name(cfg: DictConfig) -> str:
    model = cfg.model
    return str(model.get("arch") or model.get("name") or model._target_.rsplit(".", 1)[-1].lower())


def configured_layers(cfg: DictConfig) -> list[tuple[str, str]]:
    """(key, dotted layer name) of every layer the config names for hooking."""
    found = []
    for key in ("analysis.cam.layer", "defense.layer", "training.objective.layer"):
        value = _resolved(cfg, key)
        if isinstance(value, str) and value:
            found.append((key, value))
    layers = _resolved(cfg, "analysis.dissection.layers")
    if isinstance(layers, str):
        layers = [layers]
    for i, name in enumerate(layers or []):
        found.append((f"analysis.dissection.layers[{i}]", str(name)))
    return found


def check_layers(cfg: DictConfig, model: Any) -> None:
    """Every configured layer must be a submodule of the built model."""
    names = [name for name, _ in model.named_modules() if name]
    for key, layer in configured_layers(cfg):
        try:
            model.get_submodule(layer)
        except AttributeError:
            close = difflib.get_close_matches(layer, names, n=3, cutoff=0.6)
            default = getattr(model, "feature_layer", None)
            if key.startswith("analysis.dissection"):
                default = ",".join(getattr(model, "dissection_layers", ()) or ()) or None
            advice = f"did you mean {' or '.join(close)}? " if close else ""
            fallback = f" (its own: {default})" if default else ""
            raise InputError(
                f"{key}={layer} is not a layer of model={_model_name(cfg)}: {advice}pass "
                f"a dotted module name of the model, or null for the model's default{fallback}"
            ) from None


class NothingToEvaluate(InputError):
    """``stage=evaluate`` with no model cached for the config (nor given, nor ready)."""


def check_something_to_evaluate(cfg: DictConfig, model: Any, datamodule: Any) -> None:
    """``training=none`` needs a ready model; ``stage=evaluate`` a ready or cached one."""
    stage = str(cfg.get("stage", "auto"))
    training = cfg.get("training")
    no_training = isinstance(training, DictConfig) and str(training.get("name")) == "none"
    if stage == "fit" or getattr(model, "ready", False):
        return
    if no_training:
        from pse_lightning.pipeline import not_ready_error

        raise InputError(not_ready_error(cfg, model, datamodule))
    if stage == "evaluate" and not cached_model_may_exist(cfg, datamodule):
        raise NothingToEvaluate(
            f"stage=evaluate evaluates a trained model, but none is cached under "
            f"paths.checkpoint_dir={cfg.paths.checkpoint_dir} for this model, dataset, "
            "training and seed: train it first (stage=auto or stage=fit with the same "
            "settings), or pass model_checkpoint=<file>"
        )


def cached_model_may_exist(cfg: DictConfig, datamodule: Any) -> bool:
    """Whether the checkpoint cache may hold this run's model: its exact entry, or, for a
    dataset whose identity includes its files (an image tree, scanned only by the run),
    any entry of the same model, dataset and training."""
    from pse_lightning.pipeline import cache_path

    root = Path(str(cfg.paths.checkpoint_dir)).expanduser()
    if hasattr(type(datamodule), "content_fingerprint"):
        prefix = f"{_model_name(cfg)}-{datamodule.name}-{cfg.training.name}-"
        return root.is_dir() and any(root.glob(f"{prefix}*.pt"))
    from pse_lightning.pipeline import checkpoint_identity

    identity = checkpoint_identity(cfg, datamodule)
    keys = ("model", "dataset", "training", "digest")
    return cache_path(root, *(identity[k] for k in keys)).exists()


def check_accelerator(trainer: DictConfig, choice: str | None) -> None:
    """A GPU trainer needs as many CUDA devices as ``trainer.devices`` asks for."""
    accelerator = str(trainer.get("accelerator", "auto"))
    if accelerator not in _GPU_ACCELERATORS:
        return
    import torch

    where = f"trainer={choice} (trainer.accelerator={accelerator})"
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if available == 0:
        build = "a CPU-only build" if torch.version.cuda is None else "a CUDA build"
        raise InputError(
            f"{where} needs a CUDA GPU, but torch {torch.__version__} ({build}) sees none: "
            "use trainer=cpu (or trainer=ddp_cpu), or on a GPU machine install a CUDA build "
            "of torch (README: GPU installation)"
        )
    devices = trainer.get("devices")
    if isinstance(devices, int) and not isinstance(devices, bool) and devices > available:
        raise InputError(
            f"{where} asks for trainer.devices={devices}, but {available} GPU(s) are visible: "
            f"set trainer.devices={available} (or trainer.devices=-1 for all)"
        )


def check_checkpoint(path: Path) -> None:
    """``model_checkpoint`` must be a file torch can read as weights."""
    problem = weights_file_problem("model_checkpoint", path)
    if problem is not None:
        raise InputError(problem)
    import torch

    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch raises many types for foreign or damaged files
        raise InputError(refused_load(f"model_checkpoint={path}", err)) from err
    if not isinstance(payload, dict):
        raise InputError(
            f"model_checkpoint={path} holds a {type(payload).__name__}, not weights: pass a "
            "state_dict saved with torch.save(model.state_dict(), path) or a file written "
            "by stage=fit"
        )


def check_zoo_weights(model: DictConfig) -> None:
    """A RobustBench zoo model's weights file must be on disk unless it may be downloaded."""
    if model.get("download"):
        return
    from pse_lightning.core.zoo_files import missing_zoo_weights, zoo_weights_file

    path = zoo_weights_file(
        model.get("model_dir"), str(model.dataset), str(model.threat_model), str(model.name)
    )
    if not path.is_file():
        raise InputError(missing_zoo_weights(path, str(model.name)))
