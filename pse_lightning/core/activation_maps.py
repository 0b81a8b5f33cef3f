"""Class activation maps: which image regions drive a class's logit.

The bottom-layer home of the maps, because both an attack (the CAM-guided restriction) and
the image-level analysis need them. :class:`ActivationMap` hooks the model's feature layer
during the forward pass that produces the logits and combines the captured channels with
per-image weights; :class:`CAM` (Zhou et al., 2016; GAP + linear head, no backward pass)
and :class:`GradCAM` (Selvaraju et al., 2017; any model, one backward pass to the features)
differ only in ``channel_weights``. The map maths below is batched with one target and one
normalisation per image (pytorch-grad-cam #264 normalised over the whole batch).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pse_lightning.core.hooks import capture_activations
from pse_lightning.validation import require_choice

METHODS: tuple[str, ...] = ("auto", "cam", "gradcam")


def weighted_channel_sum(features: Tensor, weights: Tensor) -> Tensor:
    """sum_k weights[n, k] * features[n, k]: the map shared by CAM and Grad-CAM.

    Args:
        features: (N, K, h, w) activations A_k of the feature layer.
        weights: (N, K) one channel-weight vector per image (its own target class).

    Returns:
        (N, h, w) raw maps, not rectified, not normalised.
    """
    if features.dim() != 4 or weights.shape != features.shape[:2]:
        raise ValueError(
            f"features must be (N, K, h, w) and weights (N, K); got {tuple(features.shape)} "
            f"and {tuple(weights.shape)}"
        )
    return torch.einsum("nk,nkhw->nhw", weights.to(features.dtype), features)


def cam_weights(head_weight: Tensor, target: Tensor) -> Tensor:
    """CAM channel weights w_{c,k}: the head's row of each image's target class.

    Args:
        head_weight: (num_classes, K) weight of the linear layer after global average
            pooling.
        target: (N,) class per image.

    Returns:
        (N, K).
    """
    return head_weight[target]


def gradcam_weights(grad: Tensor) -> Tensor:
    """Grad-CAM channel weights alpha_k = mean_{u,v} dZ_c / dA_k(u, v).

    On a GAP + linear head dZ_c / dA_k(u, v) = w_{c,k} / (h w) at every position, so these
    are the CAM weights divided by h w (the identity the tests check).

    Args:
        grad: (N, K, h, w) gradient of each image's target logit w.r.t. the features.

    Returns:
        (N, K).
    """
    return grad.mean(dim=(2, 3))


def upsample(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear upsampling of (N, h, w) maps to (N, H, W), align_corners=False.

    The mode is explicit because the default differs between libraries and shifts the maps
    by half a cell.
    """
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def minmax_normalise(maps: Tensor) -> Tensor:
    """Scale each (h, w) map of an (N, h, w) batch to [0, 1] on its own.

    A constant map carries no localisation and becomes all zeros, so it thresholds to an
    empty mask instead of dividing by zero.
    """
    flat = maps.flatten(1)
    low, high = torch.aminmax(flat, dim=1, keepdim=True)
    # A constant row has flat - low == 0 exactly, so it maps to 0 without a branch.
    scaled = (flat - low) / (high - low).clamp_min(torch.finfo(maps.dtype).tiny)
    return scaled.view_as(maps)


def image_maps(raw: Tensor, size: tuple[int, int]) -> Tensor:
    """Raw (N, h, w) maps -> (N, H, W) in [0, 1]: bilinear upsampling, then per-image
    min-max normalisation (the order of docs/METHODS.md §3.1)."""
    return minmax_normalise(upsample(raw, size))


def threshold_mask(maps: Tensor, threshold: float) -> Tensor:
    """B = 1[M >= threshold] on normalised (N, H, W) maps; the CAM paper uses 0.2."""
    return maps >= threshold


def top_area_mask(maps: Tensor, area: float) -> Tensor:
    """The round(area * H * W) highest-scoring pixels of each (N, H, W) map (at least one).

    Unlike a value threshold this gives every image the same mask area, so scores compare
    across images whose maps are flat or peaked.
    """
    n, h, w = maps.shape
    k = min(h * w, max(1, round(area * h * w)))
    flat = maps.flatten(1)
    top = flat.topk(k, dim=1).indices
    mask = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, top, True)
    return mask.view(n, h, w)


