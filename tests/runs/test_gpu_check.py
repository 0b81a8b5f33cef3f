"""The CPU-side parts of ``make gpu-check``: the no-GPU answer, the CPU/GPU comparison rule
and the CW-step timing (on a small input here)."""

from __future__ import annotations

import math

import pytest
import torch

from pse_lightning import gpu_check


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_it_says_so_in_one_line_and_exits_0(capsys, tmp_path) -> None:
    assert gpu_check.main(["--out", str(tmp_path / "out")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and "no CUDA GPU" in lines[0]
    assert not (tmp_path / "out").exists()


def test_compare_metrics_allows_one_image_and_the_stated_tolerance() -> None:
    cpu = {"test/clean_acc": 0.5, "test/l2_median": 1.0, "test/pse/mean_r": math.nan}
    same = {"test/clean_acc": 0.5 + 1 / 128, "test/l2_median": 1.015, "test/pse/mean_r": math.nan}
    assert gpu_check.compare_metrics(cpu, same, samples=128, discrete_images=1) == []
    worse = {"test/clean_acc": 0.5 + 2 / 128, "test/l2_median": 1.03, "test/pse/mean_r": 0.2}
    problems = gpu_check.compare_metrics(cpu, worse, samples=128, discrete_images=1)
    assert [p.split(":")[0] for p in problems] == [
        "test/clean_acc", "test/l2_median", "test/pse/mean_r"
    ]  # fmt: skip
    assert gpu_check.compare_metrics(cpu, {}, samples=128)[0].endswith("only in one run")


def test_cw_step_ratio_is_measured_against_the_floor() -> None:
    row = gpu_check.cw_step_ratios("cpu", image_size=32, batch=4, arch="resnet18", iterations=2)
    assert row["floor_ms"] > 0 and row["peak_gpu_mib"] == 0.0
    # A CW iteration is one forward + backward plus cheap updates: about the floor.
    assert 0.3 < row["cw_iter_over_floor"] < 10


@pytest.mark.slow
def test_cw_step_ratio_reports_the_compile_cost_apart(monkeypatch) -> None:
    """compile=True goes through the compiled step (traced with a counting backend)."""
    from torch._dynamo.testing import CompileCounter

    from pse_lightning.attacks import compiled

    torch._dynamo.reset()
    backend = CompileCounter()
    monkeypatch.setattr(compiled, "BACKEND", backend)
    row = gpu_check.cw_step_ratios(
        "cpu", image_size=32, batch=4, arch="resnet18", iterations=2, compile_step=True
    )
    torch._dynamo.reset()
    assert backend.frame_count == 1 and row["compile_s"] > 0
    assert 0 < row["compile_s"] <= row["first_call_s"]
