"""Network dissection of hidden units and their sensitivity to adversarial examples.

``prepare`` dissects the chosen layers on the probe set (Bau et al., 2017; docs/METHODS.md §4):
exact per-unit top-quantile thresholds in streaming radix passes, then one pass of IoU
tallies between upsampled activation masks and concept masks. The model runs once per probe
image, stopped after the deepest dissected layer; the later passes read the activations
back from a temporary on-disk cache (``cache_features``). Every tally is an integer sum,
min or max reduced with ``all_reduce``, so one process and N processes give the same
thresholds and IoUs bit for bit, and memory does not grow with the probe set.

``update`` accumulates each unit's activation change between clean and adversarial
inputs (promotion and suppression, plus the exact unit-level PSE at the feature layer of a
GAP + linear net), and ``compute`` relates sensitivity and interpretability: Spearman's
rho with a permutation p-value and a Poisson-bootstrap CI over images, Mann–Whitney U
between interpretable and other units, enrichment of interpretable units among the most
sensitive, and the same per concept category.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from pse_lightning.analysis.base import AdversarialBatch, Analysis, AnalysisResult, ReportSection
from pse_lightning.analysis.functional.dissection import (
    SENSITIVITY_ROWS,
    IoUTally,
    RadixQuantile,
    activation_masks,
    add_sparse_tally,
    best_concepts,
    category_iou,
    empty_tally,
    hot_bounds,
    hypergeom_sf,
    iou_from_tally,
    label_area,
    mann_whitney_u,
    mask_thresholds,
    merge_top,
    permutation_pvalue,
    poisson_weights,
    sensitivity_from_sums,
    sensitivity_terms,
    spatial_mean,
    spearman,
)
from pse_lightning.core.distributed import all_gather, all_reduce_, rank_world
from pse_lightning.core.hooks import capture_activations
from pse_lightning.core.model_state import frozen_eval, model_device
from pse_lightning.validation import require_at_least, require_in_range

log = logging.getLogger(__name__)

_EMPTY_INDEX = 1 << 62  # sorts after every dataset index: an empty slot of a top-k list
_HISTOGRAM_BYTES = 1 << 28  # per-layer cap of the threshold histogram (see layer_bins)


# Activations --------------------------------------------------------------------------------


class _StopForward(Exception):
    """Raised by a hook once every requested layer is captured: skips the rest of the net."""


def layer_activations(
    model: nn.Module, x: Tensor, layers: Sequence[str], pad_to: int | None = None
) -> dict[str, Tensor]:
    """Detached outputs of ``layers`` for ``x``; the forward stops after the last of them.

    ``pad_to`` pads a short batch (repeating its first image) to that many images and drops
    the padding's outputs. Backends pick kernels by shape (oneDNN computes a batch of one
    differently from a batch of three, to the last bit), so padding every probe forward to
    the loader's batch size gives each image the same activations whatever its batch
    mates: the last batch of a shard, and shards of any number of processes, agree.
    """
    n = len(x)
    if pad_to is not None and 0 < n < pad_to:
        x = torch.cat([x, x[:1].expand(pad_to - n, *x.shape[1:])])
    with capture_activations(model, layers, detach=True) as captured:
        wanted = len(set(layers))

        def stop(_module: nn.Module, _inputs: tuple, _output: Tensor) -> None:
            if len(captured) >= wanted:
                raise _StopForward

        handles = [model.get_submodule(name).register_forward_hook(stop) for name in layers]
        try:
            model(x)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        missing = [name for name in layers if name not in captured]
        if missing:
            raise ValueError(f"analysis.layers {missing} did not run in the model's forward pass")
        return {name: captured[name][:n].float() for name in layers}


# Activation cache ---------------------------------------------------------------------------


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


# Results ------------------------------------------------------------------------------------


@dataclass
class LayerDissection:
    """What the probe passes found for one layer (all on CPU, identical on every rank).

    Attributes:
        name: dotted layer name.
        thresholds, floors: (K,) T_k and each unit's minimum activation.
        tally: the reduced :class:`IoUTally`.
        iou: (K, C + 1) IoU_{k,c}; best_iou, best_concept: (K,) max and argmax over c.
        top_scores, top_index: (K, top_images) highest per-image max activations and
            the dataset indices of those images.
    """

    name: str
    thresholds: Tensor
    floors: Tensor
    tally: IoUTally
    iou: Tensor
    best_iou: Tensor
    best_concept: Tensor
    top_scores: Tensor
    top_index: Tensor

    @property
    def units(self) -> int:
        return len(self.thresholds)


@dataclass
class Showcase:
    """Top-activating probe images of one unit, with its activation and concept masks."""

    layer: str
    unit: int
    concept: str
    category: str
    iou: float
    index: list[int]
    images: Tensor  # (k, C, H, W)
    activation_masks: Tensor  # (k, H, W) bool
    concept_masks: Tensor  # (k, H, W) bool


@dataclass
class ProbeResult:
    """Everything ``prepare`` computed, for ``compute`` and ``report``."""

    layers: dict[str, LayerDissection]
    concepts: list[Any]
    categories: list[str]
    concept_category: Tensor  # (C + 1,) long, -1 for id 0
    probe_images: int
    head_layer: str | None
    showcase: list[Showcase] = field(default_factory=list)
    pass_seconds: list[float] = field(default_factory=list)  # wall time of each probe pass
    pass_cpu_seconds: list[float] = field(default_factory=list)  # process CPU time of each


# The analysis -------------------------------------------------------------------------------


class Dissection(Analysis):
    """Network dissection and unit sensitivity (``analysis=dissection``).

    Args:
        layers: dotted layer names to dissect; null uses the model's ``dissection_layers``
            (the last two conv blocks).
        quantile: q, the fraction of a unit's activations above its threshold (0.005).
        iou_threshold: a unit is interpretable when its best IoU exceeds this (0.04).
        bins: histogram bins per unit in each threshold pass, a power of two; thresholds
            take ceil(32 / log2(bins)) probe passes (3 at 4096, 2 at 65536) and K * bins
            int64 of memory per layer, capped at 256 MB by lowering a wide layer's bins.
            With the cache only the first pass runs the model and the others cost about a
            tenth of a forward each, so 4096 (2 MB for 64 units) is the default; without
            it 65536 saves one forward pass for 16 times the memory.
        max_probe_images: dissect only probe images with dataset index below this (null:
            all); chosen by index, so the same images under any number of processes.
        top_images: top-activating probe images kept per unit for the report figure.
        top_units: units shown per layer in that figure (the most interpretable ones).
        permutations: permutations for the p-value of Spearman's rho.
        bootstrap: Poisson-bootstrap replicates over evaluation images for rho's CI.
        enrichment_top: fraction of most sensitive units tested for enrichment in
            interpretable units (hypergeometric p-value).
        successful_only: accumulate sensitivity over successful attacks only.
        seed: seed of the permutations and the bootstrap weights.
        cache_features: keep the probe set's activations of the dissected layers (float32)
            and labels in temporary files during ``prepare``, so the model runs once per
            probe image and the later passes read the files (disk: about 4 bytes per
            activation, deleted at the end); false runs the model in every pass instead
            (no disk, 1 + ceil(32 / log2(bins)) forward passes).
        cache_dir: directory of those files (null: the system's temporary directory).
        kwargs: passed to ``torchmetrics.Metric``.
    """

    name = "dissection"

    def __init__(
        self,
        *,
        layers: Sequence[str] | None = None,
        quantile: float = 0.005,
        iou_threshold: float = 0.04,
        bins: int = 4096,
        max_probe_images: int | None = None,
        top_images: int = 4,
        top_units: int = 4,
        permutations: int = 10000,
        bootstrap: int = 200,
        enrichment_top: float = 0.1,
        successful_only: bool = False,
        seed: int = 0,
        cache_features: bool = True,
        cache_dir: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if layers is not None and (isinstance(layers, str) or not len(layers)):
            raise ValueError(
                f"analysis.layers must be a non-empty list of layer names or null, got {layers!r}"
            )
        self.layers = None if layers is None else [str(name) for name in layers]
        self.quantile = require_in_range("analysis.quantile", quantile, 0.0, 0.5, low_open=True)
        self.iou_threshold = require_in_range("analysis.iou_threshold", iou_threshold, 0.0, 1.0)
        bins = require_at_least("analysis.bins", bins, 16)
        if bins & (bins - 1) or bins > 1 << 16:
            raise ValueError(f"analysis.bins must be a power of two in [16, 65536], got {bins}")
        self.bins = bins
        if max_probe_images is not None:
            require_at_least("analysis.max_probe_images", max_probe_images, 1)
        self.max_probe_images = max_probe_images
        self.top_images = require_at_least("analysis.top_images", top_images, 0)
        self.top_units = require_at_least("analysis.top_units", top_units, 0)
        self.permutations = require_at_least("analysis.permutations", permutations, 0)
        self.bootstrap = require_at_least("analysis.bootstrap", bootstrap, 0)
        self.enrichment_top = require_in_range(
            "analysis.enrichment_top", enrichment_top, 0.0, 1.0, low_open=True
        )
        if not isinstance(successful_only, bool):
            raise ValueError(
                f"analysis.successful_only must be true or false, got {successful_only!r}"
            )
        self.successful_only = successful_only
        self.seed = int(seed)
        if not isinstance(cache_features, bool):
            raise ValueError(
                f"analysis.cache_features must be true or false, got {cache_features!r}"
            )
        self.cache_features = cache_features
        self.cache_dir = None if cache_dir is None else str(cache_dir)
        self.probe: ProbeResult | None = None
        self.add_state(
            "sens_count",
            torch.zeros(1 + self.bootstrap, dtype=torch.float64),
            dist_reduce_fx="sum",
        )

    # -- probe passes ---------------------------------------------------------------------

    def prepare(self, model: nn.Module, datamodule: Any) -> None:
        """Dissect the layers on ``datamodule.probe_dataloader()`` (every rank calls this).

        Raises:
            ValueError: no layers to dissect, a concept of an unknown category, probe
                labels of the wrong shape or range, or an empty probe set.
        """
        layers = list(self.layers or getattr(model, "dissection_layers", ()) or ())
        if not layers:
            raise ValueError(
                "analysis.layers is null and the model names no "
                "dissection_layers; set analysis.layers=[<layer name>, ...]"
            )
        concepts = list(getattr(datamodule, "concepts", ()))
        categories = [str(c) for c in getattr(datamodule, "categories", ())]
        if not concepts or not categories:
            raise ValueError(
                f"dataset {getattr(datamodule, 'name', '?')} lists no concepts; "
                "dissection needs a probe dataset with concept masks"
            )
        category_of = {c: i for i, c in enumerate(categories)}
        unknown = sorted({c.category for c in concepts} - set(category_of))
        if unknown:
            raise ValueError(
                f"concept categories {unknown} are not in the dataset's categories {categories}"
            )
        concept_category = torch.tensor([-1] + [category_of[c.category] for c in concepts])
        device = model_device(model)
        loader = datamodule.probe_dataloader()
        head_layer = self._head_layer(model, layers)
        n_concepts, n_categories = len(concepts), len(categories)
        cache = (
            ActivationCache(layers, n_concepts, self.cache_dir) if self.cache_features else None
        )
        seconds: list[float] = []
        cpu_seconds: list[float] = []

        def sweep(labels: bool) -> Iterator[tuple[dict[str, Tensor], Tensor | None, Tensor]]:
            """One pass over the probe set: from the cache, or the model once more."""
            start, cpu_start = time.perf_counter(), time.process_time()
            if cache is not None:
                yield from cache.batches(device, labels)
            else:
                for x, lab, index in self._probe_batches(loader, device, n_concepts, n_categories):
                    yield layer_activations(model, x, layers, loader.batch_size), lab, index
            seconds.append(time.perf_counter() - start)
            cpu_seconds.append(time.process_time() - cpu_start)

        try:
            with frozen_eval(model), torch.no_grad():
                units = self._unit_counts(model, loader, layers, device)
                searches = {
                    n: RadixQuantile(units[n], self.quantile, self.layer_bins(units[n]), device)
                    for n in layers
                }
                k = max(self.top_images, 1)
                tops = {
                    n: (
                        torch.full((units[n], k), -math.inf, device=device),
                        torch.full((units[n], k), _EMPTY_INDEX, dtype=torch.int64, device=device),
                    )
                    for n in layers
                }
                images = torch.zeros((), dtype=torch.int64, device=device)
                # Pass 1 runs the model (stopped after the deepest layer): the first radix
                # histogram, the top-activating images and the cache, from one forward.
                start, cpu_start = time.perf_counter(), time.process_time()
                tallies = {n: searches[n].new_tallies() for n in layers}
                for x, labels, index in self._probe_batches(
                    loader, device, n_concepts, n_categories
                ):
                    acts = layer_activations(model, x, layers, loader.batch_size)
                    images += len(x)
                    for n in layers:
                        searches[n].accumulate(tallies[n], acts[n])
                        peak = acts[n].flatten(2).amax(dim=2)  # (N, K) per-image peak
                        tops[n] = merge_top(peak.T, index, *tops[n], k)
                    if cache is not None:
                        cache.append(acts, labels, index)
                self._advance(searches, tallies)
                seconds.append(time.perf_counter() - start)
                cpu_seconds.append(time.process_time() - cpu_start)
                while not all(s.done for s in searches.values()):
                    active = [n for n in layers if not searches[n].done]
                    tallies = {n: searches[n].new_tallies() for n in active}
                    for acts, _labels, _index in sweep(labels=False):
                        for n in active:
                            searches[n].accumulate(tallies[n], acts[n])
                    self._advance(searches, tallies)
                thresholds = {n: s.thresholds() for n, s in searches.items()}
                floors = {n: s.minimum() for n, s in searches.items()}
                iou_tallies = {
                    n: empty_tally(units[n], n_categories, n_concepts, device) for n in layers
                }
                mask_t = {n: mask_thresholds(thresholds[n], floors[n]).to(device) for n in layers}
                bounds = {
                    n: hot_bounds(mask_t[n], floors[n], searches[n].maximum()).to(device)
                    for n in layers
                }
                for acts, labels, _index in sweep(labels=True):
                    areas = label_area(labels, n_concepts)
                    for n in layers:
                        add_sparse_tally(iou_tallies[n], acts[n], mask_t[n], bounds[n], labels)
                        iou_tallies[n].label_area += areas
        finally:
            if cache is not None:
                cache.close()
        results, probe_images = self._reduce_results(
            layers, iou_tallies, tops, images, thresholds, floors, concept_category
        )
        self.probe = ProbeResult(
            layers=results,
            concepts=concepts,
            categories=categories,
            concept_category=concept_category,
            probe_images=probe_images,
            head_layer=head_layer,
            pass_seconds=seconds,
            pass_cpu_seconds=cpu_seconds,
        )
        for i, n in enumerate(layers):
            self.add_state(
                f"sens_{i}",
                torch.zeros(
                    1 + self.bootstrap,
                    len(SENSITIVITY_ROWS),
                    units[n],
                    dtype=torch.float64,
                    device=device,
                ),
                dist_reduce_fx="sum",
            )
        self.sens_count = self.sens_count.to(device)
        if rank_world()[0] == 0 and self.top_units and self.top_images:
            self.probe.showcase = self._showcase(model, loader, device)
        n_interp = {n: int((r.best_iou > self.iou_threshold).sum()) for n, r in results.items()}
        log.info(
            "dissection: %s interpretable units of %s (IoU > %g)",
            n_interp,
            {n: units[n] for n in layers},
            self.iou_threshold,
        )

    def layer_bins(self, units: int) -> int:
        """Histogram bins for a layer of ``units`` units: ``bins``, halved until the
        histogram fits in 256 MB (a 2048-unit layer gets 8192 bins: 3 passes, not 2)."""
        bins = self.bins
        while bins > 16 and units * bins * 8 > _HISTOGRAM_BYTES:
            bins //= 2
        return bins

    def _head_layer(self, model: nn.Module, layers: list[str]) -> str | None:
        feature, head = getattr(model, "feature_layer", None), getattr(model, "head", None)
        if feature in layers and head:
            return feature
        return None

    def _unit_counts(
        self, model: nn.Module, loader: DataLoader, layers: list[str], device: torch.device
    ) -> dict[str, int]:
        # Every rank needs the shapes, even one whose shard is empty: ask the dataset.
        x0 = loader.dataset[0][0]
        acts = layer_activations(model, x0.unsqueeze(0).to(device).float(), layers)
        for name, a in acts.items():
            if a.dim() != 4:
                raise ValueError(
                    f"analysis.layers entry {name!r} outputs shape "
                    f"{tuple(a.shape)}; dissection needs conv maps (N, K, h, w)"
                )
        return {name: a.shape[1] for name, a in acts.items()}

    def _probe_batches(
        self, loader: DataLoader, device: torch.device, concepts: int, categories: int
    ) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        limit, ascending, last = self.max_probe_images, True, -1
        for x, labels, index in loader:
            index = torch.as_tensor(index)
            if limit is not None:
                ascending = ascending and int(index.min()) >= last
                last = int(index.max())
                keep = index < limit
                if not bool(keep.any()):
                    if ascending:
                        break
                    continue
                x, labels, index = x[keep], labels[keep], index[keep]
            if labels.dim() != 4 or labels.shape[1] != categories or labels.shape[0] != len(x):
                raise ValueError(
                    f"probe concept labels must be (N, {categories}, H, W) long, "
                    f"got {tuple(labels.shape)}"
                )
            lo, hi = int(labels.min()), int(labels.max())
            if lo < 0 or hi > concepts:
                raise ValueError(
                    f"probe concept ids must be in [0, {concepts}] (0: none), got [{lo}, {hi}]"
                )
            yield x.to(device).float(), labels.to(device).long(), index.to(device)

    @staticmethod
    def _advance(
        searches: dict[str, RadixQuantile], tallies: dict[str, dict[str, Tensor]]
    ) -> None:
        """Reduce one radix pass's tallies across processes and advance each search."""
        for n, layer_tallies in tallies.items():
            for key, tensor in layer_tallies.items():
                all_reduce_(tensor, RadixQuantile.REDUCE_OPS[key])
            searches[n].advance(layer_tallies)

    def _reduce_results(
        self,
        layers: list[str],
        tallies: dict[str, IoUTally],
        tops: dict[str, tuple[Tensor, Tensor]],
        images: Tensor,
        thresholds: dict[str, Tensor],
        floors: dict[str, Tensor],
        concept_category: Tensor,
    ) -> tuple[dict[str, LayerDissection], int]:
        """All-reduce the IoU tallies and merge the top images of every process."""
        k = max(self.top_images, 1)
        results = {}
        all_reduce_(images, "sum")
        for n in layers:
            for tensor in tallies[n].tensors():
                all_reduce_(tensor, "sum")
            scores, index = tops[n]
            if rank_world()[1] > 1:
                empty = (torch.full_like(scores, -math.inf), torch.full_like(index, _EMPTY_INDEX))
                scores, index = merge_top(
                    torch.cat(all_gather(scores), dim=1),
                    torch.cat(all_gather(index), dim=1),
                    *empty,
                    k,
                )
            tally = IoUTally(*(t.cpu() for t in tallies[n].tensors()))
            iou = iou_from_tally(tally, concept_category)
            best_iou, best_concept = best_concepts(iou)
            results[n] = LayerDissection(
                name=n,
                thresholds=thresholds[n].cpu(),
                floors=floors[n].cpu(),
                tally=tally,
                iou=iou,
                best_iou=best_iou,
                best_concept=best_concept,
                top_scores=scores[:, : self.top_images].cpu(),
                top_index=index[:, : self.top_images].cpu(),
            )
        return results, int(images)

    def _showcase(
        self, model: nn.Module, loader: DataLoader, device: torch.device
    ) -> list[Showcase]:
        """Top-activating images of the most interpretable units (rank zero, bounded)."""
        assert self.probe is not None
        picks: list[tuple[str, int, list[int]]] = []
        for name, layer in self.probe.layers.items():
            order = sorted(range(layer.units), key=lambda u: (-float(layer.best_iou[u]), u))
            for unit in order[: self.top_units]:
                index = [int(i) for i in layer.top_index[unit] if int(i) != _EMPTY_INDEX]
                if index:
                    picks.append((name, unit, index))
        wanted = sorted({i for _, _, index in picks for i in index})
        samples = _fetch_samples(loader.dataset, wanted, loader.batch_size or 1)
        if samples is None:
            log.warning(
                "dissection: the probe dataset has no random access by dataset "
                "index; the top-image figure is skipped"
            )
            return []
        showcase = []
        for name, unit, index in picks:
            layer = self.probe.layers[name]
            x = torch.stack([samples[i][0] for i in index]).to(device).float()
            labels = torch.stack([samples[i][1] for i in index]).long()
            acts = layer_activations(model, x, [name], loader.batch_size)[name][:, unit : unit + 1]
            masks = activation_masks(
                acts,
                layer.thresholds[unit : unit + 1].to(device),
                layer.floors[unit : unit + 1].to(device),
                tuple(labels.shape[-2:]),
            )[:, 0].cpu()
            concept = int(layer.best_concept[unit])
            category = int(self.probe.concept_category[concept])
            showcase.append(
                Showcase(
                    layer=name,
                    unit=unit,
                    concept=self.probe.concepts[concept - 1].name,
                    category=self.probe.categories[category],
                    iou=float(layer.best_iou[unit]),
                    index=index,
                    images=x.cpu(),
                    activation_masks=masks,
                    concept_masks=labels[:, category] == concept,
                )
            )
        return showcase

    # -- sensitivity ----------------------------------------------------------------------

    def update(self, model: nn.Module, batch: AdversarialBatch) -> None:
        """Accumulate clean and adversarial spatial-mean activations of every unit."""
        if self.probe is None:
            raise RuntimeError("Dissection.prepare(model, datamodule) must run before update")
        layers = list(self.probe.layers)
        n = len(batch.x)
        with frozen_eval(model), torch.no_grad():
            acts = layer_activations(model, torch.cat([batch.x, batch.x_adv]), layers)
        weights = poisson_weights(batch.index, self.bootstrap, self.seed)
        if self.successful_only:
            weights = weights * batch.success.to(weights).view(-1, 1)
        for i, name in enumerate(layers):
            means = spatial_mean(acts[name])
            w_target = w_true = None
            if name == self.probe.head_layer:
                weight = model.get_submodule(model.head).weight.detach()
                if weight.shape[1] == means.shape[1]:
                    w_target, w_true = weight[batch.target], weight[batch.y]
            terms = sensitivity_terms(means[:n], means[n:], w_target, w_true)
            state = getattr(self, f"sens_{i}")
            state += torch.einsum("nb,rnk->brk", weights, terms)
        self.sens_count += weights.sum(dim=0)

    def _compute_legacy(self) -> dict[str, Tensor]:
        """Per-layer summary scalars and per-unit tensors (call on every rank)."""
        if self.probe is None:
            raise RuntimeError("Dissection.prepare(model, datamodule) must run before compute")
        out: dict[str, Tensor] = {}
        count = self.sens_count.detach().cpu()
        out["images"] = count[0].clone()
        for i, (name, layer) in enumerate(self.probe.layers.items()):
            sens = sensitivity_from_sums(getattr(self, f"sens_{i}").detach().cpu(), count)
            out.update({f"{name}/{k}": v for k, v in self._layer_summary(layer, sens).items()})
        return out

    def _layer_summary(self, layer: LayerDissection, sens: dict[str, Tensor]) -> dict[str, Tensor]:
        assert self.probe is not None
        gen = torch.Generator().manual_seed(self.seed)
        s = sens["s"][0]
        best_iou = layer.best_iou
        interp = best_iou > self.iou_threshold
        units = layer.units
        rho = spearman(s, best_iou)
        boot = (
            torch.stack([spearman(sens["s"][b], best_iou) for b in range(1, 1 + self.bootstrap)])
            if self.bootstrap
            else None
        )
        u_stat, u_p = mann_whitney_u(s[interp], s[~interp])
        m = max(1, round(self.enrichment_top * units))
        most = sorted(range(units), key=lambda k: (-float(s[k]), k))[:m]
        observed = int(interp[most].sum())
        scalar = lambda v: torch.as_tensor(v, dtype=torch.float64)  # noqa: E731
        out = {
            "units": scalar(units),
            "interpretable": scalar(int(interp.sum())),
            "frac_interpretable": scalar(float(interp.double().mean())),
            "mean_best_iou": best_iou.mean(),
            "mean_s": s.mean(),
            "mean_s_plus": sens["s_plus"][0].mean(),
            "mean_s_minus": sens["s_minus"][0].mean(),
            "spearman_rho": rho,
            "spearman_p": permutation_pvalue(s, best_iou, self.permutations, gen),
            "mannwhitney_u": u_stat,
            "mannwhitney_p": u_p,
            "enrichment_observed": scalar(observed),
            "enrichment_expected": scalar(m * float(interp.double().mean())),
            "enrichment_p": scalar(hypergeom_sf(observed, units, int(interp.sum()), m)),
        }
        if boot is not None:
            finite = boot[torch.isfinite(boot)]
            low, high = (
                (torch.quantile(finite, 0.025), torch.quantile(finite, 0.975))
                if len(finite)
                else (scalar(math.nan), scalar(math.nan))
            )
            out["spearman_ci_low"], out["spearman_ci_high"] = low, high
        concept_category = self.probe.concept_category
        per_cat = category_iou(layer.iou, concept_category, len(self.probe.categories))
        unit_category = concept_category[layer.best_concept]
        for g, category in enumerate(self.probe.categories):
            in_cat = interp & (unit_category == g)
            out[f"{category}/interpretable"] = scalar(int(in_cat.sum()))
            out[f"{category}/mean_s_interpretable"] = (
                s[in_cat].mean() if bool(in_cat.any()) else scalar(math.nan)
            )
            out[f"{category}/spearman_rho"] = spearman(s, per_cat[:, g])
            out[f"{category}/spearman_p"] = permutation_pvalue(
                s, per_cat[:, g], self.permutations, gen
            )
        # Per-unit tensors (K,): kept for the report and the W&B table.
        out.update(
            {
                "unit_threshold": layer.thresholds.double(),
                "unit_iou": best_iou,
                "unit_concept": layer.best_concept,
                "unit_interpretable": interp,
                "unit_s": s,
                "unit_s_plus": sens["s_plus"][0],
                "unit_s_minus": sens["s_minus"][0],
                "unit_shift": sens["shift"][0],
                "unit_sigma": sens["sigma"][0],
            }
        )
        if layer.name == self.probe.head_layer:
            out.update(
                {
                    "unit_promotion": sens["promotion"][0],
                    "unit_suppression": sens["suppression"][0],
                    "unit_promotion_signed": sens["promotion_signed"][0],
                    "unit_suppression_signed": sens["suppression_signed"][0],
                }
            )
        return out

    # -- report ---------------------------------------------------------------------------

    def compute(self) -> AnalysisResult:  # TRANSITION: until this analysis is split by job
        out = self._compute_legacy()
        scalars = {k: v for k, v in out.items() if isinstance(v, Tensor) and v.numel() == 1}
        return AnalysisResult(scalars=scalars, details=out)

    def report(
        self, result: AnalysisResult, out_dir: Path, class_names: Sequence[str]
    ) -> ReportSection:
        return self._report_legacy(result.details, out_dir)

    def _report_legacy(self, result: dict[str, Any], out_dir: Path) -> ReportSection:
        """Figures (IoU vs sensitivity, interpretable units per category, top images), the
        per-unit W&B table and a markdown summary. Rank zero only; no communication."""
        if self.probe is None:
            raise RuntimeError("Dissection.prepare(model, datamodule) must run before report")
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        layers = list(self.probe.layers)
        section = ReportSection(title=self.name)
        section.figures.append(
            iou_vs_sensitivity_figure(
                result,
                layers,
                self.probe,
                self.iou_threshold,
                out_dir / "dissection_iou_vs_sensitivity.png",
            )
        )
        section.figures.append(
            interpretable_units_figure(
                result, layers, self.probe, out_dir / "dissection_interpretable_units.png"
            )
        )
        if self.probe.showcase:
            section.figures.append(
                top_images_figure(self.probe.showcase, out_dir / "dissection_top_images.png")
            )
        section.tables["units"] = self.unit_table(result)
        section.markdown = self._markdown(result, layers)
        return section

    def unit_table(self, result: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
        """One row per unit: layer, unit, concept, category, IoU, interpretable, s+, s-, s,
        threshold, and (at the feature layer of a GAP + linear net) π_k and ς_k."""
        assert self.probe is not None
        columns = [
            "layer",
            "unit",
            "concept",
            "category",
            "iou",
            "interpretable",
            "s_plus",
            "s_minus",
            "s",
            "threshold",
            "promotion",
            "suppression",
        ]
        rows = []
        for name in self.probe.layers:
            get = lambda key, name=name: result[f"{name}/{key}"]  # noqa: E731
            promo = result.get(f"{name}/unit_promotion")
            supp = result.get(f"{name}/unit_suppression")
            for unit in range(len(get("unit_iou"))):
                concept = int(get("unit_concept")[unit])
                rows.append(
                    [
                        name,
                        unit,
                        self.probe.concepts[concept - 1].name,
                        self.probe.concepts[concept - 1].category,
                        float(get("unit_iou")[unit]),
                        bool(get("unit_interpretable")[unit]),
                        float(get("unit_s_plus")[unit]),
                        float(get("unit_s_minus")[unit]),
                        float(get("unit_s")[unit]),
                        float(get("unit_threshold")[unit]),
                        float(promo[unit]) if promo is not None else None,
                        float(supp[unit]) if supp is not None else None,
                    ]
                )
        return columns, rows

    def _markdown(self, result: dict[str, Any], layers: list[str]) -> str:
        assert self.probe is not None

        def f(key: str) -> str:
            value = result.get(key)
            return "—" if value is None else f"{float(value):.3g}"

        lines = [
            f"Probe set: {self.probe.probe_images} images; "
            f"q = {self.quantile}, interpretable when IoU > {self.iou_threshold}; "
            f"sensitivity over {float(result.get('images', 0)):.0f} evaluation images.",
            "",
            "| layer | units | interpretable | Spearman ρ(s, IoU) | perm. p | 95% CI | "
            "Mann–Whitney p | enrichment p |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for n in layers:
            lines.append(
                f"| {n} | {f(n + '/units')} | {f(n + '/interpretable')} | "
                f"{f(n + '/spearman_rho')} | {f(n + '/spearman_p')} | "
                f"[{f(n + '/spearman_ci_low')}, {f(n + '/spearman_ci_high')}] | "
                f"{f(n + '/mannwhitney_p')} | {f(n + '/enrichment_p')} |"
            )
        lines += [
            "",
            "| layer | " + " | ".join(self.probe.categories) + " |",
            "|---|" + "---|" * len(self.probe.categories),
        ]
        for n in layers:
            counts = [f(f"{n}/{c}/interpretable") for c in self.probe.categories]
            lines.append(f"| {n} | " + " | ".join(counts) + " |")
        return "\n".join(lines)


def _fetch_samples(
    dataset: Any, wanted: list[int], batch_size: int
) -> dict[int, tuple[Tensor, Tensor]] | None:
    """(x, labels) of the probe samples with the given dataset indices.

    Direct access when ``dataset[i]`` is the sample with index i (checked), else one scan
    of the dataset in order; None when the dataset has no ``__getitem__``.
    """
    if not wanted:
        return {}
    if not hasattr(dataset, "__getitem__"):
        return None
    found: dict[int, tuple[Tensor, Tensor]] = {}
    try:
        for i in wanted:
            x, labels, index = dataset[i]
            if int(index) != i:
                break
            found[i] = (torch.as_tensor(x), torch.as_tensor(labels))
        else:
            return found
    except (IndexError, KeyError):
        pass
    found = {}
    targets = set(wanted)
    for x, labels, index in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        for j, i in enumerate(torch.as_tensor(index).tolist()):
            if i in targets:
                found[i] = (x[j], labels[j])
        if len(found) == len(targets):
            break
    return found


# Figures ------------------------------------------------------------------------------------


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


_CATEGORY_COLOURS = (
    "tab:blue",
    "tab:orange",
    "tab:green",
    "tab:red",
    "tab:purple",
    "tab:brown",
    "tab:pink",
    "tab:olive",
    "tab:cyan",
)


def iou_vs_sensitivity_figure(
    result: dict[str, Any], layers: list[str], probe: ProbeResult, iou_threshold: float, path: Path
) -> Path:
    """One scatter per layer: best IoU against s_k, interpretable units coloured by the
    category of their concept, with Spearman's rho and its permutation p in the title."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(layers), figsize=(4.2 * len(layers), 3.6), squeeze=False)
    for ax, name in zip(axes[0], layers, strict=True):
        s = result[f"{name}/unit_s"].double()
        iou = result[f"{name}/unit_iou"].double()
        interp = result[f"{name}/unit_interpretable"]
        category = probe.concept_category[result[f"{name}/unit_concept"]]
        ax.scatter(s[~interp], iou[~interp], s=12, c="0.6", label="not interpretable")
        for g, cat in enumerate(probe.categories):
            chosen = interp & (category == g)
            if bool(chosen.any()):
                ax.scatter(
                    s[chosen],
                    iou[chosen],
                    s=14,
                    label=cat,
                    c=_CATEGORY_COLOURS[g % len(_CATEGORY_COLOURS)],
                )
        ax.axhline(iou_threshold, color="k", lw=0.8, ls="--")
        rho, p = result[f"{name}/spearman_rho"], result[f"{name}/spearman_p"]
        ax.set_title(f"{name}\nρ = {float(rho):.2f}, p = {float(p):.2g}", fontsize=9)
        ax.set_xlabel("sensitivity $s_k$")
        ax.set_ylabel("best IoU")
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def interpretable_units_figure(
    result: dict[str, Any], layers: list[str], probe: ProbeResult, path: Path
) -> Path:
    """Grouped bars: number of interpretable units per layer and concept category."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(layers), 3.4))
    width = 0.8 / max(1, len(probe.categories))
    for g, cat in enumerate(probe.categories):
        counts = [float(result[f"{n}/{cat}/interpretable"]) for n in layers]
        xs = [i + (g - (len(probe.categories) - 1) / 2) * width for i in range(len(layers))]
        ax.bar(xs, counts, width, label=cat, color=_CATEGORY_COLOURS[g % len(_CATEGORY_COLOURS)])
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels(
        [f"{n}\n({int(float(result[n + '/units']))} units)" for n in layers], fontsize=8
    )
    ax.set_ylabel("interpretable units")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def top_images_figure(showcase: list[Showcase], path: Path) -> Path:
    """Rows of units, columns of their top-activating probe images: the activation mask
    outlined in white, the unit's concept mask tinted."""
    plt = _pyplot()
    cols = max(len(item.index) for item in showcase)
    fig, axes = plt.subplots(
        len(showcase), cols, figsize=(1.5 * cols + 1.2, 1.6 * len(showcase)), squeeze=False
    )
    for r, item in enumerate(showcase):
        for c in range(cols):
            ax = axes[r][c]
            ax.axis("off")
            if c >= len(item.index):
                continue
            image = item.images[c].clamp(0, 1).permute(1, 2, 0).numpy()
            size = tuple(item.concept_masks[c].shape)
            if image.shape[:2] != size:
                image = (
                    torch.nn.functional.interpolate(
                        item.images[c : c + 1], size=size, mode="bilinear", align_corners=False
                    )[0]
                    .clamp(0, 1)
                    .permute(1, 2, 0)
                    .numpy()
                )
            ax.imshow(
                image[..., 0] if image.shape[2] == 1 else image,
                cmap="gray" if image.shape[2] == 1 else None,
                vmin=0,
                vmax=1,
            )
            for mask, colour, style in (
                (item.concept_masks[c], "cyan", "--"),
                (item.activation_masks[c], "white", "-"),
            ):
                if bool(mask.any()):
                    ax.contour(
                        mask.float().numpy(),
                        levels=[0.5],
                        colors=colour,
                        linewidths=1.0,
                        linestyles=style,
                    )
            ax.set_title(f"#{item.index[c]}", fontsize=6)
        axes[r][0].text(
            -0.08,
            0.5,
            f"{item.layer}:{item.unit}\n{item.concept}\n({item.category})\nIoU {item.iou:.2f}",
            transform=axes[r][0].transAxes,
            ha="right",
            va="center",
            fontsize=6,
        )
    fig.suptitle("white: unit mask S_k >= T_k; cyan dashed: the unit's concept", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
