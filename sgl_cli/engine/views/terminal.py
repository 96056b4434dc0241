"""`sgl inspect` in a terminal: each guide's importance as a heatmap on the image's token grids (framed, pooled to
fit 80 columns), the kept tokens marked [].

Every view colours a token by its share of its guide's scores over the whole image (score / sum), on a linear
scale from that guide's smallest to its largest share, with matplotlib's `inferno` colormap; the tokens the large
model would keep are marked `[]` in the terminal and outlined in the PNG. With several guides (`--guide all`)
each map has its own scale (its range is printed with it), and each guide's kept set is compared with sgl's.

An image is one token grid (Qwen, LLaVA-1.5, single-crop LLaVA-NeXT/OneVision, one-tile InternVL) or several, as
the model lays them out (`Family.token_grids`), each covering the whole image: LLaVA-NeXT/OneVision's base crop
and its high-res grid (the crops tiled in their places, unpadded as the model packs them), InternVL's tiles in
their places and its thumbnail. Crop and tile boundaries are drawn inside a grid (terminal: frame lines where
they are straight; PNG: thin white lines); one colour scale spans all grids of a guide. A video is one grid per
temporal patch (two sampled frames), labelled by its frames and their time, in rows as wide as the terminal.
"""

from __future__ import annotations

import math

from ..families.base import TokenGrid, spans
from .inspection import (
    COLORMAP,
    GuideMap,
    Inspection,
    normalise,
    overlap_summary,
    pool,
    printable,
    sgl_part,
    span,
    threshold_text,
)

CELL = 2  # characters per token: a terminal character is about twice as tall as wide, so two make a square
KEPT = "[]"
SHADES = " ░▒▓█"  # the value scale where the terminal shows no colour (a pipe, NO_COLOR)
LEGEND_STEPS = 10
MAX_WIDTH = 80  # the heatmap fits an 80-column terminal (or a narrower one)
PANEL_WIDTH = 16  # side by side, each map's column is at least this wide (its labels fit)
PANEL_GAP = 2  # spaces between maps side by side


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

    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold")
    facts.add_column()
    for i, (path, (w, h)) in enumerate(zip(insp.images, insp.image_sizes)):
        label = "image" if len(insp.images) == 1 else f"image {i + 1}"
        facts.add_row(label, f"{path.name} ({w} x {h} px)" + (f"   preset {insp.preset}" if i == 0 else ""))
    if insp.video is not None:
        facts.add_row("video", insp.video_text + ("" if insp.images else f"   preset {insp.preset}"))
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
    if insp.full_tokens is not None:
        runs = f"the large model answers from {n} visual tokens (the image's {insp.full_tokens}, reduced)"
    if insp.guide not in ("sgl", "all"):
        if not insp.has_small:
            return f"no: only the sgl guide exits early; {runs}"
        return f"no: only the sgl guide exits early; {runs} (with sgl: {_sgl_verdict(insp)})"
    if not insp.has_small:
        return f"no: only the sgl guide exits early, and it needs a small model; {runs}"
    if insp.threshold is None:
        return f"never (no threshold): {runs}"
    if insp.sgl_exits:
        return (f"yes: exit_score {insp.exit_score:.3f} >= {threshold_text(insp)}; the small model's answer "
                "is returned and the large model does not run" + (" (sgl guide)" if insp.guide == "all" else ""))
    return f"no: exit_score {insp.exit_score:.3f} < {threshold_text(insp)}; {runs}"


def _sgl_verdict(insp: Inspection) -> str:
    if insp.threshold is None:
        return "no threshold, no exit"
    sign, would = (">=", "would exit") if insp.sgl_exits else ("<", "would not exit")
    return f"exit_score {insp.exit_score:.3f} {sign} {threshold_text(insp)}, it {would}"


def _grid_line(insp: Inspection) -> str:
    if insp.full_tokens is not None:
        shapes = " + ".join(insp.grid_label(g) for g in insp.grids)
        return f"token grid{'s' if len(insp.grids) > 1 else ''} {shapes}: {insp.reduced_text}"
    count = insp.kept_count()
    if insp.grid is None:
        return (f"token grids {insp.grids_text()} ({insp.n} visual tokens); {KEPT} kept at retain {insp.retain:g}: "
                f"{count}")
    rows, cols = insp.grid
    return f"token grid {rows} x {cols} ({insp.n} visual tokens); {KEPT} kept at retain {insp.retain:g}: {count}"


