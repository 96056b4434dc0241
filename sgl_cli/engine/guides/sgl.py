"""`sgl`: Small-VLM Guidance (SGP). The small model's attention to each visual token, summed over all its layers
and heads, from the prompt rows after the image and every generated token that is fed back (method.md 1).

The importance is captured while the small model answers (`core.capture.ImportanceCapture`, scoped to that
pass), so ranking costs the large model nothing. The only guide that needs the small model, and so the only one
whose items can exit early.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from .base import Guide, GuideItem


class SGLGuide(Guide):
    name: ClassVar[str] = "sgl"
    description: ClassVar[str] = "the small model's attention to each visual token while it answers"
    uses_large: ClassVar[bool] = False
    score_noun: ClassVar[str] = "attention"
    needs_small: ClassVar[bool] = True

    def score(self, item: GuideItem) -> torch.Tensor:
        return item.small_importance
