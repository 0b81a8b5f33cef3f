"""``python -m pse_lightning`` as a user runs it: a subprocess, Hydra flags, overrides, grids."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, choices_setting, group_choices

# The smoke experiment cut to what these tests look at (how runs and grids are laid out,
# not what the model learns): 256 training images, one epoch.
QUICK = [
    "experiment=smoke",
    "dataset.num_train=256",
    "training.epochs=1",
    "logger=none",
    "dataset.eval_samples=16",
    "analysis=none",
    "trainer.enable_progress_bar=false",
]


#: The attack configs that set ``eps`` (the CLI names them when another one is given eps).
EPS_CHOICES = ", ".join(choices_setting("attack", "eps"))


def run_cli(
    args: list[str],
    cwd: Path,
    env_extra: dict | None = None,
    check: bool = True,
    python_flags: list[str] | None = None,
) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "0", **(env_extra or {})}
    if "PYTHONPATH" not in (env_extra or {}):
        env["PYTHONPATH"] = str(ROOT)  # the checkout's package, wherever the test runs from
    result = subprocess.run(
        [sys.executable, *(python_flags or []), "-m", "pse_lightning", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def _imported_modules(stderr: str) -> set[str]:
    """Top-level modules named by ``python -X importtime`` (one line per import)."""
    names = set()
    for line in stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return names


def test_help_describes_the_tool_without_importing_torch(tmp_path: Path) -> None:
    result = run_cli(["--help"], tmp_path, python_flags=["-X", "importtime"])
    out = result.stdout
    assert out.startswith("pse_lightning: craft adversarial examples")
    for group in ("attack:", "dataset:", "model:", "analysis:", "trainer:", "logger:"):
        assert group in out
    assert f"attack: {', '.join(group_choices('attack'))}" in out
    assert "== Examples ==" in out and "hydra/launcher=joblib" in out
    loaded = _imported_modules(result.stderr)
    assert "hydra" in loaded, "importtime output was not read"
    assert not loaded & {"torch", "pytorch_lightning", "lightning", "wandb", "matplotlib"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["+unknown_key=1"], "unknown_key is not a setting (top-level keys: ablation, analysis"),
        (["seed=abc"], "seed must be an integer, got 'abc'"),
        (["attack=cw", "+attack.eps=-1"], f"eps is a setting of attack={EPS_CHOICES}"),
        (
            ["analysis=pse", "analysis.pse.steps=0"],
            "Error: analysis.pse.steps must be >= 1, got 0",
        ),
        (["model_checkpoint=missing.pt"], "Error: model_checkpoint=missing.pt: no such file"),
    ],
)
def test_config_errors_are_one_line_before_torch_and_leave_nothing(
    tmp_path: Path, args: list[str], message: str
) -> None:
    result = run_cli(
        [*args, f"paths.root={tmp_path}"], tmp_path, check=False, python_flags=["-X", "importtime"]
    )
    errors = [line for line in result.stderr.splitlines() if not line.startswith("import time")]
    assert result.returncode == 1
    assert len(errors) == 1 and errors[0].startswith("Error: ") and message in errors[0]
    assert "torch" not in _imported_modules(result.stderr)
    assert list(tmp_path.iterdir()) == [], "a config error left files behind"


def test_key_missing_from_the_chosen_file_names_the_choices_that_have_it(tmp_path: Path) -> None:
    result = run_cli(["attack=cw", "attack.eps=-1"], tmp_path, check=False)
    assert result.returncode == 1
    first = choices_setting("attack", "eps")[0]
    assert result.stderr.splitlines()[-1] == (
        f"Hint: attack=cw has no setting eps; eps is a setting of attack={EPS_CHOICES}: "
        f"choose one of those (e.g. attack={first} attack.eps=-1)"
    )


def test_full_error_shows_the_traceback(tmp_path: Path) -> None:
    result = run_cli(["seed=abc"], tmp_path, env_extra={"HYDRA_FULL_ERROR": "1"}, check=False)
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "seed must be an integer" in result.stderr


def test_unreadable_checkpoint_and_absent_gpu_fail_before_the_run(tmp_path: Path) -> None:
    import torch

    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"PK\x03\x04 not really a zip")
    result = run_cli(
        [f"model_checkpoint={corrupt}", f"paths.root={tmp_path}"], tmp_path, check=False
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"Error: model_checkpoint={corrupt} is not a PyTorch weights")
    if not torch.cuda.is_available():
        result = run_cli(["trainer=gpu", f"paths.root={tmp_path}"], tmp_path, check=False)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert "needs a CUDA GPU" in result.stderr and "use trainer=cpu" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt.pt"]


@pytest.mark.parametrize(
    ("dataset", "message"),
    [
        ("cifar10", "Error: dataset=cifar10: cifar-10-batches-py/data_batch_1"),
        ("imagenet", "Error: dataset=imagenet: train/, val/ missing under dataset.root="),
    ],
)
def test_data_root_without_the_data_fails_in_the_preflight_and_leaves_nothing(
    tmp_path: Path, dataset: str, message: str
) -> None:
    """A root that does not exist (cifar10) or an empty folder (imagenet) is refused before
    Hydra creates the run directory: one line naming the root, nothing written."""
    root = tmp_path / "data_root"
    if dataset == "imagenet":
        root.mkdir()
    args = [f"dataset={dataset}", f"dataset.root={root}", f"paths.root={tmp_path}"]
    result = run_cli([*args, "logger=wandb"], tmp_path, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    (line,) = lines
    assert line.startswith(message) and str(root) in line
    expected = ["data_root"] if dataset == "imagenet" else []
    assert sorted(p.name for p in tmp_path.iterdir()) == expected, "a run directory was made"


@pytest.mark.slow
def test_error_during_the_run_is_one_line_and_in_the_log_file(tmp_path: Path) -> None:
    """An error found only while the run reads its data (a damaged image outside the sample
    the preflight decodes, raised in a DataLoader worker): no traceback on the console, one
    line naming the file, the message (and the traceback) in the run's log file."""
    import torch
    from PIL import Image

    from pse_lightning.models import SmallCNN

    root = tmp_path / "imagenet"
    for name in ("cat", "dog"):
        (root / "val" / name).mkdir(parents=True)
        for i in range(3):
            pixels = torch.randint(0, 255, (16, 16, 3), dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(root / "val" / name / f"{i}.png")
    bad = root / "val" / "dog" / "2.png"  # the preflight decodes 0.png and 1.png only
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    stats = {"mean": [0.5] * 3, "std": [0.25] * 3}
    checkpoint = tmp_path / "small.pt"
    torch.save(SmallCNN(num_classes=2, in_channels=3, **stats).state_dict(), checkpoint)
    args = [
        "dataset=imagenet",
        f"dataset.root={root}",
        "dataset.image_size=16",
        "dataset.num_workers=1",
        "dataset.batch_size=6",
        "stage=evaluate",
        f"model_checkpoint={checkpoint}",
        "attack=fgsm",
        "analysis=none",
        "logger=none",
        f"paths.root={tmp_path}",
    ]
    result = run_cli(args, tmp_path, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"Error: dataset.root: the image {bad} cannot be read"), line
    (log_file,) = (tmp_path / "outputs").glob("*/*/pse_lightning.log")
    assert line.removeprefix("Error: ") in log_file.read_text()
    assert "Traceback" in log_file.read_text()


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


@pytest.mark.slow  # builds and installs a wheel (pip): tens of seconds
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
    # The console script pip installs (`pse-lightning`) runs from there too.
    script = subprocess.run(
        [str(site / "bin" / "pse-lightning"), "--cfg", "job", "attack=pgd"],
        cwd=elsewhere,
        env={**os.environ, "PYTHONPATH": str(site)},
        capture_output=True,
        text=True,
        check=True,
    )
    assert "pse_lightning.attacks.PGD" in script.stdout


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