def _pool_factor(cols: int, budget: int) -> int:
    return math.ceil(cols / max(1, (budget - 2) // CELL))  # 2: the frame's sides


def _grid_width(grid: TokenGrid, factor: int) -> int:
    """Terminal columns of a grid framed at pool `factor`: cells, the frame's sides and the crop separators."""
    blocks = spans(grid.cuts()[1], grid.shape[1])
    return sum(CELL * -(-(c1 - c0) // factor) for c0, c1 in blocks) + len(blocks) + 1


def _grid_factor(grid: TokenGrid, budget: int) -> int:
    """The smallest pool factor that fits the grid into `budget` columns (pooling within each crop)."""
    factor = 1
    while _grid_width(grid, factor) > budget and factor < max(grid.shape):
        factor += 1
    return factor


def _framed(insp: Inspection, m: GuideMap, factor: int, colour: bool, grid: TokenGrid | None = None):
    """The framed map of `grid` (default: the one grid) as lines of Text, and the guide's (lo, hi) shares over
    the whole image. Crops tiled in a grid are separated by frame lines, and pooled each on its own."""
    from rich.text import Text

    grid = grid or insp.grids[0]
    norm, lo, hi = normalise(insp.shares(m))
    values, marks = norm[grid.tokens], insp.kept_mask(m)[grid.tokens]
    row_cuts, col_cuts = grid.cuts()
    blocks = [[pool(values[r0:r1, c0:c1], marks[r0:r1, c0:c1], factor)
               for c0, c1 in spans(col_cuts, grid.shape[1])] for r0, r1 in spans(row_cuts, grid.shape[0])]
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


def _pool_note(insp: Inspection, factor: int, budget: int, cells: tuple[int, int], grid: TokenGrid | None = None):
    from rich.text import Text

    grid = grid or insp.grids[0]
    several = len(insp.images) > 1 or insp.is_video(grid)
    name = f"{insp.grid_label(grid) if several else grid.name}: " if len(insp.grids) > 1 else ""
    within = " within one crop" if grid.cuts() != ([], []) else ""
    return Text(f"note: {name}{grid.shape[1]} token columns are too wide for {budget} terminal columns: each cell is "
                f"the max over a {factor} x {factor} block of tokens{within} ({cells[0]} x {cells[1]} cells); "
                f"{KEPT} marks a block with a kept token.", style="yellow")


def _render_one(insp: Inspection, m: GuideMap, console, budget: int, colour: bool, title: bool = False) -> None:
    from rich.text import Text

    if len(insp.grids) > 1 or insp.video is not None:
        _render_grids(insp, m, console, budget, colour, title)
        return
    factor = _pool_factor(insp.grid[1], budget)
    lines, lo, hi = _framed(insp, m, factor, colour)
    if title:
        console.print(Text.assemble((m.name, "bold"), f"  {sgl_part(insp, m)}"))
    else:
        console.print(Text(_grid_line(insp)))
        if m.sgl_overlap is not None:
            console.print(Text(f"{sgl_part(insp, m)} ({insp.chance(m):.2g} by chance)"))
    for line in lines:
        console.print(line)
    console.print(_legend(lo, hi, colour, f"share of the {insp.whole}'s {m.noun} (linear)"))
    if factor > 1 and not title:
        console.print(_pool_note(insp, factor, budget, (len(lines) - 2, (len(lines[0]) - 2) // CELL)))


def _render_grids(insp: Inspection, m: GuideMap, console, budget: int, colour: bool, title: bool) -> None:
    """Several grids of one guide: each framed under its name, shape and kept count; side by side when they fit
    the width unpooled, else one under another, each pooled to fit on its own. One colour scale for all."""
    from rich.text import Text

    if title:
        console.print(Text.assemble((m.name, "bold"), f"  {sgl_part(insp, m)}"))
    else:
        console.print(Text(_grid_line(insp)))
        console.print(Text(insp.about))
        if m.sgl_overlap is not None:
            console.print(Text(f"{sgl_part(insp, m)} ({insp.chance(m):.2g} by chance)"))
        console.print()
    kept = insp.kept_mask(m)
    side_by_side = sum(_grid_width(g, 1) for g in insp.grids) + PANEL_GAP * (len(insp.grids) - 1) <= budget
    panels, notes, lo, hi = [], [], 0.0, 0.0
    for g in insp.grids:
        factor = 1 if side_by_side or (insp.video is not None and _grid_width(g, 1) <= budget) \
            else _grid_factor(g, budget)
        lines, lo, hi = _framed(insp, m, factor, colour, g)
        head = [Text(insp.grid_label(g), style="bold"), Text(f"{int(kept[g.tokens].sum())} of {g.size} kept")]
        panels.append(head + lines)
        if factor > 1:
            cells = (sum(1 for line in lines if line.plain.startswith("│")),
                     sum(1 for c in lines[1].plain if c != "│") // CELL)
            notes.append(_pool_note(insp, factor, budget, cells, g))
    if insp.video is not None:  # a video's many patches: in rows as wide as the terminal
        widths = [max(len(line.plain) for line in p) for p in panels]
        for j, row in enumerate(_rows(widths, budget)):
            if j:
                console.print()
            _print_side_by_side(console, [panels[i] for i in row], [widths[i] for i in row])
    elif side_by_side:
        _print_side_by_side(console, panels, [max(len(line.plain) for line in p) for p in panels])
    else:
        for j, p in enumerate(panels):
            if j:
                console.print()
            for line in p:
                console.print(line)
    console.print(_legend(lo, hi, colour, f"share of the {insp.whole}'s {m.noun} (linear, all grids)"))
    for note in notes:
        console.print(note)


def _rows(widths: list[int], budget: int) -> list[list[int]]:
    """Panels of these widths in order, as many to a row as fit `budget` columns PANEL_GAP apart (one at least)."""
    rows: list[list[int]] = []
    used = budget + 1
    for i, w in enumerate(widths):
        if rows and used + PANEL_GAP + w <= budget:
            rows[-1].append(i)
            used += PANEL_GAP + w
        else:
            rows.append([i])
            used = w
    return rows


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


def _render_many(insp: Inspection, console, budget: int, colour: bool) -> None:
    """Side by side when at least two maps fit the width unpooled (in balanced rows), else one after another.
    Several grids per image: one guide after another, each with its grids."""
    from rich.text import Text

    console.print(Text(_grid_line(insp)))
    if len(insp.grids) > 1 or insp.video is not None:
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
