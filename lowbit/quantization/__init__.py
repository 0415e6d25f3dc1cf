"""Quantization toolkit: schemes, fitting and mapping (grid), metrics, calibration, fake quantization."""
