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
from tests.conftest import analyze, make_images, write_preset

# A pipe, 80 columns, whatever the terminal running the tests: the heatmap then uses shade glyphs, no colour.
runner = CliRunner(env={"COLUMNS": "80", "FORCE_COLOR": None, "TTY_COMPATIBLE": None, "TTY_INTERACTIVE": None})


def inspect(image: Path, preset: Path, *args: str):
    return runner.invoke(app, ["inspect", str(image), "--question", "What is it?", "-p", str(preset), *args])


def processor_grid(pair: dict[str, Path], image: Path) -> tuple[int, int]:
    """The token grid straight from the processor: image_grid_thw // spatial_merge_size."""
    from sgl_cli.engine.core.processors import load_processor

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
    from sgl_cli.engine.guides.base import n_keep, top_k_in_order
    from sgl_cli.engine.io.items import ImageRef, Item

    image = make_images(tmp_path, sizes=((336, 224),))[0]
    res = inspect(image, preset_file, "--json", "--retain", "0.3", "--answer-large")
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)  # stdout is the JSON object and nothing else
    eng = engine_factory(retain=0.3)
    item = Item(line=1, id=1, images=[ImageRef.path(image)], question="What is it?")
    (work,) = analyze(eng, [item])
    assert torch.equal(torch.tensor(got["importance"], dtype=torch.float32), work.small.importance)
    assert got["grid"] == [8, 12] and got["visual_tokens"] == 96
    assert got["kept"] == top_k_in_order(work.small.importance, n_keep(96, 0.3)).tolist()
    assert got["retained_tokens"] == len(got["kept"]) == 28
    assert got["exit_score"] == work.small.exit_score and got["consistency"] == work.small.consistency
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


def _unfaithful(folder: Path) -> Path:
    """16-bit images are scaled now; a float image with negative values has no faithful 8-bit picture."""
    path = folder / "signed.tif"
    Image.new("F", (56, 56), -1.0).save(path)
    return path


@pytest.mark.parametrize("make, message", [
    (_missing, "sgl: error: image 'cat.png' not found"),
    (_corrupt, "sgl: error: image 'corrupt.png' cannot be read"),
    (_unfaithful, "sgl: error: image 'signed.tif' has float values from -1 to -1, outside 0-1 and 0-255"),
])
def test_bad_image_is_one_line_and_exit_2(tmp_path, preset_file, make, message):
    res = inspect(make(tmp_path), preset_file)
    assert res.exit_code == 2
    assert res.stderr.startswith(message) and res.stderr.count("\n") == 1 and res.stdout == ""


def large_only(folder: Path, pair: dict[str, Path], **settings) -> Path:
    """A preset that names no small model (only cls, fastv and random can run)."""
    import yaml

    path = write_preset(folder, pair, **settings)
    data = yaml.safe_load(path.read_text())
    data.pop("small")
    data["name"] = "large-only"
    path = folder / "large-only.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def loaded_roles(monkeypatch) -> list[str]:
    """The roles of the models the command loads, in order."""
    from sgl_cli.engine.backends import transformers as models

    roles: list[str] = []
    real = models.load_model

    def load(spec, role):
        roles.append(role)
        return real(spec, role)

    monkeypatch.setattr(models, "load_model", load)
    return roles


def engine_scores(eng, item, retain: float) -> dict[str, tuple[list[float], list[int]]]:
    """Each guide's (importance, kept) straight from the engine and the guides, for one item."""
    from sgl_cli.engine.guides.base import n_keep, top_k_in_order

    scores, kept = {}, {}
    with torch.inference_mode():
        (work,) = analyze(eng, [item])
        for g in ("cls", "fastv", "random"):
            e = eng.with_settings(guide=g, retain=retain)
            (answer,) = e.large_pass([work], e.large_inputs([work]))
            scores[g], kept[g] = answer.scores, answer.kept
    fastv_kept = kept["fastv"]
    if eng.small is not None:
        scores["sgl"] = work.small.importance
    out = {g: (s.tolist(), top_k_in_order(s, n_keep(len(s), retain)).tolist()) for g, s in scores.items()}
    assert out["fastv"][1] == fastv_kept.tolist()
    return out


