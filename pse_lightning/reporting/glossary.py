"""The glossary of a run's report: the attack's terms, plus those its analyses declare.

Every analysis declares the entries of its own metrics and words
(:meth:`~pse_lightning.analysis.base.Analysis.glossary`, keys without ``test/<name>/``); a
report shows the entries of the parts that ran (:func:`terms_for`), and the test that
every key of a real run's ``metrics.json`` is explained uses every entry
(:mod:`pse_lightning.glossary`, which also writes ``docs/GLOSSARY.md``), so a new metric
without an entry fails the test suite instead of reaching users unexplained. This module
holds the attack's own entries (the evaluation loop's metrics) and names no metric of any
analysis.

Metric entries match keys without their ``test/`` stage prefix by a regular expression, so
one entry covers a family (per layer, per mask kind, per category); ``<layer>`` and similar
placeholders in the shown name stand for the varying part.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from pse_lightning.core.contract import Term, metric, word

__all__ = ["TERMS", "Term", "document", "explain", "glossary_markdown", "terms_for",
           "unexplained"]  # fmt: skip

TERMS: tuple[Term, ...] = (
    metric("samples", r"samples", "Test images evaluated.", "§7.1"),
    metric("clean_acc", r"clean_acc",
            "Share of test images the model classifies correctly before the attack.", "§7.1"),
    metric("robust_acc", r"robust_acc",
            "Share of all test images classified correctly both before and after the attack.",
            "§7.1"),
    metric("clean_misclassified", r"clean_misclassified",
            "Test images misclassified before the attack; they are not attacked and enter no "
            "analysis.", "§1.1"),
    metric("success_rate", r"success_rate",
            "Share of the attacked (correctly classified) images whose adversarial example is "
            "misclassified (targeted: classified as the target).", "§7.1"),
    metric("l2_mean, l2_median", r"l2_(mean|median)",
            "Mean and median L2 norm of the perturbation δ = x' − x over the successful "
            "adversarial examples, pixels in [0, 1].", "§7.1"),
    metric("linf_mean, linf_median", r"linf_(mean|median)",
            "Mean and median L∞ norm (largest pixel change) of δ over the successful "
            "adversarial examples, pixels in [0, 1].", "§7.1"),
    word("amplification (×a)", "Perturbation panels show grey 0.5 + a·δ, with a written on "
         "the panel: the factor that stretches the largest |δ| to the full grey range."),
)  # fmt: skip

STAGE = "test/"


def explain(key: str, terms: Sequence[Term] = TERMS) -> Term | None:
    """The entry of ``terms`` that explains metric ``key`` (with or without ``test/``)."""
    bare = key.removeprefix(STAGE)
    return next((term for term in terms if term.matches(bare)), None)


def unexplained(keys: Iterable[str], terms: Sequence[Term] = TERMS) -> list[str]:
    """The keys no entry of ``terms`` explains, sorted."""
    return sorted(key for key in keys if explain(key, terms) is None)


def terms_for(keys: Iterable[str], terms: Sequence[Term] = TERMS) -> list[Term]:
    """The entries of ``terms`` a report with these metric keys needs: every metric entry
    matching one of them and every word entry of the parts that ran, in glossary order."""
    bare = [key.removeprefix(STAGE) for key in keys]
    scopes = {"attack"} | {key.split("/")[0] for key in bare if "/" in key}
    return [
        term
        for term in terms
        if (term.pattern is None and term.scope in scopes)
        or any(term.matches(key) for key in bare)
    ]


def glossary_markdown(terms: Sequence[Term]) -> str:
    """A two-column table: term and meaning with its section of docs/METHODS.md."""
    rows = [
        f"| {_cell(t.name)} | {_cell(t.meaning)}{f' (docs/METHODS.md {t.ref})' if t.ref else ''} |"
        for t in terms
    ]
    return "\n".join(["| term | meaning |", "|---|---|", *rows])


def _cell(text: str) -> str:
    """Text safe inside a markdown table cell (a bare | would end the cell)."""
    return text.replace("|", "\\|")


def document(terms: Sequence[Term]) -> str:
    """Every entry of ``terms`` as ``docs/GLOSSARY.md``, grouped by scope."""
    lines = [
        "# Metric glossary",
        "",
        "Generated from the attack's entries (`pse_lightning/reporting/glossary.py`) and each "
        "analysis's own (`Analysis.glossary()`), the one source of the report's Glossary "
        "section; regenerate with `python -m pse_lightning.glossary docs/GLOSSARY.md`.",
        "Metrics are logged as `test/<name>`; `<...>` stands for the varying part of a key.",
    ]
    for scope in dict.fromkeys(term.scope for term in terms):
        lines += ["", f"## {scope}", "", glossary_markdown([t for t in terms if t.scope == scope])]
    return "\n".join(lines) + "\n"
