"""A battery of bad inputs, each run through ``python -m pse_lightning`` as a user runs it.

Every one must fail before any work (issue 23 item 2): exit status 1, one ``Error:`` line
on stderr (and at most one ``Hint:`` line, app.main's documented format) naming the key to
change, no traceback, nothing on stdout, and nothing left behind: ``paths.root`` is not
created, no W&B run, no data, no checkpoint, nothing in the working directory.

A subprocess per input is the truth (Hydra's own error handling, the callback that checks
before the run directory exists, the import order); most fail in about a second, those
that build the model or read data files in a few. The fast subset runs by default, the
whole battery with ``make test-all``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ROOT
from omegaconf import OmegaConf

from pse_lightning.cli import preflight
from pse_lightning.validation import InputError

slow = pytest.mark.slow


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Bad files and trees the inputs point at (``{files}`` in a case's arguments)."""
    return make_bad_files(tmp_path_factory.mktemp("bad_files"))


def make_bad_files(root: Path) -> Path:
    """Write the bad files and trees under ``root``; returns ``root``."""
    from PIL import Image

    (root / "a_file").write_text("not a folder")
    (root / "empty").mkdir()
    (root / "garbage.pt").write_bytes(b"\x00not a torch file" * 8)
    torch.save(torch.zeros(3), root / "tensor.pt")
    torch.save({"fc.weight": torch.zeros(10, 512)}, root / "other_arch.pt")
    torch.save({"w": torch.zeros(1), "blob": torch.nn.ReLU()}, root / "pickled.pt")
    # An ImageFolder tree whose val/dog/1.png is not a PNG (its header only).
    tree = root / "tree"
    for split in ("train", "val"):
        for name in ("cat", "dog"):
            (tree / split / name).mkdir(parents=True)
            for i in range(3):
                pixels = torch.randint(0, 255, (16, 16, 3), dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(tree / split / name / f"{i}.png")
    (tree / "val" / "dog" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    # cifar-10-batches-py with every file in place, but not CIFAR-10's.
    fake = root / "cifar" / "cifar-10-batches-py"
    fake.mkdir(parents=True)
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta"]:
        (fake / name).write_bytes(b"fake")
    # MNIST/raw with its four IDX files in place, but not MNIST's.
    raw = root / "mnist" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split in ("train", "t10k"):
        for kind, dim in (("images", 3), ("labels", 1)):
            (raw / f"{split}-{kind}-idx{dim}-ubyte").write_bytes(b"fake")
    return root


#: (id, arguments, the key the error must name); ``{files}`` is the fixture folder. The
#: fast ones fail in the config check (no torch import); the others build the model or
#: read files.
FAST = [
    ("seed_negative", ["seed=-1"], "seed"),
    ("devices_zero", ["trainer.devices=0"], "trainer.devices"),
    ("eps_negative", ["attack=pgd", "attack.eps=-1"], "attack.eps"),
    ("stage_unknown", ["stage=train"], "stage"),
    ("empty_root", ["paths.root="], "paths.root"),
    ("empty_checkpoint", ["model_checkpoint="], "model_checkpoint"),
    ("root_is_file", ["paths.root={files}/a_file"], "paths.root"),
    ("checkpoint_missing", ["model_checkpoint={files}/missing.pt"], "model_checkpoint"),
    ("target_builtin", ["attack._target_=builtins.print"], "attack._target_"),
    ("multirun_eps", ["-m", "attack=pgd", "attack.eps=0.01,-1"], "attack.eps"),
    # Refused by Hydra's composition: its several lines become one Error line (+ a Hint).
    ("choice_unknown", ["attack=cww"], "attack/cww"),
    ("key_typo_top_level", ["sed=3"], "sed"),
    ("key_typo_in_group", ["attack.stpes=3"], "attack.stpes"),
]
SLOW = [
    # value ranges and types
    ("seed_too_large", ["seed=4294967296"], "seed"),
    ("seed_text", ["seed=abc"], "seed"),
    ("devices_ddp_zero", ["trainer=ddp_cpu", "trainer.devices=0"], "trainer.devices"),
    ("devices_minus_two", ["trainer.devices=-2"], "trainer.devices"),
    ("eps_above_one", ["attack=pgd", "attack.eps=2"], "attack.eps"),
    ("steps_zero", ["attack=pgd", "attack.steps=0"], "attack.steps"),
    ("norm_unknown", ["attack=pgd", "attack.norm=l3"], "attack.norm"),
    ("step_size_text", ["attack=pgd", "attack.step_size=abc"], "attack.step_size"),
    ("cw_lr_negative", ["attack.lr=-0.1"], "attack.lr"),
    ("log_examples_negative", ["log_examples=-1"], "log_examples"),
    ("resume_text", ["resume=maybe"], "resume"),
    ("epochs_zero", ["training.epochs=0"], "training.epochs"),
    ("batch_size_zero", ["dataset.batch_size=0"], "dataset.batch_size"),
    ("num_train_zero", ["dataset.num_train=0"], "dataset.num_train"),
    ("cam_threshold", ["analysis.cam.threshold=1.5"], "analysis.cam.threshold"),
    ("cam_method", ["analysis.cam.method=foo"], "analysis.cam.method"),
    ("pse_tau_s", ["analysis.pse.tau_s=-1"], "analysis.pse.tau_s"),
    ("dissection_quantile", ["analysis.dissection.quantile=2"], "analysis.dissection.quantile"),
    ("unknown_top_level", ["+foo=1"], "foo"),
    ("fit_with_checkpoint", ["stage=fit", "model_checkpoint=x.pt"], "model_checkpoint"),
    # empty values
    ("empty_data_dir", ["paths.data_dir="], "paths.data_dir"),
    ("empty_checkpoint_dir", ["paths.checkpoint_dir="], "paths.checkpoint_dir"),
    ("empty_run_dir", ["paths.run_dir="], "paths.run_dir"),
    # output folders
    ("root_below_file", ["paths.root={files}/a_file/sub"], "paths.root"),
    ("data_dir_is_file", ["paths.data_dir={files}/a_file"], "paths.data_dir"),
    ("checkpoint_dir_is_file", ["paths.checkpoint_dir={files}/a_file"], "paths.checkpoint_dir"),
    # checkpoints and weights files
    ("checkpoint_dir", ["model_checkpoint={files}/empty"], "model_checkpoint"),
    ("checkpoint_garbage", ["model_checkpoint={files}/garbage.pt"], "model_checkpoint"),
    ("checkpoint_tensor", ["model_checkpoint={files}/tensor.pt"], "model_checkpoint"),
    ("checkpoint_pickle", ["model_checkpoint={files}/pickled.pt"], "model_checkpoint"),
    ("checkpoint_other_arch", ["model_checkpoint={files}/other_arch.pt"], "model_checkpoint"),
    ("weights_garbage", ["model=resnet18", "model.weights={files}/garbage.pt"], "model.weights"),
    (
        "weights_other_arch",
        ["model=resnet18", "model.weights={files}/other_arch.pt"],
        "model.weights",
    ),
    # layers against the built model
    ("cam_layer", ["analysis.cam.layer=net.nope"], "analysis.cam.layer"),
    (
        "dissection_layer",
        ["analysis.dissection.layers=[net.features.2,net.nope]"],
        "analysis.dissection.layers[1]",
    ),  # fmt: skip
    (
        "objective_layer",
        ["training=pse_at", "training.objective.layer=net.nope"],
        "training.objective.layer",
    ),  # fmt: skip
    ("defense_layer", ["defense=neuron_mask", "defense.layer=net.nope"], "defense.layer"),
    # nothing to evaluate
    ("training_none", ["training=none"], "training=none"),
    ("evaluate_uncached", ["stage=evaluate"], "stage=evaluate"),
    # data that cannot be read
    (
        "tree_corrupt_image",
        ["dataset=imagenet", "dataset.root={files}/tree", "model=resnet18", "dataset.num_val=2"],
        "{files}/tree/val/dog/1.png",
    ),  # fmt: skip
    ("tree_empty", ["dataset=imagenet", "dataset.root={files}/empty"], "dataset.root"),
    ("cifar_fake", ["dataset=cifar10", "dataset.root={files}/cifar"], "data_batch_1"),
    ("mnist_fake", ["dataset=mnist", "dataset.root={files}/mnist"], "train-images-idx3-ubyte"),
    ("cifar_missing", ["dataset=cifar10", "dataset.root={files}/empty"], "dataset.root"),
    ("mnist_missing", ["dataset=mnist", "dataset.root={files}/empty"], "dataset.root"),
    # multirun: every job is checked before job 0 runs
    ("multirun_seed", ["-m", "seed=0,-1"], "seed"),
    (
        "multirun_cam_layer",
        ["-m", "analysis.cam.layer=net.features.2,net.nope"],
        "analysis.cam.layer",
    ),  # fmt: skip
    ("multirun_empty_root", ["-m", "paths.root=", "attack=fgsm,pgd"], "paths.root"),
    ("multirun_evaluate", ["-m", "stage=evaluate", "seed=0,1"], "stage=evaluate"),
]
CASES = [pytest.param(*case[1:], id=case[0]) for case in FAST] + [
    pytest.param(*case[1:], id=case[0], marks=slow) for case in SLOW
]


def run_bad(args: list[str], work: Path) -> subprocess.CompletedProcess:
    """``python -m pse_lightning`` in ``work`` with ``paths.root=work/root`` (a case's own
    ``paths.root`` comes later and wins); multirun flags stay first."""
    flags = [a for a in args if a == "-m"]
    rest = [a for a in args if a != "-m"]
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, "-m", "pse_lightning", *flags, f"paths.root={work}/root", *rest],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def assert_refused_before_work(result: subprocess.CompletedProcess, key: str, work: Path) -> str:
    """One ``Error:`` line naming ``key`` (plus at most one ``Hint:``), no traceback, exit 1,
    and ``work`` (the working directory, holding ``paths.root``) still empty."""
    output = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 1, output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if not line.startswith("Hint: ")]
    assert len(errors) == 1 and errors[0].startswith("Error: "), output
    assert len(lines) - len(errors) <= 1, output
    assert "Traceback" not in result.stderr + result.stdout, output
    assert result.stdout.strip() == "", output
    assert key in errors[0], output
    left = sorted(str(p.relative_to(work)) for p in work.rglob("*"))
    assert left == [], f"left behind: {left}\n{output}"
    return errors[0]


