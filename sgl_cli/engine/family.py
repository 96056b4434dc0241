"""Model-family adapters: the only place that knows how a family lays out prompts, images and positions.

An adapter answers a few questions for the family-agnostic engine:
- `encode`: (image, prompt) -> processor inputs, through the checkpoint's own chat template;
- `visual_mask`: which columns are visual tokens (ranked and pruned); `placeholders`: which columns take image
  features (a superset: LLaVA-NeXT/OneVision's `image_newline` rows are placeholders but not visual tokens,
  they are always kept like text);
- `position_ids`: the full sequence's position ids, (P, S) (P = 3 for Qwen's M-RoPE, else 1);
- `rows`: one `Row` per item (ids, positions, image features in placeholder order, plus whatever travels with
  the features: Qwen3-VL's deepstack features) and `pack`, how the model takes features as `mm_encoder_outputs`;
- `cls_layer` / `merge_patch_scores`: the vision attention module whose output feeds the projector, its [CLS]
  query, and how per-patch scores of each crop become per-visual-token scores;
- `token_grid`: (rows, cols) of an image whose visual tokens form one raster grid (Qwen, LLaVA-1.5, a one-tile
  InternVL image); multi-crop layouts raise ValueError (`LlavaNext.layout` and `InternVL.layout` describe them);
- `token_grids`: every image as the grids `sgl inspect` draws, each covering the whole image: one grid, or
  LLaVA-NeXT/OneVision's base crop and its packed high-res crops, or InternVL's tiles in place and thumbnail.

Feeding a pruned sequence is the same for every family: keep rows of the features and columns of the ids, pass
the features as `mm_encoder_outputs` and the gathered position ids explicitly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import hf
from .errors import ModelLoadError


def _cat_pixels(encs: list[dict], device) -> torch.Tensor:
    """Every item's crops (tiles) as one (crops, C, H, W) batch; one image per item."""
    return torch.cat([e["pixel_values"].flatten(0, e["pixel_values"].dim() - 4) for e in encs]).to(device)


@dataclass(frozen=True)
class TokenGrid:
    """One grid of an image's visual tokens, as the model lays them out; every grid covers the whole image."""

    name: str  # "image" (the one grid), "base" / "high-res" (LLaVA-NeXT/OneVision), "tiles" / "thumbnail" (InternVL)
    tokens: torch.Tensor  # (rows, cols) long: the visual-token index (0..N-1, sequence order) at each cell
    crops: torch.Tensor  # (rows, cols) long: the crop or tile each cell's token comes from (pixel_values order)
    about: str = ""  # what the grid is, a few words
    crop_grid: tuple[int, int] | None = None  # (rows, cols) of the crops or tiles tiled into it, when several


def _one_grid(name: str, rows: int, cols: int, about: str, first: int = 0, crop: int = 0) -> TokenGrid:
    return TokenGrid(name, torch.arange(first, first + rows * cols).view(rows, cols),
                     torch.full((rows, cols), crop, dtype=torch.long), about)


