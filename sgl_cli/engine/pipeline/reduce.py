"""The large model's input as a guide that reduces it makes it (`Guide.reduces_input`: the downsample guide).

Each item's images go through `guide.prepare_images` (resized before the vision tower) and are encoded again when
they changed; one vision-tower call; then `guide.pool_rows` (features pooled after it, for fixed-resolution
towers). Every token of the result is kept: nothing is ranked or dropped.
"""

from __future__ import annotations

from ..core.generate import Row
from .stages import Reduced, Work


def reduced_rows(m, works: list[Work], guide, retain: float, prompt_suffix: str) -> tuple[list[Row], list[Reduced]]:
    """The large model's (`m`, a LoadedModel) rows of `works` at `retain`, and what it saw of each item."""
    encs, sizes = [], []
    for w in works:
        images = guide.prepare_images(m, list(w.encoded.images), retain)
        same = len(images) == len(w.encoded.images) and all(a is b for a, b in zip(images, w.encoded.images))
        encs.append(w.encoded.large if same else m.family.encode(m.processor, images, w.item.messages(prompt_suffix)))
        sizes.append([im.size for im in images])
    rows = guide.pool_rows(m, m.family.rows(m.model, encs), retain)
    seen = []
    for enc, size, row in zip(encs, sizes, rows):
        if row.grid is not None:  # pooled: from the item's own grid
            n = row.grid[0] * row.grid[1]
            seen.append(Reduced(enc, size, n, row.grid, tuple(m.family.token_grid(m.model, enc))))
        else:
            seen.append(Reduced(enc, size, int(m.family.visual_mask(m.model, enc).sum())))
    return rows, seen
