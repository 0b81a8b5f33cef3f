"""The multirun comparison: paired tests, verdicts, tables and figures from job directories
on disk (docs/METHODS.md §7.6)."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest
import torch
import yaml
from calibration import (
    check_two_sided,
    columns,
    fpr_region,
    one_thread,
    power_floor,
    rejections,
)
from scipy.stats import fisher_exact
from torch import Tensor

from pse_lightning.analysis.pse import PSE
from pse_lightning.core.proportions import mcnemar_exact, paired_difference_interval
from pse_lightning.reporting.outcomes import write_outcomes
from pse_lightning.reporting.sweep import write_comparison
from pse_lightning.reporting.sweep_jobs import Job, collect_jobs
from pse_lightning.reporting.sweep_stats import Comparison, comparison_findings, paired_test

N = 400


def _job(
    sweep: Path,
    num: int,
    overrides: dict[str, str],
    clean: Tensor,
    adv: Tensor,
    *,
    eps: float = 0.03,
    pse: tuple[float, float, float] | None = None,
    outcomes: bool = True,
    complete: bool = True,
) -> None:
    """A job directory as Hydra and the report writer leave it."""
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    choices = {"training": "standard", "model": "small_cnn", "dataset": "shapes"}
    choices |= {k: v for k, v in overrides.items() if "." not in k}
    (job / ".hydra" / "hydra.yaml").write_text(
        yaml.safe_dump({"hydra": {"runtime": {"choices": choices}}})
    )
    lines = ["experiment=robust_vs_standard", *(f"{k}={v}" for k, v in overrides.items())]
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(lines))
    (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"attack": {"eps": eps}}))
    adv = adv & clean
    metrics = {
        "test/clean_acc": float(clean.float().mean()),
        "test/robust_acc": float(adv.float().mean()),
        "test/samples": float(len(clean)),
    }
    if pse is not None:
        metrics |= {f"test/pse/frac_{k}": v for k, v in
                    zip(("suppression", "balanced", "promotion"), pse, strict=True)}  # fmt: skip
        # What the PSE analysis declares for the sweep, as the report writer records it.
        contract = {"analyses": [PSE().contract("pse").to_json()]}
        (job / "contract.json").write_text(json.dumps(contract))
    if outcomes:
        index = torch.arange(len(clean)).flip(0)  # any order on disk: matched by index
        write_outcomes(job, {"index": index, "clean_correct": clean.flip(0),
                             "adv_correct": adv.flip(0)})  # fmt: skip
    if complete:  # an interrupted job has no metrics.json (it is written last)
        (job / "metrics.json").write_text(json.dumps({"metrics": metrics}))


def _first(k: int, n: int = N) -> Tensor:
    return torch.arange(n) < k


def _seeded_sweep(sweep: Path, robust: dict[str, dict[str, int]], **job: object) -> Path:
    """A sweep of PGD jobs, one per seed and training (``robust``: seed -> training -> the
    first k of N images survive); standard training gets 396 clean images right, the others
    380; ``job``: more :func:`_job` settings."""
    num = 0
    for seed, per_training in robust.items():
        for training, k in per_training.items():
            overrides = {"training": training, "seed": seed, "attack": "pgd"}
            clean = _first(396 if training == "standard" else 380)
            _job(sweep, num, overrides, clean, _first(k), **job)
            num += 1
    return sweep


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """standard (clean 0.99, robust ~0), pgd_at (robust 0.6 under pgd), pse_at with exactly
    pgd_at's outcomes; trades interrupted."""
    clean_std, clean_rob = _first(396), _first(380)
    robust = {
        "standard": {"fgsm": _first(40), "pgd": _first(8)},
        "pgd_at": {"fgsm": _first(280), "pgd": _first(240)},
        "pse_at": {"fgsm": _first(280), "pgd": _first(240)},
    }
    num = 0
    for training, per_attack in robust.items():
        clean = clean_std if training == "standard" else clean_rob
        for attack, adv in per_attack.items():
            overrides = {"training": training, "attack": attack}
            _job(tmp_path, num, overrides, clean, adv, pse=(0.5, 0.3, 0.2))
            num += 1
    _job(tmp_path, num, {"training": "trades", "attack": "pgd"}, clean_rob, _first(200),
         complete=False)  # fmt: skip
    return tmp_path


