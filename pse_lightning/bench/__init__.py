"""Benchmarks: ``python -m pse_lightning.bench [attacks|pse|cam|dissection|ddp ...]``."""
