"""Shared fixtures: compose the real ``conf/`` with tiny overrides, offline W&B in tmp."""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import CONF_DIR
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

# Small enough for seconds, large enough that small_cnn learns the task.
TINY = [
    "dataset.num_train=768",
    "dataset.num_val=128",
    "dataset.num_test=128",
    "dataset.num_probe=64",
    "dataset.eval_samples=48",
    "dataset.batch_size=32",
    "training.epochs=1",
    "trainer.enable_progress_bar=false",
]


# What each test exercises (README "Tests"): `make test-unit` runs the `unit` ones. A test
# is marked by what its own body calls: `cli` starts a process (`python -m pse_lightning`,
# pip, spawned ranks), `pipeline` runs Lightning or the pipeline's stages (training, the
# test loop, an analysis's report with its figures) or uses the session's trained
# checkpoint, `unit` is everything else. A mark set by hand (`pytestmark =
# pytest.mark.pipeline`, or on the test) takes precedence: the full-size cross-checks
# against the authors' or a peer library's code are marked pipeline by hand (seconds each);
# `slow` is always set by hand.
KINDS = ("unit", "pipeline", "cli")
# A helper that starts a process counts as its call (run_bad: test_bad_inputs's runner;
# wandb_inspect: the `wandb` command line); the guard below fails a unit test that starts
# one anyway, so a helper missing here shows up as a failing test, not as a slow unit suite.
CLI_CALLS = (
    "run_cli(", "run_bad(", "subprocess.", ".spawn(", 'get_context("spawn")', "wandb_inspect(",
)  # fmt: skip
PIPELINE_CALLS = (
    "pipeline.run(", "pipeline.trained_model(", "pipeline.evaluate(", "pipeline.fit(",
    "Trainer(", ".fit(", "trainer.test(", "shared=True", ".report(",
)  # fmt: skip
PIPELINE_FIXTURES = frozenset({"trained_checkpoint"})


@functools.cache
def _source(function: Callable) -> str:
    try:
        return inspect.getsource(function)
    except (OSError, TypeError):
        return ""


def exercised_kind(item: pytest.Item) -> str:
    """``unit``, ``pipeline`` or ``cli``: the kind set by hand, else what the test calls."""
    marked = [kind for kind in KINDS if item.get_closest_marker(kind) is not None]
    if marked:
        return marked[0]
    function = getattr(item, "function", None)
    body = _source(function) if function is not None else ""
    if any(call in body for call in CLI_CALLS):
        return "cli"
    if PIPELINE_FIXTURES & set(getattr(item, "fixturenames", ())) or any(
        call in body for call in PIPELINE_CALLS
    ):
        return "pipeline"
    return "unit"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        kind = exercised_kind(item)
        if item.get_closest_marker(kind) is None:
            item.add_marker(getattr(pytest.mark, kind))


# Automatic full garbage collections come after this many young-generation ones (Python's
# default: 10). A test file's objects are collected and frozen when the file ends (below);
# between those points a full collection traverses what the file's tests built (composed
# configs, models): about 50 of them in `make test-unit`, 2-2.5 CPU-s in all. Kept 100
# times rarer, none are left there, and the garbage they would have freed waits at most
# until the end of its file (peak memory: `make test-unit` 1.78 -> 1.80 GB, `make test`
# 1.87 -> 1.88 GB).
FULL_COLLECTION_THRESHOLD = 1000


def pytest_configure(config: pytest.Config) -> None:
    """The command line's process settings (pse_lightning/core/process.py) in the test
    process too: tests allocate and free tensors as a job does. Full garbage collections
    mostly at the end of each test file (:data:`FULL_COLLECTION_THRESHOLD`)."""
    import gc

    from pse_lightning.core.process import keep_freed_memory

    keep_freed_memory()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, FULL_COLLECTION_THRESHOLD)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> object:
    """After a file's last test (and its fixtures' teardown), freeze what is alive: the
    modules its tests imported (Lightning, matplotlib, a peer library) and the session's
    caches, so the next file's full garbage collections do not traverse them again."""
    result = yield
    if nextitem is None or nextitem.path != item.path:
        from pse_lightning.core.process import freeze_live_objects

        freeze_live_objects()
    return result


def pytest_collection_finish(session: pytest.Session) -> None:
    """Every test module is imported: spare their objects (torch's, Lightning's) the full
    garbage collections of the tests to come, as the command line does after its import."""
    from pse_lightning.core.process import freeze_live_objects

    freeze_live_objects()


def _refuse(what: str, mark: str) -> Callable[..., None]:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(
            f'a test marked unit {what}: mark it {mark} (tests/conftest.py, README "Tests")'
        )

    return refuse


