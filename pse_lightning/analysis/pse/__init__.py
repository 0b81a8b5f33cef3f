"""The promotion-suppression (PSE) analysis (docs/METHODS.md §2), split by job.

- :mod:`.attribution`: grad x delta and integrated gradients with the completeness check,
  the pure functional core;
- :mod:`.statistics`: maps, totals, group scores, the PSE ratio and type, the threshold
  sweep and the summaries of reduced tallies;
- :mod:`.samples`: the bounded per-image rows and example maps kept for the report;
- :mod:`.metric`: the :class:`PSE` torchmetrics Metric (``_target_`` of
  ``conf/analysis/pse.yaml``);
- :mod:`.report` and :mod:`.figures`: the report section, from ``compute``'s result alone.
"""

from pse_lightning.analysis.pse.metric import PSE

__all__ = ["PSE"]
