"""Private attributes of third-party libraries are used in one adapter module per library
(``core/adapters/torchmetrics.py``, ``reporting/adapters/wandb_logger.py``); these tests fail
when the installed library changes them, before anything else breaks obscurely."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import torch
from helpers import ROOT
from torchmetrics import Metric

from pse_lightning.core.adapters import torchmetrics as tm_adapter
from pse_lightning.reporting.adapters import wandb_logger as wandb_adapter

PACKAGE = ROOT / "pse_lightning"
# private attribute -> the adapter module allowed to use it
OWNERS = {
    "_wrap_compute": "core/adapters/torchmetrics.py",
    "_wandb_init": "reporting/adapters/wandb_logger.py",
    "_experiment": "reporting/adapters/wandb_logger.py",
}


def test_torchmetrics_wraps_compute_through_the_private_hook() -> None:
    """Metric.__init__ still routes ``compute`` through ``_wrap_compute(compute)``, and its
    wrapper still squeezes one-element tensors (what the adapter hides from it)."""
    hook = getattr(Metric, tm_adapter.WRAP_COMPUTE, None)
    assert callable(hook), "torchmetrics.Metric._wrap_compute is gone"
    assert list(inspect.signature(hook).parameters) == ["self", "compute"]
    seen = []

    class Probe(Metric):
        def __init__(self) -> None:
            super().__init__()
            self.add_state("n", torch.zeros(1), dist_reduce_fx="sum")

        def _wrap_compute(self, compute):  # noqa: ANN001, ANN202
            seen.append(compute)
            return super()._wrap_compute(compute)

        def update(self) -> None:
            self.n += 1

        def compute(self) -> torch.Tensor:
            return self.n  # shape (1,)

    probe = Probe()
    probe.update()
    assert len(seen) == 1, "Metric.__init__ no longer wraps compute with _wrap_compute"
    assert probe.compute().shape == (), "torchmetrics no longer squeezes: the adapter is moot"


def test_the_adapter_keeps_a_one_element_axis() -> None:
    class Kept(tm_adapter.UnsqueezedCompute):
        def __init__(self) -> None:
            super().__init__()
            self.add_state("n", torch.zeros(1), dist_reduce_fx="sum")

        def update(self) -> None:
            self.n += 1

        def compute(self) -> dict[str, torch.Tensor]:
            return {"n": self.n}

    kept = Kept()
    kept.update()
    out = kept.compute()
    assert out["n"].shape == (1,) and float(out["n"][0]) == 1.0
    kept.n += 1  # the result is a copy, as torchmetrics' own
    assert float(out["n"][0]) == 1.0


def test_wandb_logger_keeps_its_private_run_attributes(tmp_path: Path) -> None:
    """Lightning's WandbLogger still holds wandb.init's keywords in ``_wandb_init`` (a dict),
    its name in ``_name`` and the (unstarted) run in ``_experiment``."""
    from pytorch_lightning.loggers import WandbLogger

    logger = WandbLogger(project="p", mode="disabled", save_dir=str(tmp_path), name="given")
    for attribute, kind in wandb_adapter.PRIVATE.items():
        assert hasattr(logger, attribute), f"WandbLogger.{attribute} is gone"
        if kind is not None:
            assert isinstance(getattr(logger, attribute), kind)
    assert not wandb_adapter.run_started(logger)
    assert wandb_adapter.init_kwargs(logger)["name"] == "given"
    wandb_adapter.set_run_name(logger, "renamed")
    assert wandb_adapter.init_kwargs(logger)["name"] == "renamed"
    assert getattr(logger, "_name") == "renamed"  # noqa: B009
    assert not wandb_adapter.run_started(logger)  # none of it started the run


def test_private_attributes_are_used_in_their_adapter_only() -> None:
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = str(path.relative_to(PACKAGE))
        text = path.read_text()
        for attribute, owner in OWNERS.items():
            if rel != owner:
                assert not re.search(rf"\.{attribute}\b", text), f"{rel} uses {attribute}"


def test_only_the_entry_point_reads_hydras_global_state() -> None:
    """``HydraConfig`` (Hydra's global state) is read once, in ``cli/app.py``; everything
    below it gets what it needs (choices, overrides, search path, sweep group) as arguments."""
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = str(path.relative_to(PACKAGE))
        if rel != "cli/app.py":
            assert "hydra.core.hydra_config" not in path.read_text(), f"{rel} reads HydraConfig"


def test_no_module_reads_another_objects_result_attribute() -> None:
    """An evaluation's result reaches its users through ``on_result``, not by reading
    ``<module>.result`` behind the module's back."""
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = str(path.relative_to(PACKAGE))
        for line in path.read_text().splitlines():
            assert not re.search(r"\b(?!self\b)\w+\.result\.\w", line), f"{rel}: {line.strip()}"
