"""The training-procedure study (issue 22): seeds as replicates on fixed data, the PSE-AT
ablation grid, its matched-strength control, the λ figure and the select-then-confirm step.
Configs are composed with Hydra, nothing is trained."""

from __future__ import annotations

import copy
import functools
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from helpers import CONF_DIR
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from pse_lightning import compare, pipeline
from pse_lightning.attacks import PGD
from pse_lightning.core.findings import Finding
from pse_lightning.models import SmallCNN
from pse_lightning.modules.objectives import (
    AdversarialObjective,
    MatchedDriftObjective,
    PSEObjective,
    logit_drift,
)
from pse_lightning.reporting.outcomes import write_outcomes
from pse_lightning.reporting.sweep import write_comparison
from pse_lightning.reporting.sweep_figures import lambda_figure, lambda_points
from pse_lightning.reporting.sweep_jobs import collect_jobs
from pse_lightning.reporting.sweep_selection import (
    CONFIRMED_ON_FRESH_SEEDS,
    SELECTED,
    Selection,
    mark_findings,
    statuses,
)
from pse_lightning.reporting.sweep_stats import comparison_plan, variant_pairs


@functools.cache
def _composed(overrides: tuple[str, ...]) -> DictConfig:
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


def _compose(*overrides: str) -> DictConfig:
    """``conf/`` composed with ``overrides``, once per distinct list in the process (the
    tests compose the same study jobs again); every caller gets its own copy."""
    return copy.deepcopy(_composed(overrides))


def _params(experiment: str) -> DictConfig:
    return _compose(f"experiment={experiment}").hydra.sweeper.params


def _seeds(experiment: str) -> list[int]:
    return [int(s) for s in str(_params(experiment).seed).split(",")]


# Seeds are training replicates on fixed data ----------------------------------------------


@pytest.mark.parametrize("experiment", ["robust_vs_standard", "pse_at_ablation", "pse_at_confirm"])
def test_every_study_trains_at_least_three_seeds(experiment: str) -> None:
    assert len(set(_seeds(experiment))) >= 3


def test_seed_changes_the_training_randomness_not_the_data() -> None:
    """seed=0 and seed=1 of the study: the same dataset config (generation, splits, the 500
    evaluated images), a different training attack seed. data_seed alone moves the data."""
    jobs = {s: _compose("experiment=robust_vs_standard", "training=pgd_at", f"seed={s}")
            for s in (0, 1)}  # fmt: skip
    assert OmegaConf.to_yaml(jobs[0].dataset) == OmegaConf.to_yaml(jobs[1].dataset)
    assert jobs[0].dataset.eval_samples == 500
    assert [j.training.objective.attack.seed for j in jobs.values()] == [0, 1]
    other = _compose("experiment=robust_vs_standard", "training=pgd_at", "data_seed=7")
    assert other.dataset.seed == 7 and other.seed == 0


def test_seed_replicates_see_the_same_images_in_another_order(make_cfg) -> None:
    """Built as a run builds them: the same test images, a different training shuffle."""
    built = {s: pipeline.build(make_cfg(f"seed={s}")).datamodule for s in (0, 1)}
    first, second = built[0], built[1]
    assert first.seed == second.seed == 0
    assert (first.training_seed, second.training_seed) == (0, 1)
    images = [torch.stack([dm.test_set[i][0] for i in range(8)]) for dm in (first, second)]
    torch.testing.assert_close(images[0], images[1], rtol=0, atol=0)
    orders = []
    for dm in (first, second):
        dm.setup("fit")
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(0)
        orders.append(list(loader.sampler))
    assert sorted(orders[0]) == sorted(orders[1]) and orders[0] != orders[1]


def _trained(job: DictConfig) -> str:
    """What a checkpoint depends on besides the seed: training, network, data (not which
    images are evaluated)."""
    dataset = {k: v for k, v in job.dataset.items() if k != "eval_samples"}
    return OmegaConf.to_yaml({"t": job.training, "m": job.model, "d": dataset})


