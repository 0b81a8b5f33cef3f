"""The probe passes: dissect the chosen layers on the probe set (docs/METHODS.md §4.1).

Pass 1 runs the model once per probe image, stopped after the deepest dissected layer: the
first radix histogram of every layer, the top-activating images of every unit and (with
``cache_features``) the activation cache. The remaining radix passes and the IoU pass read
the activations back from the cache (or run the model again without it). Every tally is an
integer sum, min or max reduced with ``all_reduce``, so one process and N processes give the
same thresholds and IoUs bit for bit, and memory does not grow with the probe set.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from pse_lightning.analysis.dissection.activations import layer_activations
from pse_lightning.analysis.dissection.cache import ActivationCache
from pse_lightning.analysis.dissection.masks import hot_bounds, mask_thresholds
from pse_lightning.analysis.dissection.quantiles import RadixQuantile
from pse_lightning.analysis.dissection.sensitivity import PROBE_POISSON_STREAM, poisson_weights
from pse_lightning.analysis.dissection.tally import (
    IoUTally,
    ReplicateTally,
    add_replicate_labels,
    add_sparse_tally,
    best_concepts,
    empty_replicates,
    empty_tally,
    iou_from_tally,
    label_area,
    merge_top,
    replicate_category_iou,
)
from pse_lightning.core.distributed import all_gather, all_reduce_, rank_world
from pse_lightning.core.model_state import frozen_eval, model_device

log = logging.getLogger(__name__)

EMPTY_INDEX = 1 << 62  # sorts after every dataset index: an empty slot of a top-k list
_HISTOGRAM_BYTES = 1 << 28  # per-layer cap of the threshold histogram (see layer_bins)
_REPLICATE_BYTES = 1 << 28  # per-layer cap of the IoU tally's probe replicates

Batches = Iterator[tuple[dict[str, Tensor], Tensor | None, Tensor]]


@dataclass(frozen=True)
class ProbeSettings:
    """The constructor settings the probe passes read (see ``Dissection``)."""

    quantile: float
    bins: int
    max_probe_images: int | None
    top_images: int
    cache_features: bool
    cache_dir: str | None
    bootstrap: int = 0  # Poisson-bootstrap replicates over probe images (IoU uncertainty)
    seed: int = 0


@dataclass  # not frozen: torchmetrics maps compute()'s result through its dataclasses
class ConceptTable:
    """The probe dataset's concepts (ids 1..C) and their categories.

    Plain strings and tensors only: it travels in ``compute()``'s result.

    Attributes:
        names: (C,) concept names; id c is ``names[c - 1]``.
        categories: (G,) category names.
        concept_category: (C + 1,) long, the category index of each concept id (-1 for 0).
        class_categories: the categories whose concepts are the class labels themselves
            (the shapes' ``object``): a unit interpretable for one of them is class-selective.
    """

    names: list[str]
    categories: list[str]
    concept_category: Tensor
    class_categories: list[str] = field(default_factory=list)

    @property
    def class_mask(self) -> Tensor:
        """(G,) bool: the category is one of :attr:`class_categories`."""
        return torch.tensor([c in self.class_categories for c in self.categories])

    def name_of(self, concept: int) -> str:
        """The name of concept id ``concept`` in [1, C]."""
        return self.names[concept - 1]

    def category_of(self, concept: int) -> str:
        """The category name of concept id ``concept`` in [1, C]."""
        return self.categories[int(self.concept_category[concept])]


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
        boot_category_iou: (B, K, G) each unit's best IoU per concept category in each
            Poisson-bootstrap replicate over probe images (thresholds T_k held at the full
            probe set's); (0, K, G) without replicates.
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
    boot_category_iou: Tensor = field(default_factory=lambda: torch.zeros(0, 0, 0))

    @property
    def units(self) -> int:
        return len(self.thresholds)

    @property
    def boot_best_iou(self) -> Tensor:
        """(B, K) best IoU over all concepts in each probe replicate."""
        if not len(self.boot_category_iou):
            return torch.zeros(0, self.units, dtype=torch.float64)
        return self.boot_category_iou.amax(dim=-1)

    def boot_best_iou_outside(self, excluded: Tensor) -> Tensor:
        """(B, K) best IoU over the categories not in ``excluded`` ((G,) bool) per replicate."""
        if not len(self.boot_category_iou):
            return torch.zeros(0, self.units, dtype=torch.float64)
        return self.boot_category_iou[..., ~excluded].amax(dim=-1)


@dataclass
class ProbeResult:
    """Everything the probe passes computed, for ``compute`` (and through it ``report``)."""

    layers: dict[str, LayerDissection]
    table: ConceptTable
    concepts: list[Any]  # the datamodule's concept objects, as it listed them
    probe_images: int
    head_layer: str | None
    pass_seconds: list[float] = field(default_factory=list)  # wall time of each probe pass
    pass_cpu_seconds: list[float] = field(default_factory=list)  # process CPU time of each

    @property
    def categories(self) -> list[str]:
        return self.table.categories


def concept_table(datamodule: Any) -> ConceptTable:
    """The datamodule's concepts and categories, checked.

    Raises:
        ValueError: no concepts, or a concept of a category the dataset does not list.
    """
    concepts = list(getattr(datamodule, "concepts", ()))
    categories = [str(c) for c in getattr(datamodule, "categories", ())]
    if not concepts or not categories:
        raise ValueError(
            f"dataset {getattr(datamodule, 'name', '?')} lists no concepts; "
            "dissection needs a probe dataset with concept masks"
        )
    index = {c: i for i, c in enumerate(categories)}
    unknown = sorted({c.category for c in concepts} - set(index))
    if unknown:
        raise ValueError(
            f"concept categories {unknown} are not in the dataset's categories {categories}"
        )
    class_categories = [str(c) for c in getattr(datamodule, "class_categories", ())]
    if set(class_categories) - set(index):
        raise ValueError(
            f"class_categories {class_categories} are not in the dataset's categories {categories}"
        )
    concept_category = torch.tensor([-1] + [index[c.category] for c in concepts])
    return ConceptTable(
        [str(c.name) for c in concepts], categories, concept_category, class_categories
    )


def layer_bins(units: int, bins: int) -> int:
    """Histogram bins for a layer of ``units`` units: ``bins``, halved until the histogram
    fits in 256 MB (a 2048-unit layer gets 8192 bins: 3 passes, not 2)."""
    while bins > 16 and units * bins * 8 > _HISTOGRAM_BYTES:
        bins //= 2
    return bins


def probe_replicates(requested: int, tally: IoUTally) -> int:
    """Probe replicates for a layer: ``requested``, capped so that the replicate tallies
    fit in 256 MB (a 512-unit layer against 1,200 Broden concepts gets 54)."""
    per_replicate = 8 * sum(t.numel() for t in tally.tensors())
    capped = min(requested, _REPLICATE_BYTES // per_replicate)
    if capped < requested:
        log.warning("probe bootstrap: %d of %d replicates fit the memory cap", capped, requested)
    return capped


def head_layer(model: nn.Module, layers: Sequence[str]) -> str | None:
    """The model's feature layer when it is dissected and followed by a linear head."""
    feature, head = getattr(model, "feature_layer", None), getattr(model, "head", None)
    return feature if feature in layers and head else None


def unit_counts(
    model: nn.Module, loader: DataLoader, layers: list[str], device: torch.device
) -> dict[str, int]:
    """Units K of each layer; every rank needs them, even one whose shard is empty, so the
    first probe image is read from the dataset itself."""
    x0 = loader.dataset[0][0]
    acts = layer_activations(model, x0.unsqueeze(0).to(device).float(), layers)
    for name, a in acts.items():
        if a.dim() != 4:
            raise ValueError(
                f"analysis.dissection.layers entry {name!r} outputs shape "
                f"{tuple(a.shape)}; dissection needs conv maps (N, K, h, w)"
            )
    return {name: a.shape[1] for name, a in acts.items()}


def _check_labels(labels: Tensor, n: int, concepts: int, categories: int) -> None:
    if labels.dim() != 4 or labels.shape[1] != categories or labels.shape[0] != n:
        raise ValueError(
            f"probe concept labels must be (N, {categories}, H, W) long, got {tuple(labels.shape)}"
        )
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi > concepts:
        raise ValueError(
            f"probe concept ids must be in [0, {concepts}] (0: none), got [{lo}, {hi}]"
        )


def probe_batches(
    loader: DataLoader, device: torch.device, limit: int | None, table: ConceptTable
) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """(x, labels, index) of the probe images with dataset index below ``limit`` (None:
    all), checked; stops early once an ascending loader has passed the limit."""
    ascending, last = True, -1
    for x, labels, index in loader:
        index = torch.as_tensor(index)
        if limit is not None:
            ascending = ascending and int(index.min()) >= last
            last = int(index.max())
            keep = index < limit
            if ascending and not bool(keep.any()):
                break  # an ascending loader has passed the limit: nothing more to keep
            if not bool(keep.any()):
                continue
            x, labels, index = x[keep], labels[keep], index[keep]
        _check_labels(labels, len(x), len(table.names), len(table.categories))
        yield x.to(device).float(), labels.to(device).long(), index.to(device)


class ProbePasses:
    """One dissection of ``layers`` on this process's shard of the probe set.

    Holds what the passes share (model, loader, cache, timings); :meth:`run` performs them.
    """

    def __init__(
        self,
        model: nn.Module,
        loader: DataLoader,
        layers: list[str],
        table: ConceptTable,
        settings: ProbeSettings,
    ) -> None:
        self.model, self.loader, self.layers = model, loader, layers
        self.table, self.settings = table, settings
        self.device = model_device(model)
        self.seconds: list[float] = []
        self.cpu_seconds: list[float] = []
        self.cache = (
            ActivationCache(layers, len(table.names), settings.cache_dir)
            if settings.cache_features
            else None
        )

    def run(self) -> tuple[dict[str, LayerDissection], int]:
        """All passes, reduced over processes: per-layer results and the probe image count."""
        try:
            with frozen_eval(self.model), torch.no_grad():
                return self._passes()
        finally:
            if self.cache is not None:
                self.cache.close()

    def _passes(self) -> tuple[dict[str, LayerDissection], int]:
        """Thresholds (radix passes), then IoU tallies; reduced over processes."""
        units = unit_counts(self.model, self.loader, self.layers, self.device)
        searches = {
            n: RadixQuantile(
                k, self.settings.quantile, layer_bins(k, self.settings.bins), self.device
            )
            for n, k in units.items()
        }
        tops, images = self._first_pass(searches)
        while not all(s.done for s in searches.values()):
            self._radix_pass(searches)
        tallies = self._iou_pass(searches, units)
        return self._reduce(searches, tallies, tops, images)

    def _timed(self, batches: Batches) -> Batches:
        start, cpu_start = time.perf_counter(), time.process_time()
        yield from batches
        self.seconds.append(time.perf_counter() - start)
        self.cpu_seconds.append(time.process_time() - cpu_start)

    def _model_batches(self) -> Batches:
        limit = self.settings.max_probe_images
        for x, labels, index in probe_batches(self.loader, self.device, limit, self.table):
            acts = layer_activations(self.model, x, self.layers, self.loader.batch_size)
            yield acts, labels, index

    def _sweep(self, labels: bool) -> Batches:
        """One later pass over the probe set: from the cache, or the model once more."""
        if self.cache is not None:
            return self._timed(self.cache.batches(self.device, labels))
        return self._timed(self._model_batches())

    def _first_pass(
        self, searches: dict[str, RadixQuantile]
    ) -> tuple[dict[str, tuple[Tensor, Tensor]], Tensor]:
        """The model's one pass: first radix histograms, top images, the cache."""
        k = max(self.settings.top_images, 1)
        tops = {
            n: (
                torch.full((s.units, k), -math.inf, device=self.device),
                torch.full((s.units, k), EMPTY_INDEX, dtype=torch.int64, device=self.device),
            )
            for n, s in searches.items()
        }
        images = torch.zeros((), dtype=torch.int64, device=self.device)
        tallies = {n: s.new_tallies() for n, s in searches.items()}
        for acts, labels, index in self._timed(self._model_batches()):
            images += len(index)
            for n in self.layers:
                searches[n].accumulate(tallies[n], acts[n])
                peak = acts[n].flatten(2).amax(dim=2)  # (N, K) per-image peak
                tops[n] = merge_top(peak.T, index, *tops[n], k)
            if self.cache is not None:
                self.cache.append(acts, labels, index)
        _advance(searches, tallies)
        return tops, images

    def _radix_pass(self, searches: dict[str, RadixQuantile]) -> None:
        active = [n for n in self.layers if not searches[n].done]
        tallies = {n: searches[n].new_tallies() for n in active}
        for acts, _labels, _index in self._sweep(labels=False):
            for n in active:
                searches[n].accumulate(tallies[n], acts[n])
        _advance(searches, tallies)

    def _iou_pass(
        self, searches: dict[str, RadixQuantile], units: dict[str, int]
    ) -> dict[str, tuple[IoUTally, ReplicateTally]]:
        """Intersections and areas of the unit masks, visiting only pixels near hot cells,
        and their Poisson-bootstrap replicates over probe images."""
        concepts, categories = len(self.table.names), len(self.table.categories)
        tallies = {}
        for n, k in units.items():
            tally = empty_tally(k, categories, concepts, self.device)
            reps = probe_replicates(self.settings.bootstrap, tally)
            tallies[n] = (tally, empty_replicates(reps, tally))
        mask_t, bounds = {}, {}
        for n, s in searches.items():
            mask_t[n] = mask_thresholds(s.thresholds(), s.minimum()).to(self.device)
            bounds[n] = hot_bounds(mask_t[n], s.minimum(), s.maximum()).to(self.device)
        most = max(r.replicates for _, r in tallies.values())
        for acts, labels, index in self._sweep(labels=True):
            areas = label_area(labels, concepts)
            weights = poisson_weights(index, most, self.settings.seed, PROBE_POISSON_STREAM)[:, 1:]
            for n in self.layers:
                tally, rep = tallies[n]
                replicate = (rep, weights[:, : rep.replicates]) if rep.replicates else None
                add_sparse_tally(tally, acts[n], mask_t[n], bounds[n], labels, replicate)
                tally.label_area += areas
                if replicate is not None:
                    add_replicate_labels(rep, labels, replicate[1])
        return tallies

    def _reduce(
        self,
        searches: dict[str, RadixQuantile],
        tallies: dict[str, tuple[IoUTally, ReplicateTally]],
        tops: dict[str, tuple[Tensor, Tensor]],
        images: Tensor,
    ) -> tuple[dict[str, LayerDissection], int]:
        """All-reduce the IoU tallies and merge the top images of every process."""
        all_reduce_(images, "sum")
        results = {}
        for n in self.layers:
            for tensor in (*tallies[n][0].tensors(), *tallies[n][1].tensors()):
                all_reduce_(tensor, "sum")
            scores, index = _gather_top(*tops[n], max(self.settings.top_images, 1))
            tally = IoUTally(*(t.cpu() for t in tallies[n][0].tensors()))
            reps = ReplicateTally(*(t.cpu() for t in tallies[n][1].tensors()))
            iou = iou_from_tally(tally, self.table.concept_category)
            best_iou, best_concept = best_concepts(iou)
            results[n] = LayerDissection(
                name=n,
                thresholds=searches[n].thresholds().cpu(),
                floors=searches[n].minimum().cpu(),
                tally=tally,
                iou=iou,
                best_iou=best_iou,
                best_concept=best_concept,
                top_scores=scores[:, : self.settings.top_images].cpu(),
                top_index=index[:, : self.settings.top_images].cpu(),
                boot_category_iou=replicate_category_iou(
                    reps, self.table.concept_category, len(self.table.categories)
                ),
            )
        return results, int(images)


def _advance(searches: dict[str, RadixQuantile], tallies: dict[str, dict[str, Tensor]]) -> None:
    """Reduce one radix pass's tallies across processes and advance each search."""
    for n, layer_tallies in tallies.items():
        for key, tensor in layer_tallies.items():
            all_reduce_(tensor, RadixQuantile.REDUCE_OPS[key])
        searches[n].advance(layer_tallies)


def _gather_top(scores: Tensor, index: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Every process's top-k per unit merged into one top-k (the same on every rank)."""
    if rank_world()[1] == 1:
        return scores, index
    empty = (torch.full_like(scores, -math.inf), torch.full_like(index, EMPTY_INDEX))
    return merge_top(
        torch.cat(all_gather(scores), dim=1), torch.cat(all_gather(index), dim=1), *empty, k
    )
