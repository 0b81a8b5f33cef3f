"""Read a weights file written by another tool into torchvision's key layout.

``model.weights=/path`` accepts (docs/MODELS.md has one example of each):

- a torchvision state dict (``conv1.weight``, ..., ``fc.bias``);
- the same inside a ``{"state_dict": ...}``, ``{"model": ...}`` or
  ``{"model_state_dict": ...}`` dict (Lightning, timm and most training scripts);
- keys prefixed ``module.`` (saved from ``DataParallel`` or ``DistributedDataParallel``);
- the madrylab robustness library's checkpoints (``{"model": ...}`` with
  ``module.model.<torchvision key>``, a second copy under ``module.attacker.model.`` and
  its normaliser ``module.normalizer.new_mean``/``new_std``): the copy is dropped and the
  normaliser's mean and std become the model's;
- RobustBench's ImageNet models as saved from the zoo (``normalize.mean``/``normalize.std``
  and ``model.<torchvision key>``, from its ``normalize_model`` wrapper), or the files it
  downloads (``state_dict`` with ``module.`` or ``model.`` prefixes).

The file is read with ``weights_only=True``: a checkpoint is data, never code.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn

from pse_lightning.models.checkpoint import CheckpointError
from pse_lightning.validation import refused_load, weights_file_problem

_WRAPPERS = ("state_dict", "model_state_dict", "model")


@dataclass(frozen=True)
class ForeignWeights:
    """A state dict in torchvision's key layout, with what the file said about its inputs.

    Attributes:
        state: parameter and buffer tensors keyed as torchvision names them.
        layout: the recognised format, for the log (``torchvision``, ``robustness``...).
        mean, std: the normalisation stored in the file (robustness, RobustBench), or None.
    """

    state: dict[str, Tensor]
    layout: str
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None


def unwrap_state(
    payload: object, what: str, wrappers: tuple[str, ...] = _WRAPPERS
) -> dict[str, Tensor]:
    """Descend through ``state_dict``/``model`` (or other ``wrappers``) entries to a dict of
    tensors; ``what`` names the file in the error (``model.weights=/path``)."""
    for _ in range(3):
        if (
            isinstance(payload, dict)
            and payload
            and all(isinstance(v, Tensor) for v in payload.values())
        ):
            return payload
        keys = wrappers if isinstance(payload, dict) else ()
        inner = next((payload[k] for k in keys if k in payload), None)
        if not isinstance(inner, dict):
            break
        payload = inner
    keys = list(payload)[:6] if isinstance(payload, dict) else type(payload).__name__
    raise CheckpointError(
        f"{what} holds no state dict (a dict of tensors, possibly under "
        f"{' or '.join(repr(w) for w in wrappers)}); found {keys}. See docs/MODELS.md"
    )


def _strip(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in state.items()}


def _stats(tensor: Tensor) -> tuple[float, ...]:
    return tuple(float(v) for v in tensor.flatten())


def to_torchvision_layout(state: dict[str, Tensor]) -> ForeignWeights:
    """Recognise the layout of ``state`` and rename its keys to torchvision's."""
    if all(k.startswith("module.") for k in state):
        state = _strip(state, "module.")
    if "normalizer.new_mean" in state and any(k.startswith("model.") for k in state):
        mean, std = _stats(state["normalizer.new_mean"]), _stats(state["normalizer.new_std"])
        kept = {k: v for k, v in state.items() if k.startswith("model.")}
        return ForeignWeights(_strip(kept, "model."), "robustness", mean, std)
    if "normalize.mean" in state and any(k.startswith("model.") for k in state):
        mean, std = _stats(state["normalize.mean"]), _stats(state["normalize.std"])
        kept = {k: v for k, v in state.items() if k.startswith("model.")}
        return ForeignWeights(_strip(kept, "model."), "robustbench", mean, std)
    if all(k.startswith("model.") for k in state):
        return ForeignWeights(_strip(state, "model."), "torchvision (model. prefix)")
    return ForeignWeights(state, "torchvision")


def read_foreign_weights(path: str | Path) -> ForeignWeights:
    """Read ``path`` (weights only) and bring it to torchvision's key layout.

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: the file cannot be read safely or holds no state dict.
    """
    path = Path(path).expanduser()
    problem = weights_file_problem("model.weights", path)
    if problem is not None:
        raise (FileNotFoundError if not path.exists() else CheckpointError)(problem)
    what = f"model.weights={path}"
    payload = load_weights_only(path, what)
    return to_torchvision_layout(unwrap_state(payload, what))


def load_weights_only(path: Path, what: str) -> object:
    """``torch.load(path, weights_only=True)`` on the CPU; ``what`` names the file and its
    key (``model.weights=<path>``) for the error.

    Raises:
        CheckpointError: corrupt, or holding pickled objects other than tensors.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt or pickled-code files
        raise CheckpointError(refused_load(what, err)) from err


def state_mismatch(own: dict[str, Tensor], state: dict[str, Tensor]) -> str | None:
    """What differs between a model's and a file's state dicts, or None if they match."""
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if not (missing or unexpected or shapes):
        return None
    parts = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected)):
        if items:
            parts.append(f"{len(items)} {label} {items[:5]}{'...' if len(items) > 5 else ''}")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatches {shapes[:5]}")
    return "; ".join(parts)


def head_name(net: nn.Module) -> str:
    """The classification head: the last Linear (or SqueezeNet's last 1x1 convolution)."""
    return [n for n, m in net.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)][-1]


def head_keys(net: nn.Module) -> set[str]:
    """State-dict keys of the classification head."""
    name = head_name(net)
    return {k for k in net.state_dict() if k.rsplit(".", 1)[0] == name}


def guess_architecture(state: dict[str, Tensor], near: str = "") -> str | None:
    """The torchvision architecture whose keys and shapes (head size aside) match ``state``.

    Models are built on the meta device (no memory, no initialisation), those of the
    family of ``near`` (``resnet`` for ``resnet50``) first: the usual mistake is a sibling;
    then those whose family the file's key names recall (``squeeze`` for ``squeezenet``),
    as building all sixty takes seconds. Only called to explain a mismatch.
    """
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    family = re.match(r"[a-z]*", near).group()
    words = {w for k in state for w in re.findall(r"[a-z]{5,}", k.lower())}

    def recalled(arch: str) -> bool:
        return any(w[:5] == arch[:5] for w in words)

    archs = torchvision.models.list_models(module=torchvision.models)
    for arch in sorted(
        archs, key=lambda a: (not (family and a.startswith(family)), not recalled(a), a)
    ):
        try:
            with torch.device("meta"):
                net = torchvision.models.get_model(arch, weights=None)
        except Exception:  # an architecture that cannot be built bare is no candidate
            continue
        own = {k: tuple(v.shape) for k, v in net.state_dict().items()}
        if set(own) != set(shapes):
            continue
        heads = head_keys(net)
        if all(own[k] == shapes[k] for k in own if k not in heads):
            return arch
    return None
