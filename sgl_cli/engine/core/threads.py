"""The torch CPU threads a process computes with: one place, for every driver (commands, Run, Ray workers,
lmms-eval)."""

from __future__ import annotations


def use_threads(threads: int | None) -> None:
    """Compute with `threads` torch CPU threads (None: torch's default, untouched)."""
    if threads is not None:
        import torch

        torch.set_num_threads(int(threads))
