"""CAM-guided refinement: any attack confined to the CAM region of the true class.

docs/METHODS.md §3.7, restricted attack: the perturbation may only touch B, the true
class's CAM mask on x dilated by ``dilate`` feature cells. Every attack takes a per-sample
support mask (:class:`~pse_lightning.attacks.base.AttackBatch`): gradients and random
starts are zeroed outside it, so the whole budget (or minimum-norm search) is spent inside
B, and the base class enforces it on the returned image. B is this attack's
``_region``; the wrapped attack is called through its public API with B as its support (so
early-abort row compaction works: the mask is compacted with the rows).
"""

from __future__ import annotations

from torch import Tensor, nn
from typing_extensions import Unpack

from pse_lightning.attacks.base import (
    COMMON_KEYS,
    Attack,
    AttackBatch,
    AttackOptions,
    Perturbation,
)
from pse_lightning.core import activation_maps as amaps
from pse_lightning.validation import require_at_least, require_choice, require_in_range


class CAMGuided(Attack):
    """Run ``attack`` with its perturbation confined to the true class's CAM region.

    Norm and budget are the wrapped attack's. ``targeted``, ``target_rule`` and ``seed`` are
    top-level keys as for every attack and must equal the wrapped attack's (the YAML files
    interpolate them: ``attack: {targeted: ${..targeted}, ...}``), so ``attack=cam_cw
    attack.targeted=true`` works like ``attack=cw attack.targeted=true`` and both runs aim
    at the same targets with the same per-sample noise. The wrapped attack is used only
    through its public call: this class resolves the targets and hands them, the indices and
    the support to it.

    Args:
        attack: the base attack (an :class:`Attack`; in YAML a nested config with
            ``_target_``, instantiated by Hydra).
        threshold: B = 1[normalised CAM >= threshold] before dilation.
        dilate: grow B by this many feature-map cells (docs/METHODS.md §3.7: one), so the
            edge of the discriminative region stays attackable.
        method: 'auto' (CAM for GAP + linear heads, Grad-CAM otherwise), 'cam', 'gradcam'.
        **common: targeted, target_rule, seed, compile: see :class:`~.base.Attack`.

    ``AttackResult.extras``: the wrapped attack's extras plus ``cam_area`` (N,), the share of
    pixels the perturbation was allowed to touch.
    """

    def __init__(
        self,
        *,
        attack: Attack,
        threshold: float = 0.2,
        dilate: int = 1,
        method: str = "auto",
        **common: Unpack[AttackOptions],
    ) -> None:
        if not isinstance(attack, Attack):
            raise TypeError(
                f"attack.attack must be an attack (a nested config with _target_, e.g. "
                f"pse_lightning.attacks.CWL2), got {type(attack).__name__}"
            )
        super().__init__(norm=attack.norm, eps=attack.eps, **common)
        for key in COMMON_KEYS:
            if getattr(attack, key) != getattr(self, key):
                raise ValueError(
                    f"attack.attack.{key}={getattr(attack, key)!r} differs from attack.{key}="
                    f"{getattr(self, key)!r}; set attack.attack.{key}: ${{..{key}}} in the YAML"
                )
        self.attack = attack
        self.threshold = require_in_range("attack.threshold", threshold, 0.0, 1.0)
        self.dilate = require_at_least("attack.dilate", dilate, 0)
        self.method = require_choice("attack.method", method, amaps.METHODS)
        self._mapper: amaps.ActivationMap | None = None

    @property
    def name(self) -> str:
        return f"CAMGuided({self.attack.name})"

    def region(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """(N, 1, H, W) bool: the dilated CAM mask of class y on x."""
        mapper = amaps.activation_map_for(model, self.method, key="attack")
        if type(self._mapper) is not type(mapper):
            self._mapper = mapper  # kept across batches: CAM verifies the head only once
        _, (raw,) = self._mapper.raw_maps(model, x, [y])
        size = (x.shape[-2], x.shape[-1])
        mask = amaps.threshold_mask(amaps.image_maps(raw, size), self.threshold)
        radius = amaps.cell_radius(size, (raw.shape[-2], raw.shape[-1]), self.dilate)
        return amaps.dilate_mask(mask, radius)[:, None]

    def _region(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor | None:
        return self.region(model, x, y)

    def _perturb(self, model: nn.Module, batch: AttackBatch) -> Perturbation:
        result = self.attack(model, batch.x, batch.y, target=batch.target, index=batch.index,
                             support=batch.support)  # fmt: skip
        extras = {**result.extras, "cam_area": amaps.mask_area(batch.support.any(dim=1))}
        return Perturbation(result.x_adv, result.logits_adv if result.scored else None, extras)
