"""What `sgl inspect` shows: one image's token importance, per guide, on its own token grid, in a terminal or PNG.

Every view colours a token by its share of its guide's scores over the whole image (score / sum), on a linear
scale from that guide's smallest to its largest share, with matplotlib's `inferno` colormap; the tokens the large
model would keep are marked `[]` in the terminal and outlined in the PNG. With several guides (`--guide all`)
each map has its own scale (its range is printed with it), and each guide's kept set is compared with sgl's.

An image is one token grid (Qwen, LLaVA-1.5, single-crop LLaVA-NeXT/OneVision, one-tile InternVL) or several, as
the model lays them out (`Family.token_grids`), each covering the whole image: LLaVA-NeXT/OneVision's base crop
and its high-res grid (the crops tiled in their places, unpadded as the model packs them), InternVL's tiles in
their places and its thumbnail. Crop and tile boundaries are drawn inside a grid (terminal: frame lines where
they are straight; PNG: thin white lines); one colour scale spans all grids of a guide.
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
class Grid:
    """One grid of an image's visual tokens as the model lays them out; it covers the whole image."""

    name: str  # "image" (the one grid), "base", "high-res", "tiles", "thumbnail"
    tokens: np.ndarray  # (rows, cols) int: the visual-token index at each cell
    crops: np.ndarray  # (rows, cols) int: the crop or tile (the model's pixel_values order) of each cell
    about: str = ""  # what the grid is, a few words
    crop_grid: tuple[int, int] | None = None  # (rows, cols) of crops or tiles tiled into it, when several

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
        for r0, r1 in _spans(rows, crops.shape[0]):
            for c0, c1 in _spans(cols, crops.shape[1]):
                if len(np.unique(crops[r0:r1, c0:c1])) != 1:
                    return [], []
        return rows, cols


def _spans(cuts: list[int], n: int) -> list[tuple[int, int]]:
    edges = [0, *cuts, n]
    return list(zip(edges[:-1], edges[1:]))


