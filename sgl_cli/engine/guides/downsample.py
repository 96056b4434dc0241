"""`downsample`: a baseline that ranks nothing. The large model sees the image reduced to about `retain` of its
visual tokens, chosen by no model (the baseline that UniPruneBench and VTC-Bench find hard to beat):

- dynamic-resolution families (Qwen2/2.5/3-VL; InternVL's tiles; LLaVA-NeXT/OneVision's anyres crops): each image
  is resized before the vision tower to the size whose visual tokens, by the processor's and the model's own
  arithmetic (`Family.image_tokens`), come closest to its budget `n_keep(its tokens, retain)` from below, among
  the sizes the family offers (`Family.smaller_sizes`: Qwen, whole merged patches at the image's aspect; InternVL,
  the canvases of its tile grids, so the budget is met in whole tiles; anyres, the image scaled down). Where
  even the smallest size gives more (InternVL's one tile, anyres' base crop plus one crop, Qwen's min_pixels),
  the smallest is taken: the processor allows no fewer.
- fixed-resolution towers (LLaVA-1.5): the projected feature grid is average-pooled (adaptive, 2-D) to the
  squarest grid of at most the budget (rows and columns differ by at most one), and the prompt is renumbered
  0..S'-1, as for an image that has that many tokens (`Family.pool_row`).

Every token of the reduced input is kept (before the language model, prune layer 0); it needs no small model
and never exits early. Records report `retained_tokens` = what the large model received, `visual_tokens` = the
image's own count at full size.
"""

from __future__ import annotations

import math
from typing import ClassVar


from .base import Guide, Kind, n_keep


def target_size(model, size: tuple[int, int], retain: float) -> tuple[int, int] | None:
    """The size (width, height) an image of `size` is resized to for the large model (its backend), or None
    when it stays as it is (the budget is its own token count, or the tower takes a fixed resolution)."""
    fam, proc = model.family, model.processor
    if fam.fixed_resolution:
        return None
    n = fam.image_tokens(model.model, proc, size)
    budget = n_keep(n, retain)
    if budget >= n:
        return None
    aspect = math.log(size[0] / size[1])
    counted = [(fam.image_tokens(model.model, proc, s), abs(math.log(s[0] / s[1]) - aspect), s)
               for s in fam.smaller_sizes(model.model, proc, size)]
    fits = [c for c in counted if c[0] <= budget]
    # The most tokens within the budget; among equals the nearest aspect, then the larger image. Else the fewest.
    best = max(fits, key=lambda c: (c[0], -c[1], c[2][0] * c[2][1])) if fits else \
        min(counted, key=lambda c: (c[0], c[1], -c[2][0] * c[2][1]))
    return None if best[0] >= n else best[2]


class DownsampleGuide(Guide):
    name: ClassVar[str] = "downsample"
    description: ClassVar[str] = "no ranking: the image reduced to the token budget before the large model"
    kind: ClassVar[Kind] = Kind.REDUCES
    # The backend answers from the reduced input (its `generate_reduced`): transformers re-encodes and pools; vLLM
    # is sent the resized images (LLaVA-1.5's pooling, after the vision tower, is transformers' only).
    needs: ClassVar[frozenset[str]] = frozenset({"reduced_input"})

    def prune_layer(self, settings, num_layers: int) -> int:
        return 0  # nothing is dropped inside the language model: it reads the reduced input

    def prepare_images(self, model, images: list, retain: float) -> list:
        from PIL import Image

        out = []
        for image in images:
            size = target_size(model, image.size, retain)
            # Bicubic, as the Qwen, LLaVA and InternVL processors resample (antialiased by PIL when shrinking).
            out.append(image if size is None else image.resize(size, Image.Resampling.BICUBIC))
        return out

    def pool_rows(self, model, rows: list, retain: float) -> list:
        if not model.family.fixed_resolution:
            return rows  # its images were resized instead
        budgets = [n_keep(len(row.feats), retain) for row in rows]
        return [row if budget >= len(row.feats) else model.family.pool_row(model.model, row, budget)
                for row, budget in zip(rows, budgets)]
