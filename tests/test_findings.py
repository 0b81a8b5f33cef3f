"""The Findings section: verdicts from planted numbers, Holm over the claims, and the
section at the top of report.md."""

from __future__ import annotations

import json
import math

import pytest

from pse_lightning.reporting.findings import run_findings
from pse_lightning.reporting.report import write_report


def pse(n: int, shares: tuple[float, float, float]) -> dict[str, float]:
    keys = ("suppression", "balanced", "promotion")
    return {
        "test/pse/n_images": n,
        **{f"test/pse/frac_{k}": s for k, s in zip(keys, shares, strict=True)},
    }


def cam(effect: float, low: float, high: float, p: float) -> dict[str, float]:
    base = "test/cam/specific_true_top20"
    return {base: effect, base + "_low": low, base + "_high": high, base + "_p": p}


def layer(name: str, rho: float, low: float, high: float, p: float) -> dict[str, float]:
    base = f"test/dissection/{name}/"
    return {base + "spearman_rho": rho, base + "spearman_ci_low": low,
            base + "spearman_ci_high": high, base + "spearman_p": p}  # fmt: skip


def verdicts(scalars: dict[str, float]) -> dict[str, str]:
    return {f.key: f.verdict for f in run_findings(scalars)}


def test_planted_effects_give_each_verdict() -> None:
    found = verdicts({
        **pse(200, (0.3, 0.4, 0.3)),          # every type common: supported
        **cam(-0.2, -0.3, -0.1, 1e-6),        # points the other way: not supported
        **layer("a", 0.05, -0.1, 0.2, 0.5),   # CI excludes |rho| >= 0.3: not supported
        **layer("b", 0.2, -0.2, 0.5, 0.2),    # wide CI, not significant: inconclusive
    })  # fmt: skip
    assert found == {
        "pse_types": "supported",
        "cam_region": "not supported",
        "sensitivity_interpretability/a": "not supported",
        "sensitivity_interpretability/b": "inconclusive",
        "pse_training": "not measured",
    }


def test_a_rare_type_is_not_supported_and_a_small_sample_is_inconclusive() -> None:
    assert verdicts(pse(1000, (0.01, 0.5, 0.49)))["pse_types"] == "not supported"
    assert verdicts(pse(20, (0.1, 0.45, 0.45)))["pse_types"] == "inconclusive"


def test_holm_runs_over_the_claims() -> None:
    # Alone, p = 0.03 rejects; beside two other tests Holm multiplies it by up to 3.
    alone = run_findings(cam(0.2, 0.1, 0.3, 0.03))
    assert alone[1].verdict == "supported" and alone[1].p_holm == pytest.approx(0.03)
    crowd = run_findings({**cam(0.2, 0.1, 0.3, 0.03), **layer("a", 0.4, 0.1, 0.6, 0.02),
                          **layer("b", 0.4, 0.1, 0.6, 0.04)})  # fmt: skip
    by_key = {f.key: f for f in crowd}
    assert by_key["cam_region"].p_holm == pytest.approx(0.06)
    assert by_key["cam_region"].verdict == "inconclusive"


def test_missing_analyses_are_not_measured() -> None:
    found = run_findings({})
    assert all(f.verdict == "not measured" and math.isnan(f.p_holm) for f in found)


def test_findings_open_the_report_and_land_in_metrics_json(tmp_path) -> None:
    scalars = {"test/clean_acc": 0.9, **cam(0.2, 0.1, 0.3, 1e-5)}
    write_report(tmp_path, title="t", setup={"attack": "cw"}, scalars=scalars, examples={},
                 class_names=["a", "b"])  # fmt: skip
    report = (tmp_path / "report.md").read_text()
    headings = [line for line in report.splitlines() if line.startswith("## ")]
    assert headings[0] == "## Findings" and headings[-1] == "## All metrics"
    payload = json.loads((tmp_path / "metrics.json").read_text())
    assert payload["findings"]["cam_region"] == "supported"
    assert payload["metrics"] == scalars