@dataclass
class GuideMap:
    """One guide's ranking of the image's visual tokens."""

    name: str  # sgl, cls, fastv or random
    importance: list[float]  # one per visual token, in sequence order (placeholders without newlines)
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
    grids: list[Grid]  # the image's token grids (one for most families), in the order of their tokens
    maps: list[GuideMap]
    small_answer: str | None = None  # None: the preset names no small model
    confidence: float | None = None
    consistency: float | None = None
    exit_score: float | None = None
    skipped: dict[str, str] = field(default_factory=dict)  # guide -> why it is not shown
    calibration: str | None = None  # the calibration file the threshold comes from, if any

    @property
    def grid(self) -> tuple[int, int] | None:
        """(rows, cols) of the image's one token grid; None when it has several."""
        return self.grids[0].shape if len(self.grids) == 1 else None

    @property
    def n(self) -> int:
        return sum(g.size for g in self.grids)

    @property
    def about(self) -> str:
        """What the grids are, one line ("" for one grid)."""
        if len(self.grids) == 1:
            return ""
        return "; ".join(f"{g.name}: {g.about}" for g in self.grids)

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
    def same_kept(self) -> bool:
        """Whether every guide keeps as many tokens (not so for cls on a multi-crop image: top `retain` per crop)."""
        return len({len(m.kept) for m in self.maps}) == 1

    def kept_count(self) -> str:
        """`12 of 60`, `12 per guide`, or each guide's count when they differ: `sgl 80, cls 82 of 400`."""
        if len(self.maps) == 1:
            return f"{self.n_kept} of {self.n}"
        if self.same_kept:
            return f"{self.n_kept} per guide"
        return ", ".join(f"{m.name} {len(m.kept)}" for m in self.maps) + f" of {self.n}"

    @property
    def sgl_kept(self) -> int:
        """How many tokens sgl keeps (its budget is global over the image)."""
        from .guides import n_keep

        return n_keep(self.n, self.retain)

    def chance(self, m: GuideMap) -> float:
        """Tokens m's kept set shares with sgl's on average when one is drawn at random: k_sgl * k / n."""
        return self.sgl_kept * len(m.kept) / self.n

    def shares(self, m: GuideMap) -> np.ndarray:
        """(N,) share of the guide's total score per visual token (index it with a grid's `tokens`)."""
        values = np.asarray(m.importance, dtype=np.float64)
        total = values.sum()
        return values / total if total > 0 else np.full_like(values, 1 / len(values))

    def kept_mask(self, m: GuideMap) -> np.ndarray:
        """(N,) whether the large model keeps each visual token."""
        mask = np.zeros(self.n, dtype=bool)
        mask[m.kept] = True
        return mask

    def layout_json(self) -> dict[str, Any]:
        """`grids` (name, shape, crops in it), `crops` (per crop or tile: its grid, origin and shape there, token
        count) and `layout` ([crop, row, col] per visual token: row and column within its crop's box)."""
        grids, crops = [], []
        layout: list[list[int]] = [[]] * self.n
        for gi, g in enumerate(self.grids):
            ids = sorted(int(c) for c in np.unique(g.crops))
            grids.append({"name": g.name, "shape": list(g.shape), "crops": ids,
                          "crop_grid": list(g.crop_grid) if g.crop_grid else None, "about": g.about})
            for c in ids:
                rows, cols = np.nonzero(g.crops == c)
                r0, c0 = int(rows.min()), int(cols.min())
                crops.append({"crop": c, "grid": gi, "origin": [r0, c0],
                              "shape": [int(rows.max()) - r0 + 1, int(cols.max()) - c0 + 1], "tokens": len(rows)})
                for r, col in zip(rows.tolist(), cols.tolist()):
                    layout[int(g.tokens[r, col])] = [c, r - r0, col - c0]
        return {"grids": grids, "crops": sorted(crops, key=lambda c: c["crop"]), "layout": layout}

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
            "calibration": self.calibration,
            "visual_tokens": self.n,
            "grid": list(self.grid) if self.grid else None,  # None: several grids (see `grids`)
            **self.layout_json(),
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
    if insp.same_kept:
        counts = ", ".join(f"{m.name} {m.sgl_overlap}" for m in others)
        return f"kept by sgl too (of {insp.n_kept}; {insp.chance(others[0]):.2g} by chance): {counts}"
    counts = ", ".join(f"{m.name} {m.sgl_overlap} of {len(m.kept)} ({insp.chance(m):.2g} by chance)" for m in others)
    return f"kept by sgl too (sgl keeps {insp.sgl_kept}): {counts}"


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
        return (f"yes: exit_score {insp.exit_score:.3f} >= {_threshold(insp)}; the small model's answer "
                "is returned and the large model does not run" + (" (sgl guide)" if insp.guide == "all" else ""))
    return f"no: exit_score {insp.exit_score:.3f} < {_threshold(insp)}; {runs}"


def _threshold(insp: Inspection) -> str:
    """`threshold 0.9`, and the calibration file it comes from (`threshold 0.9 of cal.yaml`)."""
    where = f" of {Path(insp.calibration).name}" if insp.calibration else ""
    return f"threshold {insp.threshold:g}{where}"


def _sgl_verdict(insp: Inspection) -> str:
    if insp.threshold is None:
        return "no threshold, no exit"
    sign, would = (">=", "would exit") if insp.sgl_exits else ("<", "would not exit")
    return f"exit_score {insp.exit_score:.3f} {sign} {_threshold(insp)}, it {would}"


def _grid_line(insp: Inspection) -> str:
    count = insp.kept_count()
    if insp.grid is None:
        grids = " + ".join(g.label for g in insp.grids)
        return f"token grids {grids} ({insp.n} visual tokens); {KEPT} kept at retain {insp.retain:g}: {count}"
    rows, cols = insp.grid
    return f"token grid {rows} x {cols} ({insp.n} visual tokens); {KEPT} kept at retain {insp.retain:g}: {count}"