def test_comparison_pairs_the_variants_and_writes_verdicts(sweep: Path) -> None:
    assert len(collect_jobs(sweep)) == 6  # the interrupted job is left out
    text = write_comparison(sweep).read_text()
    result = json.loads((sweep / "comparison.json").read_text())
    verdicts = result["verdicts"]
    assert result["variant_key"] == "training"
    # One seed per variant: the training procedures cannot be compared, the models can.
    assert verdicts["robust/pgd_at_vs_standard/pgd"] == "untestable"
    assert verdicts["clean/pgd_at_vs_standard"] == "untestable"
    # 232 images only pgd_at gets right, 0 only standard: far beyond chance.
    assert verdicts["robust/pgd_at_vs_standard/pgd/model"] == "supported"
    assert verdicts["robust/pse_at_vs_standard/fgsm/model"] == "supported"
    # Identical outcomes: the paired interval is about ±0.003, so a gain of 0.01 is excluded.
    assert verdicts["robust/pse_at_vs_pgd_at/pgd/model"] == "not supported"
    # Clean 0.95 vs 0.99: 16 images only standard gets right, none the other way.
    assert verdicts["clean/pgd_at_vs_standard/model"] == "supported"
    rows = {r["key"]: r for r in result["comparisons"]}
    # Identical clean outcomes (380 of 400 right), "differ" two-sided: the 95 % interval
    # ±0.0086 lies inside ±0.01, but "not supported" is judged family-wise, from the
    # simultaneous interval at 1 − 0.05/9 (9 tested claims): ±0.0170, inconclusive.
    same = rows["clean/pse_at_vs_pgd_at/model"]
    assert (same["ci_low"], same["ci_high"]) == pytest.approx((-0.00856, 0.00856), abs=1e-5)
    assert same["simultaneous_confidence"] == pytest.approx(1 - 0.05 / 9)
    assert same["family_size"] == 9
    assert (same["simultaneous_low"], same["simultaneous_high"]) == pytest.approx(
        (-0.01697, 0.01697), abs=1e-5
    )
    assert verdicts["clean/pse_at_vs_pgd_at/model"] == "inconclusive"
    assert "; simultaneous 99.4 % interval [-0.017, +0.017] |" in text
    row = rows["robust/pgd_at_vs_standard/pgd/model"]
    assert (row["only_variant"], row["only_baseline"], row["n"]) == (232, 0, N)
    assert row["difference"] == pytest.approx(0.58)
    assert row["ci_low"] < 0.58 < row["ci_high"]
    assert row["family"] == "trained models"
    # "more robust" is one-sided: the exact binomial P(X >= 232 | 232, 1/2) = 2^-232 (old
    # main stored the two-sided 2^-231); "differ" (clean) keeps the two-sided p below.
    assert row["p"] == pytest.approx(0.5**232, rel=1e-9) and row["direction"] == "greater"
    assert rows["clean/pgd_at_vs_standard/model"]["direction"] == "two-sided"
    # Holm over the 9 comparisons of trained models (3 pairs x (clean + 2 attacks)): the
    # two clean tests against standard (16 vs 0 discordant, p = 2 / 2**16) rank 5th and 6th
    # of 9, so both are multiplied by 9 - 5 + 1 = 5. The 9 procedure rows are untestable.
    assert len(result["comparisons"]) == 18
    clean = rows["clean/pse_at_vs_standard/model"]
    assert clean["p"] == pytest.approx(2 / 2**16, rel=1e-9)
    assert clean["p_holm"] == pytest.approx(5 * 2 / 2**16, rel=1e-9)
    assert rows["robust/pse_at_vs_pgd_at/pgd"]["p_holm"] is None
    # The report opens with the procedure rows, each saying why it is untestable.
    assert text.index("## Findings: training procedures") < text.index("Each row is one")
    assert "one training seed per variant" in text
    # The Findings table of the run reports, with the same vocabulary.
    assert "| measured effect (95% CI) | test and resampling scheme | p | p (Holm) " in text
    assert (
        "| pgd_at is more robust than standard under pgd (one model each) | 0.600 − 0.020 = "
        "+0.580" in text
    )
    assert "a comparison of two trained models |" in text
    assert "**not supported** |" in text
    assert "| pgd_at | 0.950 | 0.700 | 0.600 |" in text
    assert "trades" not in text
    assert result["variants"]["standard"]["pse/frac_suppression/fgsm"] == pytest.approx(0.5)
    for name in ("comparison.png", "comparison_pse_types.png"):
        assert (sweep / name).stat().st_size > 0 and f"]({name})" in text
    assert not (sweep / "comparison_accuracy_eps.png").exists()  # one budget per attack


