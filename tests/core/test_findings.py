"""The Findings: the verdict rule (docs/METHODS.md §7.13), Holm over the claims, the
analyses' declared claims, and the section at the top of report.md."""

from __future__ import annotations

import json
import math

import pytest

from pse_lightning.analysis.cam.findings import cam_findings
from pse_lightning.analysis.dissection.findings import dissection_findings
from pse_lightning.analysis.pse.findings import pse_findings
from pse_lightning.core.findings import Finding, judge, not_measured, untestable
from pse_lightning.reporting.findings import run_findings
from pse_lightning.reporting.report import write_report


def finding(estimate, low, high, p, direction="two-sided", size=0.0, null=0.0, key="c"):
    return Finding(key, "claim", "effect", "scheme", estimate=estimate, low=low, high=high,
                   p=p, direction=direction, size=size, null=null)  # fmt: skip


def verdict_of(f: Finding) -> str:
    return judge([f])[0].verdict


def test_a_significant_p_with_an_interval_that_includes_zero_is_not_supported() -> None:
    # The contradicting example of issue 21: rho = 0.20, CI [-0.15, 0.50], p = 0.01.
    assert verdict_of(finding(0.20, -0.15, 0.50, 0.01, size=0.3)) == "inconclusive"


def test_each_verdict_from_planted_effects() -> None:
    assert verdict_of(finding(0.4, 0.2, 0.6, 0.001, size=0.3)) == "supported"
    assert verdict_of(finding(0.05, -0.1, 0.2, 0.5, size=0.3)) == "not supported"
    assert verdict_of(finding(0.2, -0.2, 0.5, 0.2, size=0.3)) == "inconclusive"
    # One-sided, greater: an interval below the claimed size is "not supported" ...
    assert verdict_of(finding(0.02, 0.0, 0.04, 0.9, "greater", null=0.05)) == "not supported"
    # ... and a significant effect the other way too.
    assert verdict_of(finding(-0.2, -0.3, -0.1, 1e-6, "greater")) == "not supported"
    assert verdict_of(finding(-0.2, -0.3, -0.1, 1e-6, "less")) == "supported"
    assert verdict_of(finding(0.2, 0.1, 0.3, 1e-6, "less")) == "not supported"


def test_supported_needs_both_the_corrected_test_and_the_interval() -> None:
    # Interval excludes 0 but the test does not reject: inconclusive, not supported.
    assert verdict_of(finding(0.3, 0.01, 0.6, 0.2)) == "inconclusive"
    # The test rejects but the interval includes 0: inconclusive.
    assert verdict_of(finding(0.3, -0.01, 0.6, 0.001)) == "inconclusive"


def test_holm_runs_over_the_tested_claims_only() -> None:
    alone = judge([finding(0.2, 0.1, 0.3, 0.03)])
    assert alone[0].verdict == "supported" and alone[0].p_holm == pytest.approx(0.03)
    crowd = judge([
        finding(0.2, 0.1, 0.3, 0.03, key="a"),
        finding(0.4, 0.1, 0.6, 0.02, key="b"),
        finding(0.4, 0.1, 0.6, 0.04, key="c"),
        not_measured("d", "claim", "not run"),
        untestable("e", "claim", "effect", "scheme", "too few units"),
    ])  # fmt: skip
    by_key = {f.key: f for f in crowd}
    assert by_key["a"].p_holm == pytest.approx(0.06)
    assert by_key["a"].verdict == "inconclusive"
    assert by_key["d"].verdict == "not measured" and math.isnan(by_key["d"].p_holm)
    assert by_key["e"].verdict == "untestable" and math.isnan(by_key["e"].p_holm)


def test_analyses_declare_not_measured_when_they_saw_nothing() -> None:
    for declare in (pse_findings, cam_findings, dissection_findings):
        found = declare({})
        assert found and all(f.status == "not measured" for f in found)
    assert run_findings([])[-1].verdict == "not measured"  # the training claim


def test_findings_open_the_report_and_land_in_metrics_json(tmp_path) -> None:
    scalars = {"test/clean_acc": 0.9, "test/p": 1.69e-79}
    found = run_findings([finding(0.2, 0.1, 0.3, 1e-5, key="cam_region")])
    write_report(tmp_path, title="t", setup={"attack": "cw"}, scalars=scalars, examples={},
                 class_names=["a", "b"], findings=found)  # fmt: skip
    report = (tmp_path / "report.md").read_text()
    headings = [line for line in report.splitlines() if line.startswith("## ")]
    assert headings[0] == "## Findings" and headings[-1] == "## All metrics"
    payload = json.loads((tmp_path / "metrics.json").read_text())
    assert payload["findings"]["cam_region"] == "supported"
    assert payload["metrics"] == scalars  # a p-value of 1.69e-79 is not stored as 0
    rows = json.loads((tmp_path / "findings.json").read_text())
    assert [r["key"] for r in rows] == ["cam_region", "pse_training"]


def test_not_supported_reads_the_simultaneous_interval_when_given() -> None:
    """The sweep's family-wise rule (docs/METHODS.md §7.6): "supported" reads the 95 %
    interval and Holm's p, "not supported" the simultaneous interval; without one (every
    per-run family) both read the 95 % interval, as before."""
    up = Finding("k", "c", "e", "t", estimate=0.005, low=-0.01, high=0.015, p=0.3,
                 direction="greater", size=0.02)  # fmt: skip
    assert judge([up])[0].verdict == "not supported"
    assert judge([up], [None])[0].verdict == "not supported"
    assert judge([up], [(-0.03, 0.03)])[0].verdict == "inconclusive"
    assert judge([up], [(-0.03, 0.019)])[0].verdict == "not supported"
    down = Finding("k", "c", "e", "t", estimate=-0.005, low=-0.015, high=0.01, p=0.3,
                   direction="less", size=0.02)  # fmt: skip
    assert judge([down])[0].verdict == "not supported"
    assert judge([down], [(-0.05, 0.03)])[0].verdict == "inconclusive"
    same = Finding("k", "c", "e", "t", estimate=0.0, low=-0.005, high=0.005, p=1.0,
                   direction="two-sided", size=0.01)  # fmt: skip
    assert judge([same])[0].verdict == "not supported"
    assert judge([same], [(-0.012, 0.012)])[0].verdict == "inconclusive"
    # Supported is Holm and the 95 % interval, whatever the simultaneous interval says.
    gain = Finding("k", "c", "e", "t", estimate=0.01, low=0.002, high=0.018, p=0.001,
                   direction="greater", size=0.02)  # fmt: skip
    assert judge([gain], [(-0.01, 0.03)])[0].verdict == "supported"