def test_quick_preset_is_labelled_and_reuses_the_full_studys_models() -> None:
    text = (CONF_DIR / "experiment" / "robust_vs_standard_quick.yaml").read_text()
    assert "TOO SMALL FOR A VERDICT" in text
    quick, full = _seeds("robust_vs_standard_quick"), _seeds("robust_vs_standard")
    assert set(quick) < set(full)
    for training in ("standard", "pgd_at", "trades", "pse_at"):
        jobs = [_compose(f"experiment={e}", f"training={training}")
                for e in ("robust_vs_standard_quick", "robust_vs_standard")]  # fmt: skip
        assert _trained(jobs[0]) == _trained(jobs[1])


# The ablation grid --------------------------------------------------------------------------


def _ablation_jobs(experiment: str = "pse_at_ablation") -> dict[str, DictConfig]:
    choices = str(_params(experiment).ablation).split(",")
    return {c: _compose(f"experiment={experiment}", f"ablation={c}") for c in choices}


def _lambdas(job: DictConfig) -> tuple[float, float, float] | None:
    objective = job.training.objective
    if "lambda_s" not in objective:
        return None
    return (objective.lambda_s, objective.lambda_p, objective.lambda_u)


def test_ablation_grid_holds_the_expected_variants() -> None:
    jobs = _ablation_jobs()
    found = {c: (j.training.name, _lambdas(j)) for c, j in jobs.items()}
    assert found["pgd_at"] == ("pgd_at", None)
    assert found["s_only"] == ("pse_at", (0.1, 0.0, 0.0))
    assert found["p_only"] == ("pse_at", (0.0, 0.1, 0.0))
    assert found["u_only"] == ("pse_at", (0.0, 0.0, 0.1))
    assert found["pse_at"] == ("pse_at", (0.1, 0.1, 0.1))
    # The control: matched to pse_at's penalty at the same lambdas, not a PSEObjective.
    assert found["drift_control"] == ("drift_at", (0.1, 0.1, 0.1))
    assert jobs["drift_control"].training.objective._target_.endswith("MatchedDriftObjective")
    # The λ scale sweep: all three terms on at >= 4 values spaced evenly on a log scale.
    scale = sorted({lam[0] for name, lam in found.values()
                    if name == "pse_at" and lam and len(set(lam)) == 1})  # fmt: skip
    assert len(scale) >= 4
    steps = [math.log10(b / a) for a, b in zip(scale, scale[1:], strict=False)]
    assert all(0.3 <= s <= 0.7 for s in steps) and math.log10(scale[-1] / scale[0]) >= 2


def test_ablation_settings_differ_only_in_the_objective() -> None:
    """Same seeds, data, network, epochs and training attack as robust_vs_standard."""
    jobs = _ablation_jobs()
    study = _compose("experiment=robust_vs_standard", "training=pgd_at")
    assert set(_seeds("pse_at_ablation")) == set(_seeds("robust_vs_standard"))
    for job in jobs.values():
        assert OmegaConf.to_yaml(job.dataset) == OmegaConf.to_yaml(study.dataset)
        assert list(job.model.widths) == list(study.model.widths)
        assert job.training.epochs == study.training.epochs
        assert dict(job.training.adversary) == dict(study.training.adversary)
    # Its pgd_at and pse_at are robust_vs_standard's models (shared checkpoints).
    for name in ("pgd_at", "pse_at"):
        same = _compose("experiment=robust_vs_standard", f"training={name}")
        assert _trained(jobs[name]) == _trained(same)


def test_confirmation_seeds_are_disjoint_from_the_ablations() -> None:
    ablation, confirm = set(_seeds("pse_at_ablation")), set(_seeds("pse_at_confirm"))
    assert ablation and confirm and not ablation & confirm
    callback = _compose("experiment=pse_at_confirm").hydra.callbacks.comparison
    assert {int(s) for s in callback.selection.selection_seeds} == ablation
    assert callback.selection.stage == "confirm"
    select = _compose("experiment=pse_at_ablation").hydra.callbacks.comparison
    assert select.selection.stage == "select"
    # Every setting of the confirmation is a setting of the ablation, on the same data.
    assert set(_ablation_jobs("pse_at_confirm")) <= set(_ablation_jobs())


