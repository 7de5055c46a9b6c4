"""Calibration: probes, one-pass quality curves, r*, features, and the calibrate/predict entry points."""