def test_a_zoo_sweep_compares_models_two_sided_and_plots_accuracy_against_eps(
    tmp_path: Path,
) -> None:
    """Variants named by model.name; attack.eps swept: one comparison per budget."""
    num = 0
    for name, robust in (("A", (300, 200)), ("B", (300, 120))):
        for eps, k in zip((0.01, 0.03), robust, strict=True):
            overrides = {"model": "robustbench", "model.name": name, "attack": "pgd",
                         "attack.eps": str(eps)}  # fmt: skip
            _job(tmp_path, num, overrides, _first(390), _first(k), eps=eps)
            num += 1
    text = write_comparison(tmp_path).read_text()
    result = json.loads((tmp_path / "comparison.json").read_text())
    assert result["variant_key"] == "model.name"
    assert result["verdicts"] == {
        "clean/A_vs_B": "not supported",  # identical clean outcomes
        "robust/A_vs_B/pgd eps=0.01": "not supported",  # identical robust outcomes
        "robust/A_vs_B/pgd eps=0.03": "supported",  # 80 images only A survives
    }
    assert "A and B differ in robust accuracy under pgd eps=0.03" in text
    assert (
        "| model.name | clean acc | robust acc (pgd eps=0.01) | robust acc (pgd eps=0.03) |"
        in text
    )
    assert (tmp_path / "comparison_accuracy_eps.png").stat().st_size > 0


def test_jobs_without_per_image_outcomes_are_not_measured(tmp_path: Path) -> None:
    for num, training in enumerate(("standard", "pgd_at")):
        _job(tmp_path, num, {"training": training, "attack": "pgd"}, _first(390),
             _first(100 * num), outcomes=False)  # fmt: skip
    write_comparison(tmp_path)
    verdicts = json.loads((tmp_path / "comparison.json").read_text())["verdicts"]
    assert {v for k, v in verdicts.items() if k.endswith("/model")} == {"not measured"}
    assert {v for k, v in verdicts.items() if not k.endswith("/model")} == {"untestable"}


def test_comparison_of_an_empty_sweep_writes_nothing(tmp_path: Path) -> None:
    assert write_comparison(tmp_path) is None
    assert not (tmp_path / "comparison.md").exists()


def test_the_paired_test_detects_a_difference_an_unpaired_test_cannot() -> None:
    """Two variants agree on all but 24 of 500 images (strongly correlated outcomes): 20 only
    the first gets right, 4 only the second. Accuracy 0.600 against 0.568: as independent
    samples (Fisher's exact test on the two accuracies) the gap is noise; paired, McNemar
    sees 20 against 4 discordant images."""
    a = torch.arange(500) < 300
    b = a.clone()
    b[280:300] = False
    b[300:304] = True
    stats = paired_test(a, b)
    unpaired = fisher_exact([[300, 200], [284, 216]]).pvalue
    assert stats["difference"] == pytest.approx(0.032)
    assert unpaired > 0.2
    # p = 2 * P(X <= 4), X ~ Bin(24, 1/2): 2 * (1 + 24 + 276 + 2024 + 10626) / 2**24
    assert stats["p"] == pytest.approx(2 * 12951 / 2**24, rel=1e-9)
    assert 0 < stats["ci_low"] < 0.032 < stats["ci_high"]