# The matched-strength control ----------------------------------------------------------------


def _model_and_batch() -> tuple[SmallCNN, torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = SmallCNN(num_classes=3, in_channels=3, mean=[0.5] * 3, std=[0.25] * 3, widths=[8, 16])
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 16, 16, generator=gen)
    return model, x, torch.randint(0, 3, (16,), generator=gen), torch.arange(16)


def test_logit_drift_known_answer() -> None:
    logits = torch.tensor([[3.0, 1.0, 0.0]])
    # |1 - 3| + |1 - 1| + |4 - 0| = 6 over 3 logits
    assert float(logit_drift(logits, torch.tensor([[1.0, 1.0, 4.0]]))) == pytest.approx(2.0)
    assert float(logit_drift(logits, logits.clone())) == 0.0


class _NoAttack(MatchedDriftObjective):
    """The control with x' = x: adversarial logits equal the clean ones."""

    def craft(self, model, x, y, index):  # noqa: ANN001, ANN201
        return x.clone()


def test_control_penalty_is_zero_when_adversarial_logits_equal_clean_ones() -> None:
    model, x, y, index = _model_and_batch()
    model.eval()
    objective = _NoAttack(PGD(eps=0.03, steps=1), lambda_s=1.0, lambda_p=1.0, lambda_u=1.0)
    loss, logs = objective(model, x, y, index)
    assert float(logs["penalty"]) == 0.0 and float(logs["logit_drift"]) == 0.0
    ce = torch.nn.functional.cross_entropy(model(x), y)
    assert float(loss.detach()) == pytest.approx(float(ce.detach()))


def test_control_penalty_has_the_value_of_pse_ats_penalty_on_the_same_batch() -> None:
    """The definition of "matched": on a batch, c * D equals pse_at's penalty with the same
    lambdas (same attack, same running statistics from a fresh start)."""
    attack = PGD(eps=0.03, step_size=0.01, steps=3)
    model, x, y, index = _model_and_batch()
    model.eval()
    weights = {"lambda_s": 0.3, "lambda_p": 0.1, "lambda_u": 0.2}
    _, control = MatchedDriftObjective(attack, **weights)(model, x, y, index)
    _, pse = PSEObjective(attack, **weights)(model, x, y, index)
    expected = 0.3 * pse["suppression"] + 0.1 * pse["promotion"] + 0.2 * pse["unit_drift"]
    assert float(expected) > 0.01  # the attack moved the logits: a non-trivial match
    assert float(control["penalty"]) == pytest.approx(float(expected), rel=1e-5)
    assert float(control["pse_penalty"]) == pytest.approx(float(expected), rel=1e-5)
    torch.testing.assert_close(control["ce_adv"], pse["ce_adv"])
    # Its loss is pgd_at's loss plus that penalty.
    pgd_loss, _ = AdversarialObjective(attack)(model, x, y, index)
    assert float(control["loss"]) == pytest.approx(
        float(pgd_loss.detach()) + float(expected), rel=1e-5
    )


def test_control_gradient_is_the_unweighted_drift_scaled_to_the_match() -> None:
    """d(c D)/dZ(x') = c / (B K) sign(Z(x') - Z(x)), c = P / D detached: every logit alike,
    whatever the label (no true class, no runner-up)."""
    logits = torch.zeros(2, 3)
    logits_adv = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 3.0]], requires_grad=True)
    target = torch.tensor(2.0)  # the value pse_at's penalty takes on this batch
    drift = logit_drift(logits, logits_adv)
    assert float(drift.detach()) == pytest.approx(6.5 / 6)
    scale = MatchedDriftObjective.matched_scale(target, drift)
    assert not scale.requires_grad
    (scale * drift).backward()
    expected = (2.0 / 6.5) * torch.sign(logits_adv.detach())  # c / (B K) = (2 / (6.5/6)) / 6
    torch.testing.assert_close(logits_adv.grad, expected)
    assert float(scale * drift) == pytest.approx(2.0)
    # No drift, nothing to scale: a zero penalty, not a division by zero.
    zero = MatchedDriftObjective.matched_scale(target, torch.tensor(0.0))
    assert float(zero) == 0.0 and math.isfinite(float(zero))


