"""The jobs of a multirun as read back from disk, and what distinguishes them.

A job's *variant* is whatever its overrides set differently from the other jobs, the attack
and the seed aside: the training choice in ``experiment=robust_vs_standard``, ``model.name``
in a model zoo sweep. Its *attack* is the attack choice plus any ``attack.*`` override (``pgd
eps=0.01``), so a sweep over budgets compares variants at each budget. Its *seed* is a
replicate, never part of a variant: ``seed=0,1,2`` trains every variant three times, and the
comparison pairs each variant with its baseline within each seed.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from torch import Tensor

from pse_lightning.core.contract import ReportContract
from pse_lightning.core.run_status import MARKER, is_incomplete
from pse_lightning.reporting.outcomes import read_outcomes

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One completed job of a sweep."""

    dir: str
    overrides: dict[str, str]
    attack_choice: str
    attack: str = ""
    variant: str = ""
    eps: float | None = None
    seed: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    outcomes: dict[str, Tensor] | None = None
    findings: list[dict[str, Any]] | None = None
    contracts: list[ReportContract] = field(default_factory=list)


# The order in which training variants are listed: the baseline first, the paper's last.
TRAINING_ORDER = ("standard", "pgd_at", "trades", "pse_at")


# The override that makes a job a replicate of another rather than a different variant.
SEED_KEY = "seed"


def _is_attack_key(key: str) -> bool:
    return key == "attack" or key.startswith(("attack.", "attack/"))


def _is_variant_key(key: str) -> bool:
    return not _is_attack_key(key) and key != SEED_KEY


def _job_number(job_dir: Path) -> tuple[int, str]:
    match = re.match(r"\d+", job_dir.name)
    return (int(match.group()) if match else -1, job_dir.name)


def read_overrides(job_dir: Path, hydra_cfg: dict[str, Any]) -> dict[str, str]:
    """key -> value of the job's command-line overrides (``.hydra/overrides.yaml``), else its
    config group choices (a job directory written without the overrides file)."""
    path = job_dir / ".hydra" / "overrides.yaml"
    if path.exists():
        lines = yaml.safe_load(path.read_text()) or []
    else:
        lines = hydra_cfg["hydra"].get("overrides", {}).get("task") or [
            f"{k}={v}" for k, v in hydra_cfg["hydra"]["runtime"]["choices"].items()
        ]
    overrides = {}
    for line in lines:
        key, _, value = str(line).lstrip("+~").partition("=")
        overrides[key] = value
    return overrides


def job_config(job_dir: Path) -> dict[str, Any]:
    """A job's resolved config (``.hydra/config.yaml``); {} for a job written without it."""
    path = job_dir / ".hydra" / "config.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}


def _attack_eps(config: dict[str, Any]) -> float | None:
    eps = (config.get("attack") or {}).get("eps")
    return float(eps) if isinstance(eps, (int, float)) else None


def _seed(overrides: dict[str, str], config: dict[str, Any]) -> str:
    """The job's seed: its override, else its resolved config's, else "" (unknown)."""
    seed = overrides.get(SEED_KEY, config.get(SEED_KEY))
    return "" if seed is None else str(seed)


def read_findings(job_dir: Path) -> list[dict[str, Any]] | None:
    """The run's judged Findings (``findings.json``, one dict per claim), or None for a job
    written without them."""
    path = job_dir / "findings.json"
    return json.loads(path.read_text()) if path.exists() else None


def read_contracts(job_dir: Path) -> list[ReportContract]:
    """What the run's analyses declared (``contract.json``); none for a job written
    without it."""
    path = job_dir / "contract.json"
    if not path.exists():
        return []
    return [ReportContract.from_json(c) for c in json.loads(path.read_text())["analyses"]]


