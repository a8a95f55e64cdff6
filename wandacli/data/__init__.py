"""Calibration and evaluation sets: named sources, local files, templates, prompt masking."""
