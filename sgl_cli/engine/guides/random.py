"""`random`: uniform random scores, a baseline. Seeded per item (the run's `seed`, the item's line and id), so the
choice never depends on the batch it runs in."""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Guide, GuideItem


@dataclass
class RandomGuide(Guide):
    name: ClassVar[str] = "random"
    description: ClassVar[str] = "uniform random scores (seed {seed}, fixed per image)"
    uses_large: ClassVar[bool] = False
    seed: int = 0

    @classmethod
    def from_settings(cls, settings) -> "RandomGuide":
        return cls(seed=settings.seed if settings is not None else 0)

    def score(self, item: GuideItem) -> torch.Tensor:
        g = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}:{item.line}:{item.id}".encode()))
        return torch.rand(item.n_visual, generator=g)
