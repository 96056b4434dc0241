"""What `sgl inspect` shows: one image's token importance on its own token grid, in a terminal or as a PNG.

Both views colour a token by its share of the attention the whole image received (importance / sum), on a
linear scale from the smallest to the largest share, with matplotlib's `inferno` colormap; the tokens the large
model would keep are marked `[]` in the terminal and outlined in the PNG.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

COLORMAP = "inferno"
CELL = 2  # characters per token: a terminal character is about twice as tall as wide, so two make a square
KEPT = "[]"
SHADES = " ░▒▓█"  # the value scale where the terminal shows no colour (a pipe, NO_COLOR)
LEGEND_STEPS = 10
MAX_WIDTH = 80  # the heatmap fits an 80-column terminal (or a narrower one)


@dataclass
class Inspection:
    """One image and question through a guide: the answer, the scores and each visual token's importance."""

    image: Path
    image_size: tuple[int, int]  # (width, height) in pixels
    question: str
    guide: str
    preset: str
    small_answer: str
    confidence: float
    consistency: float
    exit_score: float
    threshold: float | None
    retain: float
    grid: tuple[int, int]  # (rows, cols) of merged patches
    importance: list[float]  # one per visual token, in sequence (= raster) order
    kept: list[int]  # indices the large model keeps at `retain`, in order
    large_answer: str | None = None

    @property
    def exits(self) -> bool:
        return self.threshold is not None and self.exit_score >= self.threshold

    def shares(self) -> np.ndarray:
        """(rows, cols) share of the image's attention per token."""
        values = np.asarray(self.importance, dtype=np.float64)
        total = values.sum()
        shares = values / total if total > 0 else np.full_like(values, 1 / len(values))
        return shares.reshape(self.grid)

    def kept_mask(self) -> np.ndarray:
        mask = np.zeros(len(self.importance), dtype=bool)
        mask[self.kept] = True
        return mask.reshape(self.grid)

    def to_json(self) -> dict[str, Any]:
        return {
            "image": str(self.image),
            "image_size": list(self.image_size),
            "question": self.question,
            "guide": self.guide,
            "preset": self.preset,
            "small_answer": self.small_answer,
            "large_answer": self.large_answer,
            "exit": "small" if self.exits else "large",
            "exit_score": self.exit_score,
            "confidence": self.confidence,
            "consistency": self.consistency,
            "threshold": self.threshold,
            "retain": self.retain,
            "visual_tokens": len(self.importance),
            "retained_tokens": len(self.kept),
            "grid": list(self.grid),
            "kept": self.kept,
            "importance": self.importance,
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


def percent(share: float) -> str:
    return f"{100 * share:.3g}%"


def printable(text: str) -> str:
    """Control characters escaped: a model's answer may hold any token, and a raw one can upset a terminal."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text) or "(empty)"


# -- terminal -------------------------------------------------------------------------------------------------
def render(insp: Inspection, console) -> None:
    """Print the answer, the scores and the heatmap (framed, pooled to fit the width) to `console`."""
    from rich.table import Table
    from rich.text import Text

    n = len(insp.importance)
    rows, cols = insp.grid
    w, h = insp.image_size
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold")
    facts.add_column()
    facts.add_row("image", f"{insp.image.name} ({w} x {h} px)   guide {insp.guide}   preset {insp.preset}")
    facts.add_row("question", printable(insp.question))
    facts.add_row("answer", Text.assemble((printable(insp.small_answer), "bold"), "  (small model)"))
    facts.add_row("scores", f"confidence {insp.confidence:.3f}   consistency {insp.consistency:.3f}   "
                            f"exit_score {insp.exit_score:.3f}")
    facts.add_row("exit", _exit_line(insp))
    if insp.large_answer is not None:
        facts.add_row("large", Text.assemble((printable(insp.large_answer), "bold"),
                                             f"  (large model, from the {len(insp.kept)} kept tokens)"))
    console.print(facts)
    console.print()

    budget = min(MAX_WIDTH, console.width)
    factor = math.ceil(cols / max(1, (budget - 2) // CELL))  # 2: the frame's sides
    norm, lo, hi = normalise(insp.shares())
    cells, marks = pool(norm, insp.kept_mask(), factor)
    colour = console.color_system is not None and not console.no_color
    console.print(Text(f"token grid {rows} x {cols} ({n} visual tokens); {KEPT} kept at retain {insp.retain:g}: "
                       f"{len(insp.kept)} of {n}"))
    console.print("┌" + "─" * (CELL * cells.shape[1]) + "┐")
    for r in range(cells.shape[0]):
        line = Text("│")
        for value, kept in zip(cells[r], marks[r]):
            line.append_text(_cell(float(value), bool(kept), colour))
        line.append("│")
        console.print(line)
    console.print("└" + "─" * (CELL * cells.shape[1]) + "┘")
    console.print(_legend(lo, hi, colour))
    if factor > 1:
        console.print(Text(
            f"note: {cols} token columns are too wide for {budget} terminal columns: each cell is the max over a "
            f"{factor} x {factor} block of tokens ({cells.shape[0]} x {cells.shape[1]} cells); {KEPT} marks a block "
            "with a kept token.", style="yellow"))


def _exit_line(insp: Inspection) -> str:
    kept, n = len(insp.kept), len(insp.importance)
    if insp.threshold is None:
        return f"never (no threshold): the large model answers from {kept} of {n} visual tokens"
    if insp.exits:
        return (f"yes: exit_score {insp.exit_score:.3f} >= threshold {insp.threshold:g}; the small model's answer "
                "is returned and the large model does not run")
    return (f"no: exit_score {insp.exit_score:.3f} < threshold {insp.threshold:g}; the large model answers from "
            f"{kept} of {n} visual tokens")


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


def _legend(lo: float, hi: float, colour: bool):
    from rich.text import Text

    line = Text(f"{percent(lo)} ")
    if colour:
        for i in range(LEGEND_STEPS):
            line.append_text(_cell(i / (LEGEND_STEPS - 1), False, True))
    else:
        line.append("".join(s * CELL for s in SHADES))
    line.append(f" {percent(hi)}  share of the image's attention (linear)")
    return line


# -- PNG ------------------------------------------------------------------------------------------------------
MIN_SIDE = 640  # smaller images are enlarged (integer factor) so cells and caption are legible
MIN_CAPTION_WIDTH = 480  # tall, narrow images get a wider canvas rather than an unreadable caption
ALPHA = 0.55  # weight of the colour map over the image
OUTLINE = (0, 255, 255)  # cyan: stands out from every colour of inferno


def save_png(insp: Inspection, image, path: Path) -> tuple[int, int]:
    """Write the image with the importance overlaid, kept tokens outlined and a caption band below it.

    The image band keeps the image's aspect ratio exactly (it is enlarged by an integer factor only); the
    colour map is the token grid upsampled by nearest neighbour. Returns the PNG's (width, height).
    """
    import matplotlib
    from PIL import Image, ImageDraw

    rows, cols = insp.grid
    w0, h0 = image.size
    scale = max(1, math.ceil(MIN_SIDE / max(w0, h0)))
    w, h = w0 * scale, h0 * scale
    base = image.convert("RGB").resize((w, h), Image.Resampling.LANCZOS)

    norm, lo, hi = normalise(insp.shares())
    colours = matplotlib.colormaps[COLORMAP](norm, bytes=True)[..., :3]
    row_of_y = np.arange(h) * rows // h
    col_of_x = np.arange(w) * cols // w
    heat = Image.fromarray(np.ascontiguousarray(colours[row_of_y][:, col_of_x]), "RGB")
    overlay = Image.blend(base, heat, ALPHA)
    # Cell c spans the pixels whose nearest cell is c: x from ceil(c * w / cols) to ceil((c + 1) * w / cols).
    xs = [-(-c * w // cols) for c in range(cols + 1)]
    ys = [-(-r * h // rows) for r in range(rows + 1)]
    _outline(ImageDraw.Draw(overlay), insp.kept_mask(), xs, ys)

    width = max(w, MIN_CAPTION_WIDTH)
    caption = _caption(insp, width, lo, hi)
    canvas = Image.new("RGB", (width, h + caption.height), "white")
    canvas.paste(overlay, ((width - w) // 2, 0))
    canvas.paste(caption, (0, h))
    canvas.save(path, format="PNG")
    return canvas.size


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


def _caption(insp: Inspection, width: int, lo: float, hi: float):
    """A white band: question, answers, scores, the kept counts and a colour bar with its scale."""
    import matplotlib
    from PIL import Image, ImageDraw

    size = max(13, min(22, round(width / 45)))
    font, bold = _font(size), _font(size, bold=True)
    pad, gap = size, size // 3
    n = len(insp.importance)
    verdict = ("would exit: the large model does not run" if insp.exits
               else "no exit threshold" if insp.threshold is None
               else f"below threshold {insp.threshold:g}: the large model runs")
    paragraphs = [
        (bold, f"Q: {printable(insp.question)}"),
        (bold, f"A: {printable(insp.small_answer)}"),
        (font, f"small model · confidence {insp.confidence:.3f} · consistency {insp.consistency:.3f} · "
               f"exit_score {insp.exit_score:.3f} ({verdict})"),
    ]
    if insp.large_answer is not None:
        paragraphs.append((bold, f"Large model, from the kept tokens: {printable(insp.large_answer)}"))
    paragraphs.append((font, f"kept {len(insp.kept)} / {n} visual tokens at retain {insp.retain:g} (outlined) · "
                             f"grid {insp.grid[0]} x {insp.grid[1]} · guide {insp.guide}"))
    paragraphs.append((font, "colour: each token's share of the image's attention, linear scale:"))

    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines = [(f, text) for f, p in paragraphs for text in _wrap(probe, p, f, width - 2 * pad)]
    line_h = size + gap
    bar_h = size
    height = pad + len(lines) * line_h + gap + bar_h + pad
    band = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(band)
    y = pad
    for f, text in lines:
        draw.text((pad, y), text, font=f, fill=(30, 30, 30))
        y += line_h
    y += gap
    # The colour bar: the scale of the overlay, from the smallest to the largest share.
    left = f"{percent(lo)} "
    x = pad + draw.textlength(left, font=font)
    draw.text((pad, y), left, font=font, fill=(30, 30, 30))
    bar_w = min(240, width // 3)
    ramp = matplotlib.colormaps[COLORMAP](np.linspace(0, 1, bar_w), bytes=True)[:, :3]
    band.paste(Image.fromarray(np.ascontiguousarray(np.repeat(ramp[None], bar_h, axis=0)), "RGB"), (round(x), y))
    draw.text((round(x) + bar_w, y), f" {percent(hi)}", font=font, fill=(30, 30, 30))
    return band
