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

from dataclasses import dataclass

import numpy as np
import torch

from ..core import hf


def image_processor(processor):
    return getattr(processor, "image_processor", processor)


def cat_pixels(encs: list[dict], device) -> torch.Tensor:
    """Every item's crops (tiles) as one (crops, C, H, W) batch; one image per item."""
    return torch.cat([e["pixel_values"].flatten(0, e["pixel_values"].dim() - 4) for e in encs]).to(device)


@dataclass(frozen=True)
class TokenGrid:
    """One grid of an image's visual tokens, as the model lays them out; every grid covers the whole image.

    Families build grids from torch tensors; they are stored as numpy arrays, which the views draw from.
    """

    name: str  # "image" (the one grid), "base" / "high-res" (LLaVA-NeXT/OneVision), "tiles" / "thumbnail" (InternVL)
    tokens: np.ndarray  # (rows, cols) int: the visual-token index (0..N-1, sequence order) at each cell
    crops: np.ndarray  # (rows, cols) int: the crop or tile each cell's token comes from (pixel_values order)
    about: str = ""  # what the grid is, a few words
    crop_grid: tuple[int, int] | None = None  # (rows, cols) of the crops or tiles tiled into it, when several
    image: int = 0  # which of the item's images it covers

    def __post_init__(self) -> None:
        for name in ("tokens", "crops"):
            value = getattr(self, name)
            if isinstance(value, torch.Tensor):
                value = value.detach().cpu().numpy()
            object.__setattr__(self, name, np.asarray(value, dtype=np.int64))

    @property
    def shape(self) -> tuple[int, int]:
        rows, cols = self.tokens.shape
        return int(rows), int(cols)

    @property
    def size(self) -> int:
        return int(self.tokens.size)

    @property
    def label(self) -> str:
        return f"{self.name} {self.shape[0]} x {self.shape[1]}"

    def cuts(self) -> tuple[list[int], list[int]]:
        """The rows and columns where a new crop starts along a straight line through the whole grid, when they
        cut it into blocks of one crop each (crops tiled in a grid); else no cuts."""
        crops = self.crops
        rows = [r for r in range(1, crops.shape[0]) if (crops[r] != crops[r - 1]).all()]
        cols = [c for c in range(1, crops.shape[1]) if (crops[:, c] != crops[:, c - 1]).all()]
        for r0, r1 in spans(rows, crops.shape[0]):
            for c0, c1 in spans(cols, crops.shape[1]):
                if len(np.unique(crops[r0:r1, c0:c1])) != 1:
                    return [], []
        return rows, cols


def spans(cuts: list[int], n: int) -> list[tuple[int, int]]:
    edges = [0, *cuts, n]
    return list(zip(edges[:-1], edges[1:]))


def one_grid(name: str, rows: int, cols: int, about: str, first: int = 0, crop: int = 0,
             tokens: torch.Tensor | None = None, image: int = 0) -> TokenGrid:
    """A grid of one crop: `tokens` (rows, cols), by default the indices from `first` on in raster order."""
    tokens = torch.arange(first, first + rows * cols).view(rows, cols) if tokens is None else tokens
    return TokenGrid(name, tokens, torch.full((rows, cols), crop, dtype=torch.long), about, image=image)


def pooled_shape(rows: int, cols: int, budget: int) -> tuple[int, int]:
    """The largest grid of at most `budget` cells whose sides differ by at most one, within rows x cols (the
    squarest pooling of a square grid; a 1 x 1 grid at the least)."""
    best = (1, 1)
    for r in range(1, rows + 1):
        for c in (r - 1, r, r + 1):
            if 1 <= c <= cols and best[0] * best[1] < r * c <= budget:
                best = (r, c)
    return best


def per_item(per_image: list, counts: list[int]) -> list[list]:
    """Per-image values grouped by item (`counts`: images per item, in order)."""
    out, i = [], 0
    for n in counts:
        out.append(list(per_image[i:i + n]))
        i += n
    return out


