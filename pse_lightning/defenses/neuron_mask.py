"""Neuron masking: silence the most attack-sensitive units of a layer at inference.

docs/METHODS.md §5: rank the units of a layer by their sensitivity s_k (or s⁻_k, s⁺_k)
measured on a calibration split, and set the top m to their clean mean μ_k (or to 0)
at inference through a forward hook. The defense is evaluated against examples
transferred from the unmasked model and, as required for any defense, against an adaptive
attack on the masked model itself, with two controls: m random units and the m least
sensitive units (:func:`accuracy_vs_k`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    stats: UnitSensitivity, k: int, rank_by: str = "s", selection: str = "top", seed: int = 0
) -> Tensor:
    """Indices (k,) of the units to mask.

    'top': the k most sensitive by ``rank_by``; 'bottom': the k least sensitive; 'random':
    the first k of a seeded permutation (nested across k, so a curve over k adds units).
    Ties are broken by the unit index, so the choice is deterministic.
    """
    require_at_least("defense.k", k, 0)
    require_choice("selection", selection, SELECTIONS)
    if k > stats.units:
        raise ValueError(f"defense.k must be <= the {stats.units} units of {stats.layer}, got {k}")
    if selection == "random":
        gen = torch.Generator().manual_seed(int(seed))
        return torch.randperm(stats.units, generator=gen)[:k]
    score = stats.score(rank_by).double()
    by_unit = torch.arange(stats.units)
    order = sorted(by_unit.tolist(), key=lambda u: (-float(score[u]), u))
    if selection == "bottom":
        order = sorted(by_unit.tolist(), key=lambda u: (float(score[u]), u))
    return torch.tensor(order[:k], dtype=torch.int64)


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
    unmasked when called directly (the transfer source of :func:`accuracy_vs_k`). It keeps
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


class NeuronMask:
    """The ``defense=neuron_mask`` choice: mask the k most sensitive units of a layer.

    Args:
        layer: dotted layer name; null for the model's ``feature_layer``.
        k: number of units to mask (0: the defense is the identity).
        rank_by: 's' (total), 's_minus' (suppression) or 's_plus' (promotion).
        fill: 'mean' (the clean mean μ_k) or 'zero'.
        sweep: the k values of the accuracy-vs-k curve.
        seed: seed of the random-units control.
    """

    def __init__(
        self,
        *,
        layer: str | None = None,
        k: int = 8,
        rank_by: str = "s",
        fill: str = "mean",
        sweep: Sequence[int] = (0, 1, 2, 4, 8, 16, 32),
        seed: int = 0,
    ) -> None:
        self.layer = layer
        self.k = require_at_least("defense.k", k, 0)
        self.rank_by = require_choice("defense.rank_by", rank_by, RANKINGS)
        self.fill = require_choice("defense.fill", fill, FILLS)
        self.sweep = [require_at_least("defense.sweep[]", int(v), 0) for v in sweep]
        self.seed = int(seed)

    def calibrate(
        self, model: nn.Module, attack: Attack, loader: Iterable, max_batches: int | None = None
    ) -> UnitSensitivity:
        """Unit sensitivities of ``self.layer`` on a calibration split."""
        return unit_sensitivity(model, attack, loader, self.layer, max_batches)

    def apply(self, model: nn.Module, stats: UnitSensitivity) -> MaskedModel:
        """The defended model for already measured sensitivities."""
        units = select_units(stats, self.k, self.rank_by, "top", self.seed)
        log.info(
            "neuron_mask: masking units %s of %s (by %s, fill %s)",
            units.tolist(),
            stats.layer,
            self.rank_by,
            self.fill,
        )
        return MaskedModel(model, stats.layer, units, fill_values(stats, self.fill))

    def fit(
        self, model: nn.Module, attack: Attack, loader: Iterable, max_batches: int | None = None
    ) -> MaskedModel:
        """Calibrate on ``loader`` and return the defended model."""
        return self.apply(model, self.calibrate(model, attack, loader, max_batches))

    def curve(
        self,
        model: nn.Module,
        attack: Attack,
        loader: Iterable,
        stats: UnitSensitivity,
        max_batches: int | None = None,
    ) -> list[dict[str, Any]]:
        """:func:`accuracy_vs_k` over ``self.sweep`` with this defense's settings."""
        ks = [k for k in self.sweep if k <= stats.units]
        return accuracy_vs_k(
            model,
            attack,
            loader,
            stats,
            ks=ks,
            rank_by=self.rank_by,
            fill=self.fill,
            seed=self.seed,
            max_batches=max_batches,
        )


