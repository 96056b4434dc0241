"""Measuring: answer metrics, early-exit calibration, accuracy against retain per guide, speed benchmarks."""
