"""What a run leaves in W&B, read back from the offline run with wandb's own reader
(``wandb leet inspect``): names, job types, groups, tables with images, artifacts, summary."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import wandb_inspect
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from pse_lightning import pipeline
from pse_lightning.models.checkpoint import read_checkpoint
from pse_lightning.reporting.loggers import RunLogger, run_name, safe_key, sweep_group
from pse_lightning.reporting.wandb_run import key_results


def run_record(records: list[dict]) -> dict:
    return next(r["run"] for r in records if r["type"] == "run")


def artifacts(records: list[dict], kind: str) -> list[dict]:
    return [
        r["artifact"] for r in records if r["type"] == "artifact" and r["artifact"]["type"] == kind
    ]


def test_names_keys_and_sweep_groups() -> None:
    name = run_name(attack="cw", model="resnet50", dataset="imagenet", training="standard", seed=0)
    assert name == "cw-resnet50-imagenet-standard-s0"
    assert (
        safe_key(" Promotion-suppression effect/Top units ")
        == "promotion-suppression_effect/top_units"
    )
    multirun = OmegaConf.create(
        {"mode": "MULTIRUN", "sweep": {"dir": "/x/multirun/2026-12-01/22-48-56"}}
    )
    single = OmegaConf.create({"mode": "RUN", "sweep": {"dir": "/x/multirun/2026-12-01/22-48-56"}})
    assert sweep_group(multirun) == "sweep-2026-12-01-22-48-56"
    assert sweep_group(single) is None


def test_key_results_are_few_named_and_finite() -> None:
    scalars = {
        "test/clean_acc": 0.9,
        "test/l2_median": float("nan"),
        "test/pse/frac_promotion": 0.2,
    }
    assert key_results(scalars) == {"results/clean_acc": 0.9}  # the attack's own
    # An analysis's key results are those it declares (Analysis.key_results).
    assert key_results(scalars, ["pse/frac_promotion", "cam/lift_true"]) == {
        "results/clean_acc": 0.9, "results/pse_frac_promotion": 0.2
    }  # fmt: skip


def test_set_identity_fixes_name_and_job_type_only_before_the_run_starts(tmp_path: Path) -> None:
    logger = RunLogger(project="p", mode="disabled", save_dir=str(tmp_path), name="given")
    logger.set_identity(name="from-choices", job_type="evaluate")
    assert logger._wandb_init["name"] == "given"  # a name the user gave wins
    assert logger._wandb_init["job_type"] == "evaluate"
    with pytest.raises(ValueError, match="job_type"):
        logger.set_identity(name=None, job_type="test")


def test_the_sweep_group_is_handed_down_by_the_entry_point(tmp_path: Path) -> None:
    """The job's ``hydra`` node gives the group (JobContext), the first stage sets it on the
    unstarted run; a group given in the logger's config wins; no global Hydra state read."""
    from pse_lightning.reporting.loggers import start_run, wandb_logger

    node = OmegaConf.create({
        "mode": "MULTIRUN", "sweep": {"dir": "/x/multirun/2026-12-01/22-48-56"},
        "runtime": {"choices": {"attack": "pgd"}}, "overrides": {"task": ["attack=pgd"]},
        "job": {"config": {"override_dirname": {"exclude_keys": []}}},
    })  # fmt: skip
    job = pipeline.JobContext.from_hydra(node)
    assert job.group == "sweep-2026-12-01-22-48-56"
    assert pipeline.JobContext.from_hydra(OmegaConf.merge(node, {"mode": "RUN"})).group is None
    logger = wandb_logger(mode="disabled", save_dir=str(tmp_path))
    assert logger._wandb_init.get("group") is None  # nothing until the job hands it over
    start_run(logger, name="n", job_type="evaluate", config={}, group=job.group)
    assert logger._wandb_init["group"] == "sweep-2026-12-01-22-48-56"
    own = wandb_logger(mode="disabled", save_dir=str(tmp_path), group="mine")
    start_run(own, name="n", job_type="evaluate", config={}, group=job.group)
    assert own._wandb_init["group"] == "mine"


def logged_table(records: list[dict], name: str) -> tuple[list[dict], Callable]:
    """(rows as dicts, cell -> pixel array) of a table logged to the run.

    W&B keeps a logged table with its images in a ``run_table`` artifact (the copy under
    ``files/media/table`` has the images replaced by their type name).
    """
    contents = {
        c["path"]: c["local_path"]
        for a in artifacts(records, "run_table")
        for c in a["manifest"]["contents"]
    }
    table = json.loads(Path(contents[name]).read_text())
    rows = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]

    def png(cell: dict) -> np.ndarray:
        assert cell["_type"] == "image-file"
        return np.asarray(Image.open(contents[cell["path"]])).astype(np.float64)

    return rows, png


