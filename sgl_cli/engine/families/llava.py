"""LLaVA-1.5, LLaVA-NeXT (anyres crops, unpadding, newline placeholders) and LLaVA-OneVision (anyres_max_9)."""

from __future__ import annotations

import math

import torch

from ..core import hf
from .base import Family, TokenGrid, cat_pixels, one_grid, per_item, pooled_shape


def _feature_layer(model) -> int:
    """The vision encoder layer whose output feeds the projector (`vision_feature_layer`: hidden_states index;
    a list concatenates several layers, the deepest one is used)."""
    cfg = model.config
    layer = cfg.vision_feature_layer
    layer = (max(layer, key=lambda i: i % (cfg.vision_config.num_hidden_layers + 1))
             if isinstance(layer, (list, tuple)) else layer)
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
    max_images = 1  # one image per prompt, as the model was trained
    fixed_resolution = True

    def max_image_pixels(self, processor) -> int | None:
        vc = getattr(getattr(processor, "image_processor", processor), "crop_size", None)
        vc = vc if isinstance(vc, dict) else getattr(vc, "__dict__", {})
        return int(vc["height"] * vc["width"]) if vc.get("height") and vc.get("width") else None

    def _side(self, model) -> int:
        vc = model.config.vision_config
        return vc.image_size // vc.patch_size

    def _device(self, model):
        return next(model.model.vision_tower.parameters()).device

    def image_features(self, model, encs: list[dict]) -> list[torch.Tensor]:
        out = model.model.get_image_features(pixel_values=cat_pixels(encs, self._device(model)), return_dict=True)
        return list(out.pooler_output)

    def token_grid(self, model, enc: dict) -> tuple[int, int]:
        side = self._side(model)
        return side, side

    def image_tokens(self, model, processor, size: tuple[int, int]) -> int:
        return self._side(model) ** 2  # every image is resized and cropped to the tower's one resolution

    def pool_row(self, model, row, budget: int):
        """The side x side grid of projected features (placeholder order is raster order) average-pooled
        (adaptive, 2-D) to the squarest grid of at most `budget` tokens; the placeholders shrink to rows x cols
        and the positions are renumbered 0..S'-1, as the processor lays out a prompt whose image has that many
        tokens (LLaVA's 1-D positions)."""
        from ..core.generate import Row

        side = self._side(model)
        rows, cols = pooled_shape(side, side, budget)
        slots = row.ids == self.image_token_id(model)
        where = slots.nonzero().flatten()
        if len(where) != side * side or int(where[-1] - where[0]) + 1 != side * side:
            raise ValueError(f"{self.name}: pooling needs one image of {side * side} consecutive placeholders")
        grid = row.feats.float().t().reshape(1, -1, side, side)
        pooled = torch.nn.functional.adaptive_avg_pool2d(grid, (rows, cols)).reshape(-1, rows * cols).t()
        first, last = int(where[0]), int(where[-1]) + 1
        ids = torch.cat([row.ids[:first], torch.full((rows * cols,), self.image_token_id(model), dtype=row.ids.dtype),
                         row.ids[last:]])
        return Row(ids, torch.arange(len(ids))[None], pooled.to(row.feats.dtype), None, (), row.pack, (rows, cols))

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
    """LLaVA-NeXT (anyres): a base crop of each image, then the crops of the best-fitting pinpoint grid, which the
    model unpads and ends row by row with an `image_newline` placeholder. Newline placeholders are not visual
    tokens: they are always kept. The layout (crop, row, col of each placeholder) is read by running the model's
    own `pack_image_features` on coordinates instead of features, so it is exactly the model's. Crops are numbered
    across the item's images in pixel order (image 0's base and high-res crops, then image 1's...)."""

    name = "llava-next"
    model_types = ("llava_next",)
    fixed_resolution = False  # anyres: the image size decides the crops
    model_methods = ("get_image_features", "pack_image_features")

    def check(self, model) -> None:
        super().check(model)
        hf.anyres_helpers(model.config.model_type)

    def n_images(self, model, enc: dict) -> int:
        return len(enc["image_sizes"])

    def max_image_pixels(self, processor) -> int | None:
        pinpoints = getattr(getattr(processor, "image_processor", processor), "image_grid_pinpoints", None)
        return max(h * w for h, w in pinpoints) if pinpoints else super().max_image_pixels(processor)

    def _n_crops(self, model, image_size) -> int:
        cfg = model.config
        num_patches, _ = hf.anyres_helpers(cfg.model_type)
        size = image_size.tolist() if hasattr(image_size, "tolist") else list(image_size)
        return num_patches(image_size=size, grid_pinpoints=cfg.image_grid_pinpoints,
                           patch_size=cfg.vision_config.image_size)

    def image_tokens(self, model, processor, size: tuple[int, int]) -> int:
        """Visual tokens (newlines not counted) of the layout the model packs for an image of `size`: its own
        `pack_image_features` run on the crop coordinates of the image size the processor records."""
        w, h = size
        lay = self._image_layouts(model, {"image_sizes": torch.tensor([[h, w]])})[0]
        return int((~lay[:, 0].isnan()).sum())

    def smaller_sizes(self, model, processor, size: tuple[int, int]) -> list[tuple[int, int]]:
        """The image scaled down in 5% steps, its aspect ratio kept (the processor then picks a smaller pinpoint
        grid, and unpads it to the image's aspect), down to a shorter side of 8 pixels."""
        w, h = size
        out, scale = [], 1.0
        while min(w, h) * scale >= 8:
            candidate = (max(1, round(w * scale)), max(1, round(h * scale)))
            if not out or out[-1] != candidate:
                out.append(candidate)
            scale *= 0.95
        return out

    def _crops_per_image(self, model, enc: dict) -> list[int]:
        return [self._n_crops(model, size) for size in enc["image_sizes"]]

    def _pack(self, model, crops: list[torch.Tensor], image_sizes, newline: torch.Tensor) -> list[torch.Tensor]:
        feats, _ = model.model.pack_image_features(crops, image_sizes, model.config.vision_feature_select_strategy,
                                                   image_newline=newline)
        return feats

    def _image_layouts(self, model, enc: dict) -> list[torch.Tensor]:
        """Per image, (n_placeholders, 3) float: (crop, row, col) of each of its placeholders (crops numbered across
        the item; the image's first crop is its base image); NaN for newlines."""
        side = self._side(model)
        out, first = [], 0
        for j, size in enumerate(enc["image_sizes"]):
            n = self._n_crops(model, size)
            crop, row, col = torch.meshgrid(torch.arange(first, first + n), torch.arange(side), torch.arange(side),
                                            indexing="ij")
            coords = torch.stack([crop, row, col], dim=-1).reshape(n, side * side, 3).double()
            (packed,) = self._pack(model, [coords], enc["image_sizes"][j:j + 1],
                                   torch.full((3,), math.nan, dtype=torch.double))
            out.append(packed)
            first += n
        return out

    def layout(self, model, enc: dict) -> torch.Tensor:
        """(n_placeholders, 3) float: (crop, row, col) of each placeholder, every image in order; NaN for newlines.
        Rows and cols count patches within the crop."""
        return torch.cat(self._image_layouts(model, enc))

    def visual_mask(self, model, enc: dict) -> torch.Tensor:
        slots = self.placeholders(model, enc)
        newline = self.layout(model, enc)[:, 0].isnan()
        if len(newline) != int(slots.sum()):
            raise ValueError(f"{int(slots.sum())} image placeholders but the model packs {len(newline)} features")
        visual = slots.clone()
        visual[slots.nonzero()[newline, 0]] = False
        return visual

    def _pixels(self, model, encs: list[dict], device) -> torch.Tensor:
        """Every image's real crops (the processor pads an item's images to one crop count) as one batch."""
        return torch.cat([e["pixel_values"][j, :n] for e in encs
                          for j, n in enumerate(self._crops_per_image(model, e))]).to(device)

    def image_features(self, model, encs: list[dict]) -> list[torch.Tensor]:
        device = self._device(model)
        sizes = torch.cat([e["image_sizes"] for e in encs]).to(device)
        out = model.model.get_image_features(pixel_values=self._pixels(model, encs, device), image_sizes=sizes,
                                             return_dict=True)
        return [torch.cat(f) for f in per_item(list(out.pooler_output), [self.n_images(model, e) for e in encs])]

    def token_grid(self, model, enc: dict) -> tuple[int, int]:
        crops = self._crops_per_image(model, enc)
        if crops != [1]:
            raise ValueError(f"this item has {sum(crops)} {self.name} crops over {len(crops)} image(s) (a base image "
                             "and an unpadded crop grid each), not one token grid")
        return super().token_grid(model, enc)

    def token_crops(self, model, enc: dict) -> torch.Tensor:
        """(N,) long: the crop each visual token comes from (numbered across the item's images; with anyres_max_9
        resizing, the nearest crop). For a per-crop budget (top-k within each crop)."""
        lay = self.layout(model, enc)
        return lay[~lay[:, 0].isnan(), 0].round().long()

    def crop_grid(self, model, enc: dict, image: int = 0) -> tuple[int, int]:
        """(rows, cols) of an image's high-res crops, as the model reshapes them before unpadding."""
        cfg = model.config
        size = enc["image_sizes"][image]
        _, grid_shape = hf.anyres_helpers(cfg.model_type)
        return tuple(int(v) for v in grid_shape(size.tolist() if hasattr(size, "tolist") else list(size),
                                                cfg.image_grid_pinpoints, cfg.vision_config.image_size))

    def token_grids(self, model, enc: dict, image_sizes=None, processor=None) -> list[TokenGrid]:
        """Per image: one crop, its one grid; several, its base image (side x side) and its high-res grid, the crops
        tiled in their places, unpadded (and for OneVision possibly resized) exactly as the model packs them: one
        row of the high-res grid per `image_newline` placeholder, which is not a visual token and is not drawn."""
        side = self._side(model)
        grids, first = [], 0
        for j, lay in enumerate(self._image_layouts(model, enc)):
            newline = lay[:, 0].isnan()
            index = torch.cumsum(~newline, 0) - 1 + first  # each placeholder's visual-token index
            n_base = side * side
            base = lay[:n_base]
            crop0 = base[0, 0]
            if bool(newline[:n_base].any()) or not torch.equal(base[:, 0], torch.full((n_base,), float(crop0),
                                                                                         dtype=base.dtype)):
                raise ValueError(f"{self.name}: the packed features do not start with the {side} x {side} base crop")
            tokens = torch.arange(first, first + n_base).view(side, side)
            tokens[base[:, 1].long(), base[:, 2].long()] = torch.arange(first, first + n_base)  # the model's order
            name = "image" if len(lay) == n_base else "base"
            about = ("the image's merged patches in raster order" if name == "image"
                     else "the whole image resized to one crop")
            grids.append(one_grid(name, side, side, about, crop=int(crop0), tokens=tokens, image=j))
            first += int((~newline).sum())
            if len(lay) == n_base:
                continue
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
            crop_rows, crop_cols = self.crop_grid(model, enc, j)
            coords = rest[keep, 1:]
            resized = bool((coords != coords.round()).any())
            about = (f"the {crop_rows} x {crop_cols} crops in their places, unpadded"
                     + (" and resized (anyres_max_9)" if resized else "")
                     + f" as the model packs them ({rows} image-newline tokens: not visual, not drawn)")
            grids.append(TokenGrid("high-res", index[n_base:][keep].view(rows, cols),
                                   rest[keep, 0].round().long().view(rows, cols), about, (crop_rows, crop_cols), j))
        return grids

    def merge_patch_scores(self, model, per_image: list[torch.Tensor], encs: list[dict]) -> list[torch.Tensor]:
        """Per item, (N,) scores in placeholder order: each crop's patch scores (`per_image`: one per crop, in the
        tower's batch order), packed (unpadded, and for OneVision resized when the crop grid is too large) exactly
        as the model packs its features, image by image."""
        out, i = [], 0
        for enc in encs:
            item = []
            for j, n in enumerate(self._crops_per_image(model, enc)):
                crops = torch.stack([self._crop_scores(model, s) for s in per_image[i:i + n]])[..., None].double()
                i += n
                (packed,) = self._pack(model, [crops], enc["image_sizes"][j:j + 1],
                                       torch.full((1,), math.nan, dtype=torch.double))
                packed = packed[:, 0]
                item.append(packed[~packed.isnan()].float())
            out.append(torch.cat(item))
        return out


class LlavaOnevision(LlavaNext):
    """LLaVA-OneVision: LLaVA-NeXT's anyres layout with a SigLIP tower (no [CLS]: the cls guide uses the mean
    attention each patch receives) and `anyres_max_9`: crop grids larger than about 9 crops are resized
    (bilinear) before packing, and so are the cls scores (a weighted mean of the neighbouring patches' scores).
    Several images per item."""

    name = "llava-onevision"
    model_types = ("llava_onevision",)
    max_images = None

    def _pack(self, model, crops, image_sizes, newline):
        feats, _ = model.model.pack_image_features(crops, image_sizes, image_newline=newline,
                                                   vision_aspect_ratio=model.config.vision_aspect_ratio)
        return feats
