"""A sweep's claims per attack (each job's findings.json side by side) and seeds as
replicates, not variants (docs/METHODS.md §7.6), on fabricated job directories."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import CONF_DIR, ROOT
from hydra import compose, initialize_config_dir
from test_sweep import _first, _job, _seeded_sweep

from pse_lightning.analysis.pse import PSE
from pse_lightning.reporting.sweep import write_comparison
from pse_lightning.reporting.sweep_jobs import (
    Job,
    collect_jobs,
    mean_metrics,
    seeds,
    variant_title,
)
from pse_lightning.reporting.sweep_stats import comparison_plan

N = 400


def _findings(sweep: Path, num: int, findings: list[dict]) -> None:
    """findings.json as reporting.report.write_report leaves it (NaN written as null)."""
    (sweep / str(num) / "findings.json").write_text(json.dumps(findings))


def _f(key: str, claim: str, verdict: str, effect: str, p_holm: float | None = 0.01) -> dict:
    return {"key": key, "claim": claim, "effect": effect, "test": "some test", "estimate": 0.4,
            "low": 0.3, "high": 0.5, "p": p_holm, "p_holm": p_holm, "direction": "greater",
            "null": 0.0, "size": 0.0, "status": "", "note": "", "verdict": verdict}  # fmt: skip


@pytest.fixture
def attack_sweep(tmp_path: Path) -> Path:
    """One model, three attacks (CW untargeted, CW targeted, DDN); claim keys that name no
    analysis of this project: the table must take whatever the jobs wrote."""
    jobs = [
        ({"attack": "cw", "attack.targeted": "False"}, [
            _f("alpha/one", "Claim one holds", "supported", "0.40 [0.30, 0.50]"),
            _f("beta/two", "Claim two holds", "inconclusive", "a | b", p_holm=0.3),
        ]),
        ({"attack": "cw", "attack.targeted": "True"}, [
            _f("alpha/one", "Claim one holds", "not supported", "0.01 [0.00, 0.02]", 0.9),
            {**_f("beta/two", "Claim two holds", "not measured", "why", None),
             "status": "not measured", "estimate": None, "low": None, "high": None},
        ]),
        ({"attack": "ddn"}, [
            _f("alpha/one", "Claim one holds", "supported", "0.45 [0.35, 0.55]"),
        ]),
    ]  # fmt: skip
    for num, (overrides, findings) in enumerate(jobs):
        _job(tmp_path, num, overrides, _first(390), _first(100), eps=0.0)
        _findings(tmp_path, num, findings)
    return tmp_path


def test_comparison_opens_with_the_claims_per_attack(attack_sweep: Path) -> None:
    text = write_comparison(attack_sweep).read_text()
    assert text.index("## The runs' claims per attack") < text.index("## Findings")
    header = "| claim | cw targeted=False | cw targeted=True | ddn |"
    assert header in text
    assert (
        "| Claim one holds | **supported** (0.40 [0.30, 0.50]) | **not supported** "
        "(0.01 [0.00, 0.02]) | **supported** (0.45 [0.35, 0.55]) |" in text
    )
    # A pipe inside an effect is escaped; a claim not measured shows its verdict only; a
    # claim a job did not write shows a dash.
    assert "| Claim two holds | **inconclusive** (a \\| b) | not measured | — |" in text
    claims = json.loads((attack_sweep / "comparison.json").read_text())["claims"]
    assert claims["columns"] == ["cw targeted=False", "cw targeted=True", "ddn"]
    assert claims["jobs"]["ddn"] == "2"
    one, two = claims["rows"]
    assert (one["key"], one["claim"]) == ("alpha/one", "Claim one holds")
    assert one["cells"]["cw targeted=True"]["verdict"] == "not supported"
    assert one["cells"]["cw targeted=True"]["p_holm"] == pytest.approx(0.9)
    assert one["cells"]["ddn"]["low"] == pytest.approx(0.3)
    assert two["cells"]["cw targeted=True"]["estimate"] is None
    assert "ddn" not in two["cells"]


def test_metrics_written_as_null_read_as_missing(attack_sweep: Path) -> None:
    """metrics.json stores NaN as null: a mean skips it, a table shows n/a."""
    jobs = [Job("0", {}, "pgd", metrics={"a": 1.0, "b": None}),
            Job("1", {}, "pgd", metrics={"a": 3.0, "b": None, "c": 2.0})]  # fmt: skip
    assert mean_metrics(jobs) == {"a": 2.0, "b": None, "c": 2.0}
    path = attack_sweep / "0" / "metrics.json"
    metrics = json.loads(path.read_text())["metrics"] | {"test/pse/frac_balanced": None}
    path.write_text(json.dumps({"metrics": metrics}))
    # The PSE analysis's declaration, as the report writer records it beside metrics.json.
    contract = {"analyses": [PSE().contract("pse").to_json()]}
    (path.parent / "contract.json").write_text(json.dumps(contract))
    text = write_comparison(attack_sweep).read_text()
    assert "| run | cw targeted=False | n/a | n/a | n/a |" in text


def test_a_sweep_without_findings_files_has_no_claims_table(tmp_path: Path) -> None:
    for num, attack in enumerate(("cw", "ddn")):
        _job(tmp_path, num, {"attack": attack}, _first(390), _first(100))
    text = write_comparison(tmp_path).read_text()
    assert "claims per" not in text
    assert json.loads((tmp_path / "comparison.json").read_text())["claims"] is None


def test_claims_columns_name_variant_and_attack_when_both_vary(tmp_path: Path) -> None:
    num = 0
    for training in ("standard", "pgd_at"):
        for attack in ("pgd", "cw"):
            _job(tmp_path, num, {"training": training, "attack": attack}, _first(390),
                 _first(100))  # fmt: skip
            _findings(tmp_path, num, [_f("k", "A claim", "supported", f"{num}")])
            num += 1
    text = write_comparison(tmp_path).read_text()
    assert "## The runs' claims per job" in text
    # Baseline first, then attacks in attack order (cw before pgd).
    assert "| claim | standard / cw | standard / pgd | pgd_at / cw | pgd_at / pgd |" in text
    assert "| A claim | **supported** (1) | **supported** (0) | **supported** (3) |" in text


# Seeds are replicates --------------------------------------------------------------------

# seed -> training -> the first k of N images survive PGD. Seed 0: pse_at and pgd_at
# identical; seed 1: pse_at survives 60 more images.
SEEDED = {
    "0": {"standard": 8, "pgd_at": 240, "pse_at": 240},
    "1": {"standard": 12, "pgd_at": 200, "pse_at": 260},
}


@pytest.fixture
def seeded(tmp_path: Path) -> Path:
    return _seeded_sweep(tmp_path, SEEDED, pse=(0.5, 0.3, 0.2))


def test_seed_is_a_replicate_never_part_of_the_variant(seeded: Path) -> None:
    """Old main labelled the variants "seed=0,training=standard", ..., which hid the
    pse_at-against-pgd_at comparison."""
    jobs = collect_jobs(seeded)
    assert {j.variant for j in jobs} == {"standard", "pgd_at", "pse_at"}
    assert variant_title(jobs) == "training"
    assert seeds(jobs) == ["0", "1"]
    assert [j.seed for j in jobs] == ["0"] * 3 + ["1"] * 3
    keys = {c.key for c in comparison_plan(["standard", "pgd_at", "pse_at"], ["pgd"], ["0", "1"])}
    assert "robust/pse_at_vs_pgd_at/pgd/seed=1" in keys


def test_a_seeded_sweep_pairs_each_variant_within_its_seed(seeded: Path) -> None:
    text = write_comparison(seeded).read_text()
    result = json.loads((seeded / "comparison.json").read_text())
    verdicts = result["verdicts"]
    assert result["variant_key"] == "training" and result["seeds"] == ["0", "1"]
    assert verdicts["robust/pse_at_vs_pgd_at/pgd/seed=0"] == "not supported"  # identical
    assert verdicts["robust/pse_at_vs_pgd_at/pgd/seed=1"] == "supported"  # 60 vs 0 images
    rows = {r["key"]: r for r in result["comparisons"]}
    # Paired within seed 1: pse_at(1) against pgd_at(1), not pgd_at of seed 0 (20 more).
    row = rows["robust/pse_at_vs_pgd_at/pgd/seed=1"]
    assert (row["only_variant"], row["only_baseline"], row["seed"]) == (60, 0, "1")
    assert rows["robust/pgd_at_vs_standard/pgd/seed=1"]["only_variant"] == 200 - 12
    # Across seeds: the mean of the per-seed differences and their SD, untestable.
    pooled = rows["robust/pse_at_vs_pgd_at/pgd"]
    diffs = [0.0, 60 / N]
    assert pooled["mean_difference"] == pytest.approx(statistics.fmean(diffs))
    assert pooled["sd_difference"] == pytest.approx(statistics.stdev(diffs))
    assert pooled["seeds"] == [["0", pytest.approx(0.0)], ["1", pytest.approx(0.15)]]
    # Across seeds: the procedures compared by a t-test on the 2 per-seed differences
    # (df = 1, a Cauchy: t = 0.075 / (0.106 / √2) = 1); "more robust" is one-sided, so
    # p = P(T >= 1) = 0.25 (the two-sided 0.5 on old main).
    assert pooled["p"] == pytest.approx(0.25)
    assert pooled["direction"] == "greater"
    assert pooled["ci_low"] == pytest.approx(0.075 - 12.7062 * 0.075, abs=1e-4)
    assert pooled["family"] == "training procedures"
    assert pooled["acc_variant"] == [pytest.approx(0.6), pytest.approx(0.65)]
    assert verdicts["robust/pse_at_vs_pgd_at/pgd"] == "inconclusive"
    assert (
        "| pse_at is more robust than pgd_at under pgd | +0.075 [-0.878, +1.028], seed-to-seed "
        "SD 0.106 over 2 seeds: 0.600 − 0.600 (seed 0), 0.650 − 0.500 (seed 1); simultaneous "
        "98.3 % interval [-2.789, +2.939] |" in text
    )
    assert (
        "| exact McNemar, paired on the same images: a comparison of two trained models "
        "(seed 1) |" in text
    )
    # Holm families: the 3 procedure claims on robust accuracy; the 3 clean comparisons of
    # procedures; the 12 per-seed comparisons of models (3 pairs x (clean + pgd) x 2 seeds).
    families = {}
    for r in result["comparisons"]:
        families.setdefault(r["family"], []).append(r["key"])
    assert families["training procedures"] == [
        "robust/pgd_at_vs_standard/pgd", "robust/pse_at_vs_standard/pgd",
        "robust/pse_at_vs_pgd_at/pgd"]  # fmt: skip
    assert len(families["clean accuracy"]) == 3 and len(families["trained models"]) == 12
    # The per-seed McNemar p of pgd_at vs standard, seed 0: 232 vs 0 discordant, Holm x 12.
    seed0 = rows["robust/pgd_at_vs_standard/pgd/seed=0"]
    assert seed0["p_holm"] == pytest.approx(min(1, 12 * seed0["p"]), rel=1e-9)
    assert text.index("## Findings: training procedures") < text.index("## Findings: clean")
    # Tables are means over the seeds.
    assert result["variants"]["pse_at"]["robust_acc/pgd"] == pytest.approx((240 + 260) / 2 / N)
    assert "With 2 seeds" in text


def test_claims_columns_name_the_seed_of_a_replicated_sweep(seeded: Path) -> None:
    for num in range(6):
        _findings(seeded, num, [_f("k", "A claim", "supported", f"{num}")])
    write_comparison(seeded)
    claims = json.loads((seeded / "comparison.json").read_text())["claims"]
    assert claims["columns"] == [
        f"{v} / pgd / seed {s}" for v in ("standard", "pgd_at", "pse_at") for s in "01"
    ]
    assert claims["jobs"]["pse_at / pgd / seed 1"] == "5"


def test_one_seed_for_every_job_is_not_a_replicate(tmp_path: Path) -> None:
    for num, training in enumerate(("standard", "pgd_at")):
        _job(tmp_path, num, {"training": training, "seed": "3", "attack": "pgd"}, _first(390),
             _first(100 + 100 * num))  # fmt: skip
    write_comparison(tmp_path)
    result = json.loads((tmp_path / "comparison.json").read_text())
    assert set(result["verdicts"]) == {
        "clean/pgd_at_vs_standard", "robust/pgd_at_vs_standard/pgd",
        "clean/pgd_at_vs_standard/seed=3", "robust/pgd_at_vs_standard/pgd/seed=3"}  # fmt: skip
    assert result["verdicts"]["robust/pgd_at_vs_standard/pgd"] == "untestable"
    assert result["verdicts"]["robust/pgd_at_vs_standard/pgd/seed=3"] == "supported"
    assert result["seeds"] == []


def test_a_seed_without_outcomes_leaves_the_spread_not_measured(seeded: Path) -> None:
    for job in ("3", "4", "5"):  # seed 1's outcomes missing
        (seeded / job / "outcomes.json").unlink()
    write_comparison(seeded)
    verdicts = json.loads((seeded / "comparison.json").read_text())["verdicts"]
    assert verdicts["robust/pse_at_vs_pgd_at/pgd/seed=1"] == "not measured"
    assert verdicts["robust/pse_at_vs_pgd_at/pgd"] == "not measured"


# The preset ------------------------------------------------------------------------------


def test_pse_types_preset_sweeps_attack_families_targeted_and_not_on_one_model() -> None:
    overrides = ["experiment=pse_types"]
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
        params = cfg.hydra.sweeper.params
        assert str(cfg.hydra.mode) == "RunMode.MULTIRUN" and "comparison" in cfg.hydra.callbacks
        attacks = params.attack.split(",")
        assert "cw" in attacks and len(set(attacks) & {"pgd_l2", "ddn", "ead"}) >= 2
        assert params["attack.targeted"].split(",") == ["false", "true"]
        jobs = [
            compose("config", overrides=[*overrides, f"attack={a}", f"attack.targeted={t}"])
            for a in attacks
            for t in ("false", "true")
        ]
    assert {j.attack.target_rule for j in jobs} == {"random"}
    assert {j.attack.targeted for j in jobs} == {False, True}
    # The same model, data and seed for every job: one training, the same images.
    for key in ("model", "dataset", "training", "seed"):
        assert len({str(j[key]) for j in jobs}) == 1, key
    assert "pse" in jobs[0].analysis


@pytest.mark.slow
def test_pse_types_runs_end_to_end_and_opens_with_the_claims_per_attack(tmp_path: Path) -> None:
    """The preset at toy size: one training, six attack jobs, one claims table."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "1"}
    small = ["dataset.num_train=256", "dataset.num_val=64", "dataset.num_test=64",
             "dataset.eval_samples=16", "training.epochs=2"]  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "pse_lightning", "experiment=pse_types", f"paths.root={tmp_path}",
         "hydra.sweep.subdir=${hydra.job.num}", *small],  # fmt: skip
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    (sweep,) = tmp_path.glob("multirun/*/*")
    assert len(list(sweep.glob("*/findings.json"))) == 6
    assert len(list((tmp_path / "outputs" / "checkpoints").glob("*.pt"))) == 1  # one training
    claims = json.loads((sweep / "comparison.json").read_text())["claims"]
    assert claims["columns"] == [
        f"{a} targeted={t}" for a in ("cw", "ddn", "pgd_l2") for t in ("False", "True")
    ]
    text = (sweep / "comparison.md").read_text()
    assert text.index("## The runs' claims per attack") < text.index("## Findings")
    keys = {row["key"] for row in claims["rows"]}
    for job in sorted(sweep.glob("*/findings.json")):
        assert {f["key"] for f in json.loads(job.read_text())} <= keys