class Family:
    """Defaults shared by the families: 1-D positions, every placeholder a visual token, chat-template prompts."""

    name = "family"
    model_types: tuple[str, ...] = ()
    position_dims = 1
    max_images: int | None = None  # images one item may have (None: as many as the processor takes)

    def max_image_pixels(self, processor) -> int | None:
        """The most pixels the processor uses of one image (larger pictures are decoded reduced); None: unknown."""
        return None

    def n_images(self, model, enc: dict) -> int:
        """How many images an encoded item holds."""
        return 1

    def image_token_id(self, model) -> int:
        return int(model.config.image_token_id)

    # Whether this family's models take a video (`encode(..., video=)`); the others refuse a video item.
    takes_video = False

    def encode(self, processor, images, prompt: str | list[dict], video=None) -> dict:
        """Processor inputs for one item through the checkpoint's own chat template: `prompt` is the chat turns
        (`Item.messages`; {"type": "image"} parts where the images go, a {"type": "video"} part where the video
        goes), or a question asked of the images in one user turn. `video`: an `io.video.Video` (families that
        take video)."""
        if video is not None:
            raise ValueError(f"{self.name} models in sgl do not take video yet")
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        messages = prompt if isinstance(prompt, list) else [
            {"role": "user", "content": [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return dict(processor(text=[text], images=images, return_tensors="pt"))

    def placeholders(self, model, enc: dict) -> torch.Tensor:
        """(S,) bool: the columns image features fill, in order."""
        return enc["input_ids"][0] == self.image_token_id(model)

    def video_slots(self, model, enc: dict) -> torch.Tensor | None:
        """(n_slots,) bool: the placeholders a video's features fill (None: the item has no video)."""
        return None

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
        from ..core.generate import Row

        rows = []
        for e, (f, extra) in zip(encs, self.features(model, encs)):
            pos = self.position_ids(model, e)
            rows.append(Row(e["input_ids"][0], pos, f, self.placeholders(model, e), extra, self.pack,
                            video=self.video_slots(model, e), next_pos=int(pos.max()) + 1))
        return rows

    def token_grid(self, model, enc: dict) -> tuple[int, int]:
        raise ValueError(f"{self.name} images are not one token grid")

    def token_grids(self, model, enc: dict, image_sizes: list[tuple[int, int]] | tuple[int, int] | None = None,
                    processor=None) -> list[TokenGrid]:
        """The grids of one encoded item's visual tokens, image by image (`image_sizes`: (width, height) of each
        image the processor was given; `processor`: the model's; only InternVL's tiling needs them). One grid per
        image by default."""
        rows, cols = self.token_grid(model, enc)
        return [one_grid("image", rows, cols, "the image's merged patches in raster order")]

    # -- the downsample guide: fewer visual tokens by a smaller image (or a pooled feature grid), chosen by no model
    # A fixed-resolution tower (LLaVA-1.5) gives every image the same tokens: the guide pools its features instead.
    fixed_resolution = False

    def image_tokens(self, model, processor, size: tuple[int, int]) -> int:
        """The visual tokens one image of `size` (width, height) becomes, by the processor's and the model's own
        arithmetic (no pixels processed)."""
        raise NotImplementedError(f"the downsample guide cannot count {self.name} image tokens")

    def smaller_sizes(self, model, processor, size: tuple[int, int]) -> list[tuple[int, int]]:
        """Sizes (width, height) the downsample guide may resize an image of `size` to, for fewer visual tokens
        (it takes the one whose `image_tokens` come closest to its budget from below)."""
        raise NotImplementedError(f"the downsample guide cannot resize {self.name} images")

    def pool_row(self, model, row, budget: int):
        """`row` (one image through a fixed-resolution tower) with its feature grid average-pooled to at most
        `budget` tokens (`pooled_shape`): fewer placeholders, the grid's shape in `row.grid`."""
        raise NotImplementedError(f"the downsample guide cannot pool {self.name} image features")

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