def accuracy_vs_k(
    model: nn.Module,
    attack: Attack,
    loader: Iterable,
    stats: UnitSensitivity,
    *,
    ks: Sequence[int] = (0, 1, 2, 4, 8, 16),
    rank_by: str = "s",
    fill: str = "mean",
    selections: Sequence[str] = SELECTIONS,
    seed: int = 0,
    max_batches: int | None = None,
) -> list[dict[str, Any]]:
    """Clean and robust accuracy of the masked model as the number of masked units grows.

    For every batch the attack runs once on the unmasked model (transferred examples) and
    once on each distinct masked model (adaptive attack: it differentiates through the
    mask). Units are chosen from ``stats`` (measured on a separate calibration split):
    'top' (the defense), 'random' and 'bottom' (least sensitive) are the controls.

    Args:
        model: the undefended classifier.
        attack: the attack used for both the transferred and the adaptive examples.
        loader: evaluation batches (x, y, index); under DDP counts are all-reduced.
        stats: calibration sensitivities of the layer to mask.
        ks: numbers of masked units.
        rank_by, fill: see :class:`NeuronMask`.
        selections: which unit choices to evaluate.
        seed: seed of the random choice.
        max_batches: stop after this many batches (per process).

    Returns:
        One row per (k, selection): k, selection, units (list), n, clean_acc,
        transfer_acc, adaptive_acc.
    """
    for sel in selections:
        require_choice("selection", sel, SELECTIONS)
    values = fill_values(stats, fill)
    device = model_device(model)
    configs = [
        (k, sel, select_units(stats, k, rank_by, sel, seed)) for k in ks for sel in selections
    ]
    distinct: dict[tuple[int, ...], MaskedModel] = {}
    for _, _, units in configs:
        key = tuple(sorted(units.tolist()))
        if key not in distinct:
            distinct[key] = MaskedModel(model, stats.layer, units, values).to(device)
    # correct counts per distinct mask: clean, transferred, adaptive
    correct = {key: torch.zeros(3, dtype=torch.float64, device=device) for key in distinct}
    total = torch.zeros((), dtype=torch.float64, device=device)
    for b, (x, y, index) in enumerate(loader):
        if max_batches is not None and b >= max_batches:
            break
        x, y, index = x.to(device), y.to(device), index.to(device)
        x_transfer = attack(model, x, y, index=index).x_adv
        for key, masked in distinct.items():
            with frozen_eval(masked), torch.no_grad():
                clean = masked(x).argmax(dim=1) == y
                transfer = masked(x_transfer).argmax(dim=1) == y
            adaptive = attack(masked, x, y, index=index).logits_adv.argmax(dim=1) == y
            correct[key] += torch.stack([clean.sum(), transfer.sum(), adaptive.sum()]).double()
        total += len(x)
    all_reduce_(total)
    for tensor in correct.values():
        all_reduce_(tensor)
    n = max(float(total), 1.0)
    rows = []
    for k, sel, units in configs:
        c = correct[tuple(sorted(units.tolist()))].cpu() / n
        rows.append(
            {
                "k": k,
                "selection": sel,
                "units": units.tolist(),
                "n": int(total),
                "clean_acc": float(c[0]),
                "transfer_acc": float(c[1]),
                "adaptive_acc": float(c[2]),
            }
        )
    return rows


def accuracy_vs_k_figure(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Clean, transferred and adaptive robust accuracy against k, one line per selection."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = (
        ("clean_acc", "clean"),
        ("transfer_acc", "transferred"),
        ("adaptive_acc", "adaptive"),
    )
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2), sharey=True)
    for ax, (key, title) in zip(axes, metrics, strict=True):
        for sel, style in zip(SELECTIONS, ("-o", "--s", ":^"), strict=True):
            chosen = sorted((r for r in rows if r["selection"] == sel), key=lambda r: r["k"])
            if chosen:
                ax.plot([r["k"] for r in chosen], [r[key] for r in chosen], style, label=sel, ms=4)
        ax.set_title(f"{title} accuracy", fontsize=9)
        ax.set_xlabel("masked units k")
    axes[0].set_ylabel("accuracy")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
