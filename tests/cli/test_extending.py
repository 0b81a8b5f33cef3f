"""The README's "Extending" recipe, run for real: a toy attack and a toy analysis from
``examples/extension`` found through ``hydra.searchpath`` and run through the pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import CONF_DIR
from omegaconf import OmegaConf

from pse_lightning import pipeline

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "extension"


def test_a_registered_attack_and_analysis_run_through_the_pipeline(
    make_cfg, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pse_lightning.modules import report_writer
    from pse_lightning.reporting.wandb_run import key_results

    monkeypatch.syspath_prepend(str(EXAMPLE))
    logged: dict = {}
    monkeypatch.setattr(report_writer, "log_report_to_wandb", lambda *a, **kw: logged.update(kw))
    cfg = make_cfg(
        f"hydra.searchpath=[file://{EXAMPLE / 'conf'}]",
        "attack=brightness",
        "analysis=mean_abs",
        shared=True,
    )
    results = pipeline.run(cfg)
    run_dir = Path(cfg.paths.run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())["metrics"]
    assert metrics == results

    # What the analysis declares reaches the report, the W&B summary and the sweep with no
    # edit in reporting/: its glossary entry, its key result, its contract.json entry.
    glossary = (run_dir / "report.md").read_text().split("## Glossary")[1]
    assert "| `mean_abs/value` | Mean |x_adv − x|" in glossary.replace("\\|", "|")
    assert "Not in the glossary" not in glossary
    summary = key_results(logged["scalars"], logged["key_results"])
    assert summary["results/mean_abs_value"] == results["test/mean_abs/value"]
    contract = json.loads((run_dir / "contract.json").read_text())["analyses"]
    assert contract == [{"prefix": "mean_abs", "key_results": ["value"], "sweep_tables": []}]

    # Known answer: brightening by eps inside the box moves a pixel by min(eps, 1 - x); the
    # analysis sees the attacked rows, those the trained model classifies correctly.
    parts = pipeline.build(OmegaConf.merge(cfg, {"stage": "evaluate"}))
    pipeline.trained_model(OmegaConf.merge(cfg, {"stage": "evaluate"}), parts)
    batches = list(parts.datamodule.test_dataloader())
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    with torch.no_grad():
        attacked = parts.model.eval()(x).argmax(1) == y
    expected = (1.0 - x[attacked].double()).clamp(max=cfg.attack.eps).mean()
    assert 0 < int(attacked.sum()) < len(y)  # the filter is exercised
    assert results["test/mean_abs/value"] == pytest.approx(float(expected), rel=1e-6)
    assert results["test/linf_median"] <= cfg.attack.eps + 1e-7


def test_compute_keeps_the_sample_axis_of_a_single_kept_sample() -> None:
    """torchmetrics squeezes one-element tensors; an analysis's details must not lose their
    sample axis (one kept example), and the result must not alias the metric's state."""
    from pse_lightning.analysis.base import Analysis, AnalysisResult

    class KeepIndex(Analysis):
        def __init__(self) -> None:
            super().__init__()
            self.add_state("index", torch.zeros(1, dtype=torch.long), dist_reduce_fx="cat")

        def update(self, model, batch) -> None:  # noqa: ANN001
            self.index += 7

        def compute(self) -> AnalysisResult:
            return AnalysisResult(scalars={"n": self.index.new_tensor(1.0)},
                                  details={"index": self.index})  # fmt: skip

    metric = KeepIndex()
    metric.update(None, None)
    result = metric.compute()
    assert result.details["index"].shape == (1,) and int(result.details["index"][0]) == 7
    metric.index += 1  # in place, after compute
    assert int(result.details["index"][0]) == 7


def test_the_readmes_extension_command_runs_from_the_cli(tmp_path: Path) -> None:
    """The README's command, as a user types it: the static config check reads Hydra's
    search path, so the extension's choices and keys are known before any work."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(EXAMPLE), "WANDB_MODE": "disabled"}
    base = [sys.executable, "-m", "pse_lightning",
            "hydra.searchpath=[file://examples/extension/conf]", "attack=brightness",
            "analysis=mean_abs", f"paths.root={tmp_path}", "logger=none"]  # fmt: skip
    tiny = ["dataset.num_train=256", "dataset.num_val=64", "dataset.num_test=64",
            "dataset.eval_samples=16", "training.epochs=1"]  # fmt: skip
    # As a multirun: each job's config (no hydra node) is checked again when it starts, with
    # the search path the entry point hands down.
    run = subprocess.run(base + tiny + ["-m"], cwd=root, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    (metrics,) = tmp_path.glob("multirun/*/*/*/metrics.json")
    assert "test/mean_abs/value" in json.loads(metrics.read_text())["metrics"]
    # A typo in the extension's own key is still caught by the same check, in one line.
    typo = subprocess.run(base + ["attack.epss=0.1"], cwd=root, env=env, capture_output=True,
                          text=True)  # fmt: skip
    assert typo.returncode == 1
    assert "attack.epss" in typo.stderr and "Traceback" not in typo.stderr


def test_the_job_check_takes_the_search_path_it_is_handed(tmp_path: Path) -> None:
    """Inside a run the job's config has no ``hydra`` node: the entry point hands the
    check Hydra's search path, and the check reads no global Hydra state to find it."""
    from conftest import compose_conf

    from pse_lightning.cli.check import check_config
    from pse_lightning.validation import InputError

    searchpath = [f"file://{EXAMPLE / 'conf'}"]
    full = compose_conf(
        f"hydra.searchpath=[{searchpath[0]}]",
        f"paths.root={tmp_path}",
        "attack=brightness",
        "analysis=mean_abs",
        hydra=True,
    )
    choices = dict(full.hydra.runtime.choices)
    job = OmegaConf.masked_copy(full, [k for k in full if k != "hydra"])
    assert "hydra" not in job
    check_config(full, choices, CONF_DIR)  # the search path from the hydra node
    check_config(job, choices, CONF_DIR, searchpath)  # handed down explicitly
    with pytest.raises(InputError, match="my_extension.BrightnessShift is not allowed"):
        check_config(job, choices, CONF_DIR)  # not handed: the extension is unknown
