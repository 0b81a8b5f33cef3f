"""``python -m pse_lightning``: the Hydra entry point (thin: see pse_lightning.cli.app)."""

from __future__ import annotations

from pse_lightning.cli.app import main

if __name__ == "__main__":
    main()
