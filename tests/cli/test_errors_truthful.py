"""Errors that tell the truth: each bad input is named for what it is, with its key and fix.

Each case failed on the old code: a directory was "no such file", an unreadable file "not a
PyTorch weights file ... truncated", a pickle quoted torch's advice to load it unsafely,
``analysis.pse.tau_s`` was ``analysis.tau_s``, a typo got Hydra's "add it with +", a
non-ASCII path no hint, and a checkpoint of another architecture a "(torchvision layout)".
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import CONF_DIR
from test_cli import run_cli

from pse_lightning.cli.hints import override_hint, quoting_hint
from pse_lightning.cli.preflight import check_checkpoint
from pse_lightning.models import CheckpointError, TorchvisionClassifier
from pse_lightning.models.checkpoint import read_checkpoint
from pse_lightning.models.foreign import read_foreign_weights
from pse_lightning.validation import InputError

DATA = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "in_channels": 3}


def _weights(path: Path) -> Path:
    torch.save({"w": torch.zeros(2)}, path)
    return path


def _unreadable(path: Path, monkeypatch) -> Path:
    """A file this process cannot open (root reads any file: then ``open`` is refused)."""
    _weights(path)
    path.chmod(0)
    if os.access(path, os.R_OK):  # running as root
        real_open = Path.open

        def refuse(self, *args, **kwargs):
            if self == path:
                raise PermissionError(13, "Permission denied", str(self))
            return real_open(self, *args, **kwargs)

        monkeypatch.setattr(Path, "open", refuse)
    return path


def _problem(tmp_path: Path, case: str, monkeypatch) -> Path:
    if case == "directory":
        (tmp_path / "run").mkdir()
        return tmp_path / "run"
    if case == "missing":
        return tmp_path / "absent.pt"
    if case == "permission":
        return _unreadable(tmp_path / "locked.pt", monkeypatch)
    if case == "truncated":
        whole = _weights(tmp_path / "whole.pt").read_bytes()
        (tmp_path / "cut.pt").write_bytes(whole[: len(whole) // 2])
        return tmp_path / "cut.pt"
    torch.save({"w": torch.zeros(2), "args": SimpleNamespace(lr=1)}, tmp_path / "pickled.pt")
    return tmp_path / "pickled.pt"


# case -> (words that must appear, words that must not)
CASES = {
    "directory": ("is a directory, not a file", ("no such file", "truncated")),
    "missing": ("no such file", ("directory", "truncated")),
    "permission": ("permission denied", ("truncated", "not a PyTorch weights file")),
    "truncated": ("not a PyTorch weights file", ("permission", "directory")),
    "pickled": ("holds pickled Python objects", ("weights_only=False", "Re-running")),
}


def assert_told_apart(message: str, key: str, path: Path, case: str) -> None:
    """One line naming ``key=path`` that says what ``CASES[case]`` says and nothing the
    other cases say."""
    said, unsaid = CASES[case]
    assert message.startswith(f"{key}={path}") and "\n" not in message
    assert said in message and not any(word in message for word in unsaid), message


@pytest.mark.parametrize("case", list(CASES))
def test_model_checkpoint_problems_are_told_apart(tmp_path: Path, monkeypatch, case) -> None:
    path = _problem(tmp_path, case, monkeypatch)
    with pytest.raises(InputError) as err:
        check_checkpoint(path)
    assert_told_apart(str(err.value), "model_checkpoint", path, case)


@pytest.mark.parametrize("case", ["directory", "permission", "truncated", "pickled"])
def test_model_weights_problems_are_told_apart(tmp_path: Path, monkeypatch, case) -> None:
    path = _problem(tmp_path, case, monkeypatch)
    with pytest.raises(CheckpointError) as err:
        read_foreign_weights(path)
    assert_told_apart(str(err.value), "model.weights", path, case)


def test_cached_checkpoint_reader_tells_the_same_truth(tmp_path: Path, monkeypatch) -> None:
    for case in ("directory", "permission", "truncated", "pickled"):
        with pytest.raises(CheckpointError, match=CASES[case][0]):
            read_checkpoint(_problem(tmp_path / case, case, monkeypatch))


@pytest.fixture(autouse=True)
def _case_dirs(tmp_path: Path) -> None:
    for case in CASES:
        (tmp_path / case).mkdir()


def test_refused_pickle_says_why_and_never_advises_loading_it_unsafely(tmp_path: Path) -> None:
    path = _problem(tmp_path, "pickled", None)
    with pytest.raises(InputError) as err:
        check_checkpoint(path)
    message = str(err.value)
    assert "types.SimpleNamespace" in message and "refused for safety" in message
    assert "torch.save(model.state_dict(), path)" in message
    assert "weights_only" not in message and "trust" not in message


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [({"tau_s": 0.9}, "analysis.pse.tau_s"), ({"tau_s": 2.0}, "analysis.pse.tau_s")],
)
def test_analysis_errors_name_the_full_key(kwargs: dict, key: str) -> None:
    from pse_lightning.analysis.pse import PSE

    with pytest.raises(ValueError, match=rf"^{key} must"):
        PSE(**kwargs)


def test_cam_and_dissection_errors_name_the_full_key() -> None:
    from pse_lightning.analysis.cam import CAMAnalysis
    from pse_lightning.analysis.dissection import Dissection

    with pytest.raises(ValueError, match=r"^analysis\.cam\.threshold must"):
        CAMAnalysis(threshold=2.0)
    with pytest.raises(ValueError, match=r"^analysis\.dissection\.quantile must"):
        Dissection(quantile=0.0)


@pytest.mark.parametrize(
    ("argv", "hint"),
    [
        (
            ["attack=pgd", "attack.stpes=10"],
            "attack.stpes is not a setting of attack=pgd: did you mean attack.steps? "
            "(attack.steps=10)",
        ),
        (
            ["analysis=pse", "analysis.pse.tua_s=0.5"],
            "analysis.pse.tua_s is not a setting of analysis=pse: did you mean "
            "analysis.pse.tau_s? (analysis.pse.tau_s=0.5)",
        ),
    ],
)
def test_typo_gets_did_you_mean(argv: list[str], hint: str) -> None:
    assert override_hint(argv, CONF_DIR) == hint


def test_value_the_lexer_rejects_gets_the_quoting_hint() -> None:
    hint = quoting_hint(["logger=none", "paths.root=/data/Ünïcode dir"])
    assert hint is not None and "\"paths.root='/data/Ünïcode dir'\"" in hint
    assert quoting_hint(["paths.root=/data/plain dir", "seed=1"]) is None
    assert quoting_hint(["-m", "attack=fgsm,pgd"]) is None  # a sweep, not a lexer error


def test_weights_of_another_architecture_say_the_keys_do_not_match(tmp_path: Path) -> None:
    import torchvision

    torch.save(torchvision.models.squeezenet1_1(num_classes=4).state_dict(), tmp_path / "s.pt")
    with pytest.raises(CheckpointError) as err:
        TorchvisionClassifier(
            arch="resnet18", num_classes=4, image_size=32, weights=str(tmp_path / "s.pt"), **DATA
        )
    message = str(err.value)
    assert "does not match model.arch=resnet18" in message and "layout" not in message
    assert re.search(r"\d+ missing keys \['bn1\.", message), message
    assert re.search(r"\d+ unexpected keys \['classifier\.", message), message
    assert message.endswith("it holds a squeezenet1_1: pass model.arch=squeezenet1_1")


def test_cli_typo_prints_did_you_mean_instead_of_hydras_plus_advice(tmp_path: Path) -> None:
    result = run_cli(["attack=pgd", "attack.stpes=10", "logger=none"], tmp_path, check=False)
    assert result.returncode == 1
    assert "To append to your config use +" not in result.stderr
    assert result.stderr.splitlines()[-1] == (
        "Hint: attack.stpes is not a setting of attack=pgd: did you mean attack.steps? "
        "(attack.steps=10)"
    )


def test_cli_directory_as_checkpoint_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "ckpt").mkdir()
    args = [f"model_checkpoint={tmp_path / 'ckpt'}", f"paths.root={tmp_path}", "logger=none"]
    result = run_cli(args, tmp_path, check=False)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"Error: model_checkpoint={tmp_path / 'ckpt'} is a directory, not a file: pass the "
        "weights file inside it"
    ]
