"""The figures of a sweep's comparison, in the shared style (:mod:`.figures`): accuracy per
variant and attack, shares an analysis declares (``SweepTable.figure``) per variant and
attack, accuracy against the budget ε when the sweep varies ``attack.eps``, and robust
accuracy against the PSE-AT weights λ (read from each job's resolved config) when the sweep
varies them. Nothing here names a metric of any analysis."""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from pse_lightning.core.contract import SweepTable
from pse_lightning.core.proportions import wilson_interval
from pse_lightning.reporting.figures import (
    FONT_SIZE,
    PALETTE,
    grouped_bar_figure,
    new_figure,
    save,
    stacked_fraction_figure,
)
from pse_lightning.reporting.sweep_jobs import Job, job_config, mean_metrics, seeds

# The PSE-AT weights of a training objective (conf/training/pse_at.yaml), in legend order.
LAMBDA_KEYS = ("lambda_s", "lambda_p", "lambda_u")


def accuracy_figure(summary: dict[str, dict], variants: list[str], path: Path) -> Path:
    """Clean and robust accuracy (one bar per attack) for each variant."""
    series = {"clean": [summary[v]["clean_acc"] for v in variants]}
    keys = sorted({k for s in summary.values() for k in s if k.startswith("robust_acc/")})
    for key in keys:
        series[key.split("/", 1)[1]] = [summary[v].get(key) for v in variants]
    return grouped_bar_figure(
        variants, series, path, ylabel="accuracy on the evaluated test samples"
    )


def stacked_share_figure(
    jobs: list[Job],
    variants: list[str],
    attacks: list[str],
    prefix: str,
    table: SweepTable,
    path: Path,
) -> Path | None:
    """The shares ``table.keys`` of analysis ``prefix``, one stacked bar per (variant,
    attack), means over the seed replicates; None when no job logged them."""
    cells = {
        (v, a): mean_metrics([j for j in jobs if (j.variant, j.attack) == (v, a)])
        for v in variants
        for a in attacks
    }
    keys = [f"test/{prefix}/{k}" for k in table.keys]
    bars = [(v, a) for v in variants for a in attacks if any(k in cells[(v, a)] for k in keys)]
    if not bars:
        return None
    names = table.legend or table.keys
    parts = {n: [cells[b].get(k) for b in bars] for n, k in zip(names, keys, strict=True)}
    return stacked_fraction_figure(
        [f"{v} / {a}" for v, a in bars], parts, path, ylabel=table.ylabel
    )


def accuracy_eps_figure(jobs: list[Job], variants: list[str], path: Path) -> Path | None:
    """Robust accuracy against ε, one line per (variant, attack) and seed replicate, with Wilson
    95% bars; None unless some attack was run at two or more budgets."""
    replicates = len(seeds(jobs)) > 1
    curves: dict[tuple[str, ...], list[tuple[float, float, int]]] = defaultdict(list)
    for job in jobs:
        acc, n = job.metrics.get("test/robust_acc"), job.metrics.get("test/samples")
        if job.eps is not None and acc is not None and n:
            line = (job.variant, job.attack_choice, *([f"seed {job.seed}"] if replicates else []))
            curves[line].append((job.eps, float(acc), int(n)))
    curves = {k: sorted(v) for k, v in curves.items() if len({e for e, _, _ in v}) > 1}
    if not curves:
        return None
    fig, axes = new_figure(width=5.0, height=3.4)
    ax = axes[0, 0]
    order = sorted(curves, key=lambda k: (variants.index(k[0]) if k[0] in variants else 0, k[1]))
    for i, key in enumerate(order):
        eps, acc, n = zip(*curves[key], strict=True)
        bounds = [wilson_interval(round(a * m), m) for a, m in zip(acc, n, strict=True)]
        err = [[a - lo for a, (lo, _) in zip(acc, bounds, strict=True)],
               [hi - a for a, (_, hi) in zip(acc, bounds, strict=True)]]  # fmt: skip
        ax.errorbar(eps, acc, yerr=err, marker="o", capsize=2, label=" / ".join(key),
                    color=PALETTE[i % len(PALETTE)])  # fmt: skip
    ax.set_xlabel("attack budget ε", fontsize=FONT_SIZE)
    ax.set_ylabel("robust accuracy (Wilson 95%)", fontsize=FONT_SIZE)
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=FONT_SIZE - 1, loc="best")
    return save(fig, path)


