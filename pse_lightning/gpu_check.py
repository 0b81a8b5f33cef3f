"""``python -m pse_lightning.gpu_check`` (``make gpu-check``): the GPU path, measured once.

One prepared script for a machine with a GPU, sized to finish in about 8 minutes on one
modern GPU. Each check is independent (a failure is recorded and the next check runs), and
everything lands in ``<out>/gpu_check.json`` and a printed table:

- ``main_job``: the main job with ``trainer=gpu`` (wall time, peak GPU memory);
- ``cpu_vs_gpu``: the same checkpoint evaluated on a slice with ``trainer=cpu`` and
  ``trainer=gpu``: clean accuracy and attack success must be equal, continuous metrics
  within :data:`RELATIVE_TOLERANCE`;
- ``ddp_1proc``: ``trainer=ddp trainer.devices=1`` against ``trainer=gpu`` on that slice;
- ``resnet50``: ResNet-50 at 224 px, batch 64: one forward+backward (the floor), one CW
  iteration / floor, peak memory, with channels-last on and off and ``attack.compile`` on and
  off (``compile_s``: the first call of the compiled gradient step, reported apart from the
  steady ``cw_iter_over_floor``);
- ``bench_attacks``, ``bench_pse``: the benchmark suites on the GPU (CUDA-synchronised).

Without a GPU it says so in one line and exits 0; its CPU parts (metric comparison, the
ResNet step timing on a small input) run in the test suite.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Metrics that count images: equal on CPU and GPU up to this many images of the slice.
DISCRETE_KEYS = ("clean_acc", "robust_acc", "success_rate", "samples", "clean_misclassified")
# Continuous metrics (norms, attributions, statistics): |gpu - cpu| <= tol * max(1, |cpu|).
RELATIVE_TOLERANCE = 0.02
SLICE = ["dataset.eval_samples=128", "logger=none", "trainer.enable_progress_bar=false"]


def compare_metrics(
    reference: dict[str, float], other: dict[str, float], *, samples: int, discrete_images: int = 0
) -> list[str]:
    """Mismatches between two runs' metrics, one line each (empty: the runs agree).

    Discrete metrics (shares of images) may differ by ``discrete_images`` images out of
    ``samples``; continuous ones by :data:`RELATIVE_TOLERANCE` relative to max(1, |ref|).
    NaN equals NaN; a key present in one run only is a mismatch.
    """
    problems = [f"{k}: only in one run" for k in sorted(set(reference) ^ set(other))]
    for key in sorted(set(reference) & set(other)):
        a, b = float(reference[key]), float(other[key])
        if math.isnan(a) and math.isnan(b):
            continue
        if key.rsplit("/", 1)[-1] in DISCRETE_KEYS:
            allowed = (discrete_images + 0.5) / samples if "samples" not in key else 0.5
        else:
            allowed = RELATIVE_TOLERANCE * max(1.0, abs(a))
        if not abs(a - b) <= allowed:
            problems.append(f"{key}: {a:.6g} vs {b:.6g} (allowed ±{allowed:.3g})")
    return problems


def _run_job(overrides: list[str]) -> tuple[dict[str, float], float, float]:
    """Compose conf/ with ``overrides`` and run the pipeline in this process.

    Returns (metrics, wall seconds, peak GPU memory in MiB).
    """
    import torch
    from hydra import compose, initialize_config_dir

    from pse_lightning import pipeline

    conf = Path(__file__).resolve().parents[1] / "conf"
    if not conf.is_dir():
        conf = Path(__file__).resolve().parent / "conf"
    with initialize_config_dir(version_base="1.3", config_dir=str(conf)):
        cfg = compose("config", overrides=overrides)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    metrics = pipeline.run(cfg)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0
    return metrics, seconds, peak


def check_main_job(out: Path) -> dict[str, Any]:
    root = [f"paths.root={out}", f"paths.run_dir={out}/main_job"]
    metrics, seconds, peak = _run_job(["trainer=gpu", "logger=none", *root])
    keys = ("test/clean_acc", "test/success_rate", "test/l2_median")
    return {"seconds": seconds, "peak_gpu_mib": peak, **{k: metrics.get(k) for k in keys}}


def check_cpu_vs_gpu(out: Path) -> dict[str, Any]:
    """The main job's checkpoint (cached by ``main_job``) on a slice, CPU against GPU."""
    runs = {}
    for trainer in ("cpu", "gpu"):
        overrides = [f"trainer={trainer}", "stage=evaluate", f"paths.root={out}",
                     f"paths.run_dir={out}/slice_{trainer}", *SLICE]  # fmt: skip
        runs[trainer], seconds, _ = _run_job(overrides)
        runs[f"{trainer}_seconds"] = seconds
    problems = compare_metrics(runs["cpu"], runs["gpu"], samples=128, discrete_images=1)
    (out / "slice_metrics.json").write_text(json.dumps(runs, indent=1))
    return {"agree": not problems, "mismatches": problems,
            "cpu_seconds": runs["cpu_seconds"], "gpu_seconds": runs["gpu_seconds"]}  # fmt: skip