class Family:
    """Defaults shared by the families: 1-D positions, every placeholder a visual token, chat-template prompts."""

    name = "family"
    model_types: tuple[str, ...] = ()
    position_dims = 1

    def image_token_id(self, model) -> int:
        return int(model.config.image_token_id)

    def encode(self, processor, image, prompt: str) -> dict:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return dict(processor(text=[text], images=[image], return_tensors="pt"))

    def placeholders(self, model, enc: dict) -> torch.Tensor:
        """(S,) bool: the columns image features fill, in order."""
        return enc["input_ids"][0] == self.image_token_id(model)

    def visual_mask(self, model, enc: dict) -> torch.Tensor:
        """(S,) bool: the visual tokens (ranked, pruned). Marker placeholders (newlines) are not among them."""
        return self.placeholders(model, enc)

    def position_ids(self, model, enc: dict) -> torch.Tensor:
        return torch.arange(enc["input_ids"].shape[1])[None]

    def image_features(self, model, encs: list[dict]) -> list[torch.Tensor]:
        """Per item, its (n_placeholders_i, hidden) language-model image features, one vision-tower call."""
        raise NotImplementedError

    def features(self, model, encs: list[dict]) -> list[tuple[torch.Tensor, tuple]]:
        """Per item, (features, extra per-placeholder features that travel with them)."""
        return [(f, ()) for f in self.image_features(model, encs)]

    pack = None  # how the model takes features as `mm_encoder_outputs["image"]` (None: pooler_output=(feats,))

    def rows(self, model, encs: list[dict]):
        from .generate import Row

        return [Row(e["input_ids"][0], self.position_ids(model, e), f, self.placeholders(model, e), extra, self.pack)
                for e, (f, extra) in zip(encs, self.features(model, encs))]

    def token_grid(self, model, enc: dict) -> tuple[int, int]:
        raise ValueError(f"{self.name} images are not one token grid")

    def token_grids(self, model, enc: dict, image_size: tuple[int, int] | None = None,
                    processor=None) -> list[TokenGrid]:
        """The grids of one encoded item's visual tokens (`image_size`: (width, height) of the image the processor
        was given; `processor`: the model's; only InternVL's tiling needs them). One grid by default."""
        rows, cols = self.token_grid(model, enc)
        return [_one_grid("image", rows, cols, "the image's merged patches in raster order")]

    # The methods of `model.model` this family calls (probed at load time by `check`).
    model_methods: tuple[str, ...] = ("get_image_features",)

    def check(self, model) -> None:
        """Raise IncompatibleTransformers when this transformers' model lacks a method or helper the family uses."""
        for method in self.model_methods:
            if not callable(getattr(model.model, method, None)):
                raise hf.incompatible(f"{type(model.model).__name__}.{method} is gone")

    def check_prune_layer(self, model, k: int) -> None:
        """Raise ValueError when pruning inside the language model at layer k > 0 cannot work for this model."""

    def cls_layer(self, model) -> tuple[torch.nn.Module, int | None]:
        raise NotImplementedError(f"the cls guide is not available for {self.name}")

    def merge_patch_scores(self, model, per_image: list[torch.Tensor], encs: list[dict]) -> list[torch.Tensor]:
        raise NotImplementedError(f"the cls guide is not available for {self.name}")