def collect_jobs(sweep_dir: Path) -> list[Job]:
    """Every completed job under ``sweep_dir`` (those with ``metrics.json`` and without the
    ``INCOMPLETE`` marker of a run stopped early), in job order, with its variant and attack
    labels set."""
    jobs = []
    files = sorted(sweep_dir.glob("*/metrics.json"), key=lambda p: _job_number(p.parent))
    for metrics_file in files:
        job_dir = metrics_file.parent
        if is_incomplete(job_dir):
            log.warning("%s did not complete (%s): left out of the comparison", job_dir, MARKER)
            continue
        hydra_cfg = yaml.safe_load((job_dir / ".hydra" / "hydra.yaml").read_text())
        choices = hydra_cfg["hydra"]["runtime"]["choices"]
        overrides, config = read_overrides(job_dir, hydra_cfg), job_config(job_dir)
        jobs.append(
            Job(
                dir=job_dir.name,
                overrides=overrides,
                attack_choice=str(choices.get("attack")),
                eps=_attack_eps(config),
                seed=_seed(overrides, config),
                metrics=json.loads(metrics_file.read_text())["metrics"],
                outcomes=read_outcomes(job_dir),
                findings=read_findings(job_dir),
                contracts=read_contracts(job_dir),
            )
        )
    label_jobs(jobs)
    return jobs


def variant_keys(jobs: list[Job]) -> list[str]:
    """The override keys, attack and seed aside, whose value differs between jobs."""
    keys = sorted({k for j in jobs for k in j.overrides if _is_variant_key(k)})
    return [k for k in keys if len({j.overrides.get(k) for j in jobs}) > 1]


def label_jobs(jobs: list[Job]) -> None:
    """Set each job's ``variant`` and ``attack`` labels (in place)."""
    keys = variant_keys(jobs)
    for job in jobs:
        if len(keys) == 1:
            job.variant = str(job.overrides.get(keys[0]))
        elif keys:
            job.variant = ",".join(f"{k}={job.overrides.get(k)}" for k in keys)
        else:
            job.variant = job.overrides.get("training", "run")
        extra = sorted(
            (k.split(".", 1)[1], v) for k, v in job.overrides.items() if k.startswith("attack.")
        )
        job.attack = " ".join([job.attack_choice, *(f"{k}={v}" for k, v in extra)])


def variant_title(jobs: list[Job]) -> str:
    """The column header of the variant: the one key that differs, else "variant"."""
    keys = variant_keys(jobs)
    return keys[0] if len(keys) == 1 else "variant"


def variant_order(jobs: list[Job]) -> list[str]:
    """Variants in display order: known training variants baseline first, then the others
    as swept."""
    seen = list(dict.fromkeys(j.variant for j in jobs))

    def rank(name: str) -> tuple[int, int]:
        known = TRAINING_ORDER.index(name) if name in TRAINING_ORDER else len(TRAINING_ORDER)
        return (known, seen.index(name))

    return sorted(seen, key=rank)


def attack_order(jobs: list[Job]) -> list[str]:
    """Attack labels in display order: by attack, then by budget."""
    first = {}
    for j in jobs:
        first.setdefault(j.attack, (j.attack_choice, j.eps if j.eps is not None else 0.0))
    return sorted(first, key=lambda a: (*first[a], a))


def seeds(jobs: list[Job]) -> list[str]:
    """The replicate seeds of a sweep, in numeric order where they are numbers; one entry
    (possibly "") when the sweep has no seed replicates."""

    def rank(seed: str) -> tuple[int, float, str]:
        try:
            return (0, float(seed), seed)
        except ValueError:
            return (1, 0.0, seed)

    return sorted({j.seed for j in jobs}, key=rank)


def mean_metrics(jobs: list[Job]) -> dict[str, float | None]:
    """Each metric's mean over ``jobs`` (the seed replicates of one variant and attack), over
    the jobs that logged a number for it; None where none did (NaN is stored as null)."""
    keys = dict.fromkeys(k for j in jobs for k in j.metrics)
    means: dict[str, float | None] = {}
    for key in keys:
        values = [float(v) for j in jobs if (v := j.metrics.get(key)) is not None]
        means[key] = sum(values) / len(values) if values else None
    return means
