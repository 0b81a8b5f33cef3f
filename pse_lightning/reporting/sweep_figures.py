"""The figures of a sweep's comparison, in the shared style (:mod:`.figures`): accuracy per
variant and attack, shares an analysis declares (``SweepTable.figure``) per variant and
attack, and accuracy against the budget ε when the sweep varies ``attack.eps``. Nothing here
names a metric of any analysis."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

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
from pse_lightning.reporting.sweep_jobs import Job, mean_metrics, seeds


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
