"""Inference-time defenses: calibrated on a split, applied to a model, evaluated under attack."""
