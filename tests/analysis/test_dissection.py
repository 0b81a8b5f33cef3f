"""Network dissection, unit sensitivity and neuron masking: known answers and references.

The probe data is an in-test fake datamodule (an object with ``probe_dataloader()``,
``concepts`` and ``categories``), so these tests depend on no dataset module.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import socket
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import scipy.stats
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

import pse_lightning.analysis.dissection.probe as probe_module
from pse_lightning.analysis.base import AdversarialBatch, Analysis, AnalysisResult
from pse_lightning.analysis.dissection import Dissection
from pse_lightning.analysis.dissection.masks import (
    activation_masks,
    hot_bounds,
    mask_thresholds,
    upsample,
)
from pse_lightning.analysis.dissection.metric import random_weights
from pse_lightning.analysis.dissection.probe import layer_bins
from pse_lightning.analysis.dissection.quantiles import (
    RadixQuantile,
    keys_to_values,
    locate_rank,
    ordered_keys,
)
from pse_lightning.analysis.dissection.sensitivity import (
    poisson_weights,
    sensitivity_from_sums,
    sensitivity_terms,
)
from pse_lightning.analysis.dissection.statistics import (
    hypergeom_sf,
    mann_whitney_u,
    permutation_pvalue,
    rankdata,
    spearman,
)
from pse_lightning.analysis.dissection.tally import (
    add_sparse_tally,
    empty_tally,
    iou_tally,
    merge_top,
)
from pse_lightning.attacks import FGSM
from pse_lightning.core.distributed import rank_world
from pse_lightning.core.proportions import mcnemar_exact, wilson_interval
from pse_lightning.data.base import Concept, ShardSampler
from pse_lightning.defenses.neuron_mask import (
    MaskedModel,
    NeuronMask,
    UnitSensitivity,
    neuron_mask,
    select_units,
    unit_sensitivity,
)
from pse_lightning.modules.evaluation import EvaluationModule

# Fake probe data ------------------------------------------------------------------------------


class ProbeSet(Dataset):
    def __init__(self, images: Tensor, labels: Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, int]:
        return self.images[i], self.labels[i], i


class FakeProbeData:
    """What Dissection.prepare needs of a datamodule: a sharded probe loader and concepts."""

    name = "fake"

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        concepts: list[Concept],
        categories: list[str],
        batch_size: int = 8,
    ) -> None:
        self.dataset = ProbeSet(images, labels)
        self.concepts, self.categories, self.batch_size = concepts, categories, batch_size

    def probe_dataloader(self) -> DataLoader:
        rank, world = rank_world()
        sampler = ShardSampler(len(self.dataset), rank, world)
        return DataLoader(self.dataset, self.batch_size, sampler=sampler)


COLOURS = {"red": (0.9, 0.1, 0.1), "green": (0.1, 0.9, 0.1), "blue": (0.1, 0.1, 0.9)}
TOY_CONCEPTS = [
    Concept("square", "object"),
    Concept("red", "colour"),
    Concept("green", "colour"),
    Concept("blue", "colour"),
    Concept("plain", "background"),
]


def coloured_squares(n: int, size: int = 16, seed: int = 0) -> FakeProbeData:
    """Squares of pure colours on darker noisy backgrounds, with concept labels.

    Object pixels have R exactly 0.9 when red and <= 0.1 otherwise; background channels
    stay below 0.5. Categories: object (square), colour (red/green/blue), background.
    """
    gen = torch.Generator().manual_seed(seed)
    images = 0.1 + 0.3 * torch.rand(n, 3, size, size, generator=gen)
    labels = torch.zeros(n, 3, size, size, dtype=torch.long)
    side = torch.randint(4, 9, (n,), generator=gen)
    top = (torch.rand(n, generator=gen) * (size - side)).long()
    left = (torch.rand(n, generator=gen) * (size - side)).long()
    colour = torch.arange(n) % 3
    ys, xs = torch.arange(size).view(1, -1, 1), torch.arange(size).view(1, 1, -1)
    inside = (
        (ys >= top.view(-1, 1, 1))
        & (ys < (top + side).view(-1, 1, 1))
        & (xs >= left.view(-1, 1, 1))
        & (xs < (left + side).view(-1, 1, 1))
    )
    rgb = torch.tensor(list(COLOURS.values()))[colour]  # (n, 3)
    images = torch.where(inside.unsqueeze(1), rgb.view(n, 3, 1, 1), images)
    labels[:, 0][inside] = 1
    labels[:, 1] = torch.where(inside, (2 + colour).view(-1, 1, 1), 0)
    labels[:, 2] = torch.where(inside, 0, 5)
    return FakeProbeData(images, labels, TOY_CONCEPTS, ["object", "colour", "background"])


class Detectors(nn.Module):
    """Units: 0 copies R, 1 is the object mask (bright pixels), 2 copies G, 3 is dead."""

    def forward(self, x: Tensor) -> Tensor:
        brightness = torch.relu(x.amax(dim=1, keepdim=True) - 0.5)
        return torch.cat([x[:, :1], brightness, x[:, 1:2], torch.zeros_like(x[:, :1])], dim=1)


class ToyNet(nn.Module):
    """Hand-built detectors, a 2x2 average pool, GAP and a linear head."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.detect = Detectors()
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(4, num_classes)
        with torch.no_grad():
            self.fc.weight.copy_(
                torch.tensor([[3.0, 0.0, -1.0, 0.0], [-1.0, 1.0, 2.0, 0.0], [0.0, -1.0, 0.5, 0.0]])
            )
            self.fc.bias.zero_()
        self.num_classes = num_classes
        self.feature_layer, self.head = "pool", "fc"
        self.dissection_layers = ("detect", "pool")

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.detect(x)).mean(dim=(2, 3)))