# Sweep directories: the λ figure and the selection -----------------------------------------


def _job(sweep: Path, num: int, label: str, seed: int, acc: float, config: dict) -> None:
    """A completed job of a pse_at_ablation-like sweep, swept as ``ablation=<label>``."""
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    choices = {"training": config["training"]["name"], "attack": "pgd"}
    (job / ".hydra" / "hydra.yaml").write_text(
        yaml.safe_dump({"hydra": {"runtime": {"choices": choices}}})
    )
    lines = ["experiment=pse_at_ablation", f"ablation={label}", f"seed={seed}", "attack=pgd"]
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(lines))
    (job / ".hydra" / "config.yaml").write_text(
        yaml.safe_dump(config | {"seed": seed, "attack": {"eps": 0.03}})
    )
    n = 200
    clean = torch.ones(n, dtype=torch.bool)
    adv = torch.arange(n) < round(acc * n)
    write_outcomes(job, {"index": torch.arange(n), "clean_correct": clean, "adv_correct": adv})
    metrics = {"test/clean_acc": 1.0, "test/robust_acc": float(adv.float().mean()),
               "test/samples": float(n)}  # fmt: skip
    (job / "metrics.json").write_text(json.dumps({"metrics": metrics}))


def _config(training: str, lambdas: tuple[float, float, float] | None) -> dict:
    objective = {} if lambdas is None else dict(zip(("lambda_s", "lambda_p", "lambda_u"),
                                                    lambdas, strict=True))  # fmt: skip
    return {"training": {"name": training, "objective": objective}}


def _ablation_sweep(sweep: Path, seeds: tuple[int, ...], winner_acc: float = 0.7) -> Path:
    """pgd_at at 0.6; labels that do NOT say their λ (a, b, c): the figure must read them."""
    settings = [
        ("pgd_at", "pgd_at", None, 0.6),
        ("a", "pse_at", (0.01,) * 3, 0.55),
        ("b", "pse_at", (1.0,) * 3, winner_acc),
        ("c", "pse_at", (0.1, 0.0, 0.0), 0.5),
    ]
    num = 0
    for label, training, lambdas, acc in settings:
        for i, seed in enumerate(seeds):
            _job(sweep, num, label, seed, acc + 0.005 * i, _config(training, lambdas))
            num += 1
    return sweep


def test_lambda_figure_reads_lambda_from_each_jobs_config(tmp_path: Path) -> None:
    sweep = _ablation_sweep(tmp_path, (0, 1, 2))
    jobs = collect_jobs(sweep)
    points, reference = lambda_points(jobs, sweep)
    cells = points["pgd"]
    assert set(cells) == {("pse_at: all three λ", 0.01), ("pse_at: all three λ", 1.0),
                          ("pse_at: λ_s", 0.1)}  # fmt: skip
    assert sorted(cells[("pse_at: all three λ", 1.0)]) == pytest.approx([0.7, 0.705, 0.71])
    assert sorted(reference["pgd"]["pgd_at"]) == pytest.approx([0.6, 0.605, 0.61])
    # Change one job's config and only its point moves.
    path = sweep / jobs[3].dir / ".hydra" / "config.yaml"
    config = yaml.safe_load(path.read_text())
    config["training"]["objective"] = {"lambda_s": 0.3, "lambda_p": 0.3, "lambda_u": 0.3}
    path.write_text(yaml.safe_dump(config))
    moved, _ = lambda_points(jobs, sweep)
    assert len(moved["pgd"][("pse_at: all three λ", 0.3)]) == 1
    assert len(moved["pgd"][("pse_at: all three λ", 0.01)]) == 2
    assert lambda_figure(jobs, sweep, tmp_path / "lambda.png").exists()


