"""pse_lightning: interpreting adversarial examples by activation promotion and suppression.

The public Python API (docs/API.md) is importable from here: attacks, analyses, models and
data modules. The names are resolved on first use, so ``import pse_lightning`` (and the
CLI's ``--help``) stays fast: torch is imported only when an object is needed.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    **dict.fromkeys(
        (
            "Attack",
            "AttackResult",
            "FGSM",
            "PGD",
            "APGD",
            "CWL2",
            "EAD",
            "DDN",
            "FMN",
            "StrAttack",
            "Square",
            "AutoAttack",
            "CAMGuided",
        ),
        "pse_lightning.attacks",
    ),
    **dict.fromkeys(
        ("AdversarialBatch", "Analysis", "AnalysisResult"), "pse_lightning.analysis.base"
    ),
    "PSE": "pse_lightning.analysis.pse",
    "CAMAnalysis": "pse_lightning.analysis.cam",
    "Dissection": "pse_lightning.analysis.dissection",
    **dict.fromkeys(
        (
            "Classifier",
            "SmallCNN",
            "TorchvisionClassifier",
            "load_weights",
            "save_checkpoint",
            "CheckpointError",
        ),
        "pse_lightning.models",
    ),
    **dict.fromkeys(
        (
            "ImageDataModule",
            "ShapesDataModule",
            "DigitsDataModule",
            "CIFAR10DataModule",
            "MNISTDataModule",
            "ImageNetDataModule",
            "BrodenDataModule",
        ),
        "pse_lightning.data",
    ),
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pse_lightning' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