@pytest.mark.parametrize("guide", ["cls", "fastv", "random"])
def test_single_model_guides_without_a_small_model(tmp_path, tiny_pair, engine_factory, loaded_roles, guide):
    from sgl_cli.engine.pipeline.engine import Engine
    from sgl_cli.engine.io.items import ImageRef, Item

    image = make_images(tmp_path, sizes=((168, 280),))[0]
    preset = large_only(tmp_path, tiny_pair, threshold=0.0)
    res = inspect(image, preset, "--guide", guide, "--retain", "0.2")
    assert res.exit_code == 0, res.output
    assert loaded_roles == ["large"]
    grid = heatmap(res.stdout)
    assert len(grid) == 10 + 2 and {len(line) for line in grid} == {2 * 6 + 2}
    assert sum(line.count("[]") for line in grid) == 12
    assert "token grid 10 x 6 (60 visual tokens); [] kept at retain 0.2: 12 of 60" in res.stdout
    assert "small     none: preset large-only names no small model" in res.stdout
    labels = {line.split()[0] for line in res.stdout.splitlines() if line[:1].isalpha()}
    assert not labels & {"answer", "scores"}  # no small answer, no SEE lines
    assert "exit      no: only the sgl guide exits early" in res.stdout
    assert all(len(line) <= 80 for line in res.stdout.splitlines())

    res = inspect(image, preset, "--guide", guide, "--retain", "0.2", "--json")
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)
    large = engine_factory().large
    eng = Engine(engine_factory(retain=0.2, threshold=0.0, guide=guide).settings, None, large)
    importance, kept = engine_scores(
        eng, Item(line=1, id=image.name, images=[ImageRef.path(image)], question="What is it?"), 0.2)[guide]
    assert got["importance"] == importance and got["kept"] == kept and got["retained_tokens"] == 12
    assert got["grid"] == [10, 6] and got["guide"] == guide and got["exit"] == "large"
    assert got["small_answer"] is None and got["exit_score"] is None and got["kept_by_sgl_too"] is None
    assert got["prune_layer"] == (1 if guide == "fastv" else 0)  # the 2-layer tiny model: FastV's K is 1


def test_sgl_loads_only_the_small_model_and_cls_the_large_one_too(tmp_path, preset_file, loaded_roles):
    image = make_images(tmp_path, sizes=((56, 56),))[0]
    assert inspect(image, preset_file, "--json").exit_code == 0
    assert inspect(image, preset_file, "--guide", "random", "--json").exit_code == 0
    assert loaded_roles == ["small", "small"]  # the large model is not loaded just to look at a heatmap
    res = inspect(image, preset_file, "--guide", "cls", "--json")
    assert res.exit_code == 0, res.output
    assert loaded_roles[2:] == ["small", "large"]
    got = json.loads(res.stdout)
    assert got["small_answer"] is not None and got["kept_by_sgl_too"] is not None  # the small model still answers


def test_all_json_equals_each_guide_of_the_engine(tmp_path, preset_file, engine_factory):
    from sgl_cli.engine.io.items import ImageRef, Item

    image = make_images(tmp_path, sizes=((336, 224),))[0]
    res = inspect(image, preset_file, "--guide", "all", "--json", "--retain", "0.3", "--answer-large")
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)
    assert got["guide"] == "all" and got["grid"] == [8, 12] and got["visual_tokens"] == 96
    assert list(got["guides"]) == ["sgl", "cls", "fastv", "random"] and got["skipped"] == {}
    item = Item(line=1, id=image.name, images=[ImageRef.path(image)], question="What is it?")
    eng = engine_factory(retain=0.3)
    want = engine_scores(eng, item, 0.3)
    sgl_kept = set(want["sgl"][1])
    for guide, (importance, kept) in want.items():
        g = got["guides"][guide]
        assert g["importance"] == importance and g["kept"] == kept and g["retained_tokens"] == len(kept) == 28
        assert g["kept_by_sgl_too"] == (None if guide == "sgl" else len(sgl_kept & set(kept)))
        # Each guide's large answer is the one `sgl run` gives with that guide (no exit threshold here).
        assert g["large_answer"] == engine_factory(retain=0.3, guide=guide).process([item])[0]["answer"]
    (work,) = analyze(eng, [item])
    assert got["exit_score"] == work.small.exit_score and got["consistency"] == work.small.consistency


