"""`sgl inspect --video` (issue 36) on a tiny Qwen2.5-VL pair given a video processor, in the environment that has
torchvision: one map per temporal patch of two sampled frames, in the terminal, the PNG and the JSON.

What is checked against an independent computation: the number and shape of the grids against the processor's own
`video_grid_thw` for frames decoded here, the visual-token count against its input ids, the importance against the
engine's small pass, the kept marks drawn in each panel against the kept indices that fall in that grid, and the
PNG's panels against its layout. A missing or damaged video, or a guide that cannot rank a video, is one line and
exit code 2.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests_vllm.test_video, tests.conftest

from sgl_cli.cli import app  # noqa: E402
from tests_vllm.test_video import SUFFIX, _reference_inputs, _with_video, write_video  # noqa: E402

# A pipe, 80 columns: the heatmaps use shade glyphs, no colour, and [] for kept tokens.
runner = CliRunner(env={"COLUMNS": "80", "FORCE_COLOR": None, "TTY_COMPATIBLE": None, "TTY_INTERACTIVE": None})
QUESTION = "what moves?"
CYAN = (0, 255, 255)  # png.OUTLINE: the kept tokens' outline


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> dict[str, Path]:
    from sgl_cli.engine.builtin.pair import TINY_SPEC, build_pair

    pair = build_pair(dataclasses.replace(TINY_SPEC, arch="qwen2_5_vl"), tmp_path_factory.mktemp("pair") / "p")
    for role in ("small", "large"):
        _with_video(pair[role], "qwen2_5_vl")
    return pair


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    """a.mp4: 4 s at 4 fps (16 frames); p.png: a 112 x 84 picture."""
    d = tmp_path_factory.mktemp("clips")
    write_video(d / "a.mp4", 16, seed=1)
    Image.fromarray(np.random.default_rng(4).integers(0, 255, (84, 112, 3)).astype(np.uint8)).save(d / "p.png")
    return d


def _preset_file(folder: Path, pair: dict[str, Path], **settings) -> Path:
    from tests.conftest import write_preset

    return write_preset(folder, pair, **{"retain": 0.25, "prompt_suffix": SUFFIX, **settings})


def _inspect(*args: str):
    return runner.invoke(app, ["inspect", *args, "--question", QUESTION])


def _reference(pair, clips: Path, item: dict):
    """The processor's own inputs for the item (frames decoded here, at the item's rate): (t, rows, cols) of the
    video's grid and the item's visual-token count."""
    from sgl_cli.engine.core.processors import load_processor

    processor = load_processor(pair["large"])
    enc = _reference_inputs(processor, clips, {"question": QUESTION, **item})
    config = json.loads((pair["large"] / "config.json").read_text())
    merge = config["vision_config"]["spatial_merge_size"]
    t, h, w = (int(v) for v in enc["video_grid_thw"][0])
    ids = enc["input_ids"][0]
    n = int((ids == config["video_token_id"]).sum() + (ids == config["image_token_id"]).sum())
    return (t, h // merge, w // merge), n


def _panels(output: str) -> list[tuple[str, str, list[str]]]:
    """The terminal's panels, in order: (label, kept line, the map's rows inside the frame). Panels side by side
    are cut at the columns where their frames start."""
    lines = output.splitlines()
    out = []
    for i, line in enumerate(lines):
        starts = [m.start() for m in re.finditer(r"┌─+┐", line)]
        if not starts or i < 2:
            continue
        ends = starts[1:] + [None]
        bottom = next(j for j in range(i + 1, len(lines)) if lines[j].lstrip().startswith("└"))
        for a, b in zip(starts, ends):
            width = line.index("┐", a) - a + 1
            rows = [row[a + 1:a + width - 1] for row in lines[i + 1:bottom]]
            out.append((lines[i - 2][a:b].strip(), lines[i - 1][a:b].strip(), rows))
    return out


def test_a_grid_per_temporal_patch_with_the_kept_marks_of_its_tokens(pair, clips, tmp_path):
    """The library function the command uses: a video alone at the preset's rate (2 per second: 8 frames of the
    4 s clip) gives one 3 x 4 grid per temporal patch (the processor's t), labelled by its frames and their middle
    time, covering the video's tokens in order; the importance is the engine's small pass; the terminal marks []
    exactly the kept tokens of each panel."""
    from rich.console import Console

    from sgl_cli.engine.guides.base import n_keep, top_k_in_order
    from sgl_cli.engine.io.items import ImageRef, Item, VideoRef
    from sgl_cli.engine.pipeline.engine import Engine
    from sgl_cli.engine.preset import load_preset
    from sgl_cli.engine.views.inspect_item import inspect_item
    from sgl_cli.engine.views.terminal import render

    preset = load_preset(str(_preset_file(tmp_path, pair)))
    insp, pictures = inspect_item(preset, [], QUESTION, video=clips / "a.mp4")
    (t, rows, cols), n = _reference(pair, clips, {"video": "a.mp4"})
    assert (t, rows, cols) == (4, 3, 4) and n == 48
    assert len(insp.grids) == t and insp.n == n and insp.video.n_frames == 8
    assert [g.shape for g in insp.grids] == [(rows, cols)] * t
    assert [insp.grid_label(g) for g in insp.grids] == [
        "frames 1-2 (0.5 s)", "frames 3-4 (1.5 s)", "frames 5-6 (2.5 s)", "frames 7-8 (3.5 s)"]
    assert [g.tokens.ravel().tolist() for g in insp.grids] == [list(range(k * 12, k * 12 + 12)) for k in range(t)]
    # The pictures the grids are drawn on: each patch's first sampled frame (the video's size).
    assert len(pictures) == t and all(p.size == (112, 84) for p in pictures)

    # The importance and kept set are the engine's, on the same item.
    eng = Engine.load(preset)
    try:
        item = Item(line=1, id=1, video=VideoRef(ImageRef.path(clips / "a.mp4"), fps=2.0, max_frames=64),
                    question=QUESTION)
        (work,) = eng.prepare([item])
        eng.small_pass([work])
    finally:
        eng.close()
    (m,) = insp.maps
    assert len(m.importance) == n
    assert torch.equal(torch.tensor(m.importance, dtype=torch.float32), work.small.importance)
    assert m.kept == top_k_in_order(work.small.importance, n_keep(n, 0.25)).tolist() and len(m.kept) == 12

    console = Console(width=80, highlight=False, color_system=None, record=True)
    render(insp, console)
    text = console.export_text()
    words = " ".join(text.split())  # lines wrapped at 80 columns
    assert "token grids 4 temporal patches of 3 x 4 (48 visual tokens); [] kept at retain 0.25: 12 of 48" in words
    assert "video a.mp4 (112 x 84 px, 4 s): 8 frames at 2 per second, 4 temporal patches of 3 x 4 tokens" in words
    assert all(len(line) <= 80 for line in text.splitlines())
    panels = _panels(text)
    assert [label for label, _, _ in panels] == [insp.grid_label(g) for g in insp.grids]
    kept = set(m.kept)
    for g, (_, count, cells) in zip(insp.grids, panels):
        mine = [int(tok) for tok in g.tokens.ravel() if int(tok) in kept]
        assert count == f"{len(mine)} of 12 kept"
        assert len(cells) == rows and {len(row) for row in cells} == {2 * cols}
        marked = [int(g.tokens[r, c]) for r in range(rows) for c in range(cols) if cells[r][2 * c:2 * c + 2] == "[]"]
        assert marked == mine
    assert sum(len(set(g.tokens.ravel().tolist()) & kept) for g in insp.grids) == len(kept)


def test_cli_json_and_png_for_an_image_and_a_video(pair, clips, tmp_path):
    """`sgl inspect IMAGE --video CLIP --json --png`: the JSON's importance has one value per visual token (the
    picture's and the video's, as the processor counts them), a grid per picture and temporal patch with its
    frames; the PNG has one panel per grid at the layout's places, each outlined where its grid has kept tokens."""
    from sgl_cli.engine.views.png import png_layout

    preset = _preset_file(tmp_path, pair)
    out = tmp_path / "heat.png"
    res = _inspect(str(clips / "p.png"), "--video", str(clips / "a.mp4"), "--fps", "1", "-p", str(preset), "--json",
                   "--png", str(out))
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)  # stdout is the JSON object alone
    (t, rows, cols), n = _reference(pair, clips, {"video": "a.mp4", "image": "p.png", "fps": 1})
    assert (t, n) == (2, 12 + 2 * 12)  # 4 frames at 1 per second: 2 temporal patches, and the picture's 12 tokens
    assert got["visual_tokens"] == n and len(got["importance"]) == n and len(got["layout"]) == n
    assert got["images"] == [str(clips / "p.png")] and got["grid"] is None
    assert got["video"]["path"] == str(clips / "a.mp4") and got["video"]["frames"] == 4
    assert got["video"]["fps"] == 1.0 and got["video"]["times"] == [0.5, 1.5, 2.5, 3.5]
    grids = got["grids"]
    assert [(g["name"], g["image"], g["shape"]) for g in grids] == [
        ("image", 0, [3, 4]), ("frames 1-2", 1, [rows, cols]), ("frames 3-4", 2, [rows, cols])]
    assert [g.get("frames") for g in grids] == [None, [0, 1], [2, 3]]
    assert [g.get("label") for g in grids[1:]] == ["frames 1-2 (1 s)", "frames 3-4 (3 s)"]
    # Each token's [crop, row, col]: its grid's crop (one per picture), every cell once.
    cells = {(g, r, c) for g in range(3) for r in range(3) for c in range(4)}
    assert {tuple(x) for x in got["layout"]} == cells
    assert got["retained_tokens"] == len(got["kept"]) == 9 and len(set(got["kept"])) == 9

    with Image.open(out) as png:
        png.verify()
    png = np.asarray(Image.open(out).convert("RGB"))
    layout = png_layout((112, 84), 3)
    assert (png.shape[1], png.shape[0] > layout.height) == (layout.width, True)
    per_grid = [sum(1 for k in got["kept"] if 12 * i <= k < 12 * (i + 1)) for i in range(3)]
    for i in range(layout.columns * layout.rows):
        left, top, right, bottom = layout.box(i)
        box = png[top:bottom, left:right].reshape(-1, 3)
        if i >= 3:  # no fourth panel
            assert (box == 255).all()
            continue
        assert not (box == 255).all(axis=1).all()
        assert (box == CYAN).all(axis=1).any() == (per_grid[i] > 0)


