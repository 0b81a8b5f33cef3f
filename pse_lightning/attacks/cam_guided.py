"""CAM-guided refinement: any attack confined to the CAM region of the true class.

METHODS.md section 3 (a), restricted attack: the perturbation may only touch B, the true
class's CAM mask on x dilated by ``dilate`` feature cells. Instead of teaching every attack
a mask, the base attack runs unchanged on the reparametrised model

    f(x~) = model(x + B * (x~ - x)),

so its gradients vanish outside B and its success tests see exactly the image that will be
returned; the result is x_adv = x + B * (x~_adv - x). Masking can only shrink |delta|
coordinate-wise and keeps each pixel between x and x~ (inside [0, 1]), so the base attack's
Lp budget and the box still hold, and the returned image is the one f judged.
"""

from __future__ import annotations

from torch import Tensor, nn

from pse_lightning.analysis import cam as cam_maps
from pse_lightning.analysis.functional import cam as core
from pse_lightning.attacks.base import Attack, AttackResult
from pse_lightning.validation import require_at_least, require_choice, require_in_range


class MaskedInput(nn.Module):
    """``model(x + mask * (x_tilde - x))`` for one fixed batch of N rows.

    The batch (x, mask) is bound to row positions, so the wrapper refuses calls on another
    number of rows instead of pairing images with the wrong masks: attacks that drop
    finished rows mid-run (CW's early-abort compaction) must run with that switched off.
    """

    def __init__(self, model: nn.Module, x: Tensor, mask: Tensor) -> None:
        super().__init__()
        self.model = model
        self.x = x.detach()
        self.mask = mask.to(x.dtype)
        num_classes = getattr(model, "num_classes", None)
        if num_classes is not None:
            self.num_classes = num_classes

    def forward(self, x_tilde: Tensor) -> Tensor:
        if x_tilde.shape != self.x.shape:
            raise ValueError(
                f"attack=cam_*: the base attack evaluated {x_tilde.shape[0]} of "
                f"{self.x.shape[0]} rows (a row subset, e.g. CW/EAD early-abort compaction); "
                "the CAM mask is bound to row positions: set attack.attack.abort_early=false"
            )
        return self.model(self.x + self.mask * (x_tilde - self.x))


class CAMGuided(Attack):
    """Run ``attack`` with its perturbation confined to the true class's CAM region.

    Norm and budget are the wrapped attack's; ``targeted``, ``target_rule`` and ``seed``
    are top-level keys as for every attack and are written into the wrapped attack, so
    ``attack=cam_cw attack.targeted=true`` works like ``attack=cw attack.targeted=true`` and
    both runs aim at the same targets with the same per-sample noise.

    Args:
        attack: the base attack (an :class:`Attack`; in YAML a nested config with
            ``_target_``, instantiated by Hydra).
        threshold: B = 1[normalised CAM >= threshold] before dilation.
        dilate: grow B by this many feature-map cells (METHODS.md: one), so the edge of
            the discriminative region stays attackable.
        method: 'auto' (CAM for GAP + linear heads, Grad-CAM otherwise), 'cam', 'gradcam'.
        targeted, target_rule, seed: see :class:`~pse_lightning.attacks.base.Attack`.

    ``extras()`` after a call: the base attack's extras plus ``cam_area`` (N,), the share
    of pixels the perturbation was allowed to touch.
    """

    def __init__(
        self,
        *,
        attack: Attack,
        threshold: float = 0.2,
        dilate: int = 1,
        method: str = "auto",
        targeted: bool = False,
        target_rule: str = "random",
        seed: int = 0,
    ) -> None:
        if not isinstance(attack, Attack):
            raise TypeError(
                f"attack.attack must be an attack (a nested config with _target_, e.g. "
                f"pse_lightning.attacks.CWL2), got {type(attack).__name__}"
            )
        super().__init__(norm=attack.norm, eps=attack.eps, targeted=targeted,
                         target_rule=target_rule, seed=seed)  # fmt: skip
        # The wrapped attack's _perturb reads these (objective sign, random starts).
        attack.targeted, attack.target_rule, attack.seed = (
            self.targeted,
            self.target_rule,
            self.seed,
        )
        self.attack = attack
        self.threshold = require_in_range("attack.threshold", threshold, 0.0, 1.0)
        self.dilate = require_at_least("attack.dilate", dilate, 0)
        self.method = require_choice("attack.method", method, cam_maps.METHODS)
        self.last_mask: Tensor | None = None
        self._mapper: cam_maps.ActivationMap | None = None
        self._y: Tensor | None = None

    @property
    def name(self) -> str:
        return f"CAMGuided({self.attack.name})"

    def __call__(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        target: Tensor | None = None,
        index: Tensor | None = None,
    ) -> AttackResult:
        """As :meth:`Attack.__call__`; the true labels are kept for the mask of a targeted
        attack, whose ``_perturb`` only sees the target."""
        self._y = y
        try:
            return super().__call__(model, x, y, target, index)
        finally:
            self._y = None

    def region(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """(N, 1, H, W) bool: the dilated CAM mask of class y on x."""
        mapper = cam_maps.activation_map_for(model, self.method, key="attack")
        if type(self._mapper) is not type(mapper):
            self._mapper = mapper  # kept across batches: CAM verifies the head only once
        mapper = self._mapper
        _, (raw,) = mapper.raw_maps(model, x, [y])
        size = (x.shape[-2], x.shape[-1])
        maps = core.image_maps(raw, size)
        mask = core.threshold_mask(maps, self.threshold)
        radius = core.cell_radius(size, (raw.shape[-2], raw.shape[-1]), self.dilate)
        return core.dilate_mask(mask, radius)[:, None]

    def _perturb(self, model: nn.Module, x: Tensor, label: Tensor, index: Tensor) -> Tensor:
        if self._y is None and self.targeted:
            raise RuntimeError("CAMGuided needs the true labels: call the attack, not _perturb")
        y = label if self._y is None else self._y
        mask = self.region(model, x, y)
        self.last_mask = mask[:, 0]
        x_tilde = self.attack._perturb(MaskedInput(model, x, mask), x, label, index)
        return x + mask.to(x.dtype) * (x_tilde.detach() - x)

    def extras(self) -> dict[str, Tensor]:
        out = dict(self.attack.extras())
        if self.last_mask is not None:
            out["cam_area"] = core.mask_area(self.last_mask)
        return out