@pytest.mark.parametrize(("args", "key"), CASES)
def test_a_bad_input_fails_in_one_line_before_any_work(
    args: list[str], key: str, files: Path, tmp_path: Path
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    args = [a.replace("{files}", str(files)) for a in args]
    result = run_bad(args, work)
    assert_refused_before_work(result, key.replace("{files}", str(files)), work)


def test_hydras_refusals_get_a_did_you_mean(tmp_path: Path) -> None:
    """The Hint line after Hydra's one-line refusal names what was meant."""
    for args, hint in [
        (["attack=cww"], "Hint: attack=cww is not a choice of attack: did you mean attack=cw?"),
        (["sed=3"], "Hint: sed is not a setting: did you mean seed? (seed=3)"),
    ]:
        result = run_bad(args, tmp_path)
        assert result.stderr.strip().splitlines()[-1] == hint, result.stderr


def test_an_unknown_key_without_a_close_match_names_the_problem_and_the_fix(
    tmp_path: Path,
) -> None:
    """No "did you mean": the one Error line says the key is not a setting and where the
    settings are listed, phrased as the close-match hint, without Hydra's advice to append
    it with ``+`` (the constructor would refuse it next); a multirun says the same, naming
    the job, before any job runs."""
    help_ = "`python -m pse_lightning --help` lists the settings and the config groups"
    for name, args, line in [
        ("run", ["foo=3"], f"Error: foo is not a setting: {help_}"),
        ("sweep", ["-m", "foo=3,4"], f"Error: job 0 of 2 (foo=3): foo is not a setting: {help_}"),
    ]:
        work = tmp_path / name
        work.mkdir()
        result = run_bad(args, work)
        assert assert_refused_before_work(result, "foo", work) == line
        assert "+foo" not in result.stderr and "Hint:" not in result.stderr
    # A typo keeps its "did you mean" on the Hint line, after the same Error line.
    work = tmp_path / "typo"
    work.mkdir()
    result = run_bad(["sed=3"], work)
    assert (
        assert_refused_before_work(result, "sed", work) == f"Error: sed is not a setting: {help_}"
    )
    assert (
        result.stderr.splitlines()[-1] == "Hint: sed is not a setting: did you mean seed? (seed=3)"
    )


def test_the_battery_has_at_least_40_inputs() -> None:
    assert len(FAST) + len(SLOW) >= 40
    assert len({case[0] for case in FAST + SLOW}) == len(FAST) + len(SLOW)


# The output-folder checks on conditions a test cannot make real as the root user (who
# writes anywhere) or without filling a disk: the checks read os.access and disk_usage.


def test_a_read_only_root_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(preflight.os, "access", lambda path, mode: False)
    cfg = OmegaConf.create({"paths": {"root": str(tmp_path / "new")}})
    with pytest.raises(InputError, match=r"^paths.root=.*new is not writable \(the nearest"):
        preflight.check_output_dirs(cfg)


def test_a_full_disk_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    usage = type("usage", (), {"free": 10 * 2**20})
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: usage)
    cfg = OmegaConf.create({"paths": {"root": str(tmp_path)}})
    with pytest.raises(InputError, match=r"^paths.root=.* has 10 MiB free; a run needs"):
        preflight.check_output_dirs(cfg)


