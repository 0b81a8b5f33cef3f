"""The text and tables of the neuron-masking section, from a computed curve only."""

from __future__ import annotations

from typing import Any

from pse_lightning.defenses.curve_stats import METRICS
from pse_lightning.reporting.tables import markdown_table

LABELS = {"clean": "clean", "transfer": "transferred", "adaptive": "adaptive"}
TITLE = "Neuron masking (defense)"
KEY_NUMBERS = ("k", "undefended_clean_acc", "clean_acc", "undefended_robust_acc",
               "transfer_acc", "adaptive_acc", "mcnemar_p_adaptive")  # fmt: skip
CURVE_CAPTION = (
    "Accuracy (share of test images) against the number k of masked units (symmetric log "
    "axis), on clean images, on adversarial examples transferred from the unmasked model "
    "and on adaptive ones crafted on the masked model: the most sensitive units (as "
    "deployed) and the least sensitive ones with Wilson 95% bands, random units as mean "
    "± sd over draws."
)


def curve_meaning(scalars: dict[str, float]) -> str:
    """One sentence from the deployed defense's numbers against the undefended model."""
    adaptive, robust = scalars["adaptive_acc"], scalars["undefended_robust_acc"]
    change = "raises" if adaptive > robust else "does not raise"
    return (
        f"Masking the {int(scalars['k'])} most sensitive units {change} accuracy under the "
        f"adaptive attack ({robust:.3g} undefended, {adaptive:.3g} defended; McNemar p = "
        f"{scalars['mcnemar_p_adaptive']:.3g}) and moves clean accuracy from "
        f"{scalars['undefended_clean_acc']:.3g} to {scalars['clean_acc']:.3g}."
    )


def _with_interval(row: dict[str, Any], metric: str) -> str:
    return f"{row[f'{metric}_acc']:.3f} [{row[f'{metric}_lo']:.3f}, {row[f'{metric}_hi']:.3f}]"


def _with_spread(entry: dict[str, Any], metric: str) -> str:
    mean, sd = entry[f"{metric}_mean"], entry[f"{metric}_sd"]
    spread = "n/a" if sd != sd else f"{sd:.3f}"
    return f"{mean:.3f} ± {spread} ({entry[f'{metric}_min']:.3f}–{entry[f'{metric}_max']:.3f})"


def curve_table(details: dict[str, Any]) -> str:
    """Per k: the top-k mask and the bottom-k control with Wilson intervals, and the random
    control as mean ± sd (min–max) over its draws."""
    spread = {entry["k"]: entry for entry in details["spread"]}
    lines = []
    for row in details["rows"]:
        if row["selection"] in ("top", "bottom"):
            cells = [_with_interval(row, m) for m in METRICS]
            lines.append([row["k"], row["selection"], str(row["units"]), *cells])
        elif row["draw"] == 0:
            entry = spread[row["k"]]
            cells = [_with_spread(entry, m) for m in METRICS]
            lines.append([row["k"], f"random ({entry['draws']} draw(s))", "", *cells])
    columns = ["k", "units masked", "unit indices", *(LABELS[m] for m in METRICS)]
    return markdown_table(columns, lines)


def tests_table(details: dict[str, Any]) -> str:
    """The paired tests: accuracies, discordant counts, raw and Holm-adjusted p."""
    lines = [
        [
            t["k"],
            LABELS[t["metric"]],
            t["versus"],
            t["acc"],
            t["acc_other"],
            t["only_top"],
            t["only_other"],
            f"{t['p']:.3g}",
            f"{t['p_holm']:.3g}",
        ]
        for t in details["tests"]
    ]
    columns = ["k", "accuracy", "top-k versus", "top-k", "other", "only top-k right",
               "only other right", "McNemar p", "Holm p"]  # fmt: skip
    return markdown_table(columns, lines)


def curve_markdown(description: str, details: dict[str, Any]) -> str:
    """The section text: what was masked, how to read the numbers, both tables."""
    n = details["rows"][0]["n"] if details["rows"] else 0
    return "\n".join(
        [
            f"Defense: {description}. Accuracy with k units masked: 'top' (the most "
            "sensitive, as deployed), and the controls 'random' (seeded draws: mean ± sd and "
            "range over draws) and 'bottom' (the least sensitive). 'transferred' examples "
            "are crafted on the unmasked model, 'adaptive' ones on the masked model itself. "
            f"Brackets: Wilson 95% intervals over the n = {n} test images.",
            "",
            curve_table(details),
            "",
            "Paired tests on the same images: two-sided exact McNemar test on the images only "
            "one of the two models gets right; p-values Holm-adjusted over the "
            f"{len(details['tests'])} tests of this section. 'undefended' compares clean with "
            "clean accuracy and transferred or adaptive with the unmasked model's robust "
            "accuracy.",
            "",
            tests_table(details),
        ]
    )


def curve_tables(details: dict[str, Any]) -> dict[str, tuple[list[str], list[list[Any]]]]:
    """W&B tables: every evaluated mask (each random draw) and every paired test."""
    tables = {}
    for name, rows in (("accuracy_vs_k", details["rows"]), ("paired_tests", details["tests"])):
        columns = list(rows[0]) if rows else []
        tables[name] = (columns, [[r[c] for c in columns] for r in rows])
    return tables
