"""LLaVA-1.5, LLaVA-NeXT (anyres crops, unpadding, newline placeholders) and LLaVA-OneVision (anyres_max_9)."""

from __future__ import annotations

import math

import torch

from ..core import hf
from .base import Family, TokenGrid, cat_pixels, one_grid


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
        out = model.model.get_image_features(pixel_values=cat_pixels(encs, self._device(model)), return_dict=True)
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
        out = model.model.get_image_features(pixel_values=cat_pixels(encs, device), image_sizes=sizes,
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
        tokens = torch.arange(n_base).view(side, side)
        tokens[base[:, 1].long(), base[:, 2].long()] = torch.arange(n_base)  # the model's order, checked
        grids = [one_grid("base", side, side, "the whole image resized to one crop", tokens=tokens)]
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
