"""Concurrent runs never lose a result: distinct run directories, shared caches built once.

Two runs started in the same second used to share ``outputs/<date>/<time>`` (one report
overwrote the other) and both trained the same model. Run and sweep directories now end
in ``-<pid>-<random>``, and the shared caches (generated data, trained checkpoints) are
written under a lock that a second job waits on.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import CONF_DIR, ROOT
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from pse_lightning.cli.run_dirs import register_resolvers
from pse_lightning.core.locks import cache_lock, lock_path

# <time>-<pid>-<4 hex digits>
UNIQUE_TIME = re.compile(r"^\d\d-\d\d-\d\d-\d+-[0-9a-f]{4}$")
WAITING = "waiting for another job"


def _hydra_dirs(tmp_path: Path) -> tuple[str, str]:
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose("config", overrides=[f"paths.root={tmp_path}"], return_hydra_config=True)
    run, sweep = str(cfg.hydra.run.dir), str(cfg.hydra.sweep.dir)
    assert (run, sweep) == (str(cfg.hydra.run.dir), str(cfg.hydra.sweep.dir)), "not stable"
    return run, sweep


def test_run_and_sweep_dirs_are_unique_and_sort_by_time(tmp_path: Path) -> None:
    register_resolvers()
    first, second = _hydra_dirs(tmp_path), _hydra_dirs(tmp_path)
    for run, sweep in (first, second):
        assert Path(run).parent.parent == tmp_path / "outputs"
        assert Path(sweep).parent.parent == tmp_path / "multirun"
        assert re.fullmatch(r"\d{4}-\d\d-\d\d", Path(run).parent.name)
        assert UNIQUE_TIME.match(Path(run).name), run
        assert UNIQUE_TIME.match(Path(sweep).name), sweep
        assert f"-{os.getpid()}-" in Path(run).name
    # Composed twice in this process (possibly in the same second): two directories.
    assert first[0] != second[0] and first[1] != second[1]


def test_the_unique_name_is_fixed_per_config_and_shared_with_its_sweep_jobs() -> None:
    """Same time stamp, two configs: two names. One config read twice, or a multirun job's
    config that Hydra gives a copy of the sweep's resolver cache: one name."""
    register_resolvers()
    a = OmegaConf.create({"dir": "${unique:12-00-00}"})
    b = OmegaConf.create({"dir": "${unique:12-00-00}"})
    assert a.dir == a.dir and b.dir == b.dir
    assert a.dir != b.dir
    assert a.dir.startswith("12-00-00-") and UNIQUE_TIME.match(a.dir)
    job = OmegaConf.create({"dir": "${unique:12-00-00}"})
    OmegaConf.copy_cache(from_config=a, to_config=job)  # what Hydra's load_sweep_config does
    assert job.dir == a.dir


def test_cache_lock_excludes_another_process_until_released(tmp_path: Path) -> None:
    cache = tmp_path / "cache" / "thing.pt"
    code = (
        "import logging, sys\n"
        "logging.basicConfig(level=logging.INFO, stream=sys.stderr)\n"
        "from pse_lightning.core.locks import cache_lock\n"
        f"with cache_lock({str(cache)!r}, 'to finish it'):\n"
        "    print('acquired', flush=True)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with cache_lock(cache):
        child = subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=env, text=True,
        )  # fmt: skip
        waiting = child.stderr.readline()  # blocks until the child has tried the lock
        assert WAITING in waiting and "to finish it" in waiting, waiting
        assert child.poll() is None, "the child got past a held lock"
    out, _ = child.communicate(timeout=60)
    assert out.strip() == "acquired" and child.returncode == 0
    assert lock_path(cache).is_file() and not cache.exists()


def test_a_killed_holder_leaves_no_stale_lock(tmp_path: Path) -> None:
    cache = tmp_path / "thing.npz"
    code = (
        "import time\nfrom pse_lightning.core.locks import cache_lock\n"
        f"with cache_lock({str(cache)!r}):\n    print('held', flush=True)\n    time.sleep(600)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=env)
    assert child.stdout.readline().strip() == b"held"
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=60)
    done = threading.Event()

    def take() -> None:
        with cache_lock(cache):
            done.set()

    worker = threading.Thread(target=take, daemon=True)
    worker.start()
    assert done.wait(timeout=60), "the lock of a killed process was not released"


def _wait_for(caplog: pytest.LogCaptureFixture, text: str, seconds: float = 60) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if text in caplog.text:
            return True
        time.sleep(0.02)
    return False