def test_training_then_evaluation_runs_read_back(make_cfg, tmp_path: Path) -> None:
    fit_cfg = make_cfg("logger=wandb", "attack=fgsm", "stage=fit")
    pipeline.run(fit_cfg)
    state, records = wandb_inspect(Path(fit_cfg.paths.run_dir))
    run = run_record(records)
    assert run["display_name"] == "fgsm-smallcnn-shapes-standard-s0"
    assert run["job_type"] == "train" and state["exit_code"] == 0
    (model,) = artifacts(records, "model")
    (checkpoint,) = Path(fit_cfg.paths.checkpoint_dir).glob("*.pt")
    _, meta = read_checkpoint(checkpoint)
    assert json.loads(model["metadata"])["digest"] == meta["digest"]
    assert meta["digest"][:12] in model["name"]
    assert [c["path"] for c in model["manifest"]["contents"]] == [checkpoint.name]

    cfg = make_cfg(
        "logger=wandb", "attack=fgsm", "stage=evaluate", "log_examples=3",
        f"paths.run_dir={tmp_path}/eval",
    )  # fmt: skip
    results = pipeline.run(cfg)
    run_dir = Path(cfg.paths.run_dir)
    state, records = wandb_inspect(run_dir)
    assert run_record(records)["job_type"] == "evaluate"
    summary = state["summary"]
    assert "epoch" not in summary and "trainer/global_step" not in summary
    assert all(" " not in key for key in summary)
    assert summary["results/robust_acc"] == pytest.approx(results["test/robust_acc"])
    assert summary["test/clean_acc"] == pytest.approx(results["test/clean_acc"])
    # The report's Findings: no analysis ran here, so none declared a claim; the training
    # claim (a sweep's) is listed as not measured.
    assert "findings/cam_region" not in summary
    assert summary["findings/pse_training"] == "not measured"
    assert json.loads((run_dir / "metrics.json").read_text())["findings"] == {
        "pse_training": "not measured"
    }
    (report,) = artifacts(records, "report")
    assert {c["path"] for c in report["manifest"]["contents"]} == {"report.md", "metrics.json"}

    assert summary["examples/adversarial"]["nrows"] == 3
    rows, png = logged_table(records, "examples/adversarial.table.json")
    assert [r["index"] for r in rows] == [0, 1, 2]
    datamodule = instantiate(cfg.dataset)
    datamodule.prepare_data()
    datamodule.setup("test")
    for row in rows:
        x, y, _ = datamodule.test_set[row["index"]]
        assert row["label"] == datamodule.class_names[int(y)]
        clean = png(row["clean"])
        expected = (x.permute(1, 2, 0).numpy() * 255).round()
        assert np.abs(clean[..., :3].reshape(expected.shape) - expected).max() <= 1
        # The perturbation panel is amplified to a full swing around grey, by the stated factor.
        assert row["amplification"] * row["linf"] == pytest.approx(0.5, rel=1e-4)
        swing = np.abs(png(row["perturbation"])[..., :3] - 127.5).max()
        assert swing >= 120
        adversarial = png(row["adversarial"])[..., :3] / 255
        linf = np.abs(adversarial - expected.reshape(adversarial.shape) / 255).max()
        assert linf == pytest.approx(row["linf"], abs=2 / 255)
    assert torch.isfinite(torch.tensor([r["amplification"] for r in rows])).all()


@pytest.mark.slow
def test_multirun_jobs_share_a_sweep_group_and_are_named_by_choice(tmp_path: Path) -> None:
    from test_cli import QUICK, run_cli

    args = [*QUICK, "logger=wandb", f"paths.root={tmp_path}", "attack=fgsm,pgd"]
    run_cli(["-m", *args], tmp_path)
    jobs = sorted(p.parent for p in (tmp_path / "multirun").glob("*/*/*/metrics.json"))
    assert len(jobs) == 2
    runs = [run_record(wandb_inspect(job)[1]) for job in jobs]
    sweep = jobs[0].parent
    assert {r["run_group"] for r in runs} == {f"sweep-{sweep.parent.name}-{sweep.name}"}
    assert [r["display_name"] for r in runs] == [
        "fgsm-small_cnn-shapes-standard-s0",
        "pgd-small_cnn-shapes-standard-s0",
    ]


def _fields(cls: type, n: int, index: list[int], **given: torch.Tensor) -> object:
    """A kept-examples dataclass with ``index`` and ``given``, other fields zeros."""
    from dataclasses import fields

    out = {"index": torch.tensor(index)}
    for f in fields(cls):
        out.setdefault(f.name, given.get(f.name, torch.zeros(n, 4, 4)))
    return cls(**out)


