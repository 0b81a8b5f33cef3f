"""Where the CAM analysis and the StrAttack tests import two PSE functions from.

The PSE functional core lives in :mod:`pse_lightning.analysis.pse.attribution` and
:mod:`pse_lightning.analysis.pse.statistics`; import from there.
"""

from pse_lightning.analysis.pse.attribution import grad_times_delta
from pse_lightning.analysis.pse.statistics import grid_group_map

__all__ = ["grad_times_delta", "grid_group_map"]
