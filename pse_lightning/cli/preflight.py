"""Checks of what the config points at outside itself: the accelerator, the checkpoint and
a zoo model's weights file.

They run after the config check and before the run directory, the data and any W&B run,
so a machine without a GPU or a wrong checkpoint path costs a second, not a data set-up,
and leaves nothing behind. They import torch, but only when the config needs them.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

from omegaconf import DictConfig

from pse_lightning.validation import InputError

_GPU_ACCELERATORS = ("gpu", "cuda")
_ZOO_MODEL = ".RobustBenchClassifier"


def check_environment(cfg: DictConfig, trainer_choice: str | None) -> None:
    """Raise :class:`InputError` when the trainer's accelerator or the checkpoint is unusable."""
    trainer = cfg.get("trainer")
    if isinstance(trainer, DictConfig):
        check_accelerator(trainer, trainer_choice)
    if cfg.get("model_checkpoint"):
        check_checkpoint(Path(str(cfg.model_checkpoint)))
    model = cfg.get("model")
    if isinstance(model, DictConfig) and str(model.get("_target_", "")).endswith(_ZOO_MODEL):
        check_zoo_weights(model)


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
    if not path.is_file():
        raise InputError(
            f"model_checkpoint={path}: no such file; pass the path of a weights file (a "
            "training run writes outputs/checkpoints/<model>-<dataset>-<training>-*.pt), or "
            "drop model_checkpoint to use the cached model or train one"
        )
    if not zipfile.is_zipfile(path):
        raise InputError(
            f"model_checkpoint={path} is not a PyTorch weights file (torch.save writes a zip "
            "archive; this file is not one: truncated, or another format): pass an intact "
            "file, or train a new one with stage=fit"
        )
    import torch

    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch raises many types for foreign or damaged files
        raise InputError(
            f"model_checkpoint={path} cannot be read as weights ({_reason(err)}): pass a "
            "state_dict saved with torch.save(model.state_dict(), path) or a file written by "
            "stage=fit"
        ) from err
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


def _reason(err: Exception) -> str:
    """The informative line of torch's load error (not its advice on ``weights_only``)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    useful = [line for line in lines if "Unsupported" in line or "failed" in line.lower()]
    line = (useful or lines or [""])[-1]
    return f"{type(err).__name__}: {line[:160]}"
