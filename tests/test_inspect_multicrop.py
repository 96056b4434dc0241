"""`sgl inspect` on multi-crop and multi-tile images (LLaVA-NeXT, LLaVA-OneVision with and without anyres_max_9
resizing, InternVL tiles + thumbnail), through CliRunner on the tiny offline families of tests/families.py, and
the preset's `calibration:` file for the exit line.

The expectations come from the model, the processor and transformers' own functions, not from sgl's layout: the
base crop is the tower's patch grid, the high-res grid has one row per `image_newline` placeholder (found as the
rows whose language-model input is the model's `image_newline` vector), its crops are the anyres grid of
`get_anyres_image_grid_shape`; InternVL's tiles are `pixel_values` minus the thumbnail, `image_seq_length`
tokens each. Where each crop is drawn is checked against its pixels: an image of coloured blocks, one per crop.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from sgl_cli.cli import app
from tests.conftest import analyze, make_images, write_preset
from tests.families import PINPOINTS_MAX9, build_family
from tests.test_families import LMInputs, encode, reference_visual

runner = CliRunner(env={"COLUMNS": "80", "FORCE_COLOR": None, "TTY_COMPATIBLE": None, "TTY_INTERACTIVE": None})
QUESTION = "What is it?"
CELL = 2

# name -> (family, builder options, image size (w, h)): every image is several crops or tiles, not square
VARIANTS = {
    "llava_next": ("llava_next", {}, (168, 280)),  # 3 x 2 crops, unpadded to 24 x 14
    "llava_onevision": ("llava_onevision", {}, (168, 280)),
    "llava_onevision_max9": ("llava_onevision", {"pinpoints": PINPOINTS_MAX9}, (300, 300)),  # 4 x 4, resized
    "internvl": ("internvl", {}, (168, 280)),  # 2 x 1 tiles + thumbnail: rows and columns cannot be swapped
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def fam(request, tmp_path_factory):
    from sgl_cli.engine.backends.transformers import load_model
    from sgl_cli.engine.preset import ModelSpec

    name, options, size = VARIANTS[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    paths = build_family(name, folder / "models", **options)
    return SimpleNamespace(
        name=name, variant=request.param, paths=paths, folder=folder, size=size,
        image=make_images(folder, sizes=(size,))[0], preset=write_preset(folder, paths),
        small=load_model(ModelSpec(str(paths["small"]), dtype="float32"), "small"),
        large=load_model(ModelSpec(str(paths["large"]), dtype="float32"), "large"),
    )


def inspect(image: Path, preset: Path, *args: str):
    return runner.invoke(app, ["inspect", str(image), "--question", QUESTION, "-p", str(preset), *args])


def frames(output: str) -> list[dict]:
    """Every framed grid of the terminal output, in reading order (left to right, then down): `blocks`, the
    (rows, cols) of tokens of each block between crop separators, as a list of bands; `marks`, the [] per block."""
    lines = output.splitlines()
    found = []
    for y, line in enumerate(lines):
        for x, ch in enumerate(line):
            if ch != "┌":
                continue
            right = line.index("┐", x)
            edges = [x] + [i for i in range(x, right) if line[i] == "┬"] + [right]
            bands, band = [], []
            for row in lines[y + 1:]:
                if row[x] == "└":
                    break
                if row[x] == "├":
                    bands.append(band)
                    band = []
                else:
                    assert row[x] == "│" and row[right] == "│", row
                    band.append(row)
            bands.append(band)
            blocks = [[(len(b), (edges[j + 1] - edges[j] - 1) // CELL) for j in range(len(edges) - 1)] for b in bands]
            marks = [[sum(r[edges[j] + 1:edges[j + 1]].count("[]") for r in b) for j in range(len(edges) - 1)]
                     for b in bands]
            found.append({"blocks": blocks, "marks": marks, "shape": (sum(b[0][0] for b in blocks),
                                                                      sum(c for _, c in blocks[0]))})
    return found


def expected(fam) -> dict:
    """The image's visual tokens and grids, from the model and the processor."""
    from sgl_cli.engine.io.items import ImageRef, Item

    model, cfg = fam.large.model, fam.large.model.config
    item = Item(line=1, id=fam.image.name, images=[ImageRef.path(fam.image)], question=QUESTION)
    enc = encode(fam.large.processor, item)
    with torch.no_grad(), LMInputs(model) as cap:
        model(**enc)
    visual = reference_visual(model, enc, cap.kwargs)
    n = int(visual.sum())
    placeholders = int((enc["input_ids"][0] == cfg.image_token_id).sum())
    if fam.name == "internvl":
        side = math.isqrt(cfg.image_seq_length)
        tiles = enc["pixel_values"].shape[0] - 1
        return {"n": n, "enc": enc, "side": side, "tiles": tiles, "crop_tokens": [side * side] * (tiles + 1)}
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    newlines = placeholders - n
    crop_grid = get_anyres_image_grid_shape(enc["image_sizes"][0].tolist(), cfg.image_grid_pinpoints,
                                            cfg.vision_config.image_size)
    crops = fam.large.family.token_crops(model, enc)  # the per-crop budget's grouping (cls guide)
    return {"n": n, "enc": enc, "side": side, "high_res": (newlines, (n - side * side) // newlines),
            "crop_grid": tuple(crop_grid), "crop_tokens": torch.bincount(crops).tolist()}


def test_terminal_and_png_draw_every_crop_in_its_place(fam):
    from sgl_cli.engine.guides.base import n_keep
    from sgl_cli.engine.views.png import png_layout

    png = fam.folder / "heat.png"
    res = inspect(fam.image, fam.preset, "--retain", "0.2", "--png", str(png))
    assert res.exit_code == 0, res.output
    out, want = res.stdout, expected(fam)
    assert all(len(line) <= 80 for line in out.splitlines()) and "note:" not in out  # small enough: unpooled
    grids = frames(out)
    assert len(grids) == 2
    n, k = want["n"], n_keep(want["n"], 0.2)
    first, second = grids
    if fam.name == "internvl":
        s, tiles = want["side"], want["tiles"]
        names = ("tiles", "thumbnail")
        assert tiles == 2 and first["blocks"] == [[(s, s)], [(s, s)]]  # 2 rows x 1 column of 4 x 4 tokens
        assert second["blocks"] == [[(s, s)]]
        assert "tiles: the 2 x 1 tiles of 4 x 4 tokens in their places; thumbnail: the whole image as one more " \
               "tile" in " ".join(out.split())
        blocks = [first, second]
    else:
        side, (rows, cols) = want["side"], want["high_res"]
        names = ("base", "high-res")
        assert first["blocks"] == [[(side, side)]]
        assert second["shape"] == (rows, cols)  # one row per image_newline placeholder
        crop_rows, crop_cols = want["crop_grid"]
        assert len(second["blocks"]) == crop_rows and {len(b) for b in second["blocks"]} == {crop_cols}
        if fam.variant == "llava_onevision_max9":
            assert (crop_rows, crop_cols) == (4, 4) and (rows, cols) == (24, 24)  # 32 x 32 resized by anyres_max_9
            assert "resized (anyres_max_9)" in " ".join(out.split())
        else:
            assert (crop_rows, crop_cols) == (3, 2) and (rows, cols) == (24, 14)  # unpadded: 16 -> 14 columns
        assert f"({rows} image-newline tokens: not visual, not drawn)" in " ".join(out.split())
        blocks = [first, second]
    # Each crop's or tile's tokens, block by block in crop order, then all of them: the visual tokens.
    sizes = [r * c for g in blocks for band in g["blocks"] for r, c in band]
    assert sizes == want["crop_tokens"] and sum(sizes) == n
    marks = [m for g in grids for band in g["marks"] for m in band]
    assert sum(marks) == k
    labels = [f"{name} {g['shape'][0]} x {g['shape'][1]}" for name, g in zip(names, grids)]
    assert f"token grids {labels[0]} + {labels[1]} ({n} visual tokens); [] kept at retain 0.2: {k} of {n}" \
        in " ".join(out.split())
    for label, g in zip(labels, grids):  # each panel says its own kept count
        assert label in out
        kept_here = sum(m for band in g["marks"] for m in band)
        assert f"{kept_here} of {g['shape'][0] * g['shape'][1]} kept" in out

    # The PNG: one panel per grid, each the whole image at its aspect ratio, crop boundaries in white lines.
    assert f"wrote {png}" in res.stderr
    with Image.open(png) as im:
        im.verify()
    pixels = np.asarray(Image.open(png).convert("RGB"))
    layout = png_layout(fam.size, 2)
    assert pixels.shape[1] == layout.width and pixels.shape[0] > layout.height  # a caption band below
    white = (pixels == 255).all(-1)
    for i, g in enumerate(grids):
        left, top, right, bottom = layout.box(i)
        assert (right - left) * fam.size[1] == (bottom - top) * fam.size[0]  # the image's aspect ratio, exactly
        panel = white[top:bottom, left:right]
        cuts_y = np.cumsum([band[0][0] for band in g["blocks"]])[:-1] / g["shape"][0]
        cuts_x = np.cumsum([c for _, c in g["blocks"][0]])[:-1] / g["shape"][1]
        # A blend of the image with inferno is never pure white: white pixels are crop lines, and only there.
        lines_y = np.nonzero(panel.mean(1) > 0.5)[0] / panel.shape[0]
        lines_x = np.nonzero(panel.mean(0) > 0.5)[0] / panel.shape[1]
        for got, cuts, extent in ((lines_y, cuts_y, panel.shape[0]), (lines_x, cuts_x, panel.shape[1])):
            assert all(np.abs(cuts - v).min() * extent <= 2 for v in got) if len(cuts) else len(got) == 0
            assert all(np.abs(got - c).min() * extent <= 2 for c in cuts)
        cyan = (pixels[top:bottom, left:right] == (0, 255, 255)).all(-1)
        assert cyan.any() == (sum(m for band in g["marks"] for m in band) > 0)  # kept tokens outlined


def engine_guides(fam, retain: float) -> dict[str, tuple[list[float], list[int]]]:
    """Each guide's (importance, kept) as `sgl run` computes them: the large model's stage of the engine, whose
    `kept` is what the large model really keeps (cls: the top `retain` of each crop)."""
    from sgl_cli.engine.pipeline.engine import Engine
    from sgl_cli.engine.io.items import ImageRef, Item
    from sgl_cli.engine.preset import Settings

    item = Item(line=1, id=fam.image.name, images=[ImageRef.path(fam.image)], question=QUESTION)
    out = {}
    for guide in ("sgl", "cls", "fastv", "random"):
        settings = Settings(threshold=None, max_new_tokens=5, prompt_suffix="Answer with one word.",
                            consistency_retain=0.05, retain=retain, guide=guide)
        eng = Engine(settings, fam.small, fam.large)
        with torch.inference_mode():
            (w,) = analyze(eng, [item])
            eng.large_pass([w], eng.large_inputs([w]))
        assert w.error is None, w.error
        scores = w.small.importance if guide == "sgl" else w.large.scores
        out[guide] = (scores.tolist(), w.large.kept.tolist())
    return out


def test_json_equals_the_engine_with_the_layout(fam):
    res = inspect(fam.image, fam.preset, "--guide", "all", "--json", "--retain", "0.3")
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)
    want = expected(fam)
    n = want["n"]
    assert got["visual_tokens"] == n and got["grid"] is None  # several grids: see `grids`
    for guide, (importance, kept) in engine_guides(fam, 0.3).items():
        g = got["guides"][guide]
        assert g["importance"] == importance, guide  # per visual token, in placeholder order
        assert g["kept"] == kept and g["retained_tokens"] == len(kept), guide
    # sgl's budget is global; cls's (FasterVLM) is the top 30% of each LLaVA crop (InternVL: of the image).
    assert len(got["guides"]["sgl"]["kept"]) == math.floor(0.3 * n)
    per_crop = sum(max(1, math.floor(0.3 * c)) for c in want["crop_tokens"])
    assert len(got["guides"]["cls"]["kept"]) == (math.floor(0.3 * n) if fam.name == "internvl" else per_crop)

    # The layout: [crop, row, col] per visual token, within its crop's box in its grid; every cell of every
    # grid holds exactly one token.
    layout, crops, grids = got["layout"], got["crops"], got["grids"]
    assert len(layout) == n
    assert [c["crop"] for c in crops] == list(range(len(want["crop_tokens"])))
    assert [c["tokens"] for c in crops] == want["crop_tokens"]
    assert np.bincount([c for c, _, _ in layout]).tolist() == want["crop_tokens"]
    cells = set()
    for crop, r, c in layout:
        box = crops[crop]
        assert 0 <= r < box["shape"][0] and 0 <= c < box["shape"][1]
        cells.add((box["grid"], box["origin"][0] + r, box["origin"][1] + c))
    assert cells == {(i, r, c) for i, g in enumerate(grids) for r in range(g["shape"][0])
                     for c in range(g["shape"][1])}
    if fam.name == "internvl":
        s = want["side"]
        assert [(g["name"], g["shape"], g["crop_grid"]) for g in grids] == [
            ("tiles", [2 * s, s], [2, 1]), ("thumbnail", [s, s], None)]
        assert [c["origin"] for c in crops] == [[0, 0], [s, 0], [0, 0]]
    else:
        assert [(g["name"], g["shape"]) for g in grids] == [
            ("base", [want["side"]] * 2), ("high-res", list(want["high_res"]))]
        assert grids[1]["crop_grid"] == list(want["crop_grid"]) and grids[0]["crops"] == [0]