def test_lambda_figure_needs_two_lambda_values(tmp_path: Path) -> None:
    for i, seed in enumerate((0, 1)):
        _job(tmp_path, i, "pgd_at", seed, 0.6, _config("pgd_at", None))
        _job(tmp_path, 10 + i, "pse_at", seed, 0.6, _config("pse_at", (0.1,) * 3))
    assert lambda_figure(collect_jobs(tmp_path), tmp_path, tmp_path / "x.png") is None


SELECT = Selection("select", "pgd_at")
CONFIRM = Selection("confirm", "pgd_at", selection_seeds=("0", "1", "2"))


def test_ablation_winner_is_selected_and_needs_confirmation(tmp_path: Path) -> None:
    sweep = _ablation_sweep(tmp_path, (0, 1, 2))
    jobs = collect_jobs(sweep)
    assert statuses(jobs, SELECT) == {"b": SELECTED}  # a and c lose to pgd_at
    write_comparison(sweep, SELECT)
    text = (sweep / "comparison.md").read_text()
    assert "## Selection and confirmation" in text and SELECTED in text
    assert "experiment=pse_at_confirm hydra.sweeper.params.ablation=pgd_at,b" in text
    record = json.loads((sweep / "comparison.json").read_text())
    assert record["selection"]["status"] == {"b": SELECTED}
    marked = [c for c in record["comparisons"] if c["variant"] == "b" and c["measure"] == "robust"]
    assert marked and all(c["verdict"] == SELECTED for c in marked)
    assert all(c["verdict"] != SELECTED for c in record["comparisons"] if c["variant"] != "b")
    assert (sweep / "comparison_lambda.png").exists()


def test_confirmation_on_fresh_seeds_keeps_its_verdicts(tmp_path: Path) -> None:
    sweep = _ablation_sweep(tmp_path, (100, 101, 102))
    jobs = collect_jobs(sweep)
    assert set(statuses(jobs, CONFIRM).values()) == {CONFIRMED_ON_FRESH_SEEDS}
    write_comparison(sweep, CONFIRM)
    record = json.loads((sweep / "comparison.json").read_text())
    assert record["selection"]["fresh_seeds"] is True
    assert all(c["verdict"] != SELECTED for c in record["comparisons"])


def test_confirmation_on_reused_seeds_stays_selected(tmp_path: Path) -> None:
    jobs = collect_jobs(_ablation_sweep(tmp_path, (2, 3, 4)))
    assert set(statuses(jobs, CONFIRM).values()) == {SELECTED}


def test_mark_findings_replaces_only_the_selected_robust_verdicts() -> None:
    finding = Finding("k", "claim", "effect", "test", verdict="supported")
    records = [
        {"variant": "b", "baseline": "pgd_at", "measure": "robust", "verdict": "supported"},
        {"variant": "b", "baseline": "pgd_at", "measure": "clean", "verdict": "supported"},
        {"variant": "a", "baseline": "pgd_at", "measure": "robust", "verdict": "supported"},
    ]
    found, marked = mark_findings([finding] * 3, records, {"b": SELECTED}, SELECT)
    assert [f.verdict for f in found] == [SELECTED, "supported", "supported"]
    assert marked[0]["judged_verdict"] == "supported" and "judged supported" in found[0].note


def test_the_ablation_compares_pse_at_with_its_matched_control(tmp_path: Path) -> None:
    """The control exists to answer "does the PSE information add anything beyond a penalty
    of the same strength": pse_at against drift_control on the same seeds, a procedure claim
    in the robust family, not two verdicts against pgd_at read side by side."""
    settings = [("pgd_at", "pgd_at", None, 0.6), ("pse_at", "pse_at", (0.1,) * 3, 0.58),
                ("drift_control", "drift_at", (0.1,) * 3, 0.5)]  # fmt: skip
    num = 0
    for label, training, lambdas, acc in settings:
        for i, seed in enumerate((0, 1, 2)):
            _job(tmp_path, num, label, seed, acc + 0.01 * i * (label == "pse_at"),
                 _config(training, lambdas))  # fmt: skip
            num += 1
    write_comparison(tmp_path, SELECT)
    record = json.loads((tmp_path / "comparison.json").read_text())
    rows = [c for c in record["comparisons"]
            if (c["variant"], c["baseline"], c["measure"]) == ("pse_at", "drift_control", "robust")
            and c["over_seeds"]]  # fmt: skip
    assert len(rows) == 1
    row = rows[0]
    assert row["family"] == "training procedures" and row["directional"]
    assert row["differences"] == pytest.approx([0.08, 0.09, 0.10])
    assert "pse_at is more robust than drift_control" in (tmp_path / "comparison.md").read_text()


