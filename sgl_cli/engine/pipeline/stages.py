"""The typed results of the engine's stages, one item at a time.

    Work.encoded  Encoded      both models' processor outputs and the visual-token columns
    Work.small    SmallPass    the small model's answer, its SGP importance and SEE scores
    Work.large    LargeAnswer  the large model's answer from the kept visual tokens, and how they were chosen

`Work` carries an item through them; a failed stage sets `error` and the later stages skip the item.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..backends.base import Reduced  # noqa: F401 - what a backend returns; imported from here too
from ..io.items import Item


@dataclass
class Encoded:
    """One item encoded for both models (the small model's encoding is the large one's when they share a
    processor; None without a small model)."""

    large: dict
    small: dict | None
    visual: torch.Tensor  # (S,) bool: the visual-token columns (input_ids == image token id; no marker tokens)
    image_sizes: list[tuple[int, int]]  # (width, height) of each image, as given to the processor
    # The decoded images as given (a guide may re-encode them reduced; a large backend that encodes on its own
    # side, vLLM, is given them with the kept indices) and the prompt (text or chat turns) they were encoded with.
    images: list = field(default_factory=list, repr=False)
    prompt: Any = None
    video: Any = field(default=None, repr=False)  # the sampled video (`io.video.Video`), when the item has one

    @property
    def n_visual(self) -> int:
        return int(self.visual.sum())

    def lean(self, pixels: bool, frames: bool = False) -> "Encoded":
        """This encoding less what only the models' own passes read: the small model's encoding, and (without
        `pixels`) the pixel tensors' memory, where the large model reads the images themselves (vLLM) or no longer
        runs; their shapes stay (on the meta device: a family lays out tiles by them). A video's frames stay only
        with `frames` (a large model that reads them itself, vLLM); its timing stays. What the records read
        stays: ids, the grids, the images and the prompt."""
        large = self.large if pixels else {
            k: v.to("meta") if k.startswith("pixel_values") and isinstance(v, torch.Tensor) else v
            for k, v in self.large.items()}
        video = self.video if self.video is None or frames else dataclasses.replace(self.video, frames=[])
        return Encoded(large, None, self.visual, self.image_sizes, self.images, self.prompt, video)


@dataclass
class SmallPass:
    """The small model's greedy answer, the SGP importance captured while it answered, and its SEE scores."""

    tokens: list[int]  # generated ids, EOS included when produced
    probs: list[float]  # each generated token's probability
    answer: str
    importance: torch.Tensor  # (N,) fp32: attention received per visual token, summed over layers, heads, rows
    consistency: float  # product of the answer's probabilities re-read with the top consistency_retain tokens
    state: Any = field(default=None, repr=False, compare=False)  # what the small model's re-read needs (its own)

    @property
    def confidence(self) -> float:
        """Geometric mean of the generated tokens' probabilities (EOS included)."""
        return math.exp(sum(math.log(max(p, 1e-45)) for p in self.probs) / len(self.probs))

    @property
    def exit_score(self) -> float:
        return (self.confidence + self.consistency) / 2


@dataclass
class LargeAnswer:
    """The large model's greedy answer from the visual tokens a guide kept, or from the input it reduced."""

    tokens: list[int]
    answer: str | None  # None: the item failed alone (`error`)
    guide: str  # what ranked the visual tokens (or reduced the input)
    scores: torch.Tensor | None  # (N,) the guide's scores (None: a reduced input, ranked by nothing)
    kept: torch.Tensor | None  # indices of the kept visual tokens, in sequence order (None: a reduced input)
    prune_layer: int  # where the others were dropped (0: before the language model)
    reduced: Reduced | None = None  # what the large model saw, when the guide reduced its input (all of it kept)
    error: str | None = None  # why the backend could not answer this item (the others were answered)

    @property
    def n_kept(self) -> int:
        """The visual tokens the large model read."""
        return self.reduced.n_visual if self.reduced is not None else len(self.kept)


@dataclass
class Work:
    """One item in flight through the stages."""

    item: Item
    encoded: Encoded | None = None
    small: SmallPass | None = None
    large: LargeAnswer | None = None
    error: str | None = None
    ms: dict[str, float] = field(default_factory=lambda: {"small": 0.0, "reread": 0.0, "large": 0.0})
    started: float = 0.0  # when its small batch started (perf_counter), for the streaming pipeline's total

    @property
    def ok(self) -> bool:
        return self.error is None

    def charge(self, stage: str, ms: float) -> None:
        self.ms[stage] = self.ms.get(stage, 0.0) + ms

