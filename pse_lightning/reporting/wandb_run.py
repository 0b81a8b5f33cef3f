"""What an evaluation leaves in its W&B run, beyond the logged scalars.

- the report's figures as images and every analysis table, under keys without spaces;
- ``examples/adversarial``: one row per kept example with image columns (clean,
  adversarial, amplified δ and, where the analyses kept the example, its promotion and
  suppression maps and the CAM on x and x') and the amplification in its own column;
- the key results under ``results/`` in the run summary (few enough for the console
  summary W&B prints at the end, which shows the first ten keys in sorted order);
- ``report.md`` and ``metrics.json`` as a ``report`` artifact; a trained checkpoint as a
  ``model`` artifact whose metadata is its identity (model, dataset, training, digest).

Everything here runs on global rank zero only (callers check), after the files are written.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from pse_lightning.core.report import ReportSection
from pse_lightning.reporting.figures import HEAT_CMAP, amplification, class_name, to_image
from pse_lightning.reporting.loggers import safe_key

ARTIFACT_NAME_MAX = 128
# The attack's test/<key> -> shown as results/<key> in the run summary, in this order of
# importance; the analyses' follow, as each declares them (Analysis.key_results).
KEY_RESULTS = ("clean_acc", "robust_acc", "success_rate", "l2_median", "linf_median")
EXAMPLE_COLUMNS = [
    "index",
    "label",
    "pred_clean",
    "pred_adv",
    "misclassified",
    "clean",
    "adversarial",
    "perturbation",
    "amplification",
    "linf",
]
# What the evaluation keeps of each example; any other entry of ``examples`` is a map column
# an analysis declared (its kept (H, W) maps, None where it kept none for that example).
KEPT = ("index", "x", "x_adv", "y", "pred_clean", "pred_adv")


def key_results(scalars: dict[str, float], declared: Sequence[str] = ()) -> dict[str, float]:
    """The headline numbers, ``results/<key>`` -> value (absent or NaN ones left out): the
    attack's, then ``declared`` (the analyses' key results, ``<name>/<key>``)."""
    out = {}
    for key in (*KEY_RESULTS, *declared):
        value = scalars.get(f"test/{key}")
        if value is not None and math.isfinite(value):
            out[f"results/{key.replace('/', '_')}"] = float(value)
    return out


def _picture(array: np.ndarray) -> Any:
    """(H, W[, C]) in [0, 1] -> a W&B image (8-bit, so the table stays small)."""
    import wandb

    return wandb.Image((array * 255).round().astype(np.uint8))


def _image(x: Tensor) -> Any:
    """(C, H, W) in [0, 1] -> a W&B image."""
    return _picture(to_image(x))


def _heat(values: Tensor | None) -> Any:
    """An (H, W) non-negative map -> a W&B image in the report's heat map colours, scaled to
    its own maximum (the maps' units differ; the report's figures give them); None stays."""
    if values is None:
        return None
    import matplotlib

    v = values.detach().float().cpu().clamp_min(0)
    v = v / max(float(v.max()), 1e-12)
    return _picture(matplotlib.colormaps[HEAT_CMAP](v.numpy())[..., :3])


def examples_table(examples: dict[str, Any], class_names: Sequence[str]) -> Any:
    """One row per kept example: labels by name, the three images, δ's amplification, and
    the map columns the analyses declared (``ExamplePanel.maps``), in their order.

    Args:
        examples: ``index``, ``x``, ``x_adv`` (N, C, H, W) in [0, 1], ``y``, ``pred_clean``,
            ``pred_adv`` (N,), as kept by the evaluation (:data:`KEPT`); any other entry
            is a map column, a list of N (H, W) maps or None.
        class_names: names of the classes, indexed by label.
    """
    import wandb

    maps = [c for c in examples if c not in KEPT]
    rows = []
    for i in range(len(examples["index"])):
        x, x_adv = examples["x"][i].float(), examples["x_adv"][i].float()
        delta = x_adv - x
        factor = amplification(delta)
        y, pred_adv = int(examples["y"][i]), int(examples["pred_adv"][i])
        rows.append(
            [
                int(examples["index"][i]),
                class_name(class_names, y),
                class_name(class_names, int(examples["pred_clean"][i])),
                class_name(class_names, pred_adv),
                pred_adv != y,
                _image(x),
                _image(x_adv),
                _image((0.5 + factor * delta).clamp(0, 1)),
                factor,
                float(delta.abs().max()),
                *(_heat(examples[c][i]) for c in maps),
            ]
        )
    return wandb.Table(columns=EXAMPLE_COLUMNS + maps, data=rows)


def _cell(value: Any) -> Any:
    """A table cell for W&B: (C, H, W) image tensors become pictures, 0-d tensors numbers."""
    if isinstance(value, Tensor):
        if value.ndim == 3 and value.shape[0] in (1, 3):
            return _image(value)
        if value.ndim == 0:
            return value.item()
        return value.tolist()
    return value


def section_tables(sections: Sequence[ReportSection]) -> dict[str, Any]:
    """Every analysis table as a W&B table under ``tables/<section>/<name>``."""
    import wandb

    return {
        f"tables/{safe_key(section.prefix or section.title)}/{safe_key(name)}": wandb.Table(
            columns=[safe_key(str(c)) for c in columns],
            data=[[_cell(v) for v in row] for row in rows],
        )
        for section in sections
        for name, (columns, rows) in section.tables.items()
    }


def artifact_name(kind: str, name: str) -> str:
    """``<kind>-<name>`` as W&B accepts it: letters, digits, ``.``, ``_`` and ``-`` only, at
    most 128 characters (a run name carries the job's overrides, ``attack.eps=0.01``: the
    ``=`` becomes ``_``; a longer name is cut and ends in a digest of the whole)."""
    text = re.sub(r"[^A-Za-z0-9._-]", "_", f"{kind}-{safe_key(name)}")
    if len(text) <= ARTIFACT_NAME_MAX:
        return text
    digest = hashlib.sha1(text.encode()).hexdigest()[:8]
    return f"{text[: ARTIFACT_NAME_MAX - 9]}-{digest}"


def report_artifact(run: Any, written: dict[str, Path]) -> Any:
    """``report.md`` and ``metrics.json`` of this run as a ``report`` artifact."""
    import wandb

    artifact = wandb.Artifact(
        artifact_name("report", run.name or run.id),
        type="report",
        description="report.md and metrics.json of one evaluation",
    )
    for key in ("report", "metrics"):
        if key in written:
            artifact.add_file(str(written[key]))
    return artifact


def model_artifact(path: Path, meta: dict[str, Any]) -> Any:
    """A trained checkpoint as a ``model`` artifact carrying its identity as metadata.

    The name (``model-<model>-<dataset>-<training>-<digest>``) is the checkpoint cache's
    identity, so retraining the same configuration adds a version of the same artifact.
    """
    import wandb

    parts = [meta.get(k, "unknown") for k in ("model", "dataset", "training")]
    digest = str(meta.get("digest", ""))[:12]
    name = "-".join(["model", *(safe_key(str(p)) for p in parts), digest]).strip("-")
    artifact = wandb.Artifact(
        name.replace("/", "_"),
        type="model",
        description="weights-only pse_lightning checkpoint (see docs/MODELS.md)",
        metadata={k: v for k, v in meta.items() if isinstance(v, (str, int, float, bool))},
    )
    artifact.add_file(str(path))
    return artifact


def log_evaluation(
    run: Any,
    *,
    written: dict[str, Path],
    sections: Sequence[ReportSection],
    scalars: dict[str, float],
    examples: dict[str, Tensor],
    class_names: Sequence[str],
    verdicts: dict[str, str],
    declared: Sequence[str] = (),
) -> None:
    """Log an evaluation's figures, tables, examples, key results (the attack's and the
    analyses' ``declared`` ones), the Findings' verdicts (claim key -> verdict) and the
    report artifact."""
    import wandb

    payload: dict[str, Any] = {
        f"report/{safe_key(name)}": wandb.Image(str(path))
        for name, path in written.items()
        if path.suffix == ".png"
    }
    payload.update(section_tables(sections))
    if examples and len(examples.get("index", ())):
        payload["examples/adversarial"] = examples_table(examples, class_names)
    run.log(payload)
    run.summary.update(key_results(scalars, declared))
    # The report's Findings, claim by claim (docs/METHODS.md §7.13), as filterable strings.
    run.summary.update({f"findings/{safe_key(k)}": v for k, v in verdicts.items()})
    run.log_artifact(report_artifact(run, written))
