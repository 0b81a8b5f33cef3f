"""Datamodules: batches (x in [0, 1], y, index); shapes also yields concept masks."""

from pse_lightning.data.base import Concept, ImageDataModule, IndexedTensorDataset
from pse_lightning.data.digits import DigitsDataModule
from pse_lightning.data.shapes import ShapesDataModule

__all__ = [
    "Concept",
    "DigitsDataModule",
    "ImageDataModule",
    "IndexedTensorDataset",
    "ShapesDataModule",
]