class RandomConvNet(nn.Module):
    """A small random conv net for reference comparisons (downsampling by 2 and 4)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.features = nn.Sequential(
            nn.Conv2d(3, 5, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(5, 6, 3, stride=2, padding=1),
        )
        self.fc = nn.Linear(6, 4)
        self.num_classes = 4
        self.feature_layer, self.head = "features.2", "fc"
        self.dissection_layers = ("features.1", "features.2")

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


RANDOM_CONCEPTS = [Concept(f"a{i}", "A") for i in range(3)] + [
    Concept(f"b{i}", "B") for i in range(2)
]


def random_probe(n: int = 24, size: int = 12, seed: int = 1, batch_size: int = 5) -> FakeProbeData:
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, size, size, generator=gen)
    labels = torch.zeros(n, 2, size, size, dtype=torch.long)
    labels[:, 0] = torch.randint(0, 4, (n, size, size), generator=gen)  # 0 (none) or 1..3
    labels[:, 1] = torch.randint(4, 6, (n, size, size), generator=gen)  # 4..5
    labels[::3, 1] = 0  # every third image is not annotated for category B
    return FakeProbeData(images, labels, RANDOM_CONCEPTS, ["A", "B"], batch_size)


# Reference implementation (numpy, loops) ------------------------------------------------------


def bilinear_reference(a: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Bilinear upsampling with half-pixel centres (align_corners=False), in float64."""

    def axis(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
        i0 = np.floor(src).astype(int)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, src - i0

    y0, y1, wy = axis(a.shape[-2], out_h)
    x0, x1, wx = axis(a.shape[-1], out_w)
    top = a[..., y0, :][..., x0] * (1 - wx) + a[..., y0, :][..., x1] * wx
    bottom = a[..., y1, :][..., x0] * (1 - wx) + a[..., y1, :][..., x1] * wx
    return top * (1 - wy[:, None]) + bottom * wy[:, None]


def dissect_reference(
    acts: np.ndarray, labels: np.ndarray, concept_category: list[int], q: float
) -> tuple[np.ndarray, np.ndarray]:
    """Thresholds (K,) and IoU (K, C+1) by the textbook definition, with explicit loops."""
    n, k = acts.shape[:2]
    size = labels.shape[-2:]
    thresholds = np.array([np.quantile(acts[:, u].astype(np.float64), 1 - q) for u in range(k)])
    floors = acts.min(axis=(0, 2, 3)).astype(np.float64)
    s = bilinear_reference(acts.astype(np.float64), *size)
    iou = np.zeros((k, len(concept_category)))
    for u in range(k):
        mask = (s[:, u] >= thresholds[u]) & (s[:, u] > floors[u])
        for c in range(1, len(concept_category)):
            g = concept_category[c]
            annotated = (labels[:, g] > 0).reshape(n, -1).any(axis=1)
            concept = labels[:, g] == c
            inter = (mask & concept).sum()
            union = (mask[annotated] | concept[annotated]).sum()
            iou[u, c] = inter / union if union else 0.0
    return thresholds, iou


def all_activations(model: nn.Module, images: Tensor, layer: str) -> np.ndarray:
    captured = {}
    handle = model.get_submodule(layer).register_forward_hook(
        lambda _m, _i, out: captured.__setitem__("a", out.detach())
    )
    with torch.no_grad():
        model(images)
    handle.remove()
    return captured["a"].numpy()


def flat_result(result: AnalysisResult) -> dict[str, Tensor]:
    """Scalars and per-unit tensors of a dissection result under one key space:
    ``<layer>/<scalar>`` and ``<layer>/unit_<field>``."""
    out = dict(result.scalars)
    for name, units in result.details["units"].items():
        for field in dataclasses.fields(units):
            value = getattr(units, field.name)
            if field.name == "head":
                out.update({f"{name}/unit_{k}": v for k, v in value.items()})
            else:
                out[f"{name}/unit_{field.name}"] = value
    return out


# Thresholds -----------------------------------------------------------------------------------


def radix_thresholds(data: Tensor, q: float, bins: int, batches: int) -> Tensor:
    rq = RadixQuantile(data.shape[1], q, bins, torch.device("cpu"))
    while not rq.done:
        tallies = rq.new_tallies()
        for chunk in data.chunk(batches):
            rq.accumulate(tallies, chunk)
        rq.advance(tallies)
    return rq.thresholds()


def test_ordered_keys_sort_like_floats_and_invert() -> None:
    x = torch.cat([torch.randn(500) * 10, torch.tensor([0.0, -0.0, 1e-38, -1e-38, 3e38])])
    keys = ordered_keys(x)
    assert torch.equal(keys_to_values(keys), x)
    assert bool((keys >= 0).all() and (keys < 2**32).all())
    assert torch.equal(x[keys.argsort()].sort().values, x.sort().values)


@pytest.mark.parametrize("bins", [16, 256, 65536])
@pytest.mark.parametrize("kind", ["normal", "relu", "ties", "constant", "signed_zeros"])
def test_radix_thresholds_equal_numpy_quantile(bins: int, kind: str) -> None:
    gen = torch.Generator().manual_seed(3)
    data = {
        "normal": torch.randn(60, 3, 5, 5, generator=gen) * 4,
        "relu": torch.relu(torch.randn(60, 3, 5, 5, generator=gen)),
        "ties": torch.randint(-2, 3, (60, 3, 5, 5), generator=gen).float(),
        "constant": torch.full((60, 3, 5, 5), 0.25),
        "signed_zeros": torch.tensor([0.0, -0.0, 1.0]).repeat(500).view(60, 1, 5, 5),
    }[kind]
    for q in (0.005, 0.05, 0.37):
        got = radix_thresholds(data, q, bins, batches=7).double().numpy()
        flat = data.transpose(0, 1).reshape(data.shape[1], -1).double().numpy()
        ref = np.quantile(flat, 1 - q, axis=1)
        # Stated bound: exact order statistics, one float32 rounding of numpy's lerp.
        np.testing.assert_allclose(got, ref, rtol=2**-23, atol=0)


@pytest.mark.parametrize("bins", [16, 64, 4096, 65536])
def test_locate_rank_equals_a_cumulative_search(bins: int) -> None:
    gen = torch.Generator().manual_seed(8)
    hist = torch.randint(0, 3, (5, bins), generator=gen) * (
        torch.rand(5, bins, generator=gen) < 0.1
    )
    hist[0] = 0
    hist[0, -1] = 4  # everything in the last bin
    cum = hist.cumsum(dim=1)
    total = cum[:, -1].contiguous()
    for rank in (torch.zeros_like(total), total // 2, (total - 1).clamp_min(0), total):
        want = torch.searchsorted(cum, rank.view(-1, 1), right=True).view(-1)
        before = torch.where(
            want > 0, cum.gather(1, (want - 1).clamp(0, bins - 1).view(-1, 1)).view(-1), 0
        )
        got, got_before = locate_rank(hist, rank)
        assert torch.equal(got, want)
        assert torch.equal(got_before, before)


@pytest.mark.parametrize("nan", [math.nan, -math.nan])
def test_radix_rejects_nan_but_keeps_infinities(nan: float) -> None:
    data = torch.tensor([1.0, math.inf, -math.inf, 0.5]).repeat(50).view(10, 1, 4, 5)
    ref = np.quantile(data.flatten().double().numpy(), 0.7)  # 1.0: infinities at both ends
    assert radix_thresholds(data, 0.3, 256, batches=2).tolist() == [ref]
    data[3, 0, 1, 1] = nan
    with pytest.raises(ValueError, match="NaN"):
        radix_thresholds(data, 0.3, 256, batches=2)


def test_radix_thresholds_do_not_depend_on_batching() -> None:
    data = torch.randn(40, 4, 3, 3)
    a = radix_thresholds(data, 0.005, 256, batches=1)
    b = radix_thresholds(data[torch.randperm(40)], 0.005, 256, batches=9)
    assert torch.equal(a, b)


# IoU --------------------------------------------------------------------------------------------


def test_iou_tally_counts_by_hand() -> None:
    masks = torch.zeros(2, 1, 2, 2, dtype=torch.bool)
    masks[0, 0, 0, :] = True  # image 0: top row
    masks[1, 0, :, 0] = True  # image 1: left column
    labels = torch.zeros(2, 1, 2, 2, dtype=torch.long)
    labels[0, 0, 0, 0] = 1
    labels[0, 0, 1, :] = 2
    tally = iou_tally(masks, labels, concepts=2)
    assert tally.intersection.tolist() == [[3, 1, 0]]  # column 0: mask pixels with no label
    assert tally.mask_area.tolist() == [[2]]  # image 1 has no label: not annotated
    assert tally.label_area[1:].tolist() == [1, 2]


@pytest.mark.parametrize(
    ("low", "high"), [(4, 12), (16, 32), (7, 112), (5, 12), (13, 7), (6, 6), (3, 9)]
)
def test_sparse_tally_equals_the_dense_masks(low: int, high: int) -> None:
    """Visiting only pixels next to hot cells must not lose a pixel; up, down, same size."""
    gen = torch.Generator().manual_seed(4)
    acts = torch.rand(6, 5, low, low, generator=gen)
    acts[:, 0] = 0.9  # constant maps equal to the threshold: all mask (upsampled exactly)
    acts[0, 0, 0, 0] = 0.1  # so 0.9 is not the unit's floor
    acts[:3, 1] = 0.3
    acts[:, 4] = 0.0  # dead unit at its floor
    acts[4, 2] = -acts[4, 2]  # a signed unit
    thresholds = torch.tensor([0.9, 0.3, 0.95, 0.8, 0.0])
    floors, maxima = acts.amin(dim=(0, 2, 3)), acts.amax(dim=(0, 2, 3))
    labels = torch.randint(0, 4, (6, 2, high, high), generator=gen)
    labels[:, 1] = torch.where(labels[:, 1] > 0, 3 + labels[:, 1] % 2, 0)
    labels[:, 0] = labels[:, 0] % 3
    labels[5] = 0  # an image annotated for no category
    dense = activation_masks(acts, thresholds, floors, (high, high))
    reference = iou_tally(dense, labels, concepts=4)
    tally = empty_tally(5, 2, 4, torch.device("cpu"))
    mask_t = mask_thresholds(thresholds, floors)
    add_sparse_tally(tally, acts, mask_t, hot_bounds(mask_t, floors, maxima), labels)
    assert torch.equal(tally.intersection, reference.intersection)
    assert torch.equal(tally.mask_area, reference.mask_area)
    assert int(reference.intersection.sum()) > 0
    assert bool(dense[1:, 0].all()) and not bool(dense[:, 4].any())


def test_upsample_is_bilinear_with_half_pixel_centres() -> None:
    gen = torch.Generator().manual_seed(6)
    acts = torch.randn(2, 3, 5, 7, generator=gen)
    got = upsample(acts, (12, 9))
    ref = bilinear_reference(acts.double().numpy(), 12, 9)
    np.testing.assert_allclose(got.double().numpy(), ref, rtol=0, atol=4e-6)  # float32 weights
    torch.testing.assert_close(
        got, F.interpolate(acts, size=(12, 9), mode="bilinear", align_corners=False)
    )


def test_hand_built_detectors_find_their_concepts() -> None:
    data = coloured_squares(30)
    model = ToyNet().eval()
    dissection = Dissection(permutations=0, bootstrap=0)
    dissection.prepare(model, data)
    detect = dissection.probe.layers["detect"]
    names = [c.name for c in TOY_CONCEPTS]
    # unit 0 copies R: exactly the red objects; unit 1 is the object mask: the square.
    assert names[int(detect.best_concept[0]) - 1] == "red"
    assert float(detect.best_iou[0]) == pytest.approx(1.0)
    assert names[int(detect.best_concept[1]) - 1] == "square"
    assert float(detect.best_iou[1]) == pytest.approx(1.0)
    assert names[int(detect.best_concept[2]) - 1] == "green"
    assert float(detect.best_iou[2]) == pytest.approx(1.0)
    # The dead unit has an empty mask, not a mask of every pixel.
    assert float(detect.best_iou[3]) == 0.0
    assert int(detect.tally.intersection[3].sum()) == 0
    # Pooled and upsampled back, the red detector still reads as red (a binary unit keeps
    # only pixels that interpolate to its top value, so the IoU drops but stays > 0.04).
    pool = dissection.probe.layers["pool"]
    assert names[int(pool.best_concept[0]) - 1] == "red"
    assert float(pool.best_iou[0]) > dissection.iou_threshold


@pytest.mark.parametrize("histogram_bytes", [1 << 28, 5 * 64 * 8])
def test_iou_matches_numpy_reference_on_random_data(
    histogram_bytes: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A small histogram cap gives the 5- and 6-unit layers 64 and 32 bins: 6 and 7 passes.
    monkeypatch.setattr(probe_module, "_HISTOGRAM_BYTES", histogram_bytes)
    data = random_probe()
    model = RandomConvNet().eval()
    dissection = Dissection(quantile=0.05, bins=256, permutations=0, bootstrap=0)
    if histogram_bytes < 1 << 28:
        assert [layer_bins(k, 256) for k in (5, 6)] == [64, 32]
    dissection.prepare(model, data)
    images, labels = data.dataset.images, data.dataset.labels.numpy()
    category = dissection.probe.table.concept_category.tolist()
    category[0] = 0
    for layer in model.dissection_layers:
        acts = all_activations(model, images, layer)
        thresholds, iou = dissect_reference(acts, labels, category, 0.05)
        result = dissection.probe.layers[layer]
        np.testing.assert_allclose(result.thresholds.double().numpy(), thresholds, rtol=2**-23)
        np.testing.assert_allclose(result.iou.numpy(), iou, rtol=1e-12, atol=1e-12)
        assert float(result.iou.max()) > 0.0


def test_cache_runs_the_model_once_per_image_and_changes_nothing(tmp_path: Path) -> None:
    """With the cache: one truncated forward per probe batch (plus one for the layer shapes),
    the head never runs, the same numbers as re-running the model, and no file left."""
    data = random_probe(n=23, batch_size=4)  # 6 batches, the last one short
    model = RandomConvNet().eval()
    calls = {"features.0": 0, "fc": 0}
    for name in calls:
        model.get_submodule(name).register_forward_hook(
            lambda _m, _i, _o, name=name: calls.__setitem__(name, calls[name] + 1)
        )
    results = {}
    for cached in (True, False):
        calls.update({"features.0": 0, "fc": 0})
        dissection = Dissection(
            quantile=0.05,
            bins=16,  # 8 radix passes
            top_units=0,  # no showcase figure: its forwards are not probe passes
            permutations=0,
            bootstrap=0,
            cache_features=cached,
            cache_dir=str(tmp_path),
        )
        dissection.prepare(model, data)
        forwards = 1 + 6 if cached else 1 + 6 * (8 + 1)
        assert calls == {"features.0": forwards, "fc": 0}
        assert len(dissection.probe.pass_seconds) == 8 + 1
        assert list(tmp_path.iterdir()) == []
        results[cached] = dissection.probe.layers
    for name, layer in results[True].items():
        other = results[False][name]
        for key in ("thresholds", "floors", "top_index", "top_scores", "iou"):
            assert torch.equal(getattr(layer, key), getattr(other, key)), key
        for got, want in zip(layer.tally.tensors(), other.tally.tensors(), strict=True):
            assert torch.equal(got, want)


def test_max_probe_images_equals_a_truncated_probe_set() -> None:
    data = random_probe(n=24)
    model = RandomConvNet().eval()
    limited = Dissection(bins=256, max_probe_images=10, permutations=0, bootstrap=0)
    limited.prepare(model, data)
    small = FakeProbeData(
        data.dataset.images[:10],
        data.dataset.labels[:10],
        RANDOM_CONCEPTS,
        ["A", "B"],
        batch_size=3,
    )
    full = Dissection(bins=256, permutations=0, bootstrap=0)
    full.prepare(model, small)
    for layer in model.dissection_layers:
        assert torch.equal(
            limited.probe.layers[layer].thresholds, full.probe.layers[layer].thresholds
        )
        assert torch.equal(
            limited.probe.layers[layer].tally.intersection,
            full.probe.layers[layer].tally.intersection,
        )
    assert limited.probe.probe_images == 10


def test_top_images_do_not_depend_on_batch_split() -> None:
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (3, 20), generator=gen).float()  # many ties
    index = torch.arange(20)
    empty = (torch.full((3, 4), -math.inf), torch.full((3, 4), 1 << 62))
    whole = merge_top(scores, index, *empty, 4)
    perm = torch.randperm(20, generator=gen)
    running = empty
    for part in perm.chunk(6):
        running = merge_top(scores[:, part], index[part], *running, 4)
    assert torch.equal(whole[0], running[0]) and torch.equal(whole[1], running[1])
    expected = sorted(range(20), key=lambda i: (-float(scores[0, i]), i))[:4]
    assert whole[1][0].tolist() == expected


# Sensitivity ----------------------------------------------------------------------------------


def test_sensitivity_signs_and_values_on_a_toy_shift() -> None:
    """R up by 0.1 everywhere, G down by 0.05: unit 0 promoted, unit 2 suppressed."""
    gen = torch.Generator().manual_seed(0)
    x = 0.2 + 0.6 * torch.rand(16, 3, 8, 8, generator=gen)
    x_adv = x.clone()
    x_adv[:, 0] += 0.1
    x_adv[:, 1] -= 0.05
    model = ToyNet().eval()
    dissection = Dissection(permutations=50, bootstrap=10)
    dissection.prepare(model, coloured_squares(12))
    y = torch.zeros(16, dtype=torch.long)
    target = torch.ones(16, dtype=torch.long)
    with torch.no_grad():
        logits, logits_adv = model(x), model(x_adv)
    for half in (slice(0, 9), slice(9, 16)):
        dissection.update(
            model,
            AdversarialBatch(
                x=x[half],
                y=y[half],
                index=torch.arange(16)[half],
                logits_clean=logits[half],
                x_adv=x_adv[half],
                logits_adv=logits_adv[half],
                target=target[half],
                success=torch.ones(len(x[half]), dtype=torch.bool),
                targeted=True,
            ),
        )
    out = flat_result(dissection.compute())
    sigma_r = x[:, 0].mean(dim=(1, 2)).double().std()
    s_plus, s_minus = out["detect/unit_s_plus"], out["detect/unit_s_minus"]
    assert float(s_plus[0]) == pytest.approx(0.1 / float(sigma_r), rel=1e-5)
    assert float(s_minus[0]) == pytest.approx(0.0, abs=1e-9)
    sigma_g = x[:, 1].mean(dim=(1, 2)).double().std()
    assert float(s_minus[2]) == pytest.approx(0.05 / float(sigma_g), rel=1e-5)
    assert float(s_plus[2]) == pytest.approx(0.0, abs=1e-9)
    assert float(out["detect/unit_s"][3]) == 0.0  # the dead unit never moves
    # Exact unit-level PSE at the GAP + linear head: sum_k w_{c,k} Δ_k is the logit change.
    dz = (logits_adv - logits).double()
    promo = out["pool/unit_promotion_signed"].sum()
    supp = out["pool/unit_suppression_signed"].sum()
    assert float(promo) == pytest.approx(float(dz[:, 1].mean()), rel=1e-5)
    assert float(supp) == pytest.approx(float(-dz[:, 0].mean()), rel=1e-5)
    assert float(out["images"]) == 16


def test_sensitivity_sums_stream_exactly() -> None:
    clean, adv = torch.rand(10, 4), torch.rand(10, 4)
    terms = sensitivity_terms(clean, adv)
    whole = sensitivity_from_sums(terms.sum(dim=1), torch.tensor(10.0))
    parts = terms[:, :3].sum(dim=1) + terms[:, 3:].sum(dim=1)
    split = sensitivity_from_sums(parts, torch.tensor(10.0))
    delta = (adv - clean).double()
    sigma = clean.double().std(dim=0)
    torch.testing.assert_close(whole["s_plus"], delta.clamp_min(0).mean(0) / sigma)
    torch.testing.assert_close(whole["s"], delta.abs().mean(0) / sigma)
    torch.testing.assert_close(whole["s"], split["s"])


def test_poisson_weights_depend_only_on_index() -> None:
    index = torch.arange(4000)
    w = poisson_weights(index, 8, seed=0)
    assert torch.equal(w[:, 0], torch.ones(4000, dtype=torch.float64))
    assert torch.equal(poisson_weights(index[1000:1010], 8, 0), w[1000:1010])
    assert float(w[:, 1:].mean()) == pytest.approx(1.0, abs=0.03)
    assert float(w[:, 1:].var()) == pytest.approx(1.0, abs=0.05)


# Statistics ---------------------------------------------------------------------------------


def test_rank_statistics_match_scipy() -> None:
    gen = torch.Generator().manual_seed(5)
    x = torch.randint(0, 6, (40,), generator=gen).double()
    y = x + torch.randn(40, generator=gen, dtype=torch.float64)
    np.testing.assert_allclose(rankdata(x).numpy(), scipy.stats.rankdata(x.numpy()))
    assert float(spearman(x, y)) == pytest.approx(scipy.stats.spearmanr(x, y)[0], abs=1e-12)
    a, b = x[:15], y[15:]
    u, p = mann_whitney_u(a, b)
    ref = scipy.stats.mannwhitneyu(a.numpy(), b.numpy(), method="asymptotic")
    assert float(u) == pytest.approx(ref.statistic)
    assert float(p) == pytest.approx(ref.pvalue, rel=1e-9)
    for observed, population, successes, draws in [(3, 50, 10, 8), (0, 20, 5, 5), (5, 30, 6, 5)]:
        assert hypergeom_sf(observed, population, successes, draws) == pytest.approx(
            scipy.stats.hypergeom.sf(observed - 1, population, successes, draws), rel=1e-9
        )


def test_permutation_pvalue_matches_exact_enumeration() -> None:
    x = torch.tensor([0.3, 1.2, 0.1, 2.5, 1.9, 0.7, 1.1], dtype=torch.float64)
    y = torch.tensor([0.2, 0.9, 0.5, 1.0, 2.2, 0.1, 1.7], dtype=torch.float64)
    rho = float(spearman(x, y))
    exact = np.mean(
        [
            abs(float(spearman(x, y[list(p)]))) >= abs(rho) - 1e-12
            for p in itertools.permutations(range(7))
        ]
    )
    p = float(permutation_pvalue(x, y, 10000, torch.Generator().manual_seed(0)))
    assert p == pytest.approx(exact, abs=0.015)


# The whole analysis -----------------------------------------------------------------------


def fake_adversarial_batches(
    model: nn.Module, n: int = 20, batch: int = 7, shard: tuple[int, int] = (0, 1)
) -> list[AdversarialBatch]:
    gen = torch.Generator().manual_seed(11)
    x = torch.rand(n, 3, 12, 12, generator=gen)
    x_adv = (x + 0.05 * torch.randn(n, 3, 12, 12, generator=gen)).clamp(0, 1)
    y = torch.randint(0, 4, (n,), generator=gen)
    target = (y + 1) % 4
    rank, world = shard
    keep = torch.arange(rank, n, world)
    out = []
    for part in keep.split(batch):
        with torch.no_grad():
            logits, logits_adv = model(x[part]), model(x_adv[part])
        out.append(
            AdversarialBatch(
                x=x[part],
                y=y[part],
                index=part,
                logits_clean=logits,
                x_adv=x_adv[part],
                logits_adv=logits_adv,
                target=target[part],
                success=torch.ones(len(part), dtype=bool),
                targeted=False,
            )
        )
    return out


def test_compute_and_report(tmp_path: Path) -> None:
    model = RandomConvNet().eval()
    dissection = Dissection(bins=256, quantile=0.05, permutations=200, bootstrap=20)
    dissection.prepare(model, random_probe())
    for batch in fake_adversarial_batches(model):
        dissection.update(model, batch)
    result = dissection.compute()
    assert all(v.dim() == 0 for v in result.scalars.values())  # per-unit tensors: details
    out = flat_result(result)
    for layer in model.dissection_layers:
        units = int(out[f"{layer}/units"])
        assert out[f"{layer}/unit_s"].shape == (units,)
        assert 0.0 <= float(out[f"{layer}/frac_interpretable"]) <= 1.0
        assert 0.0 < float(out[f"{layer}/spearman_p"]) <= 1.0
        assert float(out[f"{layer}/spearman_ci_low"]) <= float(out[f"{layer}/spearman_ci_high"])
    assert "features.2/unit_promotion" in out and "features.1/unit_promotion" not in out
    # report() reads only the result: a fresh instance that never saw the probe draws it.
    fresh = Dissection(bins=256, quantile=0.05, permutations=200, bootstrap=20)
    section = fresh.report(result, tmp_path, [])
    assert [p.name for p in section.figures] == [
        "dissection_iou_vs_sensitivity.png",
        "dissection_interpretable_units.png",
        "dissection_top_images.png",
        "dissection_sensitive_units.png",
    ]
    assert all(p.stem in section.captions for p in section.figures)
    assert all(p.stat().st_size > 1000 for p in section.figures)
    columns, rows = section.tables["units"]
    assert columns[:9] == [
        "layer",
        "unit",
        "concept",
        "category",
        "iou",
        "interpretable",
        "s_plus",
        "s_minus",
        "s",
    ]
    assert len(rows) == 5 + 6
    assert "Spearman" in section.markdown and "Holm" in section.markdown


def test_reset_then_the_same_batches_give_the_same_result() -> None:
    """Per-layer sums live in child metrics: reset must clear them with the image count."""
    model = RandomConvNet().eval()
    dissection = Dissection(bins=256, quantile=0.05, permutations=50, bootstrap=5)
    dissection.prepare(model, random_probe())
    batches = fake_adversarial_batches(model)
    runs = []
    for _ in range(2):
        for batch in batches:
            dissection.update(model, batch)
        runs.append(flat_result(dissection.compute()))
        dissection.reset()
    assert float(runs[0]["images"]) == 20
    for key, value in runs[0].items():
        assert torch.equal(value, runs[1][key]) or bool(value.isnan().all()), key


def test_random_weights_are_the_default_init_from_the_seed() -> None:
    """RandomConvNet(seed=0) is PyTorch's default init after manual_seed(0), in module
    order: re-initialising it from seed 0 must give the same weights, seed 1 others, and
    the global RNG must not move."""
    model = RandomConvNet(seed=0)
    state = torch.random.get_rng_state()
    same, other = random_weights(model, 0), random_weights(model, 1)
    assert torch.equal(torch.random.get_rng_state(), state)
    for (name, p), q, r in zip(
        model.named_parameters(), same.parameters(), other.parameters(), strict=True
    ):
        assert torch.equal(p, q), name
        assert not torch.equal(p, r), name


def test_baseline_and_category_rule_in_compute() -> None:
    """ToyNet's detectors have no weights: the random-weights baseline dissects them
    identically; a category is tested only with min_category_units interpretable units;
    every p-value has its Holm adjustment."""
    model = ToyNet().eval()
    data = coloured_squares(12)
    results = {}
    for min_units in (1, 2):
        dissection = Dissection(permutations=50, bootstrap=10, min_category_units=min_units)
        dissection.prepare(model, data)
        for batch in fake_adversarial_batches(model, n=12):  # ToyNet has 3 classes
            batch = dataclasses.replace(batch, y=batch.y % 3, target=batch.target % 3)
            dissection.update(model, batch)
        results[min_units] = dissection.compute().scalars
    out = results[1]
    assert out["detect/random/interpretable"] == out["detect/interpretable"] == 3
    assert out["detect/random/spearman_rho"] == out["detect/spearman_rho"]
    # detect: one object unit (square) and two colour units (red, green).
    assert "detect/colour/mannwhitney_p" in out and "detect/object/mannwhitney_p" in out
    assert "detect/colour/mannwhitney_p" in results[2]
    assert "detect/object/mannwhitney_p" not in results[2]
    # The trained − random differences are the Findings' tests, Holm-adjusted there.
    p_keys = [k for k in out if k.endswith("_p") and not k.endswith("delta_rho_p")]
    assert p_keys and all(f"{k}_holm" in out for k in p_keys)
    for k in p_keys:
        assert float(out[f"{k}_holm"]) >= float(out[k]) or math.isnan(float(out[k]))


def test_invalid_settings_name_their_key() -> None:
    with pytest.raises(ValueError, match="analysis.dissection.bins"):
        Dissection(bins=1000)
    with pytest.raises(ValueError, match="analysis.dissection.quantile"):
        Dissection(quantile=0.0)
    with pytest.raises(ValueError, match="analysis.dissection.layers"):
        Dissection(layers="features.1")
    with pytest.raises(ValueError, match="analysis.dissection.cache_features"):
        Dissection(cache_features="yes")
    data = random_probe()
    data.dataset.labels[0, 0, 0, 0] = 9
    with pytest.raises(ValueError, match="concept ids"):
        Dissection(bins=256).prepare(RandomConvNet().eval(), data)
    with pytest.raises(RuntimeError, match="prepare"):
        Dissection().update(RandomConvNet(), fake_adversarial_batches(RandomConvNet())[0])


# One process against two (gloo) ---------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_dissection(world: tuple[int, int]) -> dict[str, Tensor]:
    model = RandomConvNet().eval()
    dissection = Dissection(bins=256, quantile=0.05, permutations=100, bootstrap=10)
    dissection.prepare(model, random_probe(n=23, batch_size=4))
    for batch in fake_adversarial_batches(model, batch=3, shard=world):
        dissection.update(model, batch)
    out = flat_result(dissection.compute())
    for name, layer in dissection.probe.layers.items():
        out[f"{name}/intersection"] = layer.tally.intersection
        out[f"{name}/mask_area"] = layer.tally.mask_area
        out[f"{name}/top_index"] = layer.top_index
    return out


def _ddp_worker(rank: int, world: int, port: int, path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        out = _run_dissection((rank, world))
        if rank == 0:
            torch.save(out, path)
    finally:
        dist.destroy_process_group()


# Integer tallies and what follows from them must agree bit for bit; float sums of the
# sensitivity only up to summation order.
EXACT_KEYS = (
    "/unit_threshold",
    "/intersection",
    "/mask_area",
    "/unit_iou",
    "/top_index",
    "/unit_interpretable",
    "/unit_concept",
    "/interpretable",
    "/units",
    "/frac_interpretable",
)


@pytest.mark.slow
def test_two_processes_equal_one() -> None:
    single = _run_dissection((0, 1))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "out.pt")
        mp.spawn(_ddp_worker, args=(2, _free_port(), path), nprocs=2, join=True)
        double = torch.load(path, weights_only=True)
    assert single.keys() == double.keys()
    for key, value in single.items():
        if key.endswith(EXACT_KEYS):
            assert torch.equal(value, double[key]), key
        else:
            torch.testing.assert_close(
                value, double[key], rtol=1e-9, atol=1e-12, equal_nan=True, msg=key
            )


# Neuron masking -----------------------------------------------------------------------------


def _stats(values: list[float], mean: list[float] | None = None) -> UnitSensitivity:
    s = torch.tensor(values, dtype=torch.float64)
    mean_t = torch.tensor(mean if mean else [0.5] * len(values), dtype=torch.float64)
    return UnitSensitivity(
        layer="pool", s=s, s_plus=s / 2, s_minus=s / 2, clean_mean=mean_t, images=10
    )


def test_neuron_mask_replaces_chosen_units_and_k0_is_identity() -> None:
    model = ToyNet().eval()
    x = torch.rand(5, 3, 8, 8)
    with torch.no_grad():
        base = model(x)
        feats = model.pool(model.detect(x))
    stats = _stats([0.1, 0.9, 0.5, 0.0], mean=[0.3, 0.7, 0.2, 0.0])
    units = select_units(stats, 2)
    assert units.tolist() == [1, 2]
    assert select_units(stats, 2, selection="bottom").tolist() == [3, 0]
    masked = MaskedModel(model, "pool", units, torch.zeros(4))
    captured = {}
    handle = model.pool.register_forward_hook(lambda _m, _i, o: captured.__setitem__("a", o))
    with torch.no_grad():
        out = masked(x)
    handle.remove()
    assert bool((captured["a"][:, [1, 2]] == 0).all())
    assert torch.equal(captured["a"][:, [0, 3]], feats[:, [0, 3]])
    expected = feats.clone()
    expected[:, [1, 2]] = 0
    torch.testing.assert_close(out, model.fc(expected.mean(dim=(2, 3))))
    with torch.no_grad():
        assert torch.equal(model(x), base)  # the hook is gone after the wrapper's forward
        assert torch.equal(
            MaskedModel(model, "pool", select_units(stats, 0), torch.zeros(4))(x), base
        )
        with neuron_mask(model, "pool", torch.tensor([0]), stats.clean_mean.float()):
            filled = model.pool(model.detect(x))
    assert bool((filled[:, 0] == 0.3).all())


def _run_curve(defended: nn.Module, attack: FGSM, curve: Analysis, loader: list) -> Any:
    """The curve through the shared test pass: EvaluationModule under a Lightning trainer."""
    module = EvaluationModule(defended, attack, {curve.name: curve}, log_examples=0)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        inference_mode=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.test(module, dataloaders=loader, verbose=False)
    return module.result


@pytest.mark.pipeline  # the curve runs through Trainer.test (_run_curve)
def test_neuron_mask_config_and_curve_known_answers() -> None:
    """All units masked: the model predicts one constant class whatever the input; no unit
    masked: the undefended model. Paired tests and intervals from the per-image outcomes."""
    model = RandomConvNet().eval()
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(12, 3, 12, 12, generator=gen)
    y = torch.randint(0, 4, (12,), generator=gen)
    batches = [(x[:6], y[:6], torch.arange(6)), (x[6:], y[6:], torch.arange(6, 12))]
    attack = FGSM(eps=0.1)
    stats = unit_sensitivity(model, attack, batches)
    assert stats.layer == "features.2" and stats.units == 6 and stats.images == 12
    defense = NeuronMask(k=6, sweep=[0], draws=3, seed=1)
    curve = defense.evaluation(model, attack, stats)
    assert len(curve.masked) == 2  # k = 0 and k = 6 are one model whatever the selection
    loader = DataLoader(ProbeSet(x, y), batch_size=6)
    result = _run_curve(defense.apply(model, stats), attack, curve, loader)
    rows = result.analyses["neuron_mask"].details["rows"]
    assert [(r["k"], r["selection"], r["draw"]) for r in rows] == [
        (k, sel, d) for k in (0, 6) for sel, d in
        [("top", 0), ("random", 0), ("random", 1), ("random", 2), ("bottom", 0)]
    ]  # fmt: skip
    with torch.no_grad():
        clean_ok = model(x).argmax(1) == y
        masked = MaskedModel(model, stats.layer, torch.arange(6), stats.clean_mean.float())
        constant_ok = y == masked(x[:1]).argmax(1)
    robust_ok = torch.cat(
        [attack(model, *b[:2], index=b[2]).logits_adv.argmax(1) == b[1] for b in batches]
    )
    for row in rows:
        expect = (clean_ok, robust_ok, robust_ok) if row["k"] == 0 else (constant_ok,) * 3
        for metric, ok in zip(("clean", "transfer", "adaptive"), expect, strict=True):
            hits = int(ok.sum())
            assert row[f"{metric}_acc"] == pytest.approx(hits / 12)
            assert (row[f"{metric}_lo"], row[f"{metric}_hi"]) == wilson_interval(hits, 12)
    tests = result.analyses["neuron_mask"].details["tests"]
    # k = 6 against the undefended model only: top and bottom mask the same six units.
    assert [(t["k"], t["metric"], t["versus"]) for t in tests] == [
        (6, m, "undefended") for m in ("clean", "transfer", "adaptive")
    ]
    assert (tests[0]["only_top"], tests[0]["only_other"]) == (
        int((constant_ok & ~clean_ok).sum()),
        int((~constant_ok & clean_ok).sum()),
    )
    assert tests[0]["p"] == mcnemar_exact(constant_ok, clean_ok)
    assert tests[2]["p"] == mcnemar_exact(constant_ok, robust_ok)
    scalars = result.scalars
    assert scalars["test/neuron_mask/adaptive_acc"] == pytest.approx(
        float(constant_ok.double().mean())
    )
    assert scalars["test/neuron_mask/undefended_robust_acc"] == pytest.approx(
        float(robust_ok.double().mean())
    )
    # The defended model evaluated by the shared loop is the curve's top-6 mask.
    assert scalars["test/robust_acc"] == pytest.approx(scalars["test/neuron_mask/adaptive_acc"])
    assert scalars["test/clean_acc"] == pytest.approx(scalars["test/neuron_mask/clean_acc"])


def test_neuron_mask_settings_and_random_draws() -> None:
    stats = _stats([0.1, 0.9, 0.5, 0.0, 0.3, 0.7])
    defense = NeuronMask(k=2, rank_by="s_minus", fill="zero")
    defended = defense.apply(RandomConvNet().eval(), stats)
    assert defended.units.tolist() == select_units(stats, 2, "s_minus").tolist() == [1, 5]
    assert defended.num_classes == 4 and defended.feature_layer == "model.features.2"
    # Draw 0 is the single seeded permutation of earlier versions; later draws differ, and
    # within a draw the units are nested across k.
    first = torch.randperm(6, generator=torch.Generator().manual_seed(3))
    assert select_units(stats, 3, selection="random", seed=3).tolist() == first[:3].tolist()
    draws = [select_units(stats, 3, selection="random", seed=3, draw=d) for d in range(10)]
    assert len({tuple(sorted(d.tolist())) for d in draws}) > 1
    nested = select_units(stats, 5, selection="random", seed=3, draw=4)
    assert nested[:3].tolist() == draws[4].tolist()
    with pytest.raises(ValueError, match="defense.rank_by"):
        NeuronMask(rank_by="sigma")
    with pytest.raises(ValueError, match="defense.draws"):
        NeuronMask(draws=0)
    with pytest.raises(ValueError, match="defense.k"):
        select_units(stats, 7)


@pytest.mark.parametrize("act_size", [8, 3])  # at the label size, and upsampled from 3 x 3
def test_probe_replicate_tallies_weight_each_probe_image(act_size: int) -> None:
    """Replicate b of the IoU tally is the tally of the probe set with image n repeated
    w_{n,b} times: weights of 1 give the tally itself, weights (2, 0, 1, 1, 3, 1) the tally
    of images [0, 0, 2, 3, 4, 4, 4, 5]; the same in one batch or three."""
    from pse_lightning.analysis.dissection.tally import (
        add_replicate_labels,
        add_sparse_tally,
        empty_replicates,
        empty_tally,
        label_area,
    )

    gen = torch.Generator().manual_seed(0)
    n, units, size, concepts = 6, 5, 8, 3
    acts = torch.rand(n, units, act_size, act_size, generator=gen)
    labels = torch.zeros(n, 2, size, size, dtype=torch.long)
    labels[:, 0] = torch.randint(0, 3, (n, size, size), generator=gen)  # concepts 1, 2
    labels[:, 1] = torch.where(torch.rand(n, size, size, generator=gen) < 0.3, 3, 0)
    labels[3, 1] = 0  # image 3 is not annotated for the second category
    mask_t = torch.full((units,), 0.7)

    def tally(rows: list[int], weights: Tensor | None = None, cuts=((0, n),)):
        t = empty_tally(units, 2, concepts, torch.device("cpu"))
        r = empty_replicates(0 if weights is None else weights.shape[1], t)
        for lo, hi in cuts:
            part = rows[lo:hi]
            rep = None if weights is None else (r, weights[lo:hi])
            add_sparse_tally(t, acts[part], mask_t, mask_t, labels[part], rep)
            t.label_area += label_area(labels[part], concepts)
            if rep is not None:
                add_replicate_labels(r, labels[part], weights[lo:hi])
        return t, r

    weights = torch.tensor([[1.0, 2], [1, 0], [1, 1], [1, 1], [1, 3], [1, 1]], dtype=torch.float64)
    full, reps = tally(list(range(n)), weights)
    repeated, _ = tally([0, 0, 2, 3, 4, 4, 4, 5], cuts=((0, 8),))
    for b, expected in ((0, full), (1, repeated)):
        for got, want in zip(reps.tensors(), expected.tensors(), strict=True):
            assert torch.equal(got[b], want.double())
    _, batched = tally(list(range(n)), weights, cuts=((0, 2), (2, 5), (5, 6)))
    assert all(torch.equal(a, b) for a, b in zip(reps.tensors(), batched.tensors(), strict=True))
