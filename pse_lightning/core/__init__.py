"""The bottom layer: what attacks, analyses, defenses, models and modules all share.

Nothing here imports from any other ``pse_lightning`` package except ``validation``, so every
layer above may import from it without cycles (``tests/core/test_layering.py`` checks this).
"""