@pytest.fixture(autouse=True)
def _unit_stays_in_process(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A test marked unit that starts a process, trains or runs a Lightning loop fails: the
    marks say what a test costs (``make test-unit`` runs the unit ones)."""
    if exercised_kind(request.node) != "unit":
        return
    import subprocess
    import sys

    monkeypatch.setattr(subprocess.Popen, "__init__", _refuse("starts a process", "cli"))
    lightning = sys.modules.get("pytorch_lightning")  # imported by the modules that train
    if lightning is not None:
        for loop in ("fit", "validate", "test", "predict"):
            monkeypatch.setattr(
                lightning.Trainer, loop, _refuse(f"runs Trainer.{loop}", "pipeline")
            )


@pytest.fixture(autouse=True, scope="session")
def _offline_wandb(tmp_path_factory: pytest.TempPathFactory) -> None:
    home = tmp_path_factory.mktemp("wandb_home")
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ["WANDB_SILENT"] = "true"
    os.environ["WANDB_CONFIG_DIR"] = str(home / "config")
    os.environ["WANDB_CACHE_DIR"] = str(home / "cache")
    os.environ["WANDB_DATA_DIR"] = str(home / "data")
    # Under pytest-xdist (`make test`: one worker per core) each worker keeps one thread, and
    # so do the processes its tests start (the CLI, spawned ranks): two threads per process
    # beside a busy worker wait at barriers (core/threads.py) and cost far more CPU. A
    # thread count set in the environment is kept.
    import torch  # here, not at the top: xdist's controller runs no test and needs no torch

    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    threads = max(1, min(2, torch.get_num_threads()) // workers)
    torch.set_num_threads(threads)
    if workers > 1:
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One dataset cache for the whole session (generation is deterministic)."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def shared_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One checkpoint cache for the session's pipeline tests (``make_cfg(shared=True)``).

    The cache is keyed by what the model learned from (``pipeline.checkpoint_identity``),
    so tests that train the same tiny model load the first one's weights. Under
    pytest-xdist every worker gets the same folder (the parent of its own base temp), and
    the pipeline's own cache lock (:mod:`pse_lightning.core.locks`) lets the first worker
    train an entry while the others wait and then load it.
    """
    folder = _session_dir(tmp_path_factory) / "checkpoints"
    folder.mkdir(exist_ok=True)
    return folder


def _session_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder every xdist worker of the session shares: the parent of its own base temp."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def compose_conf(*overrides: str, hydra: bool = False) -> DictConfig:
    """``conf/config.yaml`` composed with ``overrides`` (and the ``hydra`` node, ``hydra``)."""
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra)


@pytest.fixture
def make_cfg(
    tmp_path: Path, data_dir: Path, shared_checkpoints: Path
) -> Callable[..., DictConfig]:
    """Compose ``conf/`` as the CLI would, with a run directory under ``tmp_path``.

    ``shared=True``: trained checkpoints go to the session's cache (:func:`shared_checkpoints`)
    instead of ``tmp_path``; for tests that need a trained model but do not look at how
    (or whether) it was trained in this test.
    """

    def _make(*overrides: str, tiny: bool = True, shared: bool = False) -> DictConfig:
        base = [
            f"paths.root={tmp_path}",
            f"paths.run_dir={tmp_path}/run",
            f"paths.data_dir={data_dir}",
            "logger=none",
            # Mechanics tests use a cheap attack; test_pipeline runs the defaults too.
            "attack=pgd",
            "analysis=none",
        ]
        if shared:
            base.append(f"paths.checkpoint_dir={shared_checkpoints}")
        return compose_conf(*base, *(TINY if tiny else []), *overrides)

    return _make


@pytest.fixture(scope="session")
def composed(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., DictConfig]:
    """``conf/`` composed as the CLI does (with the ``hydra`` node), once per distinct list
    of overrides in the session, across xdist workers too (a pickle in the shared session
    folder; a composition costs 0.1 s and a third of them repeated another worker's): tests
    that only read a choice's config share it. Do not modify the returned config (copy it
    first)."""
    root = _session_dir(tmp_path_factory) / "composed"
    root.mkdir(exist_ok=True)
    base = (
        f"paths.root={root}",
        f"paths.run_dir={root}/run",
        "logger=none",
        "attack=pgd",
        "analysis=none",
    )
    cache: dict[tuple[str, ...], DictConfig] = {}

    def _composed(*overrides: str) -> DictConfig:
        if overrides not in cache:
            cache[overrides] = _compose_once(root, *base, *overrides)
        return cache[overrides]

    return _composed


def _compose_once(folder: Path, *overrides: str) -> DictConfig:
    """:func:`compose_conf` with the hydra node, stored in ``folder`` by the first worker
    that composes ``overrides`` and read back by the others (written atomically, so a
    reader never sees half a file; two workers composing at once both write it)."""
    import hashlib
    import pickle

    from pse_lightning.core.atomic import write_atomic

    key = hashlib.sha256("\0".join(overrides).encode()).hexdigest()[:24]
    stored = folder / f"{key}.pkl"
    if stored.is_file():
        return pickle.loads(stored.read_bytes())
    cfg = compose_conf(*overrides, hydra=True)
    write_atomic(stored, lambda handle: pickle.dump(cfg, handle))
    return cfg


@pytest.fixture(scope="session")
def small_vgg16() -> object:
    """VGG-16 adapted to 32 px images with 4 classes, in eval mode, built once per worker:
    building one takes a second (torchvision initialises its ImageNet classifier before it
    is replaced). Shared: do not modify it."""
    from pse_lightning.models import TorchvisionClassifier

    return TorchvisionClassifier(arch="vgg16", num_classes=4, in_channels=3, mean=[0.4, 0.5, 0.6],
                                 std=[0.2, 0.25, 0.3], image_size=32).eval()  # fmt: skip


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory: pytest.TempPathFactory, data_dir: Path,
                       shared_checkpoints: Path) -> Path:  # fmt: skip
    """The weights file of the tiny default model (``make_cfg(shared=True)`` trains the same
    one), trained once per session (once across xdist workers: the cache lock)."""
    import pytorch_lightning as pl

    from pse_lightning import pipeline

    root = tmp_path_factory.mktemp("trained")
    cfg = compose_conf(
        f"paths.root={root}", f"paths.run_dir={root}/run", f"paths.data_dir={data_dir}",
        f"paths.checkpoint_dir={shared_checkpoints}", "logger=none", "attack=pgd",
        "analysis=none", *TINY,
    )  # fmt: skip
    pl.seed_everything(cfg.seed, workers=True, verbose=False)  # as pipeline.run does
    return Path(pipeline.trained_model(cfg, pipeline.build(cfg)))