def check_ddp_one_process(out: Path) -> dict[str, Any]:
    reference = json.loads((out / "slice_metrics.json").read_text())["gpu"]
    overrides = ["trainer=ddp", "trainer.devices=1", "stage=evaluate", f"paths.root={out}",
                 f"paths.run_dir={out}/slice_ddp", *SLICE]  # fmt: skip
    metrics, seconds, _ = _run_job(overrides)
    problems = compare_metrics(reference, metrics, samples=128)
    return {"agree": not problems, "mismatches": problems, "seconds": seconds}


def cw_step_ratios(
    device: str, *, image_size: int = 224, batch: int = 64, arch: str = "resnet50",
    channels_last: bool = False, compile_step: bool = False, iterations: int = 10,
) -> dict[str, float]:  # fmt: skip
    """Time of one CW iteration / one forward+backward (the floor), and peak memory.

    Random weights and images: timing does not depend on what the network learned.
    """
    import torch

    from pse_lightning.attacks import CWL2
    from pse_lightning.bench.common import forward_backward_floor, synchronize, time_call
    from pse_lightning.models import TorchvisionClassifier

    dev = torch.device(device)
    model = TorchvisionClassifier(arch=arch, num_classes=1000, in_channels=3,
                                  mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225],
                                  image_size=image_size).to(dev).eval()  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, image_size, image_size, generator=gen).to(dev)
    y = torch.randint(0, 1000, (batch,), generator=gen).to(dev)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    attack = CWL2(steps=iterations, binary_search_steps=1, abort_early=False,
                  compile=compile_step)  # fmt: skip
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    first = time.perf_counter()
    attack(model, x, y)  # warm-up; with compile, this call pays the compilation
    synchronize(dev)
    first = time.perf_counter() - first
    floor = forward_backward_floor(model, x, y, repeats=3)
    per_call = time_call(lambda: attack(model, x, y), repeats=2, warmup=0, device=dev)
    peak = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else 0.0
    per_iteration = per_call / (iterations + 1)  # + the scoring forward of the result
    return {"floor_ms": 1e3 * floor, "cw_iter_over_floor": per_iteration / floor,
            "first_call_s": first, "compile_s": attack.gradients.compile_seconds,
            "peak_gpu_mib": peak}  # fmt: skip


def check_resnet50(out: Path) -> dict[str, Any]:
    rows = {}
    for channels_last in (False, True):
        for compile_step in (False, True):
            name = f"channels_last={channels_last} compile={compile_step}"
            rows[name] = cw_step_ratios("cuda", channels_last=channels_last,
                                        compile_step=compile_step)  # fmt: skip
    return rows


def _bench(suite: str, *args: str) -> Callable[[Path], dict[str, Any]]:
    def run(out: Path) -> dict[str, Any]:
        command = [sys.executable, "-m", "pse_lightning.bench", suite, "--device", "cuda", *args]
        done = subprocess.run(command, capture_output=True, text=True, timeout=240)
        (out / f"bench_{suite}.txt").write_text(done.stdout + done.stderr)
        if done.returncode != 0:
            raise RuntimeError(f"bench {suite} exited {done.returncode}: {done.stderr[-500:]}")
        return {"table": done.stdout.strip()[-3000:]}

    return run


CHECKS: dict[str, Callable[[Path], dict[str, Any]]] = {
    "main_job": check_main_job,
    "cpu_vs_gpu": check_cpu_vs_gpu,
    "ddp_1proc": check_ddp_one_process,
    "resnet50": check_resnet50,
    "bench_attacks": _bench("attacks", "--quick"),
    "bench_pse": _bench("pse"),
}


def run_checks(out: Path, names: list[str]) -> dict[str, Any]:
    """Run the named checks in order; each failure is recorded, never fatal."""
    results: dict[str, Any] = {}
    for name in names:
        start = time.perf_counter()
        try:
            results[name] = {"status": "ok", **CHECKS[name](out)}
        except Exception as error:  # noqa: BLE001 - one failing check must not hide the rest
            results[name] = {"status": "failed", "error": f"{type(error).__name__}: {error}"}
        results[name]["check_seconds"] = round(time.perf_counter() - start, 1)
        print(f"[gpu-check] {name}: {results[name]['status']} "
              f"({results[name]['check_seconds']} s)", flush=True)  # fmt: skip
    return results


def format_results(results: dict[str, Any]) -> str:
    lines = ["| check | status | numbers |", "|---|---|---|"]
    for name, row in results.items():
        numbers = {k: v for k, v in row.items() if k not in ("status", "table")}
        text = ", ".join(f"{k}={_short(v)}" for k, v in numbers.items())
        lines.append(f"| {name} | {row['status']} | {text} |")
    tables = [f"\n### {name}\n{row['table']}" for name, row in results.items() if "table" in row]
    return "\n".join(lines + tables)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_short(v)}" for k, v in value.items()) + "}"
    return str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pse_lightning.gpu_check",
                                     description=__doc__.split("\n\n")[0])  # fmt: skip
    parser.add_argument("--out", default="outputs/gpu_check", help="folder for the results")
    parser.add_argument("--checks", nargs="*", default=list(CHECKS), choices=list(CHECKS))
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU visible to torch on this machine; nothing to check")
        return 0
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    results = run_checks(out, args.checks)
    results["device"] = {"status": "ok", "name": torch.cuda.get_device_name(0),
                         "torch": torch.__version__}  # fmt: skip
    (out / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str))
    print(format_results(results))
    return 1 if any(r["status"] != "ok" for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
