"""Argument checks shared by every configurable class.

Each check names the config key it guards, so a bad override fails with a message that
says which key to change and to what, before any heavy work starts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

# torch is imported inside the tensor checks only: the CLI runs the scalar checks on the
# config before any heavy import (pse_lightning.cli).
if TYPE_CHECKING:
    from torch import Tensor


class InputError(ValueError):
    """An input the run cannot use (a config value, a missing file, absent hardware).

    The message is one line naming the key, the value and the fix; the command line prints
    it without a traceback (``HYDRA_FULL_ERROR=1`` shows one).
    """


def constructor_error(err: Exception) -> InputError:
    """The one-line error a constructor raised, out of Hydra's ``InstantiationException``
    (which wraps it in three lines of its own); any other wrapped error as it reads."""
    cause = err.__cause__ if isinstance(err.__cause__, (ValueError, TypeError)) else err
    return InputError(str(cause))


#: Settings whose empty value (``key=`` on the command line) would silently do something
#: else than asked, with what it would do and the fix.
REQUIRED_VALUES = {
    "paths.root": (
        "runs and caches would be written under /outputs at the filesystem root; pass a "
        "directory (paths.root=. is the current one) or drop paths.root="
    ),
    "paths.data_dir": (
        "data would be cached in the current directory; pass a directory or drop "
        "paths.data_dir= (default <paths.root>/outputs/data)"
    ),
    "paths.checkpoint_dir": (
        "models would be cached in the current directory; pass a directory or drop "
        "paths.checkpoint_dir= (default <paths.root>/outputs/checkpoints)"
    ),
    "paths.run_dir": (
        "the report would be written to the current directory; drop paths.run_dir= (the "
        "run directory) or pass a directory"
    ),
    "model_checkpoint": (
        "the run would train a model instead of loading one; pass a weights file "
        "(model_checkpoint=<file>), or drop model_checkpoint= to use the cached model "
        "(or train one)"
    ),
}


def require_value(key: str, value: object) -> None:
    """Raise when ``key`` (one of :data:`REQUIRED_VALUES`) holds an empty string."""
    if isinstance(value, str) and not value.strip():
        raise ValueError(f"{key} is empty: {REQUIRED_VALUES[key]}")


def require_positive(key: str, value: float) -> float:
    """Return ``value`` if it is a finite number > 0, else raise naming ``key``."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{key} must be a finite number > 0, got {value!r}")
    if value <= 0:
        raise ValueError(f"{key} must be > 0, got {value}")
    return float(value)


def require_non_negative(key: str, value: float) -> float:
    """Return ``value`` if it is a finite number >= 0, else raise naming ``key``."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{key} must be a finite number >= 0, got {value!r}")
    if value < 0:
        raise ValueError(f"{key} must be >= 0, got {value}")
    return float(value)


def require_in_range(
    key: str, value: float, low: float, high: float, *, low_open: bool = False, hint: str = ""
) -> float:
    """Return ``value`` if it lies in [low, high] (or (low, high] with ``low_open``)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{key} must be a finite number, got {value!r}")
    too_low = value <= low if low_open else value < low
    if too_low or value > high:
        bracket = "(" if low_open else "["
        suffix = f"; {hint}" if hint else ""
        raise ValueError(f"{key} must be in {bracket}{low}, {high}], got {value}{suffix}")
    return float(value)


def require_at_least(key: str, value: int, minimum: int) -> int:
    """Return ``value`` if it is an integer >= ``minimum``, else raise naming ``key``."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{key} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{key} must be >= {minimum}, got {value}")
    return value


def require_choice(key: str, value: str, choices: Iterable[str]) -> str:
    """Return ``value`` if it is one of ``choices``, else raise listing them."""
    options = list(choices)
    if value not in options:
        raise ValueError(f"{key} must be one of {options}, got {value!r}")
    return value


def require_images(name: str, x: Tensor) -> None:
    """Check that ``x`` is a finite float (N, C, H, W) batch in [0, 1].

    Attacks and analyses work in pixel space; normalisation lives inside the model. A batch
    outside [0, 1] almost always means the data pipeline normalised it, which silently
    rescales every epsilon (torchattacks #63, foolbox #145).
    """
    import torch
    from torch import Tensor

    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must have shape (N, C, H, W), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a float tensor, got {x.dtype}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf values; check the data pipeline")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(
            f"{name} must lie in [0, 1], got values in [{lo:.3g}, {hi:.3g}]; remove the "
            "Normalize transform from the data: normalisation lives inside the model"
        )


def require_labels(name: str, y: Tensor, batch: int, num_classes: int) -> None:
    """Check that ``y`` is an integer (N,) label vector with values in [0, num_classes)."""
    import torch

    if not isinstance(y, torch.Tensor) or y.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be an integer tensor of class indices")
    if y.shape != (batch,):
        raise ValueError(f"{name} must have shape ({batch},), got {tuple(y.shape)}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        low, high = int(y.min()), int(y.max())
        raise ValueError(f"{name} must be in [0, {num_classes}), got [{low}, {high}]")


#: What to do with a weights file the run cannot use, said once for every reader.
RESAVE = "re-save its state dict with torch.save(model.state_dict(), path)"


def weights_file_problem(key: str, path: object) -> str | None:
    """Why the file ``path`` given as ``key`` (``model_checkpoint``, ``model.weights``) cannot
    be read as a PyTorch weights file, judged from the disk alone, or None.

    Missing, a directory, unreadable (permissions) and not a zip archive (truncated, or
    another format: ``torch.save`` writes a zip archive) are told apart.
    """
    import os
    import zipfile
    from pathlib import Path

    path = Path(str(path)).expanduser()
    where = f"{key}={path}"
    if path.is_dir():
        return f"{where} is a directory, not a file: pass the weights file inside it"
    if not path.exists():
        return f"{where}: no such file; check the path (or drop {key} to use the default)"
    try:
        with path.open("rb") as handle:
            handle.read(1)
    except PermissionError:
        return (
            f"{where} cannot be read: permission denied for user {_user()}; make it "
            f"readable (chmod u+r {path}) or copy it somewhere readable"
        )
    except OSError as err:
        return f"{where} cannot be read ({err.strerror or err}); check the file system"
    if not zipfile.is_zipfile(path):
        size = os.path.getsize(path)
        return (
            f"{where} is not a PyTorch weights file ({size} bytes, not the zip archive "
            "torch.save writes: truncated by an interrupted copy, or another format); copy "
            f"it again, or {RESAVE}"
        )
    return None


def refused_load(where: str, err: Exception) -> str:
    """The one-line message for ``torch.load(path, weights_only=True)`` failing with ``err``;
    ``where`` names the file and its key (``model_checkpoint=<path>``).

    A file holding pickled Python objects is refused for safety; the message says so, names
    the object, and never advises loading it unsafely (torch's own message does).
    """
    import re

    text = str(err)
    if "Weights only load failed" in text or "Unsupported global" in text:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        what = f" ({found.group(1)})" if found else ""
        return (
            f"{where} holds pickled Python objects{what}, not only tensors; it was refused for "
            f"safety (loading it would run code from the file); {RESAVE} where it was made"
        )
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    first = (lines or [""])[0][:160]
    return (
        f"{where} cannot be read as weights ({type(err).__name__}: {first}); the archive is "
        f"damaged or not from torch.save: copy it again, or {RESAVE}"
    )


def _user() -> str:
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "this user"