# -- Qwen2-VL, Qwen2.5-VL, Qwen3-VL -------------------------------------------------------------------------------
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

    def _vision_output(self, model, encs: list[dict]):
        device = model.model.visual.device
        pixel_values = torch.cat([e["pixel_values"] for e in encs]).to(device)
        grid = torch.cat([e["image_grid_thw"] for e in encs]).to(device)
        return model.model.get_image_features(pixel_values, grid, return_dict=True)

    def image_features(self, model, encs: list[dict]) -> list[torch.Tensor]:
        # One image per item: image i belongs to item i.
        return list(self._vision_output(model, encs).pooler_output)

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
        return list(groups.split([int(g.prod()) // merge for g in grid]))


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
        deep = out.deepstack_features or []
        return [(f, tuple(level[i] for level in deep)) for i, f in enumerate(out.pooler_output)]

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


# -- LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision ----------------------------------------------------------------------
def _feature_layer(model) -> int:
    """The vision encoder layer whose output feeds the projector (`vision_feature_layer`: hidden_states index;
    a list concatenates several layers, the deepest one is used)."""
    cfg = model.config
    layer = cfg.vision_feature_layer
    layer = max(layer, key=lambda i: i % (cfg.vision_config.num_hidden_layers + 1)) if isinstance(layer, (list, tuple)) \
        else layer
    n = cfg.vision_config.num_hidden_layers
    index = layer % (n + 1) - 1  # hidden_states[0] is the embeddings, hidden_states[i] the output of layer i - 1
    if index < 0:
        raise ValueError(f"vision_feature_layer {layer} is the embeddings, not an attention layer")
    return index


class Llava(Family):
    """LLaVA-1.5: one square crop through a CLIP tower ([CLS] at index 0), features of `vision_feature_layer`
    (-2) without [CLS] ("default" strategy), one placeholder per patch, 1-D positions."""

    name = "llava"
    model_types = ("llava",)

    def _side(self, model) -> int:
        vc = model.config.vision_config
        return vc.image_size // vc.patch_size

    def _device(self, model):
        return next(model.model.vision_tower.parameters()).device

    def image_features(self, model, encs: list[dict]) -> list[torch.Tensor]:
        out = model.model.get_image_features(pixel_values=_cat_pixels(encs, self._device(model)), return_dict=True)
        return list(out.pooler_output)

    def token_grid(self, model, enc: dict) -> tuple[int, int]:
        side = self._side(model)
        return side, side

    def _encoder_layers(self, model):
        tower = model.model.vision_tower
        return getattr(tower, "vision_model", tower).encoder.layers  # older transformers wrap a `vision_model`

    def _has_cls(self, model) -> bool:
        return model.config.vision_config.model_type == "clip_vision_model"

    def cls_layer(self, model) -> tuple[torch.nn.Module, int | None]:
        """CLIP: the [CLS] query (index 0) of the layer feeding the projector (FasterVLM); SigLIP has no [CLS]."""
        return self._encoder_layers(model)[_feature_layer(model)].self_attn, 0 if self._has_cls(model) else None

    def _crop_scores(self, model, scores: torch.Tensor) -> torch.Tensor:
        """(side*side,) scores of one crop's patches: [CLS] dropped when the features drop it."""
        if self._has_cls(model) and model.config.vision_feature_select_strategy == "default":
            return scores[1:]
        return scores

    def merge_patch_scores(self, model, per_image: list[torch.Tensor], encs: list[dict]) -> list[torch.Tensor]:
        return [self._crop_scores(model, s) for s in per_image]


class LlavaNext(Llava):
    """LLaVA-NeXT (anyres): a base crop of the whole image, then the crops of the best-fitting pinpoint grid, which
    the model unpads and ends row by row with an `image_newline` placeholder. Newline placeholders are not visual
    tokens: they are always kept. The layout (crop, row, col of each placeholder) is read by running the model's
    own `pack_image_features` on coordinates instead of features, so it is exactly the model's."""

    name = "llava-next"
    model_types = ("llava_next",)
    model_methods = ("get_image_features", "pack_image_features")

    def check(self, model) -> None:
        super().check(model)
        hf.anyres_helpers(model.config.model_type)

    def _n_crops(self, model, image_size) -> int:
        cfg = model.config
        num_patches, _ = hf.anyres_helpers(cfg.model_type)
        return num_patches(image_size=image_size, grid_pinpoints=cfg.image_grid_pinpoints,
                           patch_size=cfg.vision_config.image_size)

    def _pack(self, model, crops: list[torch.Tensor], image_sizes, newline: torch.Tensor) -> list[torch.Tensor]:
        feats, _ = model.model.pack_image_features(crops, image_sizes, model.config.vision_feature_select_strategy,
                                                   image_newline=newline)
        return feats

    def layout(self, model, enc: dict) -> torch.Tensor:
        """(n_placeholders, 3) float: (crop, row, col) of each placeholder (crop 0 is the base image); NaN for
        newlines. Rows and cols count patches within the crop."""
        side = self._side(model)
        n = self._n_crops(model, enc["image_sizes"][0])
        crop, row, col = torch.meshgrid(torch.arange(n), torch.arange(side), torch.arange(side), indexing="ij")
        coords = torch.stack([crop, row, col], dim=-1).reshape(n, side * side, 3).double()
        (packed,) = self._pack(model, [coords], enc["image_sizes"], torch.full((3,), math.nan, dtype=torch.double))
        return packed

    def visual_mask(self, model, enc: dict) -> torch.Tensor:
        slots = self.placeholders(model, enc)
        newline = self.layout(model, enc)[:, 0].isnan()
        if len(newline) != int(slots.sum()):
            raise ValueError(f"{int(slots.sum())} image placeholders but the model packs {len(newline)} features")
        visual = slots.clone()
        visual[slots.nonzero()[newline, 0]] = False
        return visual

    def image_features(self, model, encs: list[dict]) -> list[torch.Tensor]:
        device = self._device(model)
        sizes = torch.cat([e["image_sizes"] for e in encs]).to(device)
        out = model.model.get_image_features(pixel_values=_cat_pixels(encs, device), image_sizes=sizes,
                                             return_dict=True)
        return list(out.pooler_output)

    def token_grid(self, model, enc: dict) -> tuple[int, int]:
        n = self._n_crops(model, enc["image_sizes"][0])
        if n != 1:
            raise ValueError(f"this image has {n} {self.name} crops (a base image and an unpadded crop grid), "
                             "not one token grid")
        return super().token_grid(model, enc)

    def token_crops(self, model, enc: dict) -> torch.Tensor:
        """(N,) long: the crop each visual token comes from (0: the base image; with anyres_max_9 resizing, the
        nearest crop). For a per-crop budget (top-k within each crop)."""
        lay = self.layout(model, enc)
        return lay[~lay[:, 0].isnan(), 0].round().long()

    def crop_grid(self, model, enc: dict) -> tuple[int, int]:
        """(rows, cols) of the high-res crops, as the model reshapes them before unpadding."""
        cfg = model.config
        size = enc["image_sizes"][0]
        _, grid_shape = hf.anyres_helpers(cfg.model_type)
        return tuple(int(v) for v in grid_shape(size.tolist() if hasattr(size, "tolist") else list(size),
                                                cfg.image_grid_pinpoints, cfg.vision_config.image_size))

    def token_grids(self, model, enc: dict, image_size=None, processor=None) -> list[TokenGrid]:
        """One crop: the one grid. Several: the base image (crop 0, side x side) and the high-res grid, the crops
        tiled in their places, unpadded (and for OneVision possibly resized) exactly as the model packs them: one
        row of the high-res grid per `image_newline` placeholder, which is not a visual token and is not drawn."""
        if self._n_crops(model, enc["image_sizes"][0]) == 1:
            return super().token_grids(model, enc, image_size, processor)
        side = self._side(model)
        lay = self.layout(model, enc)
        newline = lay[:, 0].isnan()
        index = torch.cumsum(~newline, 0) - 1  # each placeholder's visual-token index (newlines: the one before)
        n_base = side * side
        base = lay[:n_base]
        if bool(newline[:n_base].any()) or not torch.equal(base[:, 0], torch.zeros(n_base, dtype=base.dtype)):
            raise ValueError(f"{self.name}: the packed features do not start with the {side} x {side} base crop")
        grid = _one_grid("base", side, side, "the whole image resized to one crop")
        grid.tokens[base[:, 1].long(), base[:, 2].long()] = torch.arange(n_base)  # the model's order, checked
        grids = [grid]
        rest, rest_nl = lay[n_base:], newline[n_base:]
        ends = rest_nl.nonzero().flatten().tolist()
        if not ends or ends[-1] != len(rest) - 1:
            raise ValueError(f"{self.name}: the high-res features do not end rows with image_newline")
        starts = [0] + [e + 1 for e in ends[:-1]]
        widths = {e - s for s, e in zip(starts, ends)}
        if len(widths) != 1:
            raise ValueError(f"{self.name}: the high-res rows have different lengths {sorted(widths)}")
        rows, cols = len(ends), widths.pop()
        keep = ~rest_nl
        crop_rows, crop_cols = self.crop_grid(model, enc)
        coords = rest[keep, 1:]
        resized = bool((coords != coords.round()).any())
        about = (f"the {crop_rows} x {crop_cols} crops in their places, unpadded"
                 + (" and resized (anyres_max_9)" if resized else "")
                 + f" as the model packs them ({rows} image-newline tokens: not visual, not drawn)")
        grids.append(TokenGrid("high-res", index[n_base:][keep].view(rows, cols),
                               rest[keep, 0].round().long().view(rows, cols), about, (crop_rows, crop_cols)))
        return grids

    def merge_patch_scores(self, model, per_image: list[torch.Tensor], encs: list[dict]) -> list[torch.Tensor]:
        """Per item, (N,) scores in placeholder order: each crop's patch scores, packed (unpadded, and for
        OneVision resized when the crop grid is too large) exactly as the model packs its features."""
        out, i = [], 0
        for enc in encs:
            n = self._n_crops(model, enc["image_sizes"][0])
            crops = torch.stack([self._crop_scores(model, s) for s in per_image[i:i + n]])[..., None].double()
            i += n
            (packed,) = self._pack(model, [crops], enc["image_sizes"], torch.full((1,), math.nan, dtype=torch.double))
            packed = packed[:, 0]
            out.append(packed[~packed.isnan()].float())
        return out


class LlavaOnevision(LlavaNext):
    """LLaVA-OneVision: LLaVA-NeXT's anyres layout with a SigLIP tower (no [CLS]: the cls guide uses the mean
    attention each patch receives) and `anyres_max_9`: crop grids larger than about 9 crops are resized
    (bilinear) before packing, and so are the cls scores (a weighted mean of the neighbouring patches' scores)."""

    name = "llava-onevision"
    model_types = ("llava_onevision",)

    def _pack(self, model, crops, image_sizes, newline):
        feats, _ = model.model.pack_image_features(crops, image_sizes, image_newline=newline,
                                                   vision_aspect_ratio=model.config.vision_aspect_ratio)
        return feats


# -- InternVL ----------------------------------------------------------------------------------------------------
class InternVL(Family):
    """InternVL (transformers-native, InternVL3 `-hf` checkpoints): dynamic tiles of the image plus a thumbnail,
    each through InternViT ([CLS] at index 0), pixel shuffle (2x2 patches -> one token), `<img>`...`</img>`
    around the placeholders (not visual tokens), 1-D positions."""

    name = "internvl"
    model_types = ("internvl",)
    model_methods = ("get_image_features", "pixel_shuffle")

    def check(self, model) -> None:
        super().check(model)
        hf.optimal_tiled_canvas()

    def _device(self, model):
        return next(model.model.vision_tower.parameters()).device

    def _side(self, model) -> int:
        """Patches per side of one tile."""
        vc = model.config.vision_config
        size = vc.image_size[0] if isinstance(vc.image_size, (list, tuple)) else vc.image_size
        patch = vc.patch_size[0] if isinstance(vc.patch_size, (list, tuple)) else vc.patch_size
        return size // patch

    def image_features(self, model, encs: list[dict]) -> list[torch.Tensor]:
        out = model.model.get_image_features(pixel_values=_cat_pixels(encs, self._device(model)), return_dict=True)
        feats = out.pooler_output  # (tiles, tokens per tile, hidden)
        tiles = [e["pixel_values"].shape[0] for e in encs]
        return [f.reshape(-1, f.shape[-1]) for f in feats.split(tiles)]

    @staticmethod
    def pack(feats: torch.Tensor, deepstack: tuple):
        return hf.pooled_output(feats)  # InternVL takes one tensor, not a tuple per image

    def token_grid(self, model, enc: dict) -> tuple[int, int]:
        if enc["pixel_values"].shape[0] != 1:
            raise ValueError(f"this image has {enc['pixel_values'].shape[0]} InternVL tiles, not one token grid")
        side = int(round(self._side(model) * model.config.downsample_ratio))
        return side, side

    def layout(self, model, enc: dict) -> torch.Tensor:
        """(n_placeholders, 3) float: (tile, row, col) of each placeholder: its tile (pixel_values order: the tiles
        in raster order of the tile grid, then the thumbnail when there are several) and the token's row and
        column in that tile's token grid. Read by running the model's own pixel shuffle on patch coordinates, so
        the order within a tile is exactly the model's."""
        side = self._side(model)
        r, c = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        groups = self._shuffle(model, torch.stack([r, c], dim=-1).double()).view(-1, self._groups(model), 2)
        cells = (groups.mean(1) * model.config.downsample_ratio).floor()  # (tokens per tile, 2)
        tiles = enc["pixel_values"].shape[0]
        n = int(self.placeholders(model, enc).sum())
        if n != tiles * len(cells):
            raise ValueError(f"{n} image placeholders but {tiles} tiles of {len(cells)} tokens")
        tile = torch.arange(tiles, dtype=torch.double).repeat_interleave(len(cells))
        return torch.cat([tile[:, None], cells.repeat(tiles, 1)], dim=1)

    def _groups(self, model) -> int:
        return int(round(1 / model.config.downsample_ratio ** 2))

    def tile_grid(self, processor, image_size: tuple[int, int], tiles: int) -> tuple[int, int]:
        """(rows, cols) of the tile grid of an image of `image_size` (width, height) encoded as `tiles` tiles
        (with the thumbnail): the image processor's own choice of canvas (GOT-OCR2 dynamic tiling)."""
        if tiles == 1:
            return 1, 1
        get_optimal_tiled_canvas = hf.optimal_tiled_canvas()
        ip = getattr(processor, "image_processor", processor)
        size = ip.size
        height = size["height"] if isinstance(size, dict) else size.height
        width = size["width"] if isinstance(size, dict) else size.width
        w, h = image_size
        cols, rows = get_optimal_tiled_canvas((h, w), (height, width), int(ip.min_patches), int(ip.max_patches))
        if rows * cols + 1 != tiles:
            raise ValueError(f"{self.name}: the processor tiles a {w} x {h} image {rows} x {cols} (+ thumbnail), "
                             f"but the image has {tiles} tiles")
        return rows, cols

    def token_grids(self, model, enc: dict, image_size=None, processor=None) -> list[TokenGrid]:
        """One tile: the one grid. Several: the tiles in their places in the tile grid (one grid of
        rows * side x cols * side tokens) and the thumbnail (the whole image as one more tile)."""
        tiles = enc["pixel_values"].shape[0]
        if tiles == 1:
            return super().token_grids(model, enc, image_size, processor)
        if image_size is None or processor is None:
            raise ValueError(f"{self.name}: laying out {tiles} tiles needs the image size and the processor")
        rows, cols = self.tile_grid(processor, image_size, tiles)
        lay = self.layout(model, enc).long()
        side = int(lay[:, 1].max()) + 1
        tokens = torch.full((rows * side, cols * side), -1, dtype=torch.long)
        crops = torch.full_like(tokens, -1)
        index = torch.arange(len(lay))
        main = lay[:, 0] < tiles - 1
        t, r, c = lay[main].unbind(1)
        y, x = (t // cols) * side + r, (t % cols) * side + c
        tokens[y, x], crops[y, x] = index[main], t
        if bool((tokens < 0).any()):
            raise ValueError(f"{self.name}: the {rows} x {cols} tiles do not fill their grid")
        thumb = _one_grid("thumbnail", side, side, "the whole image as one more tile", first=int(index[~main][0]),
                          crop=tiles - 1)
        _, r, c = lay[~main].unbind(1)
        thumb.tokens[r, c] = index[~main]
        about = f"the {rows} x {cols} tiles of {side} x {side} tokens in their places"
        return [TokenGrid("tiles", tokens, crops, about, (rows, cols)), thumb]

    def cls_layer(self, model) -> tuple[torch.nn.Module, int | None]:
        n = model.config.vision_config.num_hidden_layers
        layer = model.config.vision_feature_layer
        index = n - 1 if layer == -1 else layer % (n + 1) - 1
        return model.model.vision_tower.encoder.layer[index].attention, 0

    def _shuffle(self, model, grid: torch.Tensor) -> torch.Tensor:
        """(side, side, C) per-patch values -> (tokens, C * groups) through the model's own pixel shuffle."""
        out = model.model.pixel_shuffle(grid[None], scale_factor=model.config.downsample_ratio)
        return out.reshape(-1, out.shape[-1])

    def merge_patch_scores(self, model, per_image: list[torch.Tensor], encs: list[dict]) -> list[torch.Tensor]:
        """Per item, (N,) scores: per tile, the patch scores (without [CLS]) summed over each pixel-shuffle group."""
        side = self._side(model)
        tiles = [e["pixel_values"].shape[0] for e in encs]
        drop = 1 if model.config.vision_feature_select_strategy == "default" else 0
        per_tile = [self._shuffle(model, s[drop:].view(side, side, 1).double()).sum(-1).float() for s in per_image]
        out, i = [], 0
        for n in tiles:
            out.append(torch.cat(per_tile[i:i + n]))
            i += n
        return out


FAMILIES = (QwenVL(), Qwen3VL(), Llava(), LlavaNext(), LlavaOnevision(), InternVL())


def family_for(model) -> Family:
    model_type = model.config.model_type
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    supported = ", ".join(t for f in FAMILIES for t in f.model_types)
    raise ModelLoadError(f"model type {model_type!r} is not supported by sgl; supported: {supported}")
