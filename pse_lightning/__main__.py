"""``python -m pse_lightning``: the Hydra entry point (thin: all work is in pipeline.run)."""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from pse_lightning import pipeline


def config_dir() -> str:
    """The configs shipped inside an installed wheel, else the checkout's ``conf/``."""
    here = Path(__file__).resolve().parent
    packaged = here / "conf"
    return str(packaged if packaged.is_dir() else here.parent / "conf")


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def main(cfg: DictConfig) -> float | None:
    results = pipeline.run(cfg)
    # Returned to Hydra so sweepers that optimise an objective can read it.
    value = results.get("test/robust_acc")
    return None if value is None else float(value)


if __name__ == "__main__":
    main()
