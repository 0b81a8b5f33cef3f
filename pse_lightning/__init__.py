"""pse_lightning: interpreting adversarial examples by activation promotion and suppression."""

__version__ = "0.1.0"
