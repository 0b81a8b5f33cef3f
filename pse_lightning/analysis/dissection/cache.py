"""The probe pass's temporary on-disk cache of activations and concept labels."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


def _label_dtype(concepts: int) -> torch.dtype:
    if concepts < 1 << 8:
        return torch.uint8
    if concepts < 1 << 15:
        return torch.int16
    return torch.int32


class ActivationCache:
    """The dissected layers' activations and the probe labels of this process's shard, in
    append-only files of a temporary directory that :meth:`close` deletes.

    One forward pass fills it; the later threshold passes and the IoU pass read it back
    batch by batch instead of running the model again (NetDissect-Lite caches features the
    same way). Files are read with ``readinto`` into a fresh buffer per batch, not memory-
    mapped, so resident memory stays at one batch whatever the probe set's size; disk use
    is the activations' float32 size plus the labels (1 byte per pixel and category below
    256 concepts).

    Args:
        layers: the layer names, in the order their activations are appended.
        concepts: C, which picks the labels' storage type.
        directory: where the temporary directory goes (None: the system's default).
    """

    def __init__(self, layers: Sequence[str], concepts: int, directory: str | None) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="pse-dissection-", dir=directory)
        root = Path(self._dir.name)
        self.layers = list(layers)
        self.label_dtype = _label_dtype(concepts)
        self._files = {
            name: open(root / f"layer{i}.f32", "w+b")  # noqa: SIM115 - closed in close()
            for i, name in enumerate(self.layers)
        }
        self._labels = open(root / "labels.bin", "w+b")  # noqa: SIM115
        self._index = open(root / "index.i64", "w+b")  # noqa: SIM115
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._label_shape: tuple[int, ...] = ()
        self.lengths: list[int] = []  # images per cached batch (a few ints per batch)

    def append(self, acts: dict[str, Tensor], labels: Tensor, index: Tensor) -> None:
        """Write one batch: activations (N, K, h, w), labels (N, G, H, W), index (N,)."""
        try:
            for name in self.layers:
                a = acts[name].detach().float().contiguous().cpu()
                self._shapes[name] = tuple(a.shape[1:])
                self._files[name].write(a.numpy().data)
            lab = labels.to(self.label_dtype).contiguous().cpu()
            self._label_shape = tuple(lab.shape[1:])
            self._labels.write(lab.numpy().data)
            self._index.write(index.to(torch.int64).contiguous().cpu().numpy().data)
        except OSError as err:
            raise OSError(
                f"dissection could not write its activation cache in {self._dir.name} "
                f"({err}); free disk space, point analysis.cache_dir at a larger disk, or "
                "set analysis.cache_features=false to run the model in every probe pass"
            ) from err
        self.lengths.append(len(index))

    @staticmethod
    def _read(file: Any, dtype: torch.dtype, shape: tuple[int, ...]) -> Tensor:
        out = torch.empty(shape, dtype=dtype)
        view = memoryview(out.numpy()).cast("B")
        if file.readinto(view) != len(view):
            raise RuntimeError("dissection's activation cache is shorter than written")
        return out

    def batches(
        self, device: torch.device, labels: bool
    ) -> Iterator[tuple[dict[str, Tensor], Tensor | None, Tensor]]:
        """Read the batches back in order: (activations, labels or None, index)."""
        for file in (*self._files.values(), self._labels, self._index):
            file.flush()
            file.seek(0)
        for n in self.lengths:
            acts = {
                name: self._read(self._files[name], torch.float32, (n, *self._shapes[name])).to(
                    device
                )
                for name in self.layers
            }
            lab = None
            if labels:
                lab = self._read(self._labels, self.label_dtype, (n, *self._label_shape))
                lab = lab.to(device).long()
            index = self._read(self._index, torch.int64, (n,)).to(device)
            yield acts, lab, index

    def close(self) -> None:
        for file in (*self._files.values(), self._labels, self._index):
            file.close()
        self._dir.cleanup()
