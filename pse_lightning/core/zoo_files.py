"""Where RobustBench zoo weights live on disk, for the model and the CLI's preflight check.

The layout is RobustBench's own, ``<model_dir>/<dataset>/<threat_model>/<name>.pt``, so a
folder filled by ``robustbench.utils.load_model(..., model_dir=...)`` is used as it is.
``model_dir`` defaults to ``<torch hub dir>/robustbench`` (``~/.cache/torch/hub/robustbench``
unless ``$TORCH_HOME`` says otherwise), beside torchvision's pretrained weights. Defined
once here because the preflight check (which may not import the models) must find the
same file the model reads.
"""

from __future__ import annotations

import difflib
from pathlib import Path


def zoo_model_dir(model_dir: str | Path | None) -> Path:
    """``model_dir`` expanded, or the default under the torch hub cache."""
    if model_dir:
        return Path(model_dir).expanduser()
    import torch

    return Path(torch.hub.get_dir()) / "robustbench"


def zoo_weights_file(
    model_dir: str | Path | None, dataset: str, threat_model: str, name: str
) -> Path:
    """``<model_dir>/<dataset>/<threat_model>/<name>.pt``."""
    return zoo_model_dir(model_dir) / dataset / threat_model / f"{name}.pt"


def missing_zoo_weights(path: Path, name: str, source: str = "") -> str:
    """The one-line error for a zoo model whose weights file is not on disk.

    Names the file, the folder to put it in and how to get it; lists files of that folder
    with close names (a misspelt ``model.name``).
    """
    near = difflib.get_close_matches(
        path.stem, [p.stem for p in path.parent.glob("*.pt")] if path.parent.is_dir() else []
    )
    hint = f"; files there with close names: {near}" if near else ""
    return (
        f"model=robustbench model.name={name} needs {path.name} in {path.parent}: run with "
        f"model.download=true on a machine that is online (robustbench fetches it{source}), "
        "or copy the file there (robustbench's load_model(..., model_dir=<dir>) saves it as "
        f"<dir>/<dataset>/<threat_model>/<name>.pt); set model.model_dir for another folder{hint}"
    )