def test_a_second_job_waits_for_the_shapes_data_instead_of_generating_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """While one job holds the data cache's lock (generating), another job's
    ``load_arrays`` waits, then reads what the first wrote: it generates nothing."""
    from pse_lightning.data.shapes import ShapesDataModule, _write_cache

    sizes = dict(num_train=8, num_val=4, num_test=4, num_probe=4)
    first = ShapesDataModule(root=str(tmp_path), **sizes)
    second = ShapesDataModule(root=str(tmp_path), **sizes)
    found: dict = {}
    caplog.set_level("INFO")
    with cache_lock(first.cache_path):
        worker = threading.Thread(target=lambda: found.update(second.load_arrays()), daemon=True)
        worker.start()
        assert _wait_for(caplog, WAITING), "the second job did not wait for the lock"
        arrays = first._generate()
        _write_cache(first.cache_path, arrays, first.params)
    worker.join(timeout=60)
    assert "generating the shapes dataset into" not in caplog.text
    assert set(found) == set(arrays)
    assert all((found[k] == arrays[k]).all() for k in arrays)


def test_a_second_job_waits_for_the_training_instead_of_training_again(
    make_cfg, caplog: pytest.LogCaptureFixture
) -> None:
    """``stage=auto`` with no cached model: while another job holds the checkpoint's lock
    (training), this job waits, then loads the model that job cached."""
    from pse_lightning import pipeline
    from pse_lightning.models.checkpoint import cache_path, save_checkpoint

    cfg = make_cfg()
    parts = pipeline.build(cfg)
    identity = pipeline.checkpoint_identity(cfg, parts.datamodule)
    keys = ("model", "dataset", "training", "digest")
    checkpoint = cache_path(cfg.paths.checkpoint_dir, *(identity[k] for k in keys))
    assert not checkpoint.exists()
    other = pipeline.build(cfg).model  # the other job's trained model
    got: dict = {}
    caplog.set_level("INFO")
    with cache_lock(checkpoint):
        worker = threading.Thread(
            target=lambda: got.update(path=pipeline.trained_model(cfg, parts)), daemon=True
        )
        worker.start()
        assert _wait_for(caplog, WAITING), "the second job did not wait for the training"
        save_checkpoint(checkpoint, other, identity)
    worker.join(timeout=120)
    assert got["path"] == checkpoint
    assert "training it first" not in caplog.text
    assert "another job has trained this model meanwhile" in caplog.text
    for key, value in other.state_dict().items():
        assert (parts.model.state_dict()[key] == value).all()


# Run inside each job (python -c): before training, wait until the other job has either
# started training too (the old behaviour) or logged that it waits for this one's training.
_SYNCHRONISED_FIT = """
import os, sys, time
from pathlib import Path
import pse_lightning.pipeline as pipeline
root = Path(sys.argv[1])
fit = pipeline.fit

def synchronised_fit(*args, **kwargs):
    (root / f"fit-{os.getpid()}").touch()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if len(list(root.glob("fit-*"))) > 1:
            break
        logs = root.glob("outputs/*/*/pse_lightning.log")
        if any("to finish training this model" in log.read_text() for log in logs):
            break
        time.sleep(0.1)
    return fit(*args, **kwargs)

pipeline.fit = synchronised_fit
sys.argv = ["pse_lightning", *sys.argv[2:]]
from pse_lightning.cli.app import main
main()
"""


@pytest.mark.slow
def test_two_jobs_started_together_keep_both_results_and_train_once(tmp_path: Path) -> None:
    """``attack=fgsm`` and ``attack=pgd`` started at once on an empty cache: two run
    directories with a report and a W&B run each, the data generated once, one training."""
    args = [
        "experiment=smoke",
        "logger=wandb",
        "dataset.eval_samples=16",
        "analysis=none",
        "trainer.enable_progress_bar=false",
        f"paths.root={tmp_path}",
    ]
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}
    jobs = [
        subprocess.Popen(
            [sys.executable, "-c", _SYNCHRONISED_FIT, str(tmp_path), *args, f"attack={attack}"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for attack in ("fgsm", "pgd")
    ]
    for job in jobs:
        out, _ = job.communicate(timeout=900)
        assert job.returncode == 0, out
    runs = sorted(p.parent for p in (tmp_path / "outputs").glob("*/*/.hydra"))
    assert len(runs) == 2, runs
    attacks = set()
    for run in runs:
        assert (run / "report.md").is_file() and (run / "metrics.json").is_file()
        assert len(list((run / "wandb").glob("offline-run-*"))) == 1
        attacks.add(OmegaConf.load(run / ".hydra" / "config.yaml").attack._target_)
    assert attacks == {"pse_lightning.attacks.FGSM", "pse_lightning.attacks.PGD"}
    logs = [(run / "pse_lightning.log").read_text() for run in runs]
    assert len(list(tmp_path.glob("fit-*"))) == 1, "the model was trained twice"
    assert sum("training it first" in log for log in logs) == 1
    assert sum("another job has trained this model meanwhile" in log for log in logs) == 1
    assert sum("generating the shapes dataset into" in log for log in logs) == 1
