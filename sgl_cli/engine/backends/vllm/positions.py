"""M-RoPE position ids of a pruned Qwen-VL prompt, as sgl's transformers path gives them (no vLLM import).

The prompt holds only the kept visual tokens. Each keeps its ORIGINAL (t, h, w) position, and the text after an
image continues from the image's original maximum position + 1, so a pruned prompt is numbered exactly as the
full prompt's positions gathered at the kept columns (docs/design.md, "Pruned generation").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ImageSpan:
    """One image in the pruned prompt: where its kept placeholders start, its merged (t, h, w) grid and the kept
    indices into its own t*h*w tokens (raster order, ascending)."""

    offset: int
    grid: tuple[int, int, int]
    kept: torch.Tensor
    # Temporal ids step by this per temporal patch (a video on Qwen2.5-VL: tokens_per_second x seconds per patch,
    # truncated as the models do); 1 for images and Qwen2-VL's videos.
    t_factor: float = 1.0


def pruned_mrope_positions(n_tokens: int, images: list[ImageSpan]) -> tuple[torch.Tensor, int]:
    """(3, n_tokens) position ids of the pruned prompt and vLLM's `mrope_position_delta` (the first generated
    token's position minus its index)."""
    parts: list[torch.Tensor] = []
    column = 0  # next column of the pruned prompt
    start = 0  # position id of the next text token
    for span in sorted(images, key=lambda s: s.offset):
        text = span.offset - column
        if text < 0:
            raise ValueError(f"image placeholders overlap at column {span.offset}")
        parts.append(torch.arange(text).expand(3, text) + start)
        t, h, w = span.grid
        grid = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"))
        if span.t_factor != 1.0:
            grid[0] = (grid[0] * span.t_factor).long()
        top = int(grid[0].max()) + 1  # the full grid's largest temporal id + 1, kept or not
        grid = grid.reshape(3, -1)[:, span.kept.long()]
        parts.append(grid + start + text)
        start += text + max(top, h, w)  # the full grid's maximum position + 1, kept or not
        column = span.offset + len(span.kept)
    if column > n_tokens:
        raise ValueError(f"image placeholders run past the prompt's {n_tokens} tokens")
    parts.append(torch.arange(n_tokens - column).expand(3, n_tokens - column) + start)
    positions = torch.cat(parts, dim=1).long()
    delta = int(positions.max()) + 1 - n_tokens if n_tokens else 0
    return positions, delta


def split_kept(kept: list[int] | None, counts: list[int]) -> list[torch.Tensor]:
    """Item-level kept indices (over all images' visual tokens, concatenated in order) as each image's own
    indices; None keeps every token. Raises ValueError for indices out of range, unsorted or repeated, or an image
    left with none (vLLM needs at least one placeholder per image)."""
    total = sum(counts)
    if kept is None:
        return [torch.arange(n) for n in counts]
    idx = torch.as_tensor(list(kept), dtype=torch.long)
    if idx.ndim != 1 or len(idx) == 0:
        raise ValueError("the kept indices must be a non-empty list of integers")
    if int(idx.min()) < 0 or int(idx.max()) >= total:
        raise ValueError(f"kept indices must lie in 0..{total - 1} (the item's {total} visual tokens)")
    if len(idx) > 1 and not bool((idx[1:] > idx[:-1]).all()):
        raise ValueError("kept indices must be strictly increasing (the visual tokens in sequence order)")
    out, first = [], 0
    for i, n in enumerate(counts):
        mine = idx[(idx >= first) & (idx < first + n)] - first
        if len(mine) == 0:
            raise ValueError(f"image {i + 1} of {len(counts)} keeps none of its {n} visual tokens; the vLLM backend "
                             "needs at least one per image")
        out.append(mine)
        first += n
    return out
