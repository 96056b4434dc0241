"""InternVL (transformers-native, InternVL3 `-hf`): dynamic tiles plus a thumbnail, pixel shuffle, 1-D positions."""

from __future__ import annotations

import torch

from ..core import hf
from .base import Family, TokenGrid, cat_pixels, image_processor, one_grid


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
        out = model.model.get_image_features(pixel_values=cat_pixels(encs, self._device(model)), return_dict=True)
        feats = out.pooler_output  # (tiles, tokens per tile, hidden)
        tiles = [e["pixel_values"].shape[0] for e in encs]
        return [f.reshape(-1, f.shape[-1]) for f in feats.split(tiles)]

    @staticmethod
    def pack(feats: torch.Tensor, deepstack: tuple):
        return hf.pooled_output(feats)  # InternVL takes one tensor, not a tuple per image

    def token_grid(self, model, enc: dict) -> tuple[int, int]:
        if enc["pixel_values"].shape[0] != 1:
            raise ValueError(f"this item has {enc['pixel_values'].shape[0]} InternVL tiles, not one token grid")
        side = int(round(self._side(model) * model.config.downsample_ratio))
        return side, side

    def _tokens_per_tile(self, model) -> int:
        return int(round(self._side(model) * model.config.downsample_ratio)) ** 2

    def tiles_per_image(self, model, enc: dict) -> list[int]:
        """Tiles of each image, in order: each image's placeholders are one run between its <img> and </img>."""
        slots = self.placeholders(model, enc).int()
        edges = torch.diff(torch.cat([torch.zeros(1, dtype=torch.int), slots, torch.zeros(1, dtype=torch.int)]))
        starts, ends = (edges == 1).nonzero().flatten(), (edges == -1).nonzero().flatten()
        per_tile = self._tokens_per_tile(model)
        runs = (ends - starts).tolist()
        if any(n % per_tile for n in runs) or sum(runs) // per_tile != enc["pixel_values"].shape[0]:
            raise ValueError(f"{self.name}: image placeholder runs {runs} do not match {enc['pixel_values'].shape[0]} "
                             f"tiles of {per_tile} tokens")
        return [n // per_tile for n in runs]

    def n_images(self, model, enc: dict) -> int:
        return len(self.tiles_per_image(model, enc))

    def max_image_pixels(self, processor) -> int | None:
        ip = getattr(processor, "image_processor", processor)
        size = ip.size if isinstance(ip.size, dict) else getattr(ip.size, "__dict__", {})
        if size.get("height") and size.get("width") and getattr(ip, "max_patches", None):
            return int(size["height"] * size["width"] * ip.max_patches)
        return None

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

    def token_grids(self, model, enc: dict, image_sizes=None, processor=None) -> list[TokenGrid]:
        """Per image: one tile, its one grid; several, the tiles in their places in the tile grid (one grid of
        rows * side x cols * side tokens) and the thumbnail (the whole image as one more tile)."""
        sizes = [image_sizes] if isinstance(image_sizes, tuple) else image_sizes
        lay = self.layout(model, enc).long()
        side = int(lay[:, 1].max()) + 1
        grids, first_tile, first = [], 0, 0
        for j, tiles in enumerate(self.tiles_per_image(model, enc)):
            n = tiles * side * side
            own = lay[first:first + n].clone()
            own[:, 0] -= first_tile
            index = torch.arange(first, first + n)
            if tiles == 1:
                grids.append(one_grid("image", side, side, "the image's merged patches in raster order", first=first,
                                      crop=first_tile, image=j))
            else:
                if not sizes or processor is None:
                    raise ValueError(f"{self.name}: laying out {tiles} tiles needs the image size and the processor")
                rows, cols = self.tile_grid(processor, sizes[j], tiles)
                tokens = torch.full((rows * side, cols * side), -1, dtype=torch.long)
                crops = torch.full_like(tokens, -1)
                main = own[:, 0] < tiles - 1
                t, r, c = own[main].unbind(1)
                y, x = (t // cols) * side + r, (t % cols) * side + c
                tokens[y, x], crops[y, x] = index[main], t + first_tile
                if bool((tokens < 0).any()):
                    raise ValueError(f"{self.name}: the {rows} x {cols} tiles do not fill their grid")
                start = int(index[~main][0])
                thumb_tokens = torch.arange(start, start + side * side).view(side, side)
                _, r, c = own[~main].unbind(1)
                thumb_tokens[r, c] = index[~main]
                about = f"the {rows} x {cols} tiles of {side} x {side} tokens in their places"
                grids += [TokenGrid("tiles", tokens, crops, about, (rows, cols), j),
                          one_grid("thumbnail", side, side, "the whole image as one more tile",
                                   crop=first_tile + tiles - 1, tokens=thumb_tokens, image=j)]
            first_tile += tiles
            first += n
        return grids

    def image_tokens(self, model, processor, size: tuple[int, int]) -> int:
        """Tiles (the processor's tiling, the thumbnail included) x tokens per tile."""
        w, h = size
        return int(image_processor(processor).get_number_of_image_patches(h, w, {})) * self._tokens_per_tile(model)

    def smaller_sizes(self, model, processor, size: tuple[int, int]) -> list[tuple[int, int]]:
        """Every tile grid the processor may choose, as the canvas it resizes the image to before cutting it into
        tiles (cols x tile width, rows x tile height): the token count only falls in whole tiles, so the image
        is given the smaller canvas the processor would otherwise resize it to itself (one tile at the least)."""
        ip = image_processor(processor)
        tile = ip.size if isinstance(ip.size, dict) else getattr(ip.size, "__dict__", {})
        th, tw = int(tile["height"]), int(tile["width"])
        most = int(ip.max_patches) if getattr(ip, "crop_to_patches", False) else 1
        return [(cols * tw, rows * th) for rows in range(1, most + 1) for cols in range(1, most // rows + 1)]

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