def job_lambdas(config: dict[str, Any]) -> dict[str, float] | None:
    """The PSE-AT weights ``training.objective.lambda_*`` of a job's resolved config (missing
    ones count as 0); None for an objective without them (pgd_at, the reference)."""
    objective = (config.get("training") or {}).get("objective") or {}
    if not any(k in objective for k in LAMBDA_KEYS):
        return None
    return {k: float(objective.get(k) or 0.0) for k in LAMBDA_KEYS}


def lambda_series(lambdas: dict[str, float], training: str) -> tuple[str, float] | None:
    """(series label, x) of a job on the λ axis: the terms that are on and their weight
    (the largest, when they differ); None when every weight is 0 (nothing to place on a
    log axis)."""
    on = {k: v for k, v in lambdas.items() if v > 0}
    if not on:
        return None
    terms = (
        "all three λ"
        if len(on) == len(LAMBDA_KEYS)
        else " + ".join("λ_" + k.removeprefix("lambda_") for k in on)
    )
    equal = len(set(on.values())) == 1
    label = f"{training}: {terms}" + ("" if equal else " (x: the largest)")
    return label, max(on.values())


LambdaPoints = dict[str, dict[tuple[str, float], list[float]]]
Reference = dict[str, dict[str, list[float]]]


def lambda_points(jobs: list[Job], sweep_dir: Path) -> tuple[LambdaPoints, Reference]:
    """attack -> (series, λ) -> the robust accuracy of each seed's model, and attack ->
    training -> the same for the jobs without λ (the reference). λ and the training name
    are read from each job's resolved config (``.hydra/config.yaml``), never its label."""
    points: LambdaPoints = defaultdict(lambda: defaultdict(list))
    reference: Reference = defaultdict(lambda: defaultdict(list))
    for job in jobs:
        acc = job.metrics.get("test/robust_acc")
        if acc is None:
            continue
        config = job_config(sweep_dir / job.dir)
        training = str((config.get("training") or {}).get("name", job.variant))
        lambdas = job_lambdas(config)
        placed = None if lambdas is None else lambda_series(lambdas, training)
        if placed is None:
            reference[job.attack][training].append(float(acc))
        else:
            points[job.attack][placed].append(float(acc))
    return points, reference


def lambda_figure(jobs: list[Job], sweep_dir: Path, path: Path) -> Path | None:
    """Robust accuracy against λ (:func:`lambda_points`), one panel per attack: each seed's
    model a small point, the mean over seeds a marker joined along each series (which λ
    terms are on, per training objective); jobs without λ (pgd_at) as a dashed line at their
    mean with a band over their seeds' range. None unless the sweep has at least two
    distinct λ values."""
    points, reference = lambda_points(jobs, sweep_dir)
    xs = {x for cells in points.values() for (_, x) in cells}
    if len(xs) < 2:
        return None
    attacks = sorted(points)
    fig, axes = new_figure(1, len(attacks), width=4.2 * len(attacks), height=3.4)
    for ax, attack in zip(axes[0], attacks, strict=True):
        labels = sorted({label for label, _ in points[attack]})
        for i, label in enumerate(labels):
            colour = PALETTE[i % len(PALETTE)]
            cells = sorted((x, accs) for (lb, x), accs in points[attack].items() if lb == label)
            for x, accs in cells:
                ax.scatter([x] * len(accs), accs, s=10, alpha=0.5, color=colour, linewidths=0)
            means = [statistics.fmean(accs) for _, accs in cells]
            ax.plot([x for x, _ in cells], means, marker="o", color=colour, label=label)
        for j, (training, accs) in enumerate(sorted(reference[attack].items())):
            colour = PALETTE[(len(labels) + j) % len(PALETTE)]
            ax.axhline(statistics.fmean(accs), color=colour, linestyle="--",
                       label=f"{training} (no λ): mean, seed range")  # fmt: skip
            ax.axhspan(min(accs), max(accs), color=colour, alpha=0.15, linewidth=0)
        ax.set_xscale("log")
        ax.set_xlabel("λ (weight of each PSE term that is on)", fontsize=FONT_SIZE)
        ax.set_ylabel(f"robust accuracy ({attack})", fontsize=FONT_SIZE)
        ax.set_title("dots: one seed each; line: mean over seeds", fontsize=FONT_SIZE)
        ax.legend(fontsize=FONT_SIZE - 1, loc="best")
    return save(fig, path)
