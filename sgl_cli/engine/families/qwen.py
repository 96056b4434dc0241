"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL: one placeholder per merged 2x2 patch, 3-D M-RoPE positions."""

from __future__ import annotations

import math

import torch

from ..core import hf
from .base import Family, TokenGrid, image_processor, one_grid, per_item


class QwenVL(Family):
    """Qwen2-VL and Qwen2.5-VL: one placeholder per merged 2x2 patch, 3-D M-RoPE positions (t, h, w)."""

    name = "qwen-vl"
    model_types = ("qwen2_vl", "qwen2_5_vl")
    model_methods = ("get_image_features", "get_rope_index")
    position_dims = 3

    def check(self, model) -> None:
        super().check(model)
        if getattr(model.config.vision_config, "fullatt_block_indexes", None) is not None:  # windowed tower
            hf.window_index_function(model.model.visual)

    def n_images(self, model, enc: dict) -> int:
        return len(enc["image_grid_thw"])

    def max_image_pixels(self, processor) -> int | None:
        size = getattr(getattr(processor, "image_processor", processor), "size", None)
        size = size if isinstance(size, dict) else getattr(size, "__dict__", {})
        value = size.get("longest_edge") or size.get("max_pixels")
        return int(value) if value else None

    def position_ids(self, model, enc: dict) -> torch.Tensor:
        """(3, S) M-RoPE ids of one encoded item; text after the image resumes at start + max(h, w)."""
        pos, _ = model.model.get_rope_index(
            enc["input_ids"],
            mm_token_type_ids=enc["mm_token_type_ids"],
            image_grid_thw=enc["image_grid_thw"],
            attention_mask=enc.get("attention_mask"),
        )
        return pos[:, 0]

    def token_grid(self, model, enc: dict) -> tuple[int, int]:
        """(rows, cols) of one encoded image's visual tokens: merged patches, in raster order."""
        if self.n_images(model, enc) != 1:
            raise ValueError(f"this item has {self.n_images(model, enc)} images, not one token grid")
        return self._grid(model, enc["image_grid_thw"][0])

    def _grid(self, model, thw) -> tuple[int, int]:
        _, h, w = (int(v) for v in thw)
        merge = int(model.config.vision_config.spatial_merge_size)
        return h // merge, w // merge

    def token_grids(self, model, enc: dict, image_sizes=None, processor=None) -> list[TokenGrid]:
        """One grid per image (merged patches in raster order), its tokens after the images before it."""
        grids, first = [], 0
        for i, thw in enumerate(enc["image_grid_thw"]):
            rows, cols = self._grid(model, thw)
            grids.append(one_grid("image", rows, cols, "the image's merged patches in raster order", first=first,
                                  crop=i, image=i))
            first += rows * cols
        return grids

    def _vision_output(self, model, encs: list[dict]):
        device = model.model.visual.device
        pixel_values = torch.cat([e["pixel_values"] for e in encs]).to(device)
        grid = torch.cat([e["image_grid_thw"] for e in encs]).to(device)
        return model.model.get_image_features(pixel_values, grid, return_dict=True)

    def image_features(self, model, encs: list[dict]) -> list[torch.Tensor]:
        per_image = self._vision_output(model, encs).pooler_output  # one tensor per image, items in order
        return [torch.cat(f) for f in per_item(per_image, [self.n_images(model, e) for e in encs])]

    def image_tokens(self, model, processor, size: tuple[int, int]) -> int:
        """Merged patches of the size the processor resizes the image to (its `smart_resize`)."""
        ip = image_processor(processor)
        w, h = size
        return int(ip.get_number_of_image_patches(h, w, {})) // int(ip.merge_size) ** 2

    def smaller_sizes(self, model, processor, size: tuple[int, int]) -> list[tuple[int, int]]:
        """Whole merged patches (multiples of patch x merge pixels, which the processor keeps as they are), the
        aspect ratio kept to within one token: (cols, rows) with |cols - rows x aspect| <= 1, for every rows up to
        the image's own."""
        ip = image_processor(processor)
        factor = int(ip.patch_size) * int(ip.merge_size)
        w, h = size
        aspect = w / h
        out = []
        for rows in range(1, max(1, round(h / factor)) + 1):
            for cols in range(max(1, math.ceil(rows * aspect - 1)), math.floor(rows * aspect + 1) + 1):
                if max(cols, rows) / min(cols, rows) < 200:  # the processor refuses more extreme aspects
                    out.append((cols * factor, rows * factor))
        return out

    def cls_layer(self, model) -> tuple[torch.nn.Module, int | None]:
        """The vision attention module whose output feeds the merger, and its [CLS] query (None: no [CLS]).

        The Qwen ViT has no [CLS]; its last full-attention block (every block in Qwen2-VL and Qwen3-VL) feeds
        the merger.
        """
        visual = model.model.visual
        full = getattr(model.config.vision_config, "fullatt_block_indexes", None)
        return visual.blocks[max(full) if full else -1].attn, None

    def merge_patch_scores(self, model, per_image: list[torch.Tensor], encs: list[dict]) -> list[torch.Tensor]:
        """Per item, (N_i,) visual-token scores: each merged token sums the scores of its merge x merge
        patches. Qwen2.5-VL's tower runs in window order, so the scores are put back in raster order."""
        merge = int(model.config.vision_config.spatial_merge_size) ** 2
        grid = torch.cat([e["image_grid_thw"] for e in encs])
        groups = torch.cat(per_image).view(-1, merge).sum(1)
        if getattr(model.config.vision_config, "fullatt_block_indexes", None) is not None:  # a windowed tower
            groups = groups[torch.argsort(hf.vision_window_index(model.model.visual, grid).cpu())]
        images = groups.split([int(g.prod()) // merge for g in grid])
        return [torch.cat(s) for s in per_item(images, [self.n_images(model, e) for e in encs])]


class Qwen3VL(QwenVL):
    """Qwen3-VL: Qwen2-VL's layout with patch 16, plus deepstack features (one per placeholder and level, added to
    the first decoder layers' hidden states), which are gathered with the kept tokens."""

    name = "qwen3-vl"
    model_types = ("qwen3_vl",)

    def check(self, model) -> None:
        super().check(model)
        hf.deepstack_output(torch.zeros(1, 1), ())

    def features(self, model, encs: list[dict]) -> list[tuple[torch.Tensor, tuple]]:
        out = self._vision_output(model, encs)
        counts = [self.n_images(model, e) for e in encs]
        feats = [torch.cat(f) for f in per_item(out.pooler_output, counts)]
        levels = [[torch.cat(d) for d in per_item(level, counts)] for level in out.deepstack_features or []]
        return [(f, tuple(level[i] for level in levels)) for i, f in enumerate(feats)]

    def check_prune_layer(self, model, k: int) -> None:
        # Deepstack features are added to the visual positions after decoder layers 0..D-1; a sequence pruned
        # before one of those layers no longer lines up with them.
        depth = len(getattr(model.config.vision_config, "deepstack_visual_indexes", None) or [])
        if 0 < k < depth:
            raise ValueError(f"Qwen3-VL adds deepstack features after decoder layers 0..{depth - 1}; prune at layer "
                             f"0 (before the language model) or at a layer >= {depth}, not {k}")

    @staticmethod
    def pack(feats: torch.Tensor, deepstack: tuple):
        return hf.deepstack_output(feats, deepstack)