def _paired(gen: torch.Generator, shape: tuple[int, int], acc_a: float, acc_b: float, copy: float):
    """Sets of paired outcomes (sets, images): b copies a's outcome with probability
    ``copy``, otherwise is drawn so that its accuracy is ``acc_b``."""
    a = torch.rand(shape, generator=gen) < acc_a
    own = torch.rand(shape, generator=gen) < (acc_b - copy * acc_a) / (1 - copy)
    return a, torch.where(torch.rand(shape, generator=gen) < copy, a, own)


def _claims(
    sets: int, acc_b: float, copy: float, directional: bool, seed: int
) -> tuple[Tensor, Tensor]:
    """The sweep's verdict on "b differs from a" (or "b is more robust than a") over
    ``sets`` sweeps of 500 shared images with robust accuracy 0.5 for a and ``acc_b`` for
    b: (p, estimate) with p = 0 where the claim is supported and 1 otherwise (so a
    rejection is a "supported" verdict), estimate = b's accuracy minus a's."""
    a, b = _paired(torch.Generator().manual_seed(seed), (sets, 500), 0.5, acc_b, copy)
    index = torch.arange(500)
    rows = []
    with one_thread():
        for x, y in zip(a, b, strict=True):
            jobs = [
                Job(dir=v, overrides={}, attack_choice="pgd", attack="pgd", variant=v,
                    outcomes={"index": index, "clean_correct": torch.ones_like(o),
                              "adv_correct": o})
                for v, o in (("b", y), ("a", x))
            ]  # fmt: skip
            plan = [Comparison("b", "a", "robust", "pgd", directional)]
            found = comparison_findings(jobs, plan)[0][0]
            rows.append((found.verdict != "supported", found.estimate))
    return columns(rows)


@pytest.mark.parametrize("sets", [200, pytest.param(2000, marks=pytest.mark.slow)])
def test_comparison_holds_its_level_and_finds_gains_and_losses(
    sets: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two-sided claim. Equal robust accuracy (0.5), half the outcomes shared: "supported" in
    no more of 2000 null sweeps than tests/calibration.py accepts; 0.55 and 0.45 against
    0.50 (80% shared): supported with the right sign in >= 80% of 500 sweeps each (200 and
    50 in the fast smoke version). Mutants that fail: the claim judged one-sided
    ("greater") misses every loss; a one-sided p and 90% interval reported as two-sided
    (p / 2, the one-sided 95% bounds) exceeds the false-positive bound."""
    n = sets // 4
    null = _claims(sets, 0.5, 0.5, False, seed=0)
    up, down = _claims(n, 0.55, 0.8, False, seed=1), _claims(n, 0.45, 0.8, False, seed=2)
    strict = sets >= 2000
    check_two_sided("sweep", null[0], up, down, strict=False)
    one_sided = _claims(n, 0.45, 0.8, True, seed=2)
    assert not power_floor(n).accepts(rejections(*one_sided, sign=-1))
    if strict:
        from pse_lightning.reporting import sweep_stats

        monkeypatch.setattr(sweep_stats, "mcnemar_exact", lambda a, b: mcnemar_exact(a, b) / 2)
        monkeypatch.setattr(
            sweep_stats,
            "paired_difference_interval",
            partial(paired_difference_interval, confidence=0.9),
        )
        assert not fpr_region(sets).accepts(rejections(_claims(sets, 0.5, 0.5, False, seed=0)[0]))


@pytest.mark.parametrize("sets", [100, pytest.param(500, marks=pytest.mark.slow)])
def test_directional_claim_is_supported_for_a_gain_and_never_for_a_loss(sets: int) -> None:
    """Directional claim "b is more robust than a" on 500 shared images (80% of outcomes
    shared): supported in >= 80% of the sweeps with 0.55 against 0.50; with 0.45 against
    0.50 supported in no more than a level-0.05 test may show (and judged two-sided, the
    mutant, it would be in most)."""
    power_floor(sets).check(rejections(*_claims(sets, 0.55, 0.8, True, seed=3), sign=1), "gain")
    loss = _claims(sets, 0.45, 0.8, True, seed=4)[0]
    fpr_region(sets, bad=None).check(rejections(loss), "supported on a loss")
    two_sided = _claims(sets, 0.45, 0.8, False, seed=4)[0]
    assert not fpr_region(sets, bad=None).accepts(rejections(two_sided))