def test_fps_and_max_frames_default_to_the_presets(pair, clips, tmp_path):
    """The preset's video_fps (1: 4 frames, 2 patches) unless --fps; --max-frames 3 leaves a last patch of one
    frame (the processor repeats it), labelled by that frame."""
    preset = _preset_file(tmp_path, pair, video_fps=1.0)
    res = _inspect("--video", str(clips / "a.mp4"), "-p", str(preset), "--json")
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)
    assert got["video"]["frames"] == 4 and [g["frames"] for g in got["grids"]] == [[0, 1], [2, 3]]
    assert got["image"] is None and got["images"] == [] and len(got["importance"]) == 24

    # 3 frames spread over the 4 s (sampled at 2/3, 2 and 10/3 s: 0.75 per second), the clip's frames shown then
    # (it has one every 0.25 s): those at 0.5, 2 and 3.25 s.
    res = _inspect("--video", str(clips / "a.mp4"), "-p", str(preset), "--fps", "2", "--max-frames", "3")
    assert res.exit_code == 0, res.output
    assert "3 frames at 0.75 per second, 2 temporal patches of 3 x 4 tokens" in " ".join(res.stdout.split())
    panels = _panels(res.stdout)
    assert [(label, count) for label, count, _ in panels] == [
        ("frames 1-2 (1.25 s)", f"{_marks(panels[0])} of 12 kept"),
        ("frame 3 (3.25 s)", f"{_marks(panels[1])} of 12 kept")]
    (t, _, _), n = _reference(pair, clips, {"video": "a.mp4", "fps": 0.75})
    assert t == 2 and n == 24 and sum(_marks(p) for p in panels) == 6  # retain 0.25 of 24


