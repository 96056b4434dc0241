"""A synthetic visual task: coloured shapes on a noisy background, with one-word-answer questions.

Used for the example items that ship with sgl and for `sgl demo`; every item carries its answer.
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


@dataclass
class Obj:
    shape: str
    color: str
    row: int
    col: int


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


def make_item(rng: random.Random, rows: int = 8, cols: int = 8) -> tuple[list[Obj], str, str]:
    cells = rng.sample([(r, c) for r in range(rows) for c in range(cols)], rng.randint(3, 6))
    objs = [Obj(rng.choice(SHAPES), rng.choice(list(COLORS)), r, c) for r, c in cells]
    kind = rng.choice(("color", "shape", "count"))
    # Attribute questions name an attribute only one object has, so that the answer is unambiguous.
    unique_shape = [o for o in objs if sum(p.shape == o.shape for p in objs) == 1]
    unique_color = [o for o in objs if sum(p.color == o.color for p in objs) == 1]
    if kind == "color" and unique_shape:
        o = rng.choice(unique_shape)
        return objs, f"What color is the {o.shape}?", o.color
    if kind == "shape" and unique_color:
        o = rng.choice(unique_color)
        return objs, f"What shape is {o.color}?", o.shape
    shape = rng.choice(SHAPES)
    return objs, f"How many {shape}s are there?", str(sum(o.shape == shape for o in objs))


def write_items(folder: Path, n: int, seed: int = 0, side: int | None = None) -> Path:
    """Write `n` images and a `batch.jsonl` (with answers) into `folder`; returns the JSONL path.

    Image sizes vary unless `side` (px, a multiple of 28) fixes them.
    """
    rng = random.Random(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        rows, cols = (side // CELL,) * 2 if side else rng.choice(((8, 8), (12, 12), (8, 14), (16, 16)))
        objs, question, answer = make_item(rng, rows, cols)
        name = f"images/shapes_{seed}_{i:04d}.jpg"
        draw(objs, rows, cols, rng).save(folder / name, quality=90)
        lines.append({"id": f"shapes-{i}", "image": name, "question": question, "answer": answer})
    out = folder / "batch.jsonl"
    out.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return out
