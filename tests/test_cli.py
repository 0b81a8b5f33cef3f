"""``python -m pse_lightning`` as a user runs it: a subprocess, Hydra flags, overrides, grids."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT

QUICK = [
    "experiment=smoke",
    "logger=none",
    "dataset.eval_samples=16",
    "analysis=none",
    "trainer.enable_progress_bar=false",
]


def run_cli(
    args: list[str], cwd: Path, env_extra: dict | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "0", **(env_extra or {})}
    result = subprocess.run(
        [sys.executable, "-m", "pse_lightning", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def test_help_lists_the_groups(tmp_path: Path) -> None:
    out = run_cli(["--help"], tmp_path).stdout
    for group in ("attack:", "dataset:", "model:", "analysis:", "trainer:", "logger:"):
        assert group in out


def test_cfg_job_prints_the_composed_config(tmp_path: Path) -> None:
    out = run_cli(["--cfg", "job", "attack=fgsm", "attack.eps=0.01"], tmp_path).stdout
    assert "pse_lightning.attacks.FGSM" in out and "eps: 0.01" in out


def test_unknown_choice_and_bad_value_fail_clearly(tmp_path: Path) -> None:
    bad = run_cli(["attack=nope"], tmp_path, check=False)
    assert bad.returncode != 0 and "Available options" in bad.stderr and "pgd" in bad.stderr
    bad = run_cli(
        [*QUICK, "attack=pgd", "attack.eps=-1", f"paths.root={tmp_path}"], tmp_path, check=False
    )
    assert bad.returncode != 0 and "attack.eps must be in (0.0, 1.0]" in bad.stderr
    assert not (tmp_path / "outputs" / "data").exists(), "data was generated before the check"


def test_single_run_and_two_job_grid(tmp_path: Path) -> None:
    run_cli([*QUICK, f"paths.root={tmp_path}", "attack=fgsm"], tmp_path)
    (metrics,) = (tmp_path / "outputs").glob("*/*/metrics.json")
    assert json.loads(metrics.read_text())["metrics"]["test/samples"] == 16
    assert (metrics.parent / ".hydra" / "config.yaml").is_file()

    run_cli(["-m", *QUICK, f"paths.root={tmp_path}", "attack=fgsm,pgd"], tmp_path)
    jobs = sorted((tmp_path / "multirun").glob("*/*/*/metrics.json"))
    assert len(jobs) == 2
    assert {json.loads(p.read_text())["metrics"]["test/samples"] for p in jobs} == {16}
    assert "attack=fgsm" in jobs[0].parent.name and "attack=pgd" in jobs[1].parent.name


def test_installed_wheel_runs_from_another_directory(tmp_path: Path) -> None:
    wheel_dir, site = tmp_path / "wheel", tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheel_dir),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = wheel_dir.glob("pse_lightning-*.whl")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(site),
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    assert (site / "pse_lightning" / "conf" / "config.yaml").is_file()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = run_cli(["--cfg", "job"], elsewhere, env_extra={"PYTHONPATH": str(site)}).stdout
    assert "pse_lightning.models.SmallCNN" in out
    code = "import pse_lightning; print(pse_lightning.__file__)"
    probe = subprocess.run(
        [sys.executable, "-c", code],
        cwd=elsewhere,
        env={**os.environ, "PYTHONPATH": str(site)},
        capture_output=True,
        text=True,
        check=True,
    )
    assert str(site) in probe.stdout


@pytest.mark.slow
def test_ddp_cpu_through_hydra_writes_one_run_dir_and_one_wandb_run_per_job(
    tmp_path: Path,
) -> None:
    """trainer=ddp_cpu launched by Hydra (single run, then a 2-job grid): rank zero alone
    writes the report and the W&B run; the other process writes nothing."""
    args = [
        *QUICK,
        "logger=wandb",
        "trainer=ddp_cpu",
        "dataset.eval_samples=15",
        f"paths.root={tmp_path}",
        "attack=fgsm",
    ]
    run_cli(args, tmp_path)
    # outputs/<date>/<time>/ (beside outputs/data and outputs/checkpoints): one run directory
    (run_dir,) = (p.parent for p in (tmp_path / "outputs").glob("*/*/.hydra"))
    assert json.loads((run_dir / "metrics.json").read_text())["metrics"]["test/samples"] == 15
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1

    run_cli(["-m", *args[:-1], "attack=fgsm,pgd"], tmp_path)
    jobs = sorted(p.parent for p in (tmp_path / "multirun").glob("*/*/*/.hydra"))
    assert len(jobs) == 2
    for job in jobs:
        assert json.loads((job / "metrics.json").read_text())["metrics"]["test/samples"] == 15
        assert len(list((job / "wandb").glob("offline-run-*"))) == 1
