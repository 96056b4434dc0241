"""The shapes task: coloured shapes on a noisy background, with one-word-answer questions and their answers.

The built-in pair is trained on it, `sgl demo` writes it, and `sgl eval` measures guides on it. Each object
fills one cell of a grid of 28 px cells, which is exactly one merged Qwen2-VL patch (14 px x merge 2), so
every visual token is one cell: empty background or one object.

Question types (the `type` field of every item):
- `color`: "What color is the triangle?" (the named shape is unique)
- `shape`: "What shape is red?" (the named colour is unique)
- `count`: "How many squares are there?"
- `relation`: two-hop, "What color is the shape to the right of the triangle?", "What shape is above the red
  circle?": the answer is in the cell next to the one the question names. The anchor has no other object
  among its eight neighbours, so the answer is unambiguous.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
          "purple": (140, 60, 180), "orange": (240, 140, 30)}
SHAPES = ("circle", "square", "triangle", "cross")
CELL = 28  # one merged Qwen2-VL patch (14 px x merge 2): one visual token per cell
TYPES = ("color", "shape", "count", "relation")
# Grid sizes of evaluation items: 144 to 256 visual tokens, a realistic count for a Qwen2-VL image.
EVAL_GRIDS = tuple((r, c) for r in (12, 14, 16) for c in (12, 14, 16))
DIRECTIONS = {"to the right of": (0, 1), "to the left of": (0, -1), "above": (-1, 0), "below": (1, 0)}


@dataclass
class Obj:
    shape: str
    color: str
    row: int
    col: int


@dataclass
class Example:
    objs: list[Obj]
    rows: int
    cols: int
    question: str
    answer: str
    type: str


def draw(objs: list[Obj], rows: int, cols: int, rng: random.Random):
    from PIL import Image, ImageDraw

    grey = rng.randint(90, 170)
    img = Image.effect_noise((cols * CELL, rows * CELL), 24).point(lambda v: max(0, min(255, v - 128 + grey)))
    img = img.convert("RGB")
    d = ImageDraw.Draw(img)
    for o in objs:
        x0, y0 = o.col * CELL + 3, o.row * CELL + 3
        x1, y1 = x0 + CELL - 6, y0 + CELL - 6
        fill = COLORS[o.color]
        if o.shape == "circle":
            d.ellipse((x0, y0, x1, y1), fill=fill)
        elif o.shape == "square":
            d.rectangle((x0 + 2, y0 + 2, x1 - 2, y1 - 2), fill=fill)
        elif o.shape == "triangle":
            d.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
        else:
            t = (x1 - x0) // 3
            d.rectangle((x0 + t, y0, x1 - t, y1), fill=fill)
            d.rectangle((x0, y0 + t, x1, y1 - t), fill=fill)
    return img


def _n_objects(rng: random.Random, rows: int, cols: int) -> int:
    cells = rows * cols
    return rng.randint(1, 3) if cells <= 16 else rng.randint(2, 5) if cells <= 64 else rng.randint(4, 8)


def random_objects(rng: random.Random, rows: int, cols: int, n: int, taken: set) -> list[Obj]:
    """`n` objects of random shape and colour on distinct free cells of the grid (not in `taken`)."""
    free = [(r, c) for r in range(rows) for c in range(cols) if (r, c) not in taken]
    return [Obj(rng.choice(SHAPES), rng.choice(list(COLORS)), r, c) for r, c in rng.sample(free, min(n, len(free)))]


def object_name(o: Obj, objs: list[Obj]) -> str | None:
    """The shortest unique description of `o` among `objs`: its shape, or its colour and shape."""
    if sum(p.shape == o.shape for p in objs) == 1:
        return o.shape
    if sum(p.shape == o.shape and p.color == o.color for p in objs) == 1:
        return f"{o.color} {o.shape}"
    return None


def _relation(rng: random.Random, rows: int, cols: int) -> Example | None:
    direction, (dr, dc) = rng.choice(list(DIRECTIONS.items()))
    r, c = rng.randrange(rows), rng.randrange(cols)
    tr, tc = r + dr, c + dc
    if not (0 <= tr < rows and 0 <= tc < cols):
        return None
    anchor = Obj(rng.choice(SHAPES), rng.choice(list(COLORS)), r, c)
    target = Obj(rng.choice(SHAPES), rng.choice(list(COLORS)), tr, tc)
    # Keep every other object off the anchor's eight neighbours, so "next to the anchor" is one object.
    near = {(r + i, c + j) for i in (-1, 0, 1) for j in (-1, 0, 1)}
    others = random_objects(rng, rows, cols, max(0, _n_objects(rng, rows, cols) - 2), near | {(tr, tc)})
    objs = [anchor, target, *others]
    rng.shuffle(objs)
    name = object_name(anchor, objs)
    if name is None:
        return None
    if rng.random() < 0.5:
        return Example(objs, rows, cols, f"What color is the shape {direction} the {name}?", target.color,
                       "relation")
    return Example(objs, rows, cols, f"What shape is {direction} the {name}?", target.shape, "relation")


def make_example(rng: random.Random, rows: int, cols: int, kind: str | None = None) -> Example:
    """One scene and one question of `kind` (default: a type drawn uniformly)."""
    kind = kind or rng.choice(TYPES)
    for _ in range(100):
        if kind == "relation":
            ex = _relation(rng, rows, cols)
            if ex:
                return ex
            continue
        objs = random_objects(rng, rows, cols, _n_objects(rng, rows, cols), set())
        if kind == "count":
            shape = rng.choice(SHAPES)
            n = sum(o.shape == shape for o in objs)
            return Example(objs, rows, cols, f"How many {plural(shape)} are there?", str(n), "count")
        # Attribute questions name an attribute only one object has, so that the answer is unambiguous.
        if kind == "color":
            unique = [o for o in objs if sum(p.shape == o.shape for p in objs) == 1]
            if unique:
                o = rng.choice(unique)
                return Example(objs, rows, cols, f"What color is the {o.shape}?", o.color, "color")
        else:
            unique = [o for o in objs if sum(p.color == o.color for p in objs) == 1]
            if unique:
                o = rng.choice(unique)
                return Example(objs, rows, cols, f"What shape is {o.color}?", o.shape, "shape")
    raise ValueError(f"cannot make a {kind} question on a {rows}x{cols} grid")


def plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


def vocabulary() -> list[str]:
    """Every word the task's questions and answers use (the trained pair's tokenizer is word-level)."""
    words = {"what", "color", "is", "the", "shape", "how", "many", "are", "there", "?", *COLORS, *SHAPES,
             *(str(n) for n in range(10)), *(plural(s) for s in SHAPES)}
    for phrase in DIRECTIONS:
        words.update(phrase.split())
    return sorted(words)


def write_items(folder: Path, n: int, seed: int = 0, side: int | None = None) -> Path:
    """Write `n` labelled items (images and a `batch.jsonl` with `answer` and `type`); returns the JSONL path.

    Grids are 12-16 cells a side (144-256 visual tokens) unless `side` (px, a multiple of 28) fixes them.
    Question types cycle, so any n >= 4 has every type.
    """
    rng = random.Random(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        rows, cols = (side // CELL,) * 2 if side else rng.choice(EVAL_GRIDS)
        ex = make_example(rng, rows, cols, TYPES[i % len(TYPES)])
        name = f"images/shapes_{seed}_{i:04d}.jpg"
        draw(ex.objs, rows, cols, rng).save(folder / name, quality=90)
        lines.append({"id": f"shapes-{seed}-{i}", "image": name, "question": ex.question, "answer": ex.answer,
                      "type": ex.type})
    out = folder / "batch.jsonl"
    out.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return out
