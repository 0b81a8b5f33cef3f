"""``python -m pse_lightning``: the Hydra entry point (thin: all work is in pipeline.run)."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import hydra
from omegaconf import DictConfig

from pse_lightning import pipeline


def config_dir() -> str:
    """The configs shipped inside an installed wheel, else the checkout's ``conf/``."""
    here = Path(__file__).resolve().parent
    packaged = here / "conf"
    return str(packaged if packaged.is_dir() else here.parent / "conf")


class _DropAdvertisements(logging.Filter):
    """Lightning prints a cloud-logger advertisement on every Trainer; it is not a message."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


# One instance: addFilter ignores a filter already present, so every job of a multirun
# calling quiet_third_party_noise() leaves one filter, not one per job.
_DROP_ADVERTISEMENTS = _DropAdvertisements()


def quiet_third_party_noise() -> None:
    """Silence messages users cannot act on (kept out of the library: only the CLI does it)."""
    logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(_DROP_ADVERTISEMENTS)
    # Lightning 2.6 calls a torch pytree API that torch 2.14 deprecates; fixed upstream.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def main(cfg: DictConfig) -> float | None:
    quiet_third_party_noise()
    results = pipeline.run(cfg)
    # Returned to Hydra so sweepers that optimise an objective can read it.
    value = results.get("test/robust_acc")
    return None if value is None else float(value)


if __name__ == "__main__":
    main()