def _marks(panel) -> int:
    return sum(row.count("[]") for row in panel[2])


def _missing(folder: Path) -> Path:
    return folder / "nope.mp4"


def _truncated(folder: Path) -> Path:
    path = folder / "bad.mp4"
    path.write_bytes(write_video(folder / "whole.mp4", 16).read_bytes()[:300])
    return path


def _not_a_video(folder: Path) -> Path:
    path = folder / "notes.mp4"
    path.write_text("not a video at all\n")
    return path


@pytest.mark.parametrize("make, message", [
    (_missing, "sgl: error: video 'nope.mp4' "),
    (_truncated, "sgl: error: video 'bad.mp4' "),
    (_not_a_video, "sgl: error: video 'notes.mp4' cannot be read"),
])
def test_a_bad_video_is_one_line_and_exit_2(pair, tmp_path, make, message):
    res = _inspect("--video", str(make(tmp_path)), "-p", str(_preset_file(tmp_path, pair)))
    assert res.exit_code == 2, res.output
    assert res.stderr.startswith(message) and res.stderr.count("\n") == 1 and res.stdout == ""


@pytest.mark.parametrize("args, message", [
    (["--guide", "cls"], "sgl: error: the cls guide does not rank a video's tokens"),
    (["--guide", "downsample"], "sgl: error: the downsample guide does not rank a video's tokens"),
    (["--fps", "0"], "sgl: error: --fps must be above 0"),
    (["--max-frames", "0"], "sgl: error: --max-frames must be from 1 to"),
])
def test_what_cannot_run_on_a_video_is_one_line_and_exit_2(pair, clips, tmp_path, args, message):
    res = _inspect("--video", str(clips / "a.mp4"), "-p", str(_preset_file(tmp_path, pair)), *args)
    assert res.exit_code == 2, res.output
    assert res.stderr.startswith(message) and res.stderr.count("\n") == 1 and res.stdout == ""


