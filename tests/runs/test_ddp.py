"""Two gloo processes give the numbers of one process (slow: spawns processes)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from pse_lightning import pipeline


@pytest.mark.slow
def test_ddp_cpu_matches_one_process(make_cfg, tmp_path: Path) -> None:
    # An odd number of samples: the shards differ in size and nothing may be padded.
    common = ["dataset.eval_samples=45", "analysis=all", "logger=none",
              "analysis.dissection.sensitive_images=45"]  # fmt: skip
    single = pipeline.run(make_cfg(*common, f"paths.run_dir={tmp_path}/one"))
    double = pipeline.run(
        make_cfg(*common, "trainer=ddp_cpu", "stage=evaluate", f"paths.run_dir={tmp_path}/two")
    )
    assert single["test/samples"] == double["test/samples"] == 45
    assert single.keys() == double.keys()
    for key, value in single.items():
        other = double[key]
        if value is None or (isinstance(value, float) and math.isnan(value)):
            assert other is None or math.isnan(other), key
        else:
            assert other == pytest.approx(value, rel=1e-4, abs=1e-5), key
    outcomes = [
        json.loads((tmp_path / run / "outcomes.json").read_text()) for run in ("one", "two")
    ]
    assert outcomes[0] == outcomes[1] and outcomes[0]["index"] == list(range(45))
    for run in ("one", "two"):
        assert json.loads((tmp_path / run / "metrics.json").read_text())["metrics"]
        assert (tmp_path / run / "report.md").is_file()
    # Figures from gathered per-image states (norms, kept activations, examples) on both.
    figures = [sorted(p.name for p in (tmp_path / run / "figures").iterdir())
               for run in ("one", "two")]  # fmt: skip
    assert figures[0] == figures[1]
    assert {"perturbation_norms.png", "dissection_sensitive_units.png"} <= set(figures[0])