def test_a_writable_root_with_space_passes(tmp_path: Path) -> None:
    root = tmp_path / "not" / "yet"
    cfg = OmegaConf.create({"paths": {"root": str(root), "data_dir": "${paths.root}/data"}})
    preflight.check_output_dirs(cfg)
    assert not (tmp_path / "not").exists()  # checking creates nothing


# A damaged image met after the sample check (it is not in the sample) still ends the run
# with one line naming the file, also when a DataLoader worker raised it.


def _corrupt_samples(tmp_path: Path):
    from pse_lightning.data.imagenet import FolderSamples, eval_transform

    bad = tmp_path / "dog" / "7.png"
    bad.parent.mkdir()
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    return FolderSamples([(str(bad), 0)], eval_transform(8)), bad


def test_a_damaged_image_met_later_names_the_file(tmp_path: Path) -> None:
    from pse_lightning.data.imagenet import UnreadableImage

    data, bad = _corrupt_samples(tmp_path)
    with pytest.raises(UnreadableImage, match=rf"^dataset.root: the image {bad} cannot be read"):
        data[0]


def test_a_worker_error_is_reported_as_its_own_line(tmp_path: Path) -> None:
    from torch.utils.data import DataLoader

    from pse_lightning.cli.app import one_line
    from pse_lightning.data.imagenet import UnreadableImage

    data, bad = _corrupt_samples(tmp_path)
    try:
        next(iter(DataLoader(data, num_workers=1)))
    except UnreadableImage as err:
        message, line = str(err), one_line(err)
        # torch's re-raise leaves the error's traceback holding the loader in a cycle: freed
        # by a later test's garbage collection, its worker then takes 5 s to stop. Cut, the
        # loader is freed, and its worker stopped, here.
        err.__traceback__ = None
    else:
        pytest.fail("the damaged image was read")
    assert "Original Traceback" in message  # torch puts the worker's traceback in
    assert line.startswith(f"dataset.root: the image {bad} cannot be read") and "\n" not in line


