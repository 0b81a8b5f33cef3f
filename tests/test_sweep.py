"""The multirun comparison report: tables, verdict and figures from job directories on disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pse_lightning.reporting.sweep import collect_jobs, verdict, write_comparison


def _job(
    sweep: Path,
    num: int,
    training: str,
    attack: str,
    clean: float,
    robust: float,
    pse: tuple[float, float, float] | None = None,
    complete: bool = True,
) -> None:
    job = sweep / f"{num}_training={training},attack={attack}"
    (job / ".hydra").mkdir(parents=True)
    choices = {"training": training, "attack": attack, "model": "small_cnn", "dataset": "shapes"}
    (job / ".hydra" / "hydra.yaml").write_text(
        yaml.safe_dump({"hydra": {"runtime": {"choices": choices}}})
    )
    metrics = {"test/clean_acc": clean, "test/robust_acc": robust, "test/samples": 400.0}
    if pse is not None:
        metrics.update(
            {
                f"test/pse/frac_{k}": v
                for k, v in zip(("suppression", "balanced", "promotion"), pse, strict=True)
            }
        )
    if complete:  # an interrupted job has no metrics.json (it is written last)
        (job / "metrics.json").write_text(json.dumps({"metrics": metrics}))


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    rows = [
        ("standard", 0.99, {"fgsm": 0.10, "pgd": 0.02}),
        ("pgd_at", 0.95, {"fgsm": 0.70, "pgd": 0.60}),
        ("pse_at", 0.955, {"fgsm": 0.72, "pgd": 0.63}),
    ]
    num = 0
    for training, clean, robust in rows:
        for attack, acc in robust.items():
            _job(tmp_path, num, training, attack, clean, acc, pse=(0.5, 0.3, 0.2))
            num += 1
    _job(tmp_path, num, "trades", "pgd", 0.9, 0.5, complete=False)
    return tmp_path


def test_comparison_reads_only_completed_jobs_and_tabulates_them(sweep: Path) -> None:
    assert len(collect_jobs(sweep)) == 6
    path = write_comparison(sweep)
    text = path.read_text()
    assert "| pgd_at | 0.950 | 0.700 | 0.600 |" in text
    assert "| pse_at | 0.955 | 0.720 | 0.630 |" in text
    assert "trades" not in text.split("Jobs:")[0]
    summary = json.loads((sweep / "comparison.json").read_text())
    assert summary["variants"]["pse_at"]["robust_acc/pgd"] == pytest.approx(0.63)
    assert summary["variants"]["standard"]["pse/frac_suppression/fgsm"] == pytest.approx(0.5)
    assert (sweep / "comparison.png").stat().st_size > 0
    assert (sweep / "comparison_pse_types.png").stat().st_size > 0
    assert "![comparison_pse_types](comparison_pse_types.png)" in text


def test_verdict_compares_robust_variants_with_standard_and_pse_at_with_pgd_at(
    sweep: Path,
) -> None:
    write_comparison(sweep)
    lines = json.loads((sweep / "comparison.json").read_text())["verdict"]
    text = "\n".join(lines)
    # pgd_at - standard: clean 0.95 - 0.99, pgd 0.60 - 0.02; s.e. sqrt(.6*.4/400) = 0.024
    assert (
        "pgd_at vs standard: clean accuracy -0.040; robust accuracy fgsm +0.600 (s.e. 0.023)"
        ", pgd +0.580 (s.e. 0.024)" in text
    )
    assert (
        "pse_at vs pgd_at: clean accuracy +0.005; robust accuracy fgsm +0.020, pgd +0.030" in text
    )
    # s.e. of the difference: sqrt(.63*.37/400 + .6*.4/400) = 0.0344 > 0.030 / 2
    assert (
        "At equal clean accuracy (within 0.01), pse_at beats pgd_at under pgd (+0.030; the "
        "difference is within 2 standard errors (0.034), so it is not significant" in text
    )


@pytest.mark.parametrize(
    ("clean", "pgd", "expected"),
    [
        (0.90, 0.65, "no winner at equal clean accuracy"),  # less clean, more robust: a trade-off
        (0.97, 0.62, "pse_at is at least as good on both"),  # better on both
        (0.93, 0.55, "pgd_at is at least as good on both"),  # worse on both
        (0.951, 0.58, "pse_at does not beat pgd_at under pgd (-0.020)"),
        (0.955, 0.70, "pse_at beats pgd_at under pgd (+0.100)"),
    ],
)
def test_verdict_does_not_claim_a_winner_it_has_not_measured(
    clean: float, pgd: float, expected: str
) -> None:
    summary = {
        "pgd_at": {"clean_acc": 0.95, "robust_acc/pgd": 0.60},
        "pse_at": {"clean_acc": clean, "robust_acc/pgd": pgd},
    }
    assert expected in "\n".join(verdict(summary))


def test_verdict_judges_under_autoattack_when_the_sweep_measured_it() -> None:
    """PGD says pse_at wins, AutoAttack (the stronger evaluation) says it loses: the verdict
    follows AutoAttack."""
    summary = {
        "pgd_at": {"clean_acc": 0.95, "robust_acc/pgd": 0.60, "robust_acc/autoattack": 0.55},
        "pse_at": {"clean_acc": 0.955, "robust_acc/pgd": 0.62, "robust_acc/autoattack": 0.50},
    }
    text = "\n".join(verdict(summary))
    assert "pse_at does not beat pgd_at under autoattack (-0.050" in text
    assert "under pgd" not in text


def test_comparison_of_an_empty_sweep_writes_nothing(tmp_path: Path) -> None:
    assert write_comparison(tmp_path) is None
    assert not (tmp_path / "comparison.md").exists()