def blocks_image(path: Path, size: tuple[int, int], rows: int, cols: int) -> list[list[tuple[int, int, int]]]:
    """An image of rows x cols flat blocks, each a colour whose channels are each 0 or 255 (no two alike)."""
    palette = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]
    colours = [[palette[r * cols + c] for c in range(cols)] for r in range(rows)]
    w, h = size
    img = Image.new("RGB", size)
    px = img.load()
    for y in range(h):
        for x in range(w):
            px[x, y] = colours[y * rows // h][x * cols // w]
    img.save(path)
    return colours


@pytest.mark.parametrize("variant, size, grid", [
    ("llava_next", (168, 280), (3, 2)),  # crop rows are the image's thirds; columns its halves (padding aside)
    ("internvl", (336, 224), (2, 2)),  # the image squashed onto 2 x 2 tiles: its quadrants
])
def test_each_crop_is_drawn_where_its_pixels_are(tmp_path, variant, size, grid):
    """The pixels the processor puts in a crop or tile have the colour of the image block at the place where
    inspect draws that crop (its box's centre in the drawn grid)."""
    name, options, _ = VARIANTS[variant]
    paths = build_family(name, tmp_path / "models", **options)
    image = tmp_path / "blocks.png"
    colours = blocks_image(image, size, *grid)
    res = inspect(image, write_preset(tmp_path, paths), "--guide", "random", "--json")
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)
    tiled = next(i for i, g in enumerate(got["grids"]) if g["crop_grid"])
    assert got["grids"][tiled]["crop_grid"] == list(grid)

    from sgl_cli.engine.core.processors import load_processor

    processor = load_processor(paths["large"])
    pixels = processor.image_processor(images=[Image.open(image).convert("RGB")], return_tensors="pt")["pixel_values"]
    pixels = pixels.flatten(0, pixels.dim() - 4)  # (crops, C, H, W), normalised
    shape = got["grids"][tiled]["shape"]
    seen = set()
    for crop in (c for c in got["crops"] if c["grid"] == tiled):
        y = (crop["origin"][0] + crop["shape"][0] / 2) / shape[0]
        x = (crop["origin"][1] + crop["shape"][1] / 2) / shape[1]
        colour = colours[int(y * grid[0])][int(x * grid[1])]
        channels = pixels[crop["crop"]].mean(dim=(1, 2))
        assert tuple(bool(v > 0) for v in channels) == tuple(v == 255 for v in colour), (crop, colour)
        seen.add(colour)
    assert len(seen) == grid[0] * grid[1]  # every block of the image is some crop's


