"""Neuron masking: silence the most attack-sensitive units of a layer at inference.

docs/METHODS.md §5: rank the units of a layer by their sensitivity s_k (or s⁻_k, s⁺_k)
measured on a calibration split, and set the top k to their clean mean μ_k (or to 0) at
inference through a forward hook. The defense is evaluated against examples transferred
from the unmasked model and, as required for any defense, against an adaptive attack on
the masked model itself, with two controls: k random units (several seeded draws) and the
k least sensitive units (:class:`~pse_lightning.defenses.mask_curve.MaskCurve`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pse_lightning.analysis.dissection.sensitivity import (
    sensitivity_from_sums,
    sensitivity_terms,
    spatial_mean,
)
from pse_lightning.attacks import Attack
from pse_lightning.core.distributed import all_reduce_
from pse_lightning.core.hooks import capture_activations
from pse_lightning.core.model_state import frozen_eval, model_device
from pse_lightning.defenses.base import Defense
from pse_lightning.defenses.curve_stats import MaskChoice
from pse_lightning.defenses.mask_curve import MaskCurve
from pse_lightning.validation import require_at_least, require_choice

log = logging.getLogger(__name__)

RANKINGS: tuple[str, ...] = ("s", "s_minus", "s_plus")
FILLS: tuple[str, ...] = ("mean", "zero")
SELECTIONS: tuple[str, ...] = ("top", "random", "bottom")


@dataclass(frozen=True)
class UnitSensitivity:
    """Per-unit sensitivity of one layer, measured on a calibration split.

    Attributes:
        layer: dotted layer name.
        s, s_plus, s_minus: (K,) sensitivities (docs/METHODS.md §4.4).
        clean_mean: (K,) μ_k, the mean of the spatial-mean activation over clean images.
        images: number of calibration images.
    """

    layer: str
    s: Tensor
    s_plus: Tensor
    s_minus: Tensor
    clean_mean: Tensor
    images: int

    @property
    def units(self) -> int:
        return len(self.s)

    def score(self, rank_by: str) -> Tensor:
        """The ranking score named by ``rank_by`` ('s', 's_minus' or 's_plus')."""
        require_choice("defense.rank_by", rank_by, RANKINGS)
        return getattr(self, rank_by)


def unit_sensitivity(
    model: nn.Module,
    attack: Attack,
    loader: Iterable,
    layer: str | None = None,
    max_batches: int | None = None,
) -> UnitSensitivity:
    """Measure each unit's sensitivity to ``attack`` on a calibration loader.

    Args:
        model: the classifier ([0, 1] inputs); its ``feature_layer`` is the default layer.
        attack: crafts the adversarial examples of each batch.
        loader: batches (x, y, index); under DDP each rank passes its shard and the sums
            are all-reduced.
        layer: dotted name of the layer; None for ``model.feature_layer``.
        max_batches: stop after this many batches (per process).
    """
    layer = layer or getattr(model, "feature_layer", None)
    if not layer:
        raise ValueError(
            "defense.layer is null and the model has no feature_layer; "
            "set defense.layer=<layer name>"
        )
    device = model_device(model)
    sums, count = None, torch.zeros((), dtype=torch.float64, device=device)
    for b, (x, y, index) in enumerate(loader):
        if max_batches is not None and b >= max_batches:
            break
        x, y, index = x.to(device), y.to(device), index.to(device)
        x_adv = attack(model, x, y, index=index).x_adv
        with (
            frozen_eval(model),
            torch.no_grad(),
            capture_activations(model, [layer], detach=True) as captured,
        ):
            model(torch.cat([x, x_adv]))
            means = spatial_mean(captured[layer].float())
        terms = sensitivity_terms(means[: len(x)], means[len(x) :]).sum(dim=1)
        sums = terms if sums is None else sums + terms
        count += len(x)
    if sums is None:
        raise ValueError("the calibration loader yielded no batches")
    all_reduce_(sums)
    all_reduce_(count)
    sens = sensitivity_from_sums(sums.cpu(), count.cpu())
    return UnitSensitivity(
        layer=layer,
        s=sens["s"],
        s_plus=sens["s_plus"],
        s_minus=sens["s_minus"],
        clean_mean=sens["mean"],
        images=int(count),
    )


def select_units(
    stats: UnitSensitivity,
    k: int,
    rank_by: str = "s",
    selection: str = "top",
    seed: int = 0,
    draw: int = 0,
) -> Tensor:
    """Indices (k,) of the units to mask.

    'top': the k most sensitive by ``rank_by``; 'bottom': the k least sensitive; 'random':
    the first k of the ``draw``-th permutation drawn from a generator seeded with ``seed``
    (nested across k within a draw, so a curve over k adds units; draw 0 is the single draw
    of earlier versions). Ties are broken by the unit index, so the choice is deterministic.
    """
    require_at_least("defense.k", k, 0)
    require_choice("selection", selection, SELECTIONS)
    if k > stats.units:
        raise ValueError(f"defense.k must be <= the {stats.units} units of {stats.layer}, got {k}")
    if selection == "random":
        gen = torch.Generator().manual_seed(int(seed))
        for _ in range(require_at_least("draw", draw, 0) + 1):
            order = torch.randperm(stats.units, generator=gen)
        return order[:k]
    score = stats.score(rank_by).double()
    by_unit = torch.arange(stats.units)
    order = sorted(by_unit.tolist(), key=lambda u: (-float(score[u]), u))
    if selection == "bottom":
        order = sorted(by_unit.tolist(), key=lambda u: (float(score[u]), u))
    return torch.tensor(order[:k], dtype=torch.int64)


def mask_choices(
    stats: UnitSensitivity, ks: Sequence[int], rank_by: str, draws: int, seed: int
) -> list[MaskChoice]:
    """For every k: the top-k units, ``draws`` random draws of k units, the bottom k."""
    choices = []
    for k in ks:
        picks = [("top", 0)] + [("random", d) for d in range(draws)] + [("bottom", 0)]
        for selection, draw in picks:
            units = select_units(stats, k, rank_by, selection, seed, draw)
            choices.append(MaskChoice(k, selection, draw, tuple(units.tolist())))
    return choices


def fill_values(stats: UnitSensitivity, fill: str) -> Tensor:
    """(K,) replacement values: the clean means μ_k ('mean') or zeros ('zero')."""
    require_choice("defense.fill", fill, FILLS)
    return stats.clean_mean.float() if fill == "mean" else torch.zeros(stats.units)


@contextmanager
def neuron_mask(model: nn.Module, layer: str, units: Tensor, values: Tensor) -> Iterator[None]:
    """Inside the block, channels ``units`` of ``layer``'s output are replaced by
    ``values[units]`` at every position (a forward hook, always removed afterwards).

    The hook is prepended, so hooks registered earlier (activation capture, CAM) see the
    masked output, as the layers after it do. With no units the model is unchanged.

    Args:
        model: the model; ``layer`` is a dotted submodule name.
        units: (k,) long unit indices.
        values: (K,) replacement value of every unit (only ``units`` are used).
    """
    if len(units) == 0:
        yield
        return
    module = model.get_submodule(layer)
    units = units.long()

    def hook(_module: nn.Module, _inputs: tuple, output: Tensor) -> Tensor:
        keep = torch.ones(output.shape[1], dtype=torch.bool, device=output.device)
        keep[units.to(output.device)] = False
        shape = (1, -1) + (1,) * (output.dim() - 2)
        fill = values.to(device=output.device, dtype=output.dtype).view(shape)
        return torch.where(keep.view(shape), output, fill.expand_as(output))

    handle = module.register_forward_hook(hook, prepend=True)
    try:
        yield
    finally:
        handle.remove()


class MaskedModel(nn.Module):
    """``model`` with units of one layer replaced by fixed values (the defended model).

    The hook lives only during this wrapper's forward, so the wrapped model stays
    unmasked when called directly (the transfer source of the masking curve). It keeps
    the :class:`~pse_lightning.models.Classifier` facts (num_classes, layer names), so
    attacks and analyses treat it like any model; gradients flow through it (masked units
    pass none), which is what an adaptive attack must differentiate.
    """

    def __init__(self, model: nn.Module, layer: str, units: Tensor, values: Tensor) -> None:
        super().__init__()
        self.model = model
        self.layer = layer
        self.register_buffer("units", units.long().clone())
        self.register_buffer("values", values.float().clone())
        for attr in ("num_classes", "feature_layer", "head", "dissection_layers"):
            value = getattr(model, attr, None)
            if isinstance(value, str):
                value = f"model.{value}"
            elif attr == "dissection_layers" and value is not None:
                value = tuple(f"model.{v}" for v in value)
            setattr(self, attr, value)

    def forward(self, x: Tensor) -> Tensor:
        with neuron_mask(self.model, self.layer, self.units, self.values):
            return self.model(x)


class NeuronMask(Defense):
    """The ``defense=neuron_mask`` choice: mask the k most sensitive units of a layer.

    Args:
        layer: dotted layer name; null for the model's ``feature_layer``.
        k: number of units to mask (0: the defense is the identity).
        rank_by: 's' (total), 's_minus' (suppression) or 's_plus' (promotion).
        fill: 'mean' (the clean mean μ_k) or 'zero'.
        sweep: the k values of the accuracy-vs-k curve (``k`` is always added).
        draws: number of random-units draws of the control at each k (≥ 10 for a spread).
        seed: seed of the random-units control.
    """

    name = "neuron_mask"

    def __init__(
        self,
        *,
        layer: str | None = None,
        k: int = 8,
        rank_by: str = "s",
        fill: str = "mean",
        sweep: Sequence[int] = (0, 1, 2, 4, 8, 16, 32),
        draws: int = 10,
        seed: int = 0,
    ) -> None:
        self.layer = layer
        self.k = require_at_least("defense.k", k, 0)
        self.rank_by = require_choice("defense.rank_by", rank_by, RANKINGS)
        self.fill = require_choice("defense.fill", fill, FILLS)
        self.sweep = [require_at_least("defense.sweep[]", int(v), 0) for v in sweep]
        self.draws = require_at_least("defense.draws", draws, 1)
        self.seed = int(seed)

    def calibrate(self, model: nn.Module, attack: Attack, loader: Iterable) -> UnitSensitivity:
        """Unit sensitivities of ``self.layer`` on a calibration split."""
        return unit_sensitivity(model, attack, loader, self.layer)

    def apply(self, model: nn.Module, calibration: UnitSensitivity) -> MaskedModel:
        """The defended model for already measured sensitivities."""
        units = select_units(calibration, self.k, self.rank_by, "top", self.seed)
        log.info("neuron_mask: masking units %s; %s", units.tolist(), self.describe(calibration))
        return MaskedModel(model, calibration.layer, units, fill_values(calibration, self.fill))

    def describe(self, calibration: UnitSensitivity) -> str:
        return (
            f"the {self.k} units of `{calibration.layer}` (of {calibration.units}) with the "
            f"highest {self.rank_by} on {calibration.images} calibration images, set to "
            f"{'their clean mean' if self.fill == 'mean' else 'zero'}"
        )

    def evaluation(
        self, model: nn.Module, attack: Attack, calibration: UnitSensitivity
    ) -> MaskCurve:
        """Accuracy against k for the top, random and bottom units (docs/METHODS.md §5)."""
        ks = sorted({k for k in self.sweep if k <= calibration.units} | {self.k})
        choices = mask_choices(calibration, ks, self.rank_by, self.draws, self.seed)
        masks = {c.key: None for c in choices}
        values = fill_values(calibration, self.fill)
        masked = [
            MaskedModel(model, calibration.layer, torch.tensor(key, dtype=torch.int64), values)
            for key in masks
        ]
        return MaskCurve(
            model,
            attack,
            masked,
            choices,
            deployed_k=self.k,
            description=self.describe(calibration),
        )