def test_examples_table_joins_the_analyses_maps_by_dataset_index(tmp_path: Path) -> None:
    """PSE kept examples 2 and 5, CAM kept 5 and 7: each example's row gets the maps of
    the analyses that kept it (None elsewhere), and a map's hottest pixel is the top
    colour of the report's heat map scale."""
    import matplotlib

    from pse_lightning.analysis.base import AnalysisResult
    from pse_lightning.analysis.cam import CAMAnalysis
    from pse_lightning.analysis.cam.result import CAMExamples
    from pse_lightning.analysis.pse import PSE
    from pse_lightning.analysis.pse.samples import ExampleMaps
    from pse_lightning.modules.example_panels import example_map_columns
    from pse_lightning.reporting.figures import HEAT_CMAP
    from pse_lightning.reporting.wandb_run import examples_table

    map_columns = ["promotion", "suppression", "cam_clean", "cam_adv"]

    hot = torch.zeros(2, 4, 4)
    hot[0, 1, 2] = 3.0  # example 2's promotion map: one hot pixel
    hot[1, 0, 0] = 1.0
    pse = _fields(ExampleMaps, 2, [2, 5], promotion=hot)
    cam = _fields(CAMExamples, 2, [5, 7], map_clean=torch.rand(2, 4, 4))
    results = {
        "pse": AnalysisResult({}, {"examples": pse}),
        "cam": AnalysisResult({}, {"examples": cam}),
    }
    index = torch.tensor([2, 5, 7])
    analyses = {"pse": PSE(), "cam": CAMAnalysis()}
    panels = {n: analyses[n].example_panel(r) for n, r in results.items()}
    columns = example_map_columns(panels, index)
    assert list(columns) == map_columns
    assert torch.equal(columns["promotion"][0], pse.promotion[0])
    assert torch.equal(columns["promotion"][1], pse.promotion[1])
    assert columns["promotion"][2] is None
    assert columns["cam_clean"][0] is None
    assert torch.equal(columns["cam_clean"][2], cam.map_clean[1])
    assert list(example_map_columns({"pse": panels["pse"]}, index)) == map_columns[:2]

    n = 3
    examples = {
        "index": index, "x": torch.rand(n, 3, 4, 4), "x_adv": torch.rand(n, 3, 4, 4),
        "y": torch.zeros(n, dtype=torch.long), "pred_clean": torch.zeros(n, dtype=torch.long),
        "pred_adv": torch.ones(n, dtype=torch.long), **columns,
    }  # fmt: skip
    table = examples_table(examples, ["a", "b"])
    assert table.columns[-4:] == map_columns
    cell = table.data[0][table.columns.index("promotion")]
    pixels = np.asarray(cell.image).astype(float)
    top = np.array(matplotlib.colormaps[HEAT_CMAP](1.0)[:3]) * 255
    bottom = np.array(matplotlib.colormaps[HEAT_CMAP](0.0)[:3]) * 255
    assert np.abs(pixels[1, 2, :3] - top).max() <= 1
    assert np.abs(pixels[0, 0, :3] - bottom).max() <= 1
    assert table.data[2][table.columns.index("promotion")] is None

    # The table, None cells and all, logs to an offline run and reads back.
    import wandb

    run = wandb.init(mode="offline", dir=str(tmp_path), project="t")
    run.log({"examples/adversarial": table})
    run.finish()
    _, records = wandb_inspect(tmp_path)
    rows, png = logged_table(records, "examples/adversarial.table.json")
    assert [r["index"] for r in rows] == [2, 5, 7] and rows[2]["promotion"] is None
    assert np.abs(png(rows[0]["promotion"])[1, 2, :3] - top).max() <= 1
    assert rows[0]["cam_clean"] is None and rows[2]["cam_clean"] is not None


def test_run_names_leave_out_what_every_job_of_a_sweep_shares(tmp_path: Path) -> None:
    """A multirun job's name says what it varies: the command line's overrides that every
    job received verbatim (the sweep's multirun.yaml) are left out; a single run keeps all."""
    sweep = tmp_path / "multirun" / "2026-12-01" / "22-48-56"
    sweep.mkdir(parents=True)
    typed = ["experiment=smoke", "training.epochs=1", "attack.eps=0.01,0.02"]
    (sweep / "multirun.yaml").write_text(
        OmegaConf.to_yaml({"hydra": {"overrides": {"task": typed}}})
    )
    node = OmegaConf.create({
        "mode": "MULTIRUN", "sweep": {"dir": str(sweep)}, "runtime": {"choices": {}},
        "overrides": {"task": ["experiment=smoke", "training.epochs=1", "attack.eps=0.02"]},
        "job": {"config": {"override_dirname": {"exclude_keys": []}}},
    })  # fmt: skip
    assert pipeline.JobContext.from_hydra(node).shared == ("experiment", "training.epochs")
    single = OmegaConf.merge(node, {"mode": "RUN"})
    assert pipeline.JobContext.from_hydra(single).shared == ()
