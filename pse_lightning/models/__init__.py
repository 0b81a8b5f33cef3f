"""Models take [0, 1] images; normalisation, hook names and heads live on the model."""

from pse_lightning.models.checkpoint import CheckpointError, load_weights, save_checkpoint
from pse_lightning.models.classifier import Classifier
from pse_lightning.models.small_cnn import SmallCNN
from pse_lightning.models.torchvision_nets import TorchvisionClassifier
from pse_lightning.models.zoo import RobustBenchClassifier

__all__ = [
    "CheckpointError",
    "Classifier",
    "RobustBenchClassifier",
    "SmallCNN",
    "TorchvisionClassifier",
    "load_weights",
    "save_checkpoint",
]