def _pool_factor(cols: int, budget: int) -> int:
    return math.ceil(cols / max(1, (budget - 2) // CELL))  # 2: the frame's sides


def _grid_width(grid: Grid, factor: int) -> int:
    """Terminal columns of a grid framed at pool `factor`: cells, the frame's sides and the crop separators."""
    spans = _spans(grid.cuts()[1], grid.shape[1])
    return sum(CELL * -(-(c1 - c0) // factor) for c0, c1 in spans) + len(spans) + 1


def _grid_factor(grid: Grid, budget: int) -> int:
    """The smallest pool factor that fits the grid into `budget` columns (pooling within each crop)."""
    factor = 1
    while _grid_width(grid, factor) > budget and factor < max(grid.shape):
        factor += 1
    return factor


def _framed(insp: Inspection, m: GuideMap, factor: int, colour: bool, grid: Grid | None = None):
    """The framed map of `grid` (default: the one grid) as lines of Text, and the guide's (lo, hi) shares over
    the whole image. Crops tiled in a grid are separated by frame lines, and pooled each on its own."""
    from rich.text import Text

    grid = grid or insp.grids[0]
    norm, lo, hi = normalise(insp.shares(m))
    values, marks = norm[grid.tokens], insp.kept_mask(m)[grid.tokens]
    row_cuts, col_cuts = grid.cuts()
    blocks = [[pool(values[r0:r1, c0:c1], marks[r0:r1, c0:c1], factor)
               for c0, c1 in _spans(col_cuts, grid.shape[1])] for r0, r1 in _spans(row_cuts, grid.shape[0])]
    widths = [CELL * cells.shape[1] for cells, _ in blocks[0]]

    def rule(left: str, middle: str, right: str):
        return Text(left + middle.join("─" * w for w in widths) + right)

    lines = [rule("┌", "┬", "┐")]
    for i, band in enumerate(blocks):
        if i:
            lines.append(rule("├", "┼", "┤"))
        for r in range(band[0][0].shape[0]):
            line = Text("│")
            for cells, kept in band:
                for value, k in zip(cells[r], kept[r]):
                    line.append_text(_cell(float(value), bool(k), colour))
                line.append("│")
            lines.append(line)
    lines.append(rule("└", "┴", "┘"))
    return lines, lo, hi


def _pool_note(insp: Inspection, factor: int, budget: int, cells: tuple[int, int], grid: Grid | None = None):
    from rich.text import Text

    grid = grid or insp.grids[0]
    name = f"{grid.name}: " if len(insp.grids) > 1 else ""
    within = " within one crop" if grid.cuts() != ([], []) else ""
    return Text(f"note: {name}{grid.shape[1]} token columns are too wide for {budget} terminal columns: each cell is "
                f"the max over a {factor} x {factor} block of tokens{within} ({cells[0]} x {cells[1]} cells); "
                f"{KEPT} marks a block with a kept token.", style="yellow")


def _render_one(insp: Inspection, m: GuideMap, console, budget: int, colour: bool, title: bool = False) -> None:
    from rich.text import Text

    if len(insp.grids) > 1:
        _render_grids(insp, m, console, budget, colour, title)
        return
    factor = _pool_factor(insp.grid[1], budget)
    lines, lo, hi = _framed(insp, m, factor, colour)
    if title:
        console.print(Text.assemble((m.name, "bold"), f"  {_sgl_part(insp, m)}"))
    else:
        console.print(Text(_grid_line(insp)))
        if m.sgl_overlap is not None:
            console.print(Text(f"{_sgl_part(insp, m)} ({insp.chance(m):.2g} by chance)"))
    for line in lines:
        console.print(line)
    console.print(_legend(lo, hi, colour, f"share of the image's {m.noun} (linear)"))
    if factor > 1 and not title:
        console.print(_pool_note(insp, factor, budget, (len(lines) - 2, (len(lines[0]) - 2) // CELL)))


def _render_grids(insp: Inspection, m: GuideMap, console, budget: int, colour: bool, title: bool) -> None:
    """Several grids of one guide: each framed under its name, shape and kept count; side by side when they fit
    the width unpooled, else one under another, each pooled to fit on its own. One colour scale for all."""
    from rich.text import Text

    if title:
        console.print(Text.assemble((m.name, "bold"), f"  {_sgl_part(insp, m)}"))
    else:
        console.print(Text(_grid_line(insp)))
        console.print(Text(insp.about))
        if m.sgl_overlap is not None:
            console.print(Text(f"{_sgl_part(insp, m)} ({insp.chance(m):.2g} by chance)"))
        console.print()
    kept = insp.kept_mask(m)
    side_by_side = sum(_grid_width(g, 1) for g in insp.grids) + PANEL_GAP * (len(insp.grids) - 1) <= budget
    panels, notes, lo, hi = [], [], 0.0, 0.0
    for g in insp.grids:
        factor = 1 if side_by_side else _grid_factor(g, budget)
        lines, lo, hi = _framed(insp, m, factor, colour, g)
        head = [Text(g.label, style="bold"), Text(f"{int(kept[g.tokens].sum())} of {g.size} kept")]
        panels.append(head + lines)
        if factor > 1:
            cells = (sum(1 for line in lines if line.plain.startswith("│")),
                     sum(1 for c in lines[1].plain if c != "│") // CELL)
            notes.append(_pool_note(insp, factor, budget, cells, g))
    if side_by_side:
        _print_side_by_side(console, panels, [max(len(line.plain) for line in p) for p in panels])
    else:
        for j, p in enumerate(panels):
            if j:
                console.print()
            for line in p:
                console.print(line)
    console.print(_legend(lo, hi, colour, f"share of the image's {m.noun} (linear, all grids)"))
    for note in notes:
        console.print(note)


def _print_side_by_side(console, panels: list[list], widths: list[int]) -> None:
    """Panels (lists of Text lines) next to each other, each padded to its width, PANEL_GAP apart."""
    from rich.text import Text

    for i in range(max(len(p) for p in panels)):
        line = Text()
        for j, (p, w) in enumerate(zip(panels, widths)):
            cell = p[i].copy() if i < len(p) else Text("")
            cell.truncate(w, pad=j < len(panels) - 1)
            if j:
                line.append(" " * PANEL_GAP)
            line.append_text(cell)
        console.print(line)


def _sgl_part(insp: Inspection, m: GuideMap) -> str:
    if m.sgl_overlap is None:
        return f"keeps {len(m.kept)} of {insp.n}"
    return f"sgl keeps {m.sgl_overlap} of these {len(m.kept)} too"


def _render_many(insp: Inspection, console, budget: int, colour: bool) -> None:
    """Side by side when at least two maps fit the width unpooled (in balanced rows), else one after another.
    Several grids per image: one guide after another, each with its grids."""
    from rich.text import Text

    console.print(Text(_grid_line(insp)))
    if len(insp.grids) > 1:
        console.print(Text(insp.about))
        for m in insp.maps:
            console.print()
            _render_grids(insp, m, console, budget, colour, title=True)
        summary = overlap_summary(insp)
        if summary:
            console.print(Text(summary))
        return
    rows, cols = insp.grid
    width = max(CELL * cols + 2, PANEL_WIDTH)
    per_row = (budget + PANEL_GAP) // (width + PANEL_GAP)
    if per_row >= 2:
        n_rows = math.ceil(len(insp.maps) / per_row)
        per_row = math.ceil(len(insp.maps) / n_rows)
        for start in range(0, len(insp.maps), per_row):
            panels = [_panel(insp, m, width, colour) for m in insp.maps[start:start + per_row]]
            console.print()
            _print_side_by_side(console, panels, [width] * len(panels))
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
CROP_LINE = (255, 255, 255)  # crop and tile boundaries inside a grid
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


def save_png(insp: Inspection, image, path: Path) -> tuple[int, int]:
    """Write the image with each guide's importance overlaid (one panel per guide and token grid: every grid
    covers the whole image; several guides of a several-grid image are one row each), the kept tokens outlined,
    crop and tile boundaries in thin white lines, and a caption band below. The colour map is the token grid
    upsampled by nearest neighbour. Returns the PNG's (width, height)."""
    from PIL import Image, ImageDraw

    shown = [(m, g) for m in insp.maps for g in insp.grids]
    columns = len(insp.grids) if len(insp.grids) > 1 and len(insp.maps) > 1 else None
    layout = png_layout(image.size, len(shown), columns)
    w, h = layout.panel
    base = image.convert("RGB").resize((w, h), Image.Resampling.LANCZOS)
    panels = Image.new("RGB", (layout.width, layout.height), "white")
    scales = []
    for i, (m, g) in enumerate(shown):
        overlay, lo, hi = _overlay(insp, m, base, g)
        scales.append((lo, hi))
        left, top, _, _ = layout.box(i)
        panels.paste(overlay, (left, top))
        if layout.title_height:
            _panel_title(ImageDraw.Draw(panels), insp, m, (lo, hi), left, top - layout.title_height, w, g)
    caption = _caption(insp, layout.width, scales[0] if len(insp.maps) == 1 else None)
    canvas = Image.new("RGB", (layout.width, layout.height + caption.height), "white")
    canvas.paste(panels, (0, 0))
    canvas.paste(caption, (0, layout.height))
    canvas.save(path, format="PNG")
    return canvas.size


def _overlay(insp: Inspection, m: GuideMap, base, grid: Grid | None = None):
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
                 width: int, grid: Grid | None = None) -> None:
    """Two lines above a panel: the guide (and the grid) and its colour range; its kept tokens (in this grid, and
    what sgl thinks of the guide's kept set)."""
    size = _title_size(width)
    font, bold = _font(size), _font(size, bold=True)
    several = len(insp.grids) > 1 and grid is not None
    name = m.name if not several else grid.label if len(insp.maps) == 1 else f"{m.name} · {grid.label}"
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
                       else f"below {_threshold(insp)}: the large model runs")
        else:
            verdict = (f"with the sgl guide it would {'' if insp.sgl_exits else 'not '}exit at "
                       f"{_threshold(insp)}" + ("" if insp.guide == "all" else f"; the {insp.guide} guide never "
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
    grids = (f"grid {insp.grid[0]} x {insp.grid[1]}" if insp.grid
             else f"grids {' + '.join(g.label for g in insp.grids)}")
    kept = (f"kept {insp.n_kept} / {insp.n} visual tokens at retain {insp.retain:g} (outlined)"
            f"{' per guide' if many else ''}") if insp.same_kept else \
        f"kept at retain {insp.retain:g} (outlined): {insp.kept_count()} visual tokens"
    paragraphs.append((font, f"{kept} · {grids} · {guides}"))
    if insp.grid is None:
        paragraphs.append((font, f"{insp.about[0].upper()}{insp.about[1:]}; crop and tile boundaries in white"))
    summary = overlap_summary(insp)
    if summary and many:
        paragraphs.append((font, summary[0].upper() + summary[1:]))
    elif summary:
        paragraphs.append((font, f"{_sgl_part(insp, insp.maps[0])} ({insp.chance(insp.maps[0]):.2g} by chance)"))
    for name, why in insp.skipped.items():
        paragraphs.append((font, f"{name} skipped: {why}"))
    if many:
        paragraphs.append((font, "colour: each token's share of its guide's scores over the image, linear from the "
                                 "guide's smallest to its largest share (the range above each panel):"))
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
