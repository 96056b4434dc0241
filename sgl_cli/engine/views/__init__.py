"""Presentation: what `sgl inspect` shows (terminal and PNG), plots of evaluations and calibrations."""
