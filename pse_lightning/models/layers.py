"""Find the layers the analyses hook in any torchvision classification network.

CAM, Grad-CAM and dissection read convolutional feature maps (docs/METHODS.md §3, §4).
The blocks are read from the module tree, not from a table per architecture, so every
torchvision classifier (and a user's variant of one) gets them:

- descend from the network through containers until at least three children hold
  convolutions (ResNet: ``conv1, layer1..layer4``; VGG/DenseNet/EfficientNet: the
  children of ``features``; RegNet: the stages of ``trunk_output``); auxiliary heads and
  classifier heads are skipped;
- a block is extended over the normalisations and activations right after it (VGG's
  ReLU after its last convolution, DenseNet's ``norm5``), so the hooked map is the one
  the rest of the network reads;
- the CAM layer is the last block, dissection takes the last two;
- a network with attention after its last convolution (ViT, Swin: the convolution is the
  patch embedding) has no convolutional feature map to explain: CAM and dissection get a
  clear error instead of maps of the patch embedding.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

#: Children never taken as feature blocks (auxiliary classifiers, classification heads).
_SKIPPED = ("aux", "classifier", "fc", "head")
#: Layers that may follow a block's last convolution and still belong to the block.
_BLOCK_TAIL = (nn.BatchNorm2d, nn.GroupNorm, nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish)
#: Layers allowed between the pooled feature map and the linear head of an exact CAM net.
_PASS_THROUGH = (nn.Dropout, nn.Flatten, nn.Identity)


@dataclass(frozen=True)
class FeatureLayers:
    """Dotted names (relative to the network) of the layers the analyses use.

    Attributes:
        feature_layer: last convolutional feature map (CAM, Grad-CAM), or None.
        dissection_layers: the last two feature blocks (dissection), or ().
        head: the linear layer applied right after global average pooling of
            ``feature_layer`` (exact CAM), or None (Grad-CAM is used then).
        missing: why there is no feature layer (None when there is one).
    """

    feature_layer: str | None
    dissection_layers: tuple[str, ...]
    head: str | None
    missing: str | None = None


def _has_conv(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in module.modules())


def _is_attention(module: nn.Module) -> bool:
    return isinstance(module, nn.MultiheadAttention) or "Attention" in type(module).__name__


def conv_blocks(net: nn.Module) -> tuple[list[str], nn.Module]:
    """Dotted names of the feature blocks of ``net`` and the container that holds them."""
    prefix, parent = "", net
    while True:
        kids = [
            (name, child)
            for name, child in parent.named_children()
            if _has_conv(child) and not name.lower().startswith(_SKIPPED)
        ]
        if not kids:
            return [], parent
        last_name, last = kids[-1]
        if len(kids) >= 3 or not list(last.children()):
            return [prefix + name for name, _ in kids], parent
        prefix, parent = f"{prefix}{last_name}.", last


def _extend(parent: nn.Module, prefix: str, name: str) -> str:
    """The block ``name`` extended over the normalisations/activations that follow it."""
    names = [n for n, _ in parent.named_children()]
    children = dict(parent.named_children())
    end = names.index(name)
    while end + 1 < len(names) and isinstance(children[names[end + 1]], _BLOCK_TAIL):
        end += 1
    return prefix + names[end]


def _modules_after(net: nn.Module, layer: str, leaves: bool = True) -> list[tuple[str, nn.Module]]:
    """Modules (leaves only, by default) registered after ``layer`` and outside it."""
    names = [(n, m) for n, m in net.named_modules() if n]
    start = next(i for i, (n, _) in enumerate(names) if n == layer)
    return [
        (n, m)
        for n, m in names[start + 1 :]
        if not n.startswith(f"{layer}.") and not (leaves and list(m.children()))
    ]


def gap_linear_head(net: nn.Module, layer: str) -> str | None:
    """The head if the network ends ``AdaptiveAvgPool2d(1) -> [dropout/flatten] -> Linear``
    right after ``layer`` (ResNet, Inception, RegNet, EfficientNet), else None."""
    tail = _modules_after(net, layer)
    if len(tail) < 2 or not isinstance(tail[0][1], nn.AdaptiveAvgPool2d):
        return None
    if tail[0][1].output_size not in (1, (1, 1)) or not isinstance(tail[-1][1], nn.Linear):
        return None
    if not all(isinstance(m, _PASS_THROUGH) for _, m in tail[1:-1]):
        return None
    return tail[-1][0]


def disable_inplace(net: nn.Module) -> None:
    """Turn off in-place activations: they overwrite the activations a hook captured
    (captum #156)."""
    for module in net.modules():
        if getattr(module, "inplace", False):
            module.inplace = False


def find_feature_layers(net: nn.Module, arch: str) -> FeatureLayers:
    """The CAM layer, dissection layers and exact-CAM head of ``net`` (see module doc)."""
    blocks, parent = conv_blocks(net)
    if blocks:
        prefix = blocks[-1].rsplit(".", 1)[0] + "." if "." in blocks[-1] else ""
        layers = [_extend(parent, prefix, b.rsplit(".", 1)[-1]) for b in blocks[-2:]]
        feature = layers[-1]
        if not any(_is_attention(m) for _, m in _modules_after(net, feature, leaves=False)):
            return FeatureLayers(feature, tuple(layers), gap_linear_head(net, feature))
    return FeatureLayers(
        None,
        (),
        None,
        missing=(
            f"model.arch={arch} has no convolutional feature map after which only pooling "
            "and the classifier follow (its convolutions, if any, embed patches for "
            "attention layers): CAM, Grad-CAM and dissection need one; use a convolutional "
            "architecture or set analysis.layer/analysis.layers to a layer with (N, C, H, W) "
            "output"
        ),
    )
