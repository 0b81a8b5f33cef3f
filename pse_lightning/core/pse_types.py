"""The three PSE image types of the paper, in the order every table shows them.

Shared by the PSE analysis (which assigns them) and the sweep report (which compares their
shares across runs), so it sits at the bottom of the package.
"""

from __future__ import annotations

DOMINANCE_TYPES: tuple[str, ...] = ("suppression", "balanced", "promotion")
