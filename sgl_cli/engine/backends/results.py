"""The typed results of the model seams (backends/base.py): what the large model's pass needs (`LargeInputs`), what
it answers (`Answer`, a `Reduced` input), what the small model answers (`SmallAnswer`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass
class LargeInputs:
    """What the large model's pass needs for a batch: its rows (for transformers: ids, positions, image features:
    the vision tower ran once; a backend without sgl-side rows: None per item), the guides' view of each item, and,
    per guide that ranks before the language model, each item's scores."""

    works: list
    rows: list
    items: list  # GuideItem per work
    scores: dict[str, list]  # guide name -> per item (guides of another kind: absent)

    @classmethod
    def join(cls, parts: list["LargeInputs"]) -> "LargeInputs":
        """The inputs of several calls as one, in order (the scores of the guides every part has)."""
        names = [g for g in (parts[0].scores if parts else {}) if all(g in p.scores for p in parts)]
        return cls([w for p in parts for w in p.works], [r for p in parts for r in p.rows],
                   [i for p in parts for i in p.items], {g: [s for p in parts for s in p.scores[g]] for g in names})

    def select(self, works: list) -> "LargeInputs":
        """The inputs of a subset of the works (same objects), in the subset's order."""
        index = {id(w): i for i, w in enumerate(self.works)}
        picked = [index[id(w)] for w in works]
        return LargeInputs(list(works), [self.rows[i] for i in picked], [self.items[i] for i in picked],
                           {g: [s[i] for i in picked] for g, s in self.scores.items()})


@dataclass
class Reduced:
    """What the large model saw of one item under a guide that reduces its input (`Kind.REDUCES`)."""

    encoding: dict  # the large model's processor output of the images it was given (the item's own when unchanged)
    image_sizes: list[tuple[int, int]]  # (width, height) of each image as encoded
    n_visual: int  # the visual tokens the large model received (all kept)
    pooled: tuple[int, int] | None = None  # (rows, cols) of the pooled feature grid (fixed-resolution towers)
    pooled_from: tuple[int, int] | None = None  # (rows, cols) of the grid it was pooled from

    def grids(self, model) -> list:
        """The token grids of what the large model saw (`model`: the large backend), as `sgl inspect` draws
        them."""
        from ..families.base import one_grid

        if self.pooled is not None:
            (r, c), (r0, c0) = self.pooled, self.pooled_from
            return [one_grid("pooled", r, c, f"the {r0} x {c0} feature grid average-pooled to {r} x {c}")]
        return model.family.token_grids(model.model, self.encoding, self.image_sizes, model.processor)


@dataclass
class Answer:
    """The large model's answer to one item under one guide: from the visual tokens the guide ranked and kept
    (`scores`, `kept`), or from the input it reduced (`reduced`, every token of it kept: no scores). `error`: the
    item failed alone (the others of its batch are answered)."""

    tokens: list[int]
    scores: "torch.Tensor | None" = None  # (N,) the guide's scores (None for a reduced input)
    kept: "torch.Tensor | None" = None  # kept visual-token indices in sequence order (None for a reduced input)
    reduced: Reduced | None = None
    error: str | None = None

    @property
    def n_kept(self) -> int:
        return self.reduced.n_visual if self.reduced is not None else len(self.kept)


@dataclass
class SmallAnswer:
    """The small model's greedy answer to one item: its tokens (EOS included when produced), each one's
    probability, the SGP importance of the item's visual tokens ((N,) fp32 on the host; None when not captured),
    and what `reread` needs of the item (opaque to the engine)."""

    tokens: list[int]
    probs: list[float]
    importance: "torch.Tensor | None"
    state: Any = field(default=None, repr=False, compare=False)
