"""What `sgl inspect` shows: one image's token importance, per guide, on its own token grid, in a terminal or PNG.

Every view colours a token by its share of its guide's scores over the whole image (score / sum), on a linear
scale from that guide's smallest to its largest share, with matplotlib's `inferno` colormap; the tokens the large
model would keep are marked `[]` in the terminal and outlined in the PNG. With several guides (`--guide all`)
each map has its own scale (its range is printed with it), and each guide's kept set is compared with sgl's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

COLORMAP = "inferno"
CELL = 2  # characters per token: a terminal character is about twice as tall as wide, so two make a square
KEPT = "[]"
SHADES = " ░▒▓█"  # the value scale where the terminal shows no colour (a pipe, NO_COLOR)
LEGEND_STEPS = 10
MAX_WIDTH = 80  # the heatmap fits an 80-column terminal (or a narrower one)
PANEL_WIDTH = 16  # side by side, each map's column is at least this wide (its labels fit)
PANEL_GAP = 2  # spaces between maps side by side

# What each guide's score is, in a few words (its legend and its line in the header).
WHAT = {
    "sgl": "the small model's attention to each visual token while it answers",
    "cls": "the large model's vision-encoder attention (the layer feeding the projector)",
    "fastv": "the large model's attention from the last prompt token at layer {k_1} (pruned at layer {k})",
    "random": "uniform random scores (seed {seed}, fixed per image)",
}


@dataclass
class GuideMap:
    """One guide's ranking of the image's visual tokens."""

    name: str  # sgl, cls, fastv or random
    importance: list[float]  # one per visual token, in sequence (= raster) order
    kept: list[int]  # indices the large model keeps at `retain`, in order
    prune_layer: int = 0  # where the large model drops the other tokens (0: before the language model)
    what: str = ""  # what the scores are, one line
    large_answer: str | None = None  # the large model's answer from `kept` (--answer-large)
    sgl_overlap: int | None = None  # how many of `kept` sgl keeps too (None: sgl itself, or no small model)

    @property
    def noun(self) -> str:
        return "score" if self.name == "random" else "attention"


@dataclass
class Inspection:
    """One image and question through one guide or several: the small model's answer and scores (when the preset
    has a small model) and each guide's importance map."""

    image: Path
    image_size: tuple[int, int]  # (width, height) in pixels
    question: str
    guide: str  # what --guide asked for: a guide's name, or "all"
    preset: str
    threshold: float | None
    retain: float
    grid: tuple[int, int]  # (rows, cols) of merged patches
    maps: list[GuideMap]
    small_answer: str | None = None  # None: the preset names no small model
    confidence: float | None = None
    consistency: float | None = None
    exit_score: float | None = None
    skipped: dict[str, str] = field(default_factory=dict)  # guide -> why it is not shown

    @property
    def n(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def has_small(self) -> bool:
        return self.small_answer is not None

    @property
    def sgl_exits(self) -> bool:
        """Whether the small model's answer clears the threshold (only the sgl guide exits on it)."""
        return self.has_small and self.threshold is not None and self.exit_score >= self.threshold

    def exits(self, guide: str) -> bool:
        return guide == "sgl" and self.sgl_exits

    @property
    def n_kept(self) -> int:
        return len(self.maps[0].kept)

    @property
    def chance_overlap(self) -> float:
        """Tokens two kept sets of this size share on average when one is drawn at random: k * k / n."""
        return self.n_kept ** 2 / self.n

    def shares(self, m: GuideMap) -> np.ndarray:
        """(rows, cols) share of the guide's total score per token."""
        values = np.asarray(m.importance, dtype=np.float64)
        total = values.sum()
        shares = values / total if total > 0 else np.full_like(values, 1 / len(values))
        return shares.reshape(self.grid)

    def kept_mask(self, m: GuideMap) -> np.ndarray:
        mask = np.zeros(self.n, dtype=bool)
        mask[m.kept] = True
        return mask.reshape(self.grid)

    def to_json(self) -> dict[str, Any]:
        """One guide: its fields beside the common ones (flat). Several: the common fields and `guides`, a map
        of guide name to its fields, and `skipped` (guide name -> why)."""
        common = {
            "image": str(self.image),
            "image_size": list(self.image_size),
            "question": self.question,
            "guide": self.guide,
            "preset": self.preset,
            "small_answer": self.small_answer,
            "exit_score": self.exit_score,
            "confidence": self.confidence,
            "consistency": self.consistency,
            "threshold": self.threshold,
            "retain": self.retain,
            "visual_tokens": self.n,
            "grid": list(self.grid),
        }
        if self.guide != "all":
            return {**common, **self._guide_json(self.maps[0])}
        return {**common, "guides": {m.name: self._guide_json(m) for m in self.maps}, "skipped": self.skipped}

    def _guide_json(self, m: GuideMap) -> dict[str, Any]:
        return {
            "exit": "small" if self.exits(m.name) else "large",
            "large_answer": m.large_answer,
            "prune_layer": m.prune_layer,
            "retained_tokens": len(m.kept),
            "kept_by_sgl_too": m.sgl_overlap,
            "kept": m.kept,
            "importance": m.importance,
        }


def normalise(values: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Values mapped linearly onto [0, 1] from their min to their max, with that min and max."""
    lo, hi = float(values.min()), float(values.max())
    return (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values), lo, hi


def pool(values: np.ndarray, mask: np.ndarray, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """Blocks of factor x factor tokens: the max value (so a lone important token stays visible and the scale
    is the unpooled one) and whether any token of the block is kept. Edge blocks may be partial."""
    rows, cols = values.shape
    pr, pc = -(-rows // factor), -(-cols // factor)
    padded = np.full((pr * factor, pc * factor), -np.inf)
    padded[:rows, :cols] = values
    kept = np.zeros(padded.shape, dtype=bool)
    kept[:rows, :cols] = mask
    blocks = (pr, factor, pc, factor)
    return padded.reshape(blocks).max(axis=(1, 3)), kept.reshape(blocks).any(axis=(1, 3))


def percent(share: float, digits: int = 3) -> str:
    return f"{100 * share:.{digits}g}%"


def span(lo: float, hi: float) -> tuple[str, str]:
    """`lo` and `hi` as percentages with enough digits (up to 6) that they differ where they do."""
    digits = 3
    while digits < 6 and lo != hi and percent(lo, digits) == percent(hi, digits):
        digits += 1
    return percent(lo, digits), percent(hi, digits)


def printable(text: str) -> str:
    """Control characters escaped: a model's answer may hold any token, and a raw one can upset a terminal."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text) or "(empty)"


def overlap_summary(insp: Inspection) -> str | None:
    """`kept by sgl too (of 12; 2.4 by chance): cls 7, fastv 5, random 3`, or None without sgl's ranking."""
    others = [m for m in insp.maps if m.sgl_overlap is not None]
    if not others:
        return None
    counts = ", ".join(f"{m.name} {m.sgl_overlap}" for m in others)
    return f"kept by sgl too (of {insp.n_kept}; {insp.chance_overlap:.2g} by chance): {counts}"


# -- terminal -------------------------------------------------------------------------------------------------
def render(insp: Inspection, console) -> None:
    """Print the answers, the scores and the heatmaps (framed, pooled to fit the width) to `console`."""
    console.print(_facts(insp))
    console.print()
    budget = min(MAX_WIDTH, console.width)
    colour = console.color_system is not None and not console.no_color
    if len(insp.maps) == 1:
        _render_one(insp, insp.maps[0], console, budget, colour)
    else:
        _render_many(insp, console, budget, colour)


def _facts(insp: Inspection):
    from rich.table import Table
    from rich.text import Text

    w, h = insp.image_size
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold")
    facts.add_column()
    facts.add_row("image", f"{insp.image.name} ({w} x {h} px)   preset {insp.preset}")
    facts.add_row("question", printable(insp.question))
    for i, m in enumerate(insp.maps):
        facts.add_row("guide" if i == 0 else "", Text.assemble((m.name, "bold"), f"  {m.what}"))
    for name, why in insp.skipped.items():
        facts.add_row("skipped", Text.assemble((name, "bold"), f"  {why}"))
    if insp.has_small:
        note = "  (small model)" if any(m.name == "sgl" for m in insp.maps) else "  (small model, not this guide's)"
        facts.add_row("answer", Text.assemble((printable(insp.small_answer), "bold"), note))
        facts.add_row("scores", f"confidence {insp.confidence:.3f}   consistency {insp.consistency:.3f}   "
                                f"exit_score {insp.exit_score:.3f}")
    else:
        facts.add_row("small", f"none: preset {insp.preset} names no small model (no small answer, no SEE scores)")
    facts.add_row("exit", _exit_line(insp))
    for m in insp.maps:
        if m.large_answer is not None:
            label = "large" if len(insp.maps) == 1 else f"large {m.name}"
            facts.add_row(label, Text.assemble((printable(m.large_answer), "bold"),
                                               f"  (large model, from {m.name}'s {len(m.kept)} kept tokens)"))
    return facts


def _exit_line(insp: Inspection) -> str:
    kept, n = insp.n_kept, insp.n
    runs = f"the large model answers from {kept} of {n} visual tokens"
    if insp.guide not in ("sgl", "all"):
        if not insp.has_small:
            return f"no: only the sgl guide exits early; {runs}"
        return f"no: only the sgl guide exits early; {runs} (with sgl: {_sgl_verdict(insp)})"
    if not insp.has_small:
        return f"no: only the sgl guide exits early, and it needs a small model; {runs}"
    if insp.threshold is None:
        return f"never (no threshold): {runs}"
    if insp.sgl_exits:
        return (f"yes: exit_score {insp.exit_score:.3f} >= threshold {insp.threshold:g}; the small model's answer "
                "is returned and the large model does not run" + (" (sgl guide)" if insp.guide == "all" else ""))
    return f"no: exit_score {insp.exit_score:.3f} < threshold {insp.threshold:g}; {runs}"


def _sgl_verdict(insp: Inspection) -> str:
    if insp.threshold is None:
        return "no threshold, no exit"
    sign, would = (">=", "would exit") if insp.sgl_exits else ("<", "would not exit")
    return f"exit_score {insp.exit_score:.3f} {sign} threshold {insp.threshold:g}, it {would}"


def _grid_line(insp: Inspection) -> str:
    rows, cols = insp.grid
    count = f"{insp.n_kept} per guide" if len(insp.maps) > 1 else f"{insp.n_kept} of {insp.n}"
    return f"token grid {rows} x {cols} ({insp.n} visual tokens); {KEPT} kept at retain {insp.retain:g}: {count}"


def _pool_factor(cols: int, budget: int) -> int:
    return math.ceil(cols / max(1, (budget - 2) // CELL))  # 2: the frame's sides


def _framed(insp: Inspection, m: GuideMap, factor: int, colour: bool):
    """The framed map as lines of Text, and its (lo, hi) shares."""
    from rich.text import Text

    norm, lo, hi = normalise(insp.shares(m))
    cells, marks = pool(norm, insp.kept_mask(m), factor)
    edge = "─" * (CELL * cells.shape[1])
    lines = [Text("┌" + edge + "┐")]
    for r in range(cells.shape[0]):
        line = Text("│")
        for value, kept in zip(cells[r], marks[r]):
            line.append_text(_cell(float(value), bool(kept), colour))
        line.append("│")
        lines.append(line)
    lines.append(Text("└" + edge + "┘"))
    return lines, lo, hi


def _pool_note(insp: Inspection, factor: int, budget: int, cells: tuple[int, int]):
    from rich.text import Text

    return Text(f"note: {insp.grid[1]} token columns are too wide for {budget} terminal columns: each cell is the "
                f"max over a {factor} x {factor} block of tokens ({cells[0]} x {cells[1]} cells); {KEPT} marks a "
                "block with a kept token.", style="yellow")


def _render_one(insp: Inspection, m: GuideMap, console, budget: int, colour: bool, title: bool = False) -> None:
    from rich.text import Text

    factor = _pool_factor(insp.grid[1], budget)
    lines, lo, hi = _framed(insp, m, factor, colour)
    if title:
        console.print(Text.assemble((m.name, "bold"), f"  {_sgl_part(insp, m)}"))
    else:
        console.print(Text(_grid_line(insp)))
        if m.sgl_overlap is not None:
            console.print(Text(f"{_sgl_part(insp, m)} ({insp.chance_overlap:.2g} by chance)"))
    for line in lines:
        console.print(line)
    console.print(_legend(lo, hi, colour, f"share of the image's {m.noun} (linear)"))
    if factor > 1 and not title:
        console.print(_pool_note(insp, factor, budget, (len(lines) - 2, (len(lines[0]) - 2) // CELL)))


def _sgl_part(insp: Inspection, m: GuideMap) -> str:
    if m.sgl_overlap is None:
        return f"keeps {len(m.kept)} of {insp.n}"
    return f"sgl keeps {m.sgl_overlap} of these {len(m.kept)} too"


def _render_many(insp: Inspection, console, budget: int, colour: bool) -> None:
    """Side by side when at least two maps fit the width unpooled (in balanced rows), else one after another."""
    from rich.text import Text

    rows, cols = insp.grid
    width = max(CELL * cols + 2, PANEL_WIDTH)
    per_row = (budget + PANEL_GAP) // (width + PANEL_GAP)
    console.print(Text(_grid_line(insp)))
    if per_row >= 2:
        n_rows = math.ceil(len(insp.maps) / per_row)
        per_row = math.ceil(len(insp.maps) / n_rows)
        for start in range(0, len(insp.maps), per_row):
            panels = [_panel(insp, m, width, colour) for m in insp.maps[start:start + per_row]]
            console.print()
            for i in range(max(len(p) for p in panels)):
                line = Text()
                for j, p in enumerate(panels):
                    cell = p[i].copy() if i < len(p) else Text("")
                    cell.truncate(width, pad=j < len(panels) - 1)
                    if j:
                        line.append(" " * PANEL_GAP)
                    line.append_text(cell)
                console.print(line)
        console.print(_legend(None, None, colour, "each map's own share scale (range below it)"))
    else:
        factor = _pool_factor(cols, budget)
        for m in insp.maps:
            console.print()
            _render_one(insp, m, console, budget, colour, title=True)
        if factor > 1:
            cells = (-(-rows // factor), -(-cols // factor))
            console.print(_pool_note(insp, factor, budget, cells))
    summary = overlap_summary(insp)
    if summary:
        console.print(Text(summary))


def _panel(insp: Inspection, m: GuideMap, width: int, colour: bool):
    from rich.text import Text

    lines, lo, hi = _framed(insp, m, 1, colour)
    overlap = "" if m.sgl_overlap is None else f"∩ sgl: {m.sgl_overlap} of {len(m.kept)}"
    return [Text(m.name, style="bold"), Text(overlap), *lines, Text("–".join(span(lo, hi)))]


def _rgb(value: float) -> tuple[int, int, int]:
    import matplotlib

    r, g, b, _ = matplotlib.colormaps[COLORMAP](value, bytes=True)
    return int(r), int(g), int(b)


def _cell(value: float, kept: bool, colour: bool):
    from rich.color import Color
    from rich.style import Style
    from rich.text import Text

    if not colour:
        return Text(KEPT if kept else SHADES[min(len(SHADES) - 1, int(value * len(SHADES)))] * CELL)
    r, g, b = _rgb(value)
    # The mark must read on dark and bright cells alike.
    ink = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 128 else "white"
    return Text(KEPT if kept else " " * CELL, style=Style(color=ink, bgcolor=Color.from_rgb(r, g, b), bold=True))


def _legend(lo: float | None, hi: float | None, colour: bool, what: str):
    """The colour ramp between `lo` and `hi` (percent), or `low` and `high` when each map has its own scale."""
    from rich.text import Text

    left, right = span(lo, hi) if lo is not None else ("low", "high")
    line = Text(f"{left} ")
    if colour:
        for i in range(LEGEND_STEPS):
            line.append_text(_cell(i / (LEGEND_STEPS - 1), False, True))
    else:
        line.append("".join(s * CELL for s in SHADES))
    line.append(f" {right}  {what}")
    return line


# -- PNG ------------------------------------------------------------------------------------------------------
MIN_SIDE = 640  # smaller images are enlarged (integer factor) so cells and caption are legible
PANEL_MIN_SIDE = 360  # the same, for each panel of a several-guide PNG
MIN_CAPTION_WIDTH = 480  # tall, narrow images get a wider canvas rather than an unreadable caption
GAP = 16  # white space between panels
ALPHA = 0.55  # weight of the colour map over the image
OUTLINE = (0, 255, 255)  # cyan: stands out from every colour of inferno
INK = (30, 30, 30)


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


def png_layout(image_size: tuple[int, int], panels: int) -> PngLayout:
    """One panel: the image at least MIN_SIDE px on its long side. Several: each at least PANEL_MIN_SIDE, in the
    grid of columns x rows whose shape is nearest 4:3."""
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

    columns, rows = min({balanced(c) for c in range(1, panels + 1)}, key=off_shape)
    grid_w = columns * w + (columns - 1) * GAP
    return PngLayout(scale, (w, h), columns, rows, title, max(grid_w + 2 * GAP, MIN_CAPTION_WIDTH), margin=GAP)


def save_png(insp: Inspection, image, path: Path) -> tuple[int, int]:
    """Write the image with each guide's importance overlaid (one panel per guide), the kept tokens outlined and
    a caption band below. The colour map is the token grid upsampled by nearest neighbour. Returns the PNG's
    (width, height)."""
    from PIL import Image, ImageDraw

    layout = png_layout(image.size, len(insp.maps))
    w, h = layout.panel
    base = image.convert("RGB").resize((w, h), Image.Resampling.LANCZOS)
    panels = Image.new("RGB", (layout.width, layout.height), "white")
    scales = []
    for i, m in enumerate(insp.maps):
        overlay, lo, hi = _overlay(insp, m, base)
        scales.append((lo, hi))
        left, top, _, _ = layout.box(i)
        panels.paste(overlay, (left, top))
        if layout.title_height:
            _panel_title(ImageDraw.Draw(panels), insp, m, (lo, hi), left, top - layout.title_height, w)
    caption = _caption(insp, layout.width, scales[0] if len(scales) == 1 else None)
    canvas = Image.new("RGB", (layout.width, layout.height + caption.height), "white")
    canvas.paste(panels, (0, 0))
    canvas.paste(caption, (0, layout.height))
    canvas.save(path, format="PNG")
    return canvas.size


def _overlay(insp: Inspection, m: GuideMap, base):
    import matplotlib
    from PIL import Image, ImageDraw

    rows, cols = insp.grid
    w, h = base.size
    norm, lo, hi = normalise(insp.shares(m))
    colours = matplotlib.colormaps[COLORMAP](norm, bytes=True)[..., :3]
    row_of_y = np.arange(h) * rows // h
    col_of_x = np.arange(w) * cols // w
    heat = Image.fromarray(np.ascontiguousarray(colours[row_of_y][:, col_of_x]), "RGB")
    overlay = Image.blend(base, heat, ALPHA)
    # Cell c spans the pixels whose nearest cell is c: x from ceil(c * w / cols) to ceil((c + 1) * w / cols).
    xs = [-(-c * w // cols) for c in range(cols + 1)]
    ys = [-(-r * h // rows) for r in range(rows + 1)]
    _outline(ImageDraw.Draw(overlay), insp.kept_mask(m), xs, ys)
    return overlay, lo, hi


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
                 width: int) -> None:
    """Two lines above a panel: the guide and its colour range; what sgl thinks of its kept set."""
    size = _title_size(width)
    font, bold = _font(size), _font(size, bold=True)
    x = left + draw.textlength(m.name + "  ", font=bold)
    draw.text((left, top), m.name, font=bold, fill=INK)
    draw.text((x, top), _fit(draw, f"colour {'–'.join(span(*scale))}", font, width - (x - left)),
              font=font, fill=INK)
    second = (f"kept {len(m.kept)} / {insp.n}" if m.sgl_overlap is None
              else f"kept {len(m.kept)} / {insp.n}, {m.sgl_overlap} of them also by sgl")
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
                       else f"below threshold {insp.threshold:g}: the large model runs")
        else:
            verdict = (f"with the sgl guide it would {'' if insp.sgl_exits else 'not '}exit at threshold "
                       f"{insp.threshold:g}" + ("" if insp.guide == "all" else f"; the {insp.guide} guide never "
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
    paragraphs.append((font, f"kept {insp.n_kept} / {insp.n} visual tokens at retain {insp.retain:g} (outlined)"
                             f"{' per guide' if many else ''} · grid {insp.grid[0]} x {insp.grid[1]} · {guides}"))
    summary = overlap_summary(insp)
    if summary and many:
        paragraphs.append((font, summary[0].upper() + summary[1:]))
    elif summary:
        paragraphs.append((font, f"{_sgl_part(insp, insp.maps[0])} ({insp.chance_overlap:.2g} by chance)"))
    for name, why in insp.skipped.items():
        paragraphs.append((font, f"{name} skipped: {why}"))
    if many:
        paragraphs.append((font, "colour: each token's share of its guide's scores over the image, linear from the "
                                 "panel's smallest to its largest share (the range above each panel):"))
    else:
        paragraphs.append((font, f"colour: each token's share of the image's {insp.maps[0].noun}, linear scale:"))

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
