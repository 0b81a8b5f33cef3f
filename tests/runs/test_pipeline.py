"""The whole pipeline on a slice of shapes: train, attack, report, log; then reuse the cache."""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_report import check_figures_captioned, check_report_layout

from pse_lightning import pipeline
from pse_lightning.glossary import unexplained
from pse_lightning.models import CheckpointError


def _report_figures(run_dir: Path) -> list[Path]:
    text = (run_dir / "report.md").read_text()
    return [run_dir / rel for rel in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)]


def test_full_run_with_csv_logger_then_cached_evaluation(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg("logger=csv")
    results = pipeline.run(cfg)
    run_dir = Path(cfg.paths.run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())["metrics"]
    assert metrics == results
    assert metrics["test/samples"] == 48
    for key in ("test/clean_acc", "test/robust_acc", "test/success_rate"):
        assert 0.0 <= metrics[key] <= 1.0
    # Untargeted: every correctly classified sample is either robust or a success; the
    # success rate is over those (clean-misclassified samples are not attacked).
    clean_correct = metrics["test/clean_acc"] * metrics["test/samples"]
    robust = metrics["test/robust_acc"] * metrics["test/samples"]
    assert metrics["test/success_rate"] == pytest.approx(1 - robust / clean_correct)
    assert metrics["test/clean_misclassified"] == pytest.approx(
        metrics["test/samples"] - clean_correct
    )
    assert metrics["test/linf_median"] <= 0.03 + 1e-6
    outcomes = json.loads((run_dir / "outcomes.json").read_text())  # what a sweep pairs
    assert outcomes["index"] == list(range(48))
    assert sum(outcomes["adv_correct"]) == pytest.approx(robust)
    assert sum(outcomes["clean_correct"]) == pytest.approx(clean_correct)
    figures = _report_figures(run_dir)
    assert figures and all(f.is_file() and f.stat().st_size > 1000 for f in figures)
    rows = list(csv.DictReader((run_dir / "csv" / "metrics.csv").open()))
    logged = [r for r in rows if r.get("test/clean_acc")]
    assert float(logged[-1]["test/clean_acc"]) == pytest.approx(metrics["test/clean_acc"])
    assert any(r.get("train/loss_epoch") for r in rows), "training was not logged"
    checkpoints = list(Path(cfg.paths.checkpoint_dir).glob("smallcnn-shapes-standard-*.pt"))
    assert len(checkpoints) == 1

    # Second run: the cached model is found, nothing retrains, the numbers are identical.
    again = make_cfg("logger=none", "stage=evaluate", f"paths.run_dir={tmp_path}/run2")
    assert pipeline.run(again) == results


def test_default_attack_and_analyses_end_to_end(make_cfg) -> None:
    """The main job's defaults (CW, every analysis) on the tiny slice: all sections land."""
    cfg = make_cfg("attack=cw", "analysis=all", "analysis.pse.max_steps=32", shared=True)
    results = pipeline.run(cfg)
    run_dir = Path(cfg.paths.run_dir)
    report = (run_dir / "report.md").read_text()
    parts = ["Attack", "Per-example panels", "Promotion-suppression effect (PSE)",
             "Class activation maps (CAM)", "Network dissection"]  # fmt: skip
    check_report_layout(run_dir, parts)
    check_figures_captioned(run_dir)
    assert "attack=cwl2\n" in report and "attack.kappa=0.0\n" in report
    assert "'_target_'" not in report
    # Every logged metric is explained: a new metric without a glossary entry fails here.
    metrics = json.loads((run_dir / "metrics.json").read_text())["metrics"]
    assert unexplained(metrics) == [], "metrics without a glossary entry"
    assert (run_dir / "figures" / "perturbation_norms.png").is_file()
    for prefix in ("test/pse/", "test/cam/", "test/dissection/"):
        assert any(k.startswith(prefix) for k in results), prefix
    fractions = [
        results[f"test/pse/frac_{k}"] for k in ("suppression", "promotion", "balanced", "none")
    ]
    assert sum(fractions) == pytest.approx(1.0)
    assert all(f.is_file() for f in _report_figures(run_dir))
    # One rule decides the attacked rows: the PSE's skipped count is the attack's (one
    # training epoch on the tiny slice leaves some images misclassified, so it is not 0 = 0).
    assert results["test/clean_misclassified"] > 0
    assert results["test/pse/n_clean_misclassified"] == results["test/clean_misclassified"]
    # The analyses' declared claims are judged and written beside metrics.json.
    judged = json.loads((run_dir / "findings.json").read_text())
    assert {"pse_types", "cam_region", "pse_training"} <= {f["key"] for f in judged}


def test_wandb_offline_run_reads_back(make_cfg) -> None:
    cfg = make_cfg("logger=wandb", "attack=fgsm", shared=True)
    results = pipeline.run(cfg)
    runs = list((Path(cfg.paths.run_dir) / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    wandb_cli = Path(sys.executable).with_name("wandb")
    out = subprocess.run(
        [str(wandb_cli), "leet", "inspect", "--summary", "--json", str(runs[0])],
        capture_output=True,
        text=True,
        check=True,
    )
    record = json.loads(out.stdout)
    text = json.dumps(record)
    assert "test/clean_acc" in text and "pse_lightning.attacks.FGSM" in text
    summary = _find_key(record, "test/robust_acc")
    assert summary == pytest.approx(results["test/robust_acc"])


def _find_key(node, key):
    """Depth-first search for ``key`` in nested JSON (the summary layout is W&B's)."""
    if isinstance(node, dict):
        if key in node:
            value = node[key]
            return value.get("value", value) if isinstance(value, dict) else value
        for child in node.values():
            found = _find_key(child, key)
            if found is not None:
                return found
    elif isinstance(node, list):
        for child in node:
            found = _find_key(child, key)
            if found is not None:
                return found
    return None


def test_evaluate_without_a_checkpoint_says_how_to_train(make_cfg) -> None:
    cfg = make_cfg("stage=evaluate", "dataset.seed=123")
    with pytest.raises(FileNotFoundError, match="stage=fit"):
        pipeline.run(cfg)
    assert not (Path(cfg.paths.run_dir) / "metrics.json").exists()


def test_corrupt_given_checkpoint_is_refused(make_cfg, tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    cfg = make_cfg("stage=evaluate", f"model_checkpoint={bad}")
    with pytest.raises(CheckpointError, match="not a PyTorch weights file"):
        pipeline.run(cfg)


def test_checkpoint_for_another_model_is_refused(
    make_cfg, tmp_path: Path, trained_checkpoint: Path
) -> None:
    moved = tmp_path / "other.pt"
    shutil.copy(trained_checkpoint, moved)
    cfg = make_cfg("stage=evaluate", "model=resnet18", f"model_checkpoint={moved}")
    with pytest.raises(CheckpointError, match="model='smallcnn'"):
        pipeline.run(cfg)


@pytest.mark.slow
def test_the_smoke_experiment_has_something_to_show(make_cfg) -> None:
    """``experiment=smoke`` used to end at clean accuracy 0.19 with CW success 0 of 12 and
    every PSE and CAM number NaN; now its model is trained enough for every analysis."""
    cfg = make_cfg("experiment=smoke", "attack=cw", "analysis=all", tiny=False)
    results = pipeline.run(cfg)
    assert results["test/clean_acc"] >= 0.9
    assert results["test/success_rate"] > 0.5
    for key in ("test/pse/frac_suppression", "test/pse/mean_r",
                "test/cam/specific_same_true_top20",
                "test/dissection/net.features.2/spearman_rho"):  # fmt: skip
        assert math.isfinite(results[key]), key
