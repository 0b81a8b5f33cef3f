"""Settings given empty (``key=``) fail in one line before any work, naming the key and fix.

``paths.root=`` used to write ``/outputs`` at the filesystem root and ``model_checkpoint=``
silently trained a model from scratch.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import CONF_DIR
from hydra import compose, initialize_config_dir
from test_cli import run_cli

from pse_lightning.cli.check import check_config
from pse_lightning.validation import REQUIRED_VALUES, InputError


def _compose(*overrides: str):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


@pytest.mark.parametrize("key", sorted(REQUIRED_VALUES))
def test_an_empty_setting_is_refused_with_its_fix(key: str) -> None:
    cfg = _compose(f"{key}=")
    choices = dict(cfg.hydra.runtime.choices)
    with pytest.raises(InputError, match=rf"^{key} is empty: .*; .*{key}") as err:
        check_config(cfg, choices, CONF_DIR)
    assert "\n" not in str(err.value)


def test_set_values_and_null_checkpoint_pass(tmp_path: Path) -> None:
    cfg = _compose(f"paths.root={tmp_path}", "model_checkpoint=null")
    check_config(cfg, dict(cfg.hydra.runtime.choices), CONF_DIR)


def _nothing_at_the_filesystem_root() -> list[Path]:
    return [p for p in (Path("/outputs"), Path("/multirun")) if p.exists()]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["paths.root="], "paths.root is empty: runs and caches would be written under /outputs"),
        (["-m", "paths.root=", "attack=fgsm,pgd"], "paths.root is empty"),
        (["model_checkpoint="], "model_checkpoint is empty: the run would train a model"),
    ],
)
def test_the_cli_refuses_them_before_writing_anything(
    tmp_path: Path, args: list[str], message: str
) -> None:
    before = _nothing_at_the_filesystem_root()
    # An invalid size fails the next check: an implementation that misses the empty value
    # fails this test quickly instead of running a job at the filesystem root.
    result = run_cli([*args, "dataset.num_train=0"], tmp_path, check=False)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {message}"), result.stderr
    assert list(tmp_path.iterdir()) == []
    assert _nothing_at_the_filesystem_root() == before


def test_the_python_api_refuses_an_empty_checkpoint_before_the_data(make_cfg, tmp_path) -> None:
    from pse_lightning import pipeline

    data = tmp_path / "fresh_data"
    cfg = make_cfg("model_checkpoint=", f"paths.data_dir={data}", "stage=evaluate")
    with pytest.raises(InputError, match="model_checkpoint is empty"):
        pipeline.run(cfg)
    assert not data.exists()


@pytest.mark.parametrize("seed", [-1, 2**32])
def test_a_seed_outside_numpys_range_is_refused_before_any_work(seed: int) -> None:
    """``seed=-1`` used to fail in numpy after 9.5 s of start-up, with numpy's message."""
    cfg = _compose(f"seed={seed}")
    with pytest.raises(InputError, match=rf"^seed must be in \[0, 2\*\*32 - 1\].*got {seed}"):
        check_config(cfg, dict(cfg.hydra.runtime.choices), CONF_DIR)
    ok = _compose(f"seed={2**32 - 1}")
    check_config(ok, dict(ok.hydra.runtime.choices), CONF_DIR)


def test_a_target_override_outside_the_package_and_the_config_files_is_refused() -> None:
    """``instantiate`` would import and call any ``_target_``: only this package's classes
    and those a config file names (conf/ or an extension folder) are accepted."""
    for target in ("os.system", "subprocess.Popen"):
        cfg = _compose(f"attack._target_={target}")
        with pytest.raises(InputError, match=rf"^attack._target_={target} is not allowed"):
            check_config(cfg, dict(cfg.hydra.runtime.choices), CONF_DIR)
    # torch.optim.SGD is named by no config file; AdamW (conf/training) is
    cfg = _compose("training.optimizer._target_=torch.optim.SGD")
    with pytest.raises(InputError, match="training.optimizer._target_=torch.optim.SGD"):
        check_config(cfg, dict(cfg.hydra.runtime.choices), CONF_DIR)
    ok = _compose("attack._target_=pse_lightning.attacks.PGD", "attack=pgd")
    check_config(ok, dict(ok.hydra.runtime.choices), CONF_DIR)


@pytest.mark.parametrize("devices", [0, -2])
def test_a_device_count_lightning_cannot_use_is_refused_before_any_work(devices: int) -> None:
    cfg = _compose("trainer=ddp_cpu", f"trainer.devices={devices}")
    with pytest.raises(InputError, match=rf"^trainer.devices must be .*got {devices}"):
        check_config(cfg, dict(cfg.hydra.runtime.choices), CONF_DIR)
    for ok in (1, -1):
        good = _compose("trainer=ddp_cpu", f"trainer.devices={ok}")
        check_config(good, dict(good.hydra.runtime.choices), CONF_DIR)