def test_all_side_by_side_with_overlaps(tmp_path, preset_file):
    image = make_images(tmp_path, sizes=((168, 280),))[0]  # 10 x 6: four maps fit 80 columns
    res = inspect(image, preset_file, "--guide", "all", "--retain", "0.2")
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines)
    assert "token grid 10 x 6 (60 visual tokens); [] kept at retain 0.2: 12 per guide" in res.stdout
    assert any(line.split() == ["sgl", "cls", "fastv", "random"] for line in lines)
    top = next(i for i, line in enumerate(lines) if line.startswith("┌"))
    frame = lines[top:top + 10 + 2]
    assert all(line.count("┌") + line.count("│") // 2 + line.count("└") == 4 for line in frame)
    # Each map's own 12 kept tokens: count the marks inside each of the four frames.
    starts = [i for i, c in enumerate(frame[0]) if c == "┌"]
    for s in starts:
        assert sum(line[s:s + 14].count("[]") for line in frame) == 12
    summary = next(line for line in lines if line.startswith("kept by sgl too"))
    assert summary.startswith("kept by sgl too (of 12; 2.4 by chance): cls ")
    assert [part.split()[0] for part in summary.split(": ", 1)[1].split(", ")] == ["cls", "fastv", "random"]


def test_all_without_a_small_model_one_after_another_pooled(tmp_path, tiny_pair, loaded_roles):
    image = make_images(tmp_path, sizes=((1400, 28),))[0]  # 1 x 50: too wide side by side, pooled one by one
    res = inspect(image, large_only(tmp_path, tiny_pair), "--guide", "all")
    assert res.exit_code == 0, res.output
    assert loaded_roles == ["large"]
    out = res.stdout
    assert "skipped   sgl  preset large-only names no small model, which it needs" in out
    assert out.count("┌" + "─" * 50 + "┐") == 3 and out.count("note: 50 token columns are too wide") == 1
    titles = [line.split()[0] for line in out.splitlines() if line.endswith("keeps 4 of 50")]
    assert titles == ["cls", "fastv", "random"]
    assert "kept by sgl too" not in out and all(len(line) <= 80 for line in out.splitlines())
    got = json.loads(inspect(image, large_only(tmp_path, tiny_pair), "--guide", "all", "--json").stdout)
    assert list(got["guides"]) == ["cls", "fastv", "random"] and "sgl" in got["skipped"]


def test_all_png_has_a_panel_per_guide_with_the_image_aspect(tmp_path, preset_file):
    from sgl_cli.engine.views.png import png_layout

    image = make_images(tmp_path, sizes=((168, 280),))[0]
    out = tmp_path / "all.png"
    res = inspect(image, preset_file, "--guide", "all", "--png", str(out), "--json")
    assert res.exit_code == 0, res.output
    with Image.open(out) as png:
        png.verify()
    png = Image.open(out).convert("RGB")
    layout = png_layout((168, 280), 4)
    assert (layout.columns, layout.rows) == (2, 2) or (layout.columns, layout.rows) == (4, 1)
    assert png.width == layout.width and png.height > layout.height  # the caption band below the panels
    pixels = np.asarray(png)
    for i in range(4):
        left, top, right, bottom = layout.box(i)
        assert (right - left) * 280 == (bottom - top) * 168  # the image's aspect ratio, exactly
        panel = pixels[top:bottom, left:right].reshape(-1, 3)
        assert (panel == (0, 255, 255)).all(axis=1).any()  # its kept tokens' outline
        assert (pixels[top - 1, left:right] == 255).all() and (pixels[bottom, left:right] == 255).all()


def test_sgl_without_a_small_model_is_one_line_and_exit_2(tmp_path, tiny_pair):
    image = make_images(tmp_path, sizes=((56, 56),))[0]
    res = inspect(image, large_only(tmp_path, tiny_pair))
    assert res.exit_code == 2 and res.stdout == ""
    assert res.stderr == ("sgl: error: preset 'large-only' names no small model, which the sgl guide needs "
                          "(use --guide cls, fastv, random, downsample or all)\n")


def test_fastv_at_the_last_layer_is_one_line_and_exit_2(tmp_path, tiny_pair):
    image = make_images(tmp_path, sizes=((56, 56),))[0]
    res = inspect(image, large_only(tmp_path, tiny_pair, prune_layer=2), "--guide", "fastv")
    assert res.exit_code == 2 and res.stdout == ""
    last = res.stderr.splitlines()[-1]  # after the tiny pair's random-weights warning
    assert last == ("sgl: error: the fastv guide prunes at a layer K in 1..1 (it ranks with layer K-1's attention), "
                    "got prune_layer 2")
