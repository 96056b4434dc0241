"""`sgl inspect` through CliRunner on the tiny offline pair: the grid, kept tokens, JSON, PNG, pooling, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from sgl_cli.cli import app
from tests.conftest import make_images, write_preset

# A pipe, 80 columns, whatever the terminal running the tests: the heatmap then uses shade glyphs, no colour.
runner = CliRunner(env={"COLUMNS": "80", "FORCE_COLOR": None, "TTY_COMPATIBLE": None, "TTY_INTERACTIVE": None})


def inspect(image: Path, preset: Path, *args: str):
    return runner.invoke(app, ["inspect", str(image), "--question", "What is it?", "-p", str(preset), *args])


def processor_grid(pair: dict[str, Path], image: Path) -> tuple[int, int]:
    """The token grid straight from the processor: image_grid_thw // spatial_merge_size."""
    from sgl_cli.engine.processors import load_processor

    processor = load_processor(pair["small"])
    _, h, w = processor.image_processor(images=[Image.open(image).convert("RGB")], return_tensors="pt")[
        "image_grid_thw"][0].tolist()
    merge = json.loads((pair["small"] / "config.json").read_text())["vision_config"]["spatial_merge_size"]
    return h // merge, w // merge


def heatmap(output: str) -> list[str]:
    """The heatmap's rows, frame included."""
    lines = output.splitlines()
    top = next(i for i, line in enumerate(lines) if line.startswith("┌"))
    bottom = next(i for i, line in enumerate(lines) if line.startswith("└"))
    return lines[top:bottom + 1]


def test_terminal_grid_matches_the_processor_and_marks_kept(tmp_path, tiny_pair):
    image = make_images(tmp_path, sizes=((168, 280),))[0]  # not square: rows and columns cannot be swapped
    preset = write_preset(tmp_path, tiny_pair, threshold=0.0)
    res = inspect(image, preset, "--retain", "0.2")
    assert res.exit_code == 0, res.output
    rows, cols = processor_grid(tiny_pair, image)
    assert (rows, cols) == (10, 6)
    grid = heatmap(res.stdout)
    assert len(grid) == rows + 2 and {len(line) for line in grid} == {2 * cols + 2}
    assert sum(line.count("[]") for line in grid) == max(1, int(0.2 * rows * cols)) == 12
    assert f"token grid {rows} x {cols} ({rows * cols} visual tokens); [] kept at retain 0.2: 12 of 60" in res.stdout
    for label in ("answer", "scores", "confidence", "consistency", "exit_score"):
        assert label in res.stdout
    assert "exit      yes: exit_score" in res.stdout  # threshold 0: it would exit
    assert "note:" not in res.stdout and all(len(line) <= 80 for line in res.stdout.splitlines())


def test_json_equals_the_engine(tmp_path, preset_file, engine_factory):
    from sgl_cli.engine.engine import n_keep, top_k_in_order
    from sgl_cli.engine.items import Item

    image = make_images(tmp_path, sizes=((336, 224),))[0]
    res = inspect(image, preset_file, "--json", "--retain", "0.3", "--answer-large")
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)  # stdout is the JSON object and nothing else
    eng = engine_factory(retain=0.3)
    item = Item(line=1, id=1, image=image, question="What is it?")
    (work,) = eng.analyze([item])
    assert torch.equal(torch.tensor(got["importance"], dtype=torch.float32), work.importance)
    assert got["grid"] == [8, 12] and got["visual_tokens"] == 96
    assert got["kept"] == top_k_in_order(work.importance, n_keep(96, 0.3)).tolist()
    assert got["retained_tokens"] == len(got["kept"]) == 28
    assert got["exit_score"] == eng.exit_score(work) and got["consistency"] == work.consistency
    assert got["exit"] == "large" and got["threshold"] is None and got["guide"] == "sgl"
    assert got["large_answer"] == eng.process([item])[0]["answer"]


def test_png_keeps_the_aspect_ratio_with_a_caption_band(tmp_path, preset_file):
    image = make_images(tmp_path, sizes=((336, 224),))[0]
    out = tmp_path / "heat.png"
    res = inspect(image, preset_file, "--png", str(out), "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["grid"] == [8, 12] and f"wrote {out}" in res.stderr
    with Image.open(out) as png:
        png.verify()
    png = Image.open(out).convert("RGB")
    scale = png.width // 336
    assert png.width == 336 * scale and scale >= 1
    assert png.height > 224 * scale  # the image band, then the caption band
    band_top = [png.getpixel((x, 224 * scale)) for x in range(png.width)]
    assert all(p == (255, 255, 255) for p in band_top)  # the caption starts right below the image
    pixels = np.asarray(png)[: 224 * scale].reshape(-1, 3)
    assert (pixels == (0, 255, 255)).all(axis=1).any()  # the kept tokens' outline


def test_wide_image_is_pooled_to_fit_80_columns(tmp_path, tiny_pair, preset_file):
    image = make_images(tmp_path, sizes=((1400, 28),))[0]
    assert processor_grid(tiny_pair, image) == (1, 50)
    res = inspect(image, preset_file)
    assert res.exit_code == 0, res.output
    grid = heatmap(res.stdout)
    assert len(grid) == 3 and len(grid[0]) == 2 * 25 + 2
    assert "note: 50 token columns are too wide" in res.stdout and "max over a 2 x 2 block" in res.stdout
    assert all(len(line) <= 80 for line in res.stdout.splitlines())


def _missing(folder: Path) -> Path:
    return folder / "cat.png"


def _corrupt(folder: Path) -> Path:
    path = folder / "corrupt.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return path


def _unsupported(folder: Path) -> Path:
    path = folder / "deep.tif"
    Image.new("I;16B", (56, 56)).save(path)
    return path


@pytest.mark.parametrize("make, message", [
    (_missing, "sgl: error: image 'cat.png' not found"),
    (_corrupt, "sgl: error: image 'corrupt.png' cannot be read"),
    (_unsupported, "sgl: error: image 'deep.tif' has unsupported mode I;16B"),
])
def test_bad_image_is_one_line_and_exit_2(tmp_path, preset_file, make, message):
    res = inspect(make(tmp_path), preset_file)
    assert res.exit_code == 2
    assert res.stderr.startswith(message) and res.stderr.count("\n") == 1 and res.stdout == ""


def test_guides_not_yet_available_name_the_available_ones(tmp_path, preset_file):
    image = make_images(tmp_path, sizes=((56, 56),))[0]
    res = inspect(image, preset_file, "--guide", "fastv")
    assert res.exit_code == 2
    assert res.stderr == "sgl: error: --guide fastv is not available yet; available: sgl\n"