def test_several_grids_pool_each_within_its_crops_to_fit_80_columns():
    """A real-size LLaVA-NeXT layout (base 24 x 24, high-res 2 x 2 crops of 24 x 24): too wide for 80 columns
    side by side, so one under another; the high-res grid is pooled 2 x 2 within each crop, and says so."""
    from rich.console import Console

    from sgl_cli.engine.families.base import TokenGrid as Grid
    from sgl_cli.engine.views.inspection import GuideMap, Inspection
    from sgl_cli.engine.views.terminal import render

    base = Grid("base", np.arange(576).reshape(24, 24), np.zeros((24, 24), dtype=int), "the whole image")
    crops = 1 + (np.arange(48)[:, None] // 24) * 2 + np.arange(48)[None] // 24
    high = Grid("high-res", 576 + np.arange(48 * 48).reshape(48, 48), crops, "the 2 x 2 crops", (2, 2))
    n = 576 + 48 * 48
    importance = np.zeros(n)
    importance[576 + 48 * 30 + 25] = 1.0  # one token of crop 4 (row 30, column 25)
    importance[5] = 0.5
    insp = Inspection(image=Path("x.png"), image_size=(672, 672), question="q", guide="sgl", preset="p",
                      threshold=None, retain=0.001, grids=[base, high],
                      maps=[GuideMap("sgl", importance.tolist(), [5, 576 + 48 * 30 + 25])])
    console = Console(width=80, color_system=None, highlight=False, record=True)
    render(insp, console)
    out = console.export_text()
    assert all(len(line) <= 80 for line in out.splitlines())
    first, second = frames(out)
    assert first["blocks"] == [[(24, 24)]] and first["marks"] == [[1]]
    assert second["blocks"] == [[(12, 12), (12, 12)], [(12, 12), (12, 12)]]  # 2 x 2 blocks within each crop
    assert second["marks"] == [[0, 0], [0, 1]]  # the kept token lies in crop 4, bottom right
    assert "note: high-res: 48 token columns are too wide for 80 terminal columns" in " ".join(out.split())
    assert "max over a 2 x 2 block of tokens within one crop (24 x 24 cells)" in " ".join(out.split())
    assert "note: base" not in out


# -- the exit line honours the preset's calibration, as `sgl run` does ---------------------------------------------
def write_calibration(path: Path, preset: Path, threshold: float, **changed) -> Path:
    from sgl_cli.engine.calibration import VERSION
    from sgl_cli.engine.calibration import fingerprint
    from sgl_cli.engine.preset import load_preset

    fp = {**fingerprint(load_preset(str(preset))), **changed}
    path.write_text(yaml.safe_dump({"version": VERSION, "threshold": threshold, "metric": "vqa",
                                    "target": {"exit_rate": 0.5}, "n_items": 20, "fingerprint": fp}))
    return path


def test_exit_line_uses_the_presets_calibration(tmp_path, tiny_pair):
    image = make_images(tmp_path, sizes=((56, 56),))[0]
    plain = write_preset(tmp_path, tiny_pair)  # threshold null
    res = inspect(image, plain, "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["threshold"] is None

    presets = tmp_path / "presets"
    presets.mkdir()
    preset = write_preset(presets, tiny_pair, calibration="cal.yaml")  # relative to the preset file
    cal = write_calibration(presets / "cal.yaml", preset, 0.0)
    res = inspect(image, preset)
    assert res.exit_code == 0, res.output
    assert "exit      yes: exit_score" in res.stdout and ">= threshold 0 of cal.yaml;" in res.stdout
    assert f"sgl: threshold 0 from the calibration {cal}" in res.stderr
    # Another retain (and guide) than the calibration's: the exit decision does not depend on them.
    res = inspect(image, preset, "--json", "--retain", "0.5", "--guide", "random")
    got = json.loads(res.stdout)
    assert got["threshold"] == 0.0 and got["calibration"] == str(cal) and got["retain"] == 0.5

    # A version-2 file's retain and prune layer are taken unless given, as `sgl run` takes them.
    data = yaml.safe_load(cal.read_text())
    cal.write_text(yaml.safe_dump({**data, "retain": 0.3, "prune_layer": 1}))
    res = inspect(image, preset, "--json")
    got = json.loads(res.stdout)
    assert (got["retain"], got["threshold"]) == (0.3, 0.0)
    assert f"sgl: retain 0.3 and prune layer 1 from the calibration {cal}" in res.stderr
    assert json.loads(inspect(image, preset, "--json", "--retain", "0.5").stdout)["retain"] == 0.5

    write_calibration(cal, preset, 1.5)  # no answer clears it
    got = json.loads(inspect(image, preset, "--json").stdout)
    assert got["threshold"] == 1.5 and got["exit"] == "large" and got["exit_score"] < 1.5

    write_calibration(cal, preset, 0.0, max_new_tokens=9)  # made for other exit settings: refused, one line
    res = inspect(image, preset)
    assert res.exit_code == 2 and res.stdout == ""
    assert res.stderr == (f"sgl: error: calibration {cal} was made for other models or settings: max_new_tokens "
                          "(calibrated 9, this run 5)\n")