def test_no_image_and_no_video_is_one_line_and_exit_2(pair, tmp_path):
    res = _inspect("-p", str(_preset_file(tmp_path, pair)))
    assert res.exit_code == 2 and res.stderr == "sgl: error: give an image (IMAGE...) or a --video\n"


def test_all_guides_on_a_video_one_guide_per_band_of_rows(pair, clips, tmp_path):
    """`--guide all` on 8 temporal patches (16 frames at 4 per second): cls, which reads the vision tower's image
    attention, is left out with its reason; in the PNG each guide's patches fill VIDEO_COLUMNS-wide rows from a
    row of their own (the rest of its last row blank); in the terminal, rows of panels within 80 columns."""
    from rich.console import Console

    from sgl_cli.engine.preset import load_preset
    from sgl_cli.engine.views.inspect_item import inspect_item
    from sgl_cli.engine.views.png import VIDEO_COLUMNS, png_layout, save_png
    from sgl_cli.engine.views.terminal import render

    preset = load_preset(str(_preset_file(tmp_path, pair)))
    insp, pictures = inspect_item(preset, [], QUESTION, "all", video=clips / "a.mp4", fps=4)
    assert [m.name for m in insp.maps] == ["sgl", "fastv", "random"] and "cls" in insp.skipped
    assert len(insp.grids) == 8 == len(pictures) and insp.video.n_frames == 16
    for m in insp.maps:
        assert len(m.importance) == insp.n == 96 and len(m.kept) == 24
    out = tmp_path / "all.png"
    width, height = save_png(insp, pictures, out)
    png = np.asarray(Image.open(out).convert("RGB"))
    assert png.shape[:2] == (height, width)
    band = 2 * VIDEO_COLUMNS  # 8 patches take two rows of 6
    layout = png_layout((112, 84), 2 * band + 8, VIDEO_COLUMNS)
    assert (layout.width, layout.rows) == (width, 6)
    for slot in range(3 * band):
        left, top, right, bottom = layout.box(slot)
        blank = (png[top:bottom, left:right] == 255).all()
        assert blank == (slot % band >= 8), slot

    console = Console(width=80, highlight=False, color_system=None, record=True)
    render(insp, console)
    text = console.export_text()
    assert all(len(line) <= 80 for line in text.splitlines())
    panels = _panels(text)
    assert [p[0] for p in panels] == [insp.grid_label(g) for g in insp.grids] * 3
    for j, m in enumerate(insp.maps):
        assert sum(_marks(p) for p in panels[8 * j:8 * (j + 1)]) == len(m.kept)