def test_each_robust_procedure_is_compared_with_pgd_at() -> None:
    """robust_vs_standard: every variant against standard, and each other adversarial
    procedure (trades as pse_at) against pgd_at, "more robust" (old main: pse_at only, so
    the README read trades against standard alone)."""
    variants = ["standard", "pgd_at", "trades", "pse_at"]
    assert variant_pairs(variants) == [
        ("pgd_at", "standard", True), ("trades", "standard", True),
        ("pse_at", "standard", True), ("trades", "pgd_at", True), ("pse_at", "pgd_at", True),
    ]  # fmt: skip
    keys = {c.key for c in comparison_plan(variants, ["pgd"], ["0", "1", "2"])}
    assert {"robust/trades_vs_pgd_at/pgd/seed=2", "clean/trades_vs_pgd_at/seed=0"} <= keys
    # Without pgd_at there is nothing to compare a robust procedure with.
    assert variant_pairs(["standard", "trades"]) == [("trades", "standard", True)]


@pytest.mark.parametrize("selected", ["pse_at", "drift_control"])
def test_a_control_comparison_of_a_selected_setting_is_marked(selected: str) -> None:
    """The seeds that selected a setting favour it against its control too."""
    finding = Finding("k", "claim", "effect", "test", verdict="supported")
    records = [
        {"variant": "pse_at", "baseline": "drift_control", "measure": "robust",
         "verdict": "supported"},
        {"variant": "pse_at", "baseline": "drift_control", "measure": "clean",
         "verdict": "supported"},
    ]  # fmt: skip
    found, marked = mark_findings([finding] * 2, records, {selected: SELECTED}, SELECT)
    assert [f.verdict for f in found] == [SELECTED, "supported"]
    assert marked[0]["judged_verdict"] == "supported"
    assert f"ablation=pgd_at,{selected}" in found[0].note


def test_selection_stage_is_checked() -> None:
    with pytest.raises(ValueError, match="selection.stage"):
        Selection("choose")


def _multirun_yaml(sweep: Path, selection: dict | None) -> None:
    comparison = {"_target_": "pse_lightning.reporting.sweep.SweepComparison"}
    if selection is not None:
        comparison["selection"] = selection
    saved = {"hydra": {"callbacks": {"comparison": comparison}}}
    (sweep / "multirun.yaml").write_text(yaml.safe_dump(saved))


def test_compare_rewrites_a_sweeps_comparison_with_its_own_selection(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sweep = _ablation_sweep(tmp_path, (0, 1, 2))
    _multirun_yaml(sweep, {"stage": "select", "reference": "pgd_at"})
    assert compare.main([str(sweep)]) == 0
    assert str(sweep / "comparison.md") in capsys.readouterr().out
    text = (sweep / "comparison.md").read_text()
    assert "## Selection and confirmation" in text and SELECTED in text
    # Without the callback's selection (a plain grid) no setting is marked.
    _multirun_yaml(sweep, None)
    assert compare.main([str(sweep)]) == 0
    assert SELECTED not in (sweep / "comparison.md").read_text()


def test_compare_names_a_wrong_folder_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert compare.main([str(tmp_path / "nope")]) == 2
    assert compare.main([str(tmp_path)]) == 1
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and all(line.startswith("Error: ") for line in errors)
    assert "is not a folder" in errors[0] and "no completed job" in errors[1]
