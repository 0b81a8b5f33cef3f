"""Run directories that never collide: ``outputs/<date>/<time>-<pid>-<random>``.

Hydra names a run directory by the second it starts; two runs started in the same second
(a grid submitted to a queue, two shells) would share it and overwrite each other's
report and W&B run. The ``unique`` resolver appends the process id (distinct among the
processes alive on a machine) and a random part (distinct across machines sharing a
disk) to the time, so the directories still sort by start time:
``${unique:${now:%H-%M-%S}}`` -> ``09-01-07-48213-a3f9``.

The value is cached in the config (``use_cache``), so every reading of ``hydra.run.dir``
in a job gives the same directory, and Hydra copies the cache into each job of a
multirun, so the jobs of one sweep share its directory. The resolver is registered when
:mod:`pse_lightning.cli.app` is imported, before Hydra composes the config (also in the
worker processes of a launcher such as joblib or submitit, which import the task).
"""

from __future__ import annotations

import os
import secrets

from omegaconf import OmegaConf

RESOLVER = "unique"


def unique_name(stamp: str) -> str:
    """``stamp`` followed by ``-<process id>-<4 random hex digits>``."""
    return f"{stamp}-{os.getpid()}-{secrets.token_hex(2)}"


def register_resolvers() -> None:
    """Register ``${unique:...}`` with OmegaConf (once per process)."""
    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, unique_name, use_cache=True)