def dilate_mask(mask: Tensor, radius: int) -> Tensor:
    """Binary dilation of (N, H, W) masks by a (2 radius + 1)^2 square."""
    if radius <= 0:
        return mask
    grown = F.max_pool2d(mask[:, None].float(), 2 * radius + 1, stride=1, padding=radius)
    return grown[:, 0] > 0


def mask_area(mask: Tensor) -> Tensor:
    """Area share a = mean(B) of each (N, H, W) mask, shape (N,).

    A random pixel mask that holds each pixel with probability a has E[IS^2] = a exactly
    (E||B * delta||^2 = sum_i a delta_i^2), so a (and sqrt(a) on the IS scale) is the
    random-mask baseline and IS^2 / a the lift over it.
    """
    return mask.flatten(1).float().mean(dim=1)


def cell_radius(image_size: tuple[int, int], map_size: tuple[int, int], cells: int) -> int:
    """Pixels spanned by ``cells`` feature-map cells at the image's resolution."""
    if cells <= 0:
        return 0
    ratio = max(image_size[0] / map_size[0], image_size[1] / map_size[1])
    return int(math.ceil(cells * ratio))


class ActivationMap:
    """Weighted sums of a layer's channels, captured during the forward pass of the logits.

    Subclasses override only :meth:`channel_weights`. The hook lives in
    :func:`~pse_lightning.hooks.capture_activations`, so it is removed even when
    the forward pass or the weights raise (pytorch-grad-cam #132).

    Args:
        layer: dotted name of the feature layer; None takes ``model.feature_layer``.
    """

    #: Apply ReLU to the weighted sum (Grad-CAM keeps only positive evidence; CAM does not).
    rectify: bool = False
    #: Whether ``channel_weights`` differentiates through the features.
    needs_grad: bool = False

    def __init__(self, layer: str | None = None) -> None:
        self.layer = layer

    def channel_weights(
        self, model: nn.Module, features: Tensor, logits: Tensor, target: Tensor
    ) -> Tensor:
        """(N, K) weight of each channel of ``features`` (N, K, h, w) for each image's target."""
        raise NotImplementedError

    def resolve_layer(self, model: nn.Module) -> str:
        layer = self.layer or getattr(model, "feature_layer", None)
        if not layer:
            raise ValueError(
                f"{type(model).__name__} has no feature_layer; set analysis.layer to the dotted "
                "name of its last convolutional feature map"
            )
        return layer

    def raw_maps(
        self, model: nn.Module, x: Tensor, targets: Sequence[Tensor]
    ) -> tuple[Tensor, list[Tensor]]:
        """One forward pass; the maps of several target vectors share it.

        Args:
            model: classifier on [0, 1] images; the caller sets eval mode.
            x: (N, C, H, W) images.
            targets: one or more (N,) class vectors, one class per image.

        Returns:
            (logits (N, num_classes) of that same pass, [raw (N, h, w) map per target]).
        """
        layer = self.resolve_layer(model)
        if self.needs_grad:
            _require_autograd(type(self).__name__)
        grad_mode = torch.enable_grad() if self.needs_grad else torch.no_grad()
        with grad_mode, capture_activations(model, [layer], detach=not self.needs_grad) as acts:
            # An input that requires grad keeps the features in the graph even when the
            # parameters are frozen.
            inputs = x.detach().requires_grad_(True) if self.needs_grad else x
            logits = model(inputs)
            if layer not in acts:
                raise ValueError(f"layer {layer!r} did not run in the forward pass")
            features = acts[layer]
            if not isinstance(features, Tensor) or features.dim() != 4:
                raise ValueError(
                    f"layer {layer!r} must output an (N, K, h, w) tensor, got "
                    f"{getattr(features, 'shape', type(features).__name__)}"
                )
            maps = []
            for target in targets:
                weights = self.channel_weights(model, features, logits, target)
                raw = weighted_channel_sum(features.detach(), weights.detach())
                maps.append(raw.relu() if self.rectify else raw)
        return logits.detach(), maps

    def __call__(self, model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
        """Normalised (N, H, W) maps in [0, 1] at the input resolution, one per image."""
        _, (raw,) = self.raw_maps(model, x, [target])
        return image_maps(raw, (x.shape[-2], x.shape[-1]))


class CAM(ActivationMap):
    """Class activation map M_c = sum_k w_{c,k} A_k (Zhou et al., 2016).

    Exact for a net whose logits are a linear layer (``model.head``) on the global average
    of the feature layer. That structure is checked on the first call for each model:
    mean(M_c) + b_c must reproduce Z_c of the same forward pass.
    """

    def __init__(self, layer: str | None = None) -> None:
        super().__init__(layer)
        self._verified: set[tuple[int, str]] = set()

    def channel_weights(
        self, model: nn.Module, features: Tensor, logits: Tensor, target: Tensor
    ) -> Tensor:
        head = _linear_head(model)
        weights = cam_weights(head.weight.detach(), target)
        key = (id(model), self.resolve_layer(model))
        if key not in self._verified:
            self._verify(model, head, features, weights, logits, target)
            self._verified.add(key)
        return weights

    def _verify(
        self,
        model: nn.Module,
        head: nn.Linear,
        features: Tensor,
        weights: Tensor,
        logits: Tensor,
        target: Tensor,
    ) -> None:
        # GAP + linear: Z_c = sum_k w_ck mean(A_k) + b_c. A mismatch means the head is not
        # applied to the pooled feature layer and CAM would be meaningless.
        pooled = weighted_channel_sum(features.detach(), weights).mean(dim=(1, 2))
        bias = head.bias.detach()[target] if head.bias is not None else 0.0
        expected = logits.detach().gather(1, target[:, None])[:, 0]
        scale = 1e-3 * (1.0 + expected.abs())
        if not torch.all((pooled + bias - expected).abs() <= scale):
            raise ValueError(
                "analysis.cam.method=cam needs logits = head(global average of the feature "
                f"layer), but {type(model).__name__}.head={getattr(model, 'head', None)!r} "
                f"does not reproduce them from {self.resolve_layer(model)!r}; use "
                "analysis.cam.method=gradcam"
            )


class GradCAM(ActivationMap):
    """Grad-CAM L_c = ReLU(sum_k alpha_k A_k), alpha_k = mean dZ_c/dA_k (Selvaraju 2017)."""

    rectify = True
    needs_grad = True

    def channel_weights(
        self, model: nn.Module, features: Tensor, logits: Tensor, target: Tensor
    ) -> Tensor:
        # Summing the per-image target logits gives each image its own gradient (images are
        # independent in eval mode); autograd.grad leaves parameter .grad untouched.
        score = logits.gather(1, target[:, None]).sum()
        (grad,) = torch.autograd.grad(score, features, retain_graph=True)
        return gradcam_weights(grad)


def _require_autograd(what: str) -> None:
    # enable_grad() cannot undo inference_mode (Lightning #19910): fail with the fix.
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            f"{what} needs gradients but runs under torch.inference_mode(); set "
            "trainer.inference_mode=false"
        )


def _linear_head(model: nn.Module) -> nn.Linear:
    name = getattr(model, "head", None)
    if not name:
        raise ValueError(
            f"analysis.cam.method=cam needs a GAP + linear head, but {type(model).__name__} has "
            "head=None; use analysis.cam.method=gradcam (or auto)"
        )
    head = model.get_submodule(name)
    if not isinstance(head, nn.Linear):
        raise ValueError(
            f"analysis.cam.method=cam needs model.head to be nn.Linear, got {type(head).__name__} "
            f"at {name!r}; use analysis.cam.method=gradcam"
        )
    return head


def activation_map_for(
    model: nn.Module, method: str = "auto", layer: str | None = None, key: str = "analysis.cam"
) -> ActivationMap:
    """CAM when the model has a GAP + linear head (``model.head``), else Grad-CAM.

    Args:
        model: the classifier.
        method: 'auto', 'cam' or 'gradcam'.
        layer: feature layer override (default ``model.feature_layer``).
        key: config prefix named in errors.
    """
    require_choice(f"{key}.method", method, METHODS)
    if method == "auto":
        method = "cam" if getattr(model, "head", None) else "gradcam"
    return CAM(layer) if method == "cam" else GradCAM(layer)
