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
    takes_video = True  # a video's frames through the checkpoint's video processor (`encode`)

    def check(self, model) -> None:
        super().check(model)
        if getattr(model.config.vision_config, "fullatt_block_indexes", None) is not None:  # windowed tower
            hf.window_index_function(model.model.visual)

    def n_images(self, model, enc: dict) -> int:
        return len(enc["image_grid_thw"]) if "image_grid_thw" in enc else 0

    def encode(self, processor, images, prompt, video=None) -> dict:
        """With a video: its sampled frames and their timing (`VideoMetadata`, with the processor's own sampling
        off: the frames are what sgl sampled, and Qwen2.5-VL's temporal positions follow their rate)."""
        if video is None:
            return super().encode(processor, images, prompt)
        vp = getattr(processor, "video_processor", None)
        if vp is None or not callable(vp):
            raise ValueError("this processor has no video processor: transformers' video processors need "
                             "torchvision (pip install torchvision, the build matching your torch)")
        images = list(images) if isinstance(images, (list, tuple)) else ([images] if images is not None else [])
        messages = prompt if isinstance(prompt, list) else [
            {"role": "user", "content": [{"type": "image"} for _ in images] + [{"type": "video"},
                                                                                {"type": "text", "text": prompt}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        kwargs = {"images": images} if images else {}
        return dict(processor(text=[text], videos=[list(video.frames)], return_tensors="pt", do_sample_frames=False,
                              video_metadata=[hf.video_metadata(**video.metadata)], **kwargs))

    def video_token_id(self, model) -> int | None:
        value = getattr(model.config, "video_token_id", None)
        return int(value) if value is not None else None

    def placeholders(self, model, enc: dict) -> torch.Tensor:
        ids = enc["input_ids"][0]
        video = self.video_token_id(model)
        mask = ids == self.image_token_id(model)
        return mask | (ids == video) if video is not None and "video_grid_thw" in enc else mask

    def video_slots(self, model, enc: dict) -> torch.Tensor | None:
        if "video_grid_thw" not in enc:
            return None
        ids = enc["input_ids"][0]
        return ids[self.placeholders(model, enc)] == self.video_token_id(model)

    def max_image_pixels(self, processor) -> int | None:
        size = getattr(getattr(processor, "image_processor", processor), "size", None)
        size = size if isinstance(size, dict) else getattr(size, "__dict__", {})
        value = size.get("longest_edge") or size.get("max_pixels")
        return int(value) if value else None

    def position_ids(self, model, enc: dict) -> torch.Tensor:
        """(3, S) M-RoPE ids of one encoded item; text after the image resumes at start + max(h, w)."""
        video = {k: enc[k] for k in ("video_grid_thw", "second_per_grid_ts") if k in enc}
        if "second_per_grid_ts" in video and not isinstance(video["second_per_grid_ts"], torch.Tensor):
            video["second_per_grid_ts"] = torch.tensor(video["second_per_grid_ts"])
        pos, _ = model.model.get_rope_index(
            enc["input_ids"],
            mm_token_type_ids=enc["mm_token_type_ids"],
            image_grid_thw=enc.get("image_grid_thw"),
            attention_mask=enc.get("attention_mask"),
            **video,
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
        """One grid per image (merged patches in raster order), and one per temporal patch of a video (two frames
        each), in the order the prompt has them, each grid's tokens after those before it. A temporal patch counts
        as a picture after the item's images (`TokenGrid.image`), which the views draw from its first frame."""
        images = iter(enc.get("image_grid_thw", []))
        videos = iter(enc.get("video_grid_thw", []))
        n_pictures = len(enc.get("image_grid_thw", []))
        ids = enc["input_ids"][0]
        video_id = self.video_token_id(model)
        grids, first, n_image = [], 0, 0
        patches: list[tuple[int, int]] = []  # the current video's temporal patches not yet placed: (rows, cols)
        n_patch = 0
        placeholders = self.placeholders(model, enc)
        starts = placeholders.int().diff(prepend=torch.zeros(1, dtype=torch.int)) == 1
        ends = placeholders.int().diff(append=torch.zeros(1, dtype=torch.int)) == -1
        for column, end in zip(starts.nonzero()[:, 0].tolist(), ends.nonzero()[:, 0].tolist()):
            if video_id is not None and int(ids[column]) == video_id and "video_grid_thw" in enc:
                if not patches:
                    thw = next(videos)
                    patches = [self._grid(model, thw)] * int(thw[0])
                # One run of tokens per video (Qwen2-VL, Qwen2.5-VL), or one per temporal patch, each after its
                # timestamp (Qwen3-VL).
                run = end - column + 1
                while patches and run > 0:
                    rows, cols = patches.pop(0)
                    grids.append(one_grid(f"frames {2 * n_patch + 1}-{2 * n_patch + 2}", rows, cols,
                                          "two frames' merged patches in raster order", first=first, crop=n_patch,
                                          image=n_pictures + n_patch))
                    first += rows * cols
                    run -= rows * cols
                    n_patch += 1
            else:
                rows, cols = self._grid(model, next(images))
                grids.append(one_grid("image", rows, cols, "the image's merged patches in raster order", first=first,
                                      crop=n_image, image=n_image))
                first += rows * cols
                n_image += 1
        return grids

    def _vision_output(self, model, encs: list[dict], kind: str = "image"):
        """The tower's output for the items' images (or videos), one call; None when none of them has any."""
        pixels, grid = ("pixel_values", "image_grid_thw") if kind == "image" else ("pixel_values_videos",
                                                                                   "video_grid_thw")
        encs = [e for e in encs if grid in e]
        if not encs:
            return None
        device = model.model.visual.device
        pixel_values = torch.cat([e[pixels] for e in encs]).to(device)
        thw = torch.cat([e[grid] for e in encs]).to(device)
        get = model.model.get_image_features if kind == "image" else model.model.get_video_features
        return get(pixel_values, thw, return_dict=True)

    def _per_item(self, model, encs: list[dict], out, kind: str) -> list[list[torch.Tensor] | None]:
        """Per item, the tensors of one output field's images (or videos) (None: the item has none)."""
        grid = "image_grid_thw" if kind == "image" else "video_grid_thw"
        counts = [len(e[grid]) if grid in e else 0 for e in encs]
        groups = iter(per_item(list(out), [n for n in counts if n]) if out is not None else [])
        return [next(groups) if n else None for n in counts]

    def _features(self, model, encs: list[dict]) -> list[tuple[torch.Tensor, tuple]]:
        """Per item, its features in placeholder order (images and a video interleaved as the prompt has them),
        with their deepstack levels (Qwen3-VL's; none for Qwen2-VL and Qwen2.5-VL)."""
        outs = {kind: self._vision_output(model, encs, kind) for kind in ("image", "video")}
        parts = {}
        for kind, out in outs.items():
            feats = self._per_item(model, encs, out.pooler_output if out is not None else None, kind)
            levels = [self._per_item(model, encs, level, kind)
                      for level in (getattr(out, "deepstack_features", None) or [] if out is not None else [])]
            parts[kind] = (feats, levels)
        result = []
        for i, e in enumerate(encs):
            video = self.video_slots(model, e)
            image_f, video_f = parts["image"][0][i], parts["video"][0][i]
            if video is None:
                feats = torch.cat(image_f)
                extra = tuple(torch.cat(level[i]) for level in parts["image"][1])
            else:
                feats = _interleave(video, image_f, video_f)
                image_levels = parts["image"][1] or [[None] * len(encs)] * len(parts["video"][1])
                extra = tuple(_interleave(video, a[i], b[i]) for a, b in zip(image_levels, parts["video"][1]))
            result.append((feats, extra))
        return result

    def image_features(self, model, encs: list[dict]) -> list[torch.Tensor]:
        return [f for f, _ in self._features(model, encs)]

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
        if any("video_grid_thw" in e for e in encs):
            raise ValueError("the cls guide does not rank a video's tokens yet (sgl, random and fastv do)")
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
        return self._features(model, encs)

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


def _interleave(video: torch.Tensor, images: list[torch.Tensor] | None, videos: list[torch.Tensor]) -> torch.Tensor:
    """(n_slots, hidden): the video's rows where `video` (n_slots,) is True, the images' rows elsewhere, each in
    order."""
    vid = torch.cat(videos)
    out = vid.new_empty((len(video), vid.shape[-1]))
    out[video.to(vid.device)] = vid
    if images:
        out[~video.to(vid.device)] = torch.cat(images)
    return out
