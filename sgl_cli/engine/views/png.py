"""`sgl inspect --png`: the image with each guide's importance overlaid (a panel per guide and per token grid), the
kept tokens outlined, crop and tile boundaries drawn, and a caption with the answers and scores. A video's temporal
patches are panels too, each drawn on its first sampled frame and titled by its frames and their time."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..families.base import TokenGrid
from .inspection import (
    COLORMAP,
    GuideMap,
    Inspection,
    normalise,
    overlap_summary,
    printable,
    sgl_part,
    span,
    threshold_text,
)

MIN_SIDE = 640  # smaller images are enlarged (integer factor) so cells and caption are legible
PANEL_MIN_SIDE = 360  # the same, for each panel of a several-guide PNG
MIN_CAPTION_WIDTH = 480  # tall, narrow images get a wider canvas rather than an unreadable caption
GAP = 16  # white space between panels
ALPHA = 0.55  # weight of the colour map over the image
OUTLINE = (0, 255, 255)  # cyan: stands out from every colour of inferno
CROP_LINE = (255, 255, 255)  # crop and tile boundaries inside a grid
INK = (30, 30, 30)
VIDEO_COLUMNS = 6  # with several guides, a video's patches wrap after this many panels (each guide from a new row)


@dataclass(frozen=True)
class PngLayout:
    """Where each guide's panel lies in the PNG: its image area keeps the image's aspect ratio exactly (the image
    enlarged by an integer `scale`); several panels have a title band above each and lie in a grid."""

    scale: int
    panel: tuple[int, int]  # (width, height) of a panel's image area
    columns: int
    rows: int
    title_height: int  # 0 with one panel
    width: int  # of the canvas
    margin: int = 0  # around the panels (0 with one: the image starts at the top)

    def box(self, i: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom), exclusive, of panel i's image area."""
        w, h = self.panel
        grid_w = self.columns * w + (self.columns - 1) * GAP
        left = (self.width - grid_w) // 2 + (i % self.columns) * (w + GAP)
        top = self.margin + (i // self.columns) * (self.title_height + h + GAP) + self.title_height
        return left, top, left + w, top + h

    @property
    def height(self) -> int:
        """Of the panels, without the caption band."""
        return self.margin + self.rows * (self.title_height + self.panel[1]) + (self.rows - 1) * GAP


def png_layout(image_size: tuple[int, int], panels: int, columns: int | None = None) -> PngLayout:
    """One panel: the image at least MIN_SIDE px on its long side. Several: each at least PANEL_MIN_SIDE, in
    `columns` columns, or else in the grid of columns x rows whose shape is nearest 4:3."""
    w0, h0 = image_size
    scale = max(1, math.ceil((MIN_SIDE if panels == 1 else PANEL_MIN_SIDE) / max(w0, h0)))
    w, h = w0 * scale, h0 * scale
    if panels == 1:
        return PngLayout(scale, (w, h), 1, 1, 0, max(w, MIN_CAPTION_WIDTH))
    title = 2 * (_title_size(w) + _title_size(w) // 3) + _title_size(w) // 2

    def balanced(columns: int) -> tuple[int, int]:  # 4 panels in 3 columns are 2 x 2, not 3 + 1
        rows = math.ceil(panels / columns)
        return math.ceil(panels / rows), rows

    def off_shape(shape: tuple[int, int]) -> float:
        columns, rows = shape
        return abs(math.log((columns * w) / (rows * (h + title)) / (4 / 3)))

    if columns is not None:
        columns, rows = columns, math.ceil(panels / columns)
    else:
        columns, rows = min({balanced(c) for c in range(1, panels + 1)}, key=off_shape)
    grid_w = columns * w + (columns - 1) * GAP
    return PngLayout(scale, (w, h), columns, rows, title, max(grid_w + 2 * GAP, MIN_CAPTION_WIDTH), margin=GAP)


def save_png(insp: Inspection, images, path: Path) -> tuple[int, int]:
    """Write the image(s) with each guide's importance overlaid (one panel per guide and token grid: every grid
    covers its whole image; several guides of a several-grid item are one row each), the kept tokens outlined,
    crop and tile boundaries in thin white lines, and a caption band below. The colour map is the token grid
    upsampled by nearest neighbour. An item's other images are fitted into the first one's panel size, aspect
    kept. `images`: the pictures the grids are drawn on (`TokenGrid.image` indexes them: the item's images, then
    a video's temporal patches' first frames). Returns the PNG's (width, height)."""
    from PIL import Image, ImageDraw

    images = images if isinstance(images, (list, tuple)) else [images]
    shown = [(m, g) for m in insp.maps for g in insp.grids]
    columns = len(insp.grids) if len(insp.grids) > 1 and len(insp.maps) > 1 else None
    slots = list(range(len(shown)))  # where each panel lies in the layout's grid of panels
    if columns is not None and insp.video is not None and columns > VIDEO_COLUMNS:
        columns, per_guide = VIDEO_COLUMNS, -(-len(insp.grids) // VIDEO_COLUMNS) * VIDEO_COLUMNS
        slots = [j * per_guide + i for j in range(len(insp.maps)) for i in range(len(insp.grids))]
    layout = png_layout(images[0].size, slots[-1] + 1, columns)
    w, h = layout.panel
    first = (images[0].convert("RGB").resize((w, h), Image.Resampling.LANCZOS), (0, 0))  # the panel's own aspect
    bases = [first] + [_fitted(im.convert("RGB"), (w, h)) for im in images[1:]]
    panels = Image.new("RGB", (layout.width, layout.height), "white")
    scales = []
    for i, (m, g) in enumerate(shown):
        base, (dx, dy) = bases[g.image]
        overlay, lo, hi = _overlay(insp, m, base, g)
        scales.append((lo, hi))
        left, top, _, _ = layout.box(slots[i])
        panels.paste(overlay, (left + dx, top + dy))
        if layout.title_height:
            _panel_title(ImageDraw.Draw(panels), insp, m, (lo, hi), left, top - layout.title_height, w, g)
    caption = _caption(insp, layout.width, scales[0] if len(insp.maps) == 1 else None)
    canvas = Image.new("RGB", (layout.width, layout.height + caption.height), "white")
    canvas.paste(panels, (0, 0))
    canvas.paste(caption, (0, layout.height))
    canvas.save(path, format="PNG")
    return canvas.size


def _fitted(image, box: tuple[int, int]):
    """`image` resized to fill `box` with its aspect kept, and its offset in the box (centred)."""
    from PIL import Image

    w, h = box
    scale = min(w / image.width, h / image.height)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS), ((w - size[0]) // 2, (h - size[1]) // 2)


def _overlay(insp: Inspection, m: GuideMap, base, grid: TokenGrid | None = None):
    import matplotlib
    from PIL import Image, ImageDraw

    grid = grid or insp.grids[0]
    rows, cols = grid.shape
    w, h = base.size
    norm, lo, hi = normalise(insp.shares(m))
    colours = matplotlib.colormaps[COLORMAP](norm[grid.tokens], bytes=True)[..., :3]
    row_of_y = np.arange(h) * rows // h
    col_of_x = np.arange(w) * cols // w
    heat = Image.fromarray(np.ascontiguousarray(colours[row_of_y][:, col_of_x]), "RGB")
    overlay = Image.blend(base, heat, ALPHA)
    # Cell c spans the pixels whose nearest cell is c: x from ceil(c * w / cols) to ceil((c + 1) * w / cols).
    xs = [-(-c * w // cols) for c in range(cols + 1)]
    ys = [-(-r * h // rows) for r in range(rows + 1)]
    draw = ImageDraw.Draw(overlay)
    _crop_lines(draw, grid.crops, xs, ys)
    _outline(draw, insp.kept_mask(m)[grid.tokens], xs, ys)
    return overlay, lo, hi


def _crop_lines(draw, crops: np.ndarray, xs: list[int], ys: list[int]) -> None:
    """A thin line between neighbouring cells of different crops or tiles (none in a one-crop grid)."""
    lw = 2 if min(xs[1] - xs[0], ys[1] - ys[0]) >= 24 else 1
    for r, c in zip(*np.nonzero(crops[:, 1:] != crops[:, :-1])):  # between columns c and c + 1
        x = xs[c + 1] - lw // 2
        draw.rectangle((x, ys[r], x + lw - 1, ys[r + 1] - 1), fill=CROP_LINE)
    for r, c in zip(*np.nonzero(crops[1:] != crops[:-1])):  # between rows r and r + 1
        y = ys[r + 1] - lw // 2
        draw.rectangle((xs[c], y, xs[c + 1] - 1, y + lw - 1), fill=CROP_LINE)


def _outline(draw, kept: np.ndarray, xs: list[int], ys: list[int]) -> None:
    """Draw the border of the kept region: each kept cell's sides that face a dropped cell or the image edge."""
    rows, cols = kept.shape
    cell = min(xs[1] - xs[0], ys[1] - ys[0])
    lw = max(1, min(4, cell // 8))

    def dropped(r: int, c: int) -> bool:
        return not (0 <= r < rows and 0 <= c < cols and kept[r, c])

    for r, c in zip(*np.nonzero(kept)):
        x0, x1, y0, y1 = xs[c], xs[c + 1] - 1, ys[r], ys[r + 1] - 1
        if dropped(r, c - 1):
            draw.rectangle((x0, y0, x0 + lw - 1, y1), fill=OUTLINE)
        if dropped(r, c + 1):
            draw.rectangle((x1 - lw + 1, y0, x1, y1), fill=OUTLINE)
        if dropped(r - 1, c):
            draw.rectangle((x0, y0, x1, y0 + lw - 1), fill=OUTLINE)
        if dropped(r + 1, c):
            draw.rectangle((x0, y1 - lw + 1, x1, y1), fill=OUTLINE)


def _font(size: int, bold: bool = False):
    import matplotlib
    from PIL import ImageFont

    # matplotlib ships DejaVu Sans, so the caption looks the same everywhere and covers most scripts.
    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name), size)


def _title_size(panel_width: int) -> int:
    return max(12, min(20, round(panel_width / 24)))


def _fit(draw, text: str, font, width: float) -> str:
    """`text`, cut with an ellipsis where it is wider than `width`."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def _panel_title(draw, insp: Inspection, m: GuideMap, scale: tuple[float, float], left: int, top: int,
                 width: int, grid: TokenGrid | None = None) -> None:
    """Two lines above a panel: the guide (and the grid) and its colour range; its kept tokens (in this grid, and
    what sgl thinks of the guide's kept set)."""
    size = _title_size(width)
    font, bold = _font(size), _font(size, bold=True)
    several = (len(insp.grids) > 1 or insp.video is not None) and grid is not None
    label = insp.grid_label(grid)
    name = m.name if not several else label if len(insp.maps) == 1 else f"{m.name} · {label}"
    x = left + draw.textlength(name + "  ", font=bold)
    draw.text((left, top), name, font=bold, fill=INK)
    draw.text((x, top), _fit(draw, f"colour {'–'.join(span(*scale))}", font, width - (x - left)),
              font=font, fill=INK)
    if several:
        here = int(insp.kept_mask(m)[grid.tokens].sum())
        second = f"kept {here} of its {grid.size} ({len(m.kept)} of {insp.n} in all)"
    elif m.sgl_overlap is None:
        second = f"kept {len(m.kept)} / {insp.n}"
    else:
        second = f"kept {len(m.kept)} / {insp.n}, {m.sgl_overlap} of them also by sgl"
    draw.text((left, top + size + size // 3), _fit(draw, second, font, width), font=font, fill=INK)


def _wrap(draw, text: str, font, width: float) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}" if line else word
        if line and draw.textlength(candidate, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    return lines + [line] if line else lines


def _caption(insp: Inspection, width: int, scale: tuple[float, float] | None):
    """A white band: question, answers, scores, the kept counts and a colour bar with its scale (`scale`: the
    one map's (lo, hi); None: each panel has its own, given in its title)."""
    import matplotlib
    from PIL import Image, ImageDraw

    size = max(13, min(22, round(width / 45)))
    font, bold = _font(size), _font(size, bold=True)
    pad, gap = size, size // 3
    many = len(insp.maps) > 1
    paragraphs = [(bold, f"Q: {printable(insp.question)}")]
    if insp.has_small:
        if insp.threshold is None:
            verdict = "no exit threshold"
        elif insp.guide == "sgl":
            verdict = ("would exit: the large model does not run" if insp.sgl_exits
                       else f"below {threshold_text(insp)}: the large model runs")
        else:
            verdict = (f"with the sgl guide it would {'' if insp.sgl_exits else 'not '}exit at "
                       f"{threshold_text(insp)}" + ("" if insp.guide == "all" else f"; the {insp.guide} guide never "
                                                                                "exits: the large model runs"))
        paragraphs += [
            (bold, f"A: {printable(insp.small_answer)}"),
            (font, f"small model · confidence {insp.confidence:.3f} · consistency {insp.consistency:.3f} · "
                   f"exit_score {insp.exit_score:.3f} ({verdict})"),
        ]
    else:
        paragraphs.append((font, f"no small model in preset {insp.preset}: no small answer or SEE scores"))
    for m in insp.maps:
        if m.large_answer is not None:
            paragraphs.append((bold, f"Large model, from {m.name}'s kept tokens: {printable(m.large_answer)}"))
    guides = f"guide {insp.maps[0].name}" if not many else f"guides {', '.join(m.name for m in insp.maps)}"
    grids = f"grid {insp.grid[0]} x {insp.grid[1]}" if insp.grid else f"grids {insp.grids_text()}"
    kept = (f"kept {insp.n_kept} / {insp.n} visual tokens at retain {insp.retain:g} (outlined)"
            f"{' per guide' if many else ''}") if insp.same_kept else \
        f"kept at retain {insp.retain:g} (outlined): {insp.kept_count()} visual tokens"
    paragraphs.append((font, f"{kept} · {grids} · {guides}"))
    if insp.grid is None:
        crops = "" if all(len(np.unique(g.crops)) == 1 for g in insp.grids) and insp.video is not None \
            else "; crop and tile boundaries in white"
        paragraphs.append((font, f"{insp.about[0].upper()}{insp.about[1:]}{crops}"))
    summary = overlap_summary(insp)
    if summary and many:
        paragraphs.append((font, summary[0].upper() + summary[1:]))
    elif summary:
        paragraphs.append((font, f"{sgl_part(insp, insp.maps[0])} ({insp.chance(insp.maps[0]):.2g} by chance)"))
    for name, why in insp.skipped.items():
        paragraphs.append((font, f"{name} skipped: {why}"))
    if many:
        paragraphs.append((font, f"colour: each token's share of its guide's scores over the {insp.whole}, linear "
                                 "from the guide's smallest to its largest share (the range above each panel):"))
    else:
        noun = insp.maps[0].noun
        paragraphs.append((font, f"colour: each token's share of the {insp.whole}'s {noun}, linear scale:"))

    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines = [(f, text) for f, p in paragraphs for text in _wrap(probe, p, f, width - 2 * pad)]
    line_h = size + gap
    bar_h = size
    height = pad + len(lines) * line_h + gap + bar_h + pad
    band = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(band)
    y = pad
    for f, text in lines:
        draw.text((pad, y), text, font=f, fill=INK)
        y += line_h
    y += gap
    # The colour bar: the scale of the overlay, from the smallest to the largest share.
    lo_text, hi_text = span(*scale) if scale else ("low", "high")
    left = f"{lo_text} "
    x = pad + draw.textlength(left, font=font)
    draw.text((pad, y), left, font=font, fill=INK)
    bar_w = min(240, width // 3)
    ramp = matplotlib.colormaps[COLORMAP](np.linspace(0, 1, bar_w), bytes=True)[:, :3]
    band.paste(Image.fromarray(np.ascontiguousarray(np.repeat(ramp[None], bar_h, axis=0)), "RGB"), (round(x), y))
    draw.text((round(x) + bar_w, y), f" {hi_text}", font=font, fill=INK)
    return band
