"""Datamodules: batches (x in [0, 1], y, index); shapes and Broden also yield concept masks."""

from pse_lightning.data.base import Concept, ImageDataModule, IndexedTensorDataset
from pse_lightning.data.broden import BrodenDataModule
from pse_lightning.data.cifar10 import CIFAR10DataModule
from pse_lightning.data.digits import DigitsDataModule
from pse_lightning.data.imagenet import ImageNetDataModule
from pse_lightning.data.mnist import MNISTDataModule
from pse_lightning.data.shapes import ShapesDataModule

__all__ = [
    "BrodenDataModule",
    "CIFAR10DataModule",
    "Concept",
    "DigitsDataModule",
    "ImageDataModule",
    "ImageNetDataModule",
    "IndexedTensorDataset",
    "MNISTDataModule",
    "ShapesDataModule",
]
