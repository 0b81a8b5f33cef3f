"""The README's "Extending" recipe, run for real: a toy attack and a toy analysis from
``examples/extension`` found through ``hydra.searchpath`` and run through the pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from pse_lightning import pipeline

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "extension"


def test_a_registered_attack_and_analysis_run_through_the_pipeline(
    make_cfg, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(EXAMPLE))
    cfg = make_cfg(
        f"hydra.searchpath=[file://{EXAMPLE / 'conf'}]", "attack=brightness", "analysis=mean_abs"
    )
    results = pipeline.run(cfg)
    metrics = json.loads((Path(cfg.paths.run_dir) / "metrics.json").read_text())["metrics"]
    assert metrics == results

    # Known answer: brightening by eps inside the box moves a pixel by min(eps, 1 - x).
    datamodule = instantiate(cfg.dataset)
    datamodule.prepare_data()
    datamodule.setup("test")
    x = torch.cat([batch[0] for batch in datamodule.test_dataloader()]).double()
    expected = (1.0 - x).clamp(max=cfg.attack.eps).mean()
    assert results["test/mean_abs/value"] == pytest.approx(float(expected), rel=1e-6)
    assert results["test/linf_median"] <= cfg.attack.eps + 1e-7
