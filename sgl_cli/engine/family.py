"""Model-family adapters: the only place that knows how a family lays out prompts, images and positions.

An adapter answers four questions for the family-agnostic engine: which token id marks a visual placeholder,
how to turn (image, prompt) into processor inputs, the full sequence's position ids, and the visual features
in placeholder order. Feeding a pruned sequence is the same for every family: keep rows of the features and
columns of the ids, pass the features as `mm_encoder_outputs` and the gathered position ids explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import ModelLoadError


@dataclass(frozen=True)
class QwenVL:
    """Qwen2-VL and Qwen2.5-VL: one placeholder per merged 2x2 patch, 3-D M-RoPE positions (t, h, w)."""

    name: str = "qwen-vl"
    model_types: tuple[str, ...] = ("qwen2_vl", "qwen2_5_vl")
    position_dims: int = 3

    def image_token_id(self, model) -> int:
        return int(model.config.image_token_id)

    def encode(self, processor, image, prompt: str) -> dict:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return dict(processor(text=[text], images=[image], return_tensors="pt"))

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
        """(rows, cols) of one encoded item's visual tokens: merged patches, in raster order."""
        _, h, w = (int(v) for v in enc["image_grid_thw"][0])
        merge = int(model.config.vision_config.spatial_merge_size)
        return h // merge, w // merge

    def image_features(self, model, encs: list[dict]) -> list[torch.Tensor]:
        """Per item, its (N_i, hidden) language-model image features, one vision-tower call for all."""
        device = model.model.visual.device
        pixel_values = torch.cat([e["pixel_values"] for e in encs]).to(device)
        grid = torch.cat([e["image_grid_thw"] for e in encs]).to(device)
        out = model.model.get_image_features(pixel_values, grid, return_dict=True)
        per_image = list(out.pooler_output)
        # One image per item: image i belongs to item i.
        return per_image


FAMILIES = (QwenVL(),)


def family_for(model) -> QwenVL:
    model_type = model.config.model_type
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    supported = ", ".join(t for f in FAMILIES for t in f.model_types)
    raise ModelLoadError(f"model type {model_type!r} is not supported by sgl; supported: {supported}")
