"""The checkpoint cache: trained weights keyed by model, dataset and training variant.

A cached file is trusted only if its recorded key and configuration hash match the run's
(NetDissect-Lite #17 shows what happens otherwise). Files are written atomically (temporary
file, then rename), so an interrupted save never leaves a file that looks complete, and
read with ``weights_only=True``: a checkpoint is data, never code.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pse_lightning.core.atomic import write_atomic
from pse_lightning.validation import InputError, refused_load, weights_file_problem

FORMAT_VERSION = 1


class CheckpointError(InputError):
    """A checkpoint exists but cannot be used (corrupt, another model, wrong keys)."""


def config_digest(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable configuration parts."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:10]


def cache_path(root: str | Path, model: str, dataset: str, training: str, digest: str) -> Path:
    """``<root>/<model>-<dataset>-<training>-<digest>.pt``."""
    return Path(root) / f"{model}-{dataset}-{training}-{digest}.pt"


def save_checkpoint(path: str | Path, model: nn.Module, meta: dict[str, Any]) -> Path:
    """Atomically write the model's weights and JSON-able ``meta`` to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format_version": FORMAT_VERSION,
        "meta_json": json.dumps(meta, sort_keys=True, default=str),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    return write_atomic(path, lambda handle: torch.save(payload, handle))


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read (state_dict, meta) safely.

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: the file is not a pse_lightning checkpoint or is corrupt.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"checkpoint {path} does not exist; pass an existing file as model_checkpoint=... "
            "or run with stage=fit (or stage=auto) to train one"
        )
    problem = weights_file_problem("model_checkpoint", path)
    if problem is not None:
        raise CheckpointError(problem)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise CheckpointError(refused_load(f"model_checkpoint={path}", err)) from err
    if isinstance(payload, dict) and "state_dict" in payload and "meta_json" in payload:
        return payload["state_dict"], json.loads(payload["meta_json"])
    if isinstance(payload, dict) and all(isinstance(v, torch.Tensor) for v in payload.values()):
        return payload, {}  # a bare state_dict, e.g. from another tool
    raise CheckpointError(
        f"checkpoint {path} is not a pse_lightning checkpoint (expected a dict with "
        f"'state_dict'); got {type(payload).__name__}"
    )


def load_weights(model: nn.Module, path: str | Path, expect: dict[str, Any] | None = None) -> dict:
    """Load ``path`` into ``model``, checking recorded metadata against ``expect``.

    Returns:
        The checkpoint's metadata.

    Raises:
        CheckpointError: metadata mismatch, or missing/unexpected/mis-shaped weights.
    """
    state, meta = read_checkpoint(path)
    for key, value in (expect or {}).items():
        if key in meta and meta[key] != value:
            raise CheckpointError(
                f"checkpoint {path} was made for {key}={meta[key]!r}, but this run has "
                f"{key}={value!r}; pass a matching checkpoint or retrain with stage=fit"
            )
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"checkpoint {path} does not match the model: missing keys {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}"
            f"{'...' if len(unexpected) > 5 else ''}, shape mismatches {shapes[:5]}"
        )
    model.load_state_dict(state)
    return meta