# The multirun pre-pass, in process: which jobs it expands, and a sweep whose later job
# evaluates the model an earlier job trains passes it.


def _check_sweep(tmp_path: Path, *overrides: str) -> list[list[str]] | None:
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    from pse_lightning.cli.app import check_sweep, sweep_jobs

    args = [f"paths.root={tmp_path}/root", "analysis=none", *overrides]
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        hydra = GlobalHydra.instance().hydra
        cfg = hydra.compose_config("config", args, run_mode=RunMode.MULTIRUN)
        jobs = sweep_jobs(cfg)
        check_sweep(cfg)
    return jobs


def test_the_sweep_pre_pass_expands_every_job(tmp_path: Path) -> None:
    jobs = _check_sweep(tmp_path, "attack=fgsm,pgd", "seed=0,1")
    assert [[a for a in job if a.startswith(("attack=", "seed="))] for job in jobs] == [
        ["attack=fgsm", "seed=0"],
        ["attack=fgsm", "seed=1"],
        ["attack=pgd", "seed=0"],
        ["attack=pgd", "seed=1"],
    ]
    assert not (tmp_path / "root").exists()


def test_a_sweep_may_evaluate_what_an_earlier_job_trains(tmp_path: Path) -> None:
    _check_sweep(tmp_path, "stage=fit,evaluate")
    with pytest.raises(InputError, match=r"^job 0 of 2 \(seed=0\): stage=evaluate evaluates"):
        _check_sweep(tmp_path, "stage=evaluate", "seed=0,1")
    with pytest.raises(InputError, match=r"^job 1 of 2 \(attack.eps=-1\): attack.eps must be"):
        _check_sweep(tmp_path, "attack=pgd", "attack.eps=0.01,-1")
