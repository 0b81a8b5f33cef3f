"""Image-level interpretation of adversarial perturbations with class activation maps.

``analysis=cam`` (docs/METHODS.md §3), split by job: :mod:`.metric` (the torchmetrics
Metric: maps, scores, reduced state, ``compute``), :mod:`.statistics` (pure functions: the
interpretability score, its baselines and p-values), :mod:`.report` and :mod:`.figures`
(the report section, drawn from the computed result alone).
"""

from pse_lightning.analysis.cam.metric import CAMAnalysis

__all__ = ["CAMAnalysis"]
