"""Messages that name what is at fault (issue 32): a max_new_tokens the context cannot hold, a resume whose images
now resolve to other files, `-` as the input, a bad `--model_args` value for lmms-eval, a backend's bad token ids;
and lmms-eval's images in any mode sgl converts from a file (CMYK)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sgl_cli.cli import app
from tests.conftest import make_images, write_jsonl

runner = CliRunner()
QUESTIONS = ["What color is the square?", "How many circles are there?", "What shape is red?"]


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture
def no_model_loads(monkeypatch):
    from sgl_cli.engine.backends import transformers as hf_backend

    monkeypatch.setattr(hf_backend, "load_model", lambda *a, **k: pytest.fail("a model loaded"))


# -- 7a: max_new_tokens over the context -------------------------------------------------------------------------
def test_max_new_tokens_that_leaves_no_room_is_said_so(tmp_path, preset_file):
    """The run's max_new_tokens at or over the models' context (4,096) refuses the run in one line naming the flag;
    an item's own max_new_tokens over it is that item's error, worded the same (not "the prompt's text is 97
    characters, over 64 a token of the 1 it may take")."""
    (img,) = make_images(tmp_path, sizes=((56, 56),))
    q = "What is the colour of the big square in the middle of this picture, please?"
    src = write_jsonl(tmp_path / "q.jsonl", [{"image": img.name, "question": q}])
    out = tmp_path / "out.jsonl"
    for n in ("5000", "4096"):
        res = runner.invoke(app, ["run", str(src), "--preset", str(preset_file), "--out", str(out), "-q",
                                  "--max-new-tokens", n])
        assert res.exit_code == 2, res.output
        assert res.stderr == (f"sgl: error: --max-new-tokens {n} leaves no room for a prompt in the models' context "
                              "of 4,096 tokens\n")
        assert not out.exists()
    write_jsonl(src, [{"image": img.name, "question": q, "max_new_tokens": 5000},
                      {"image": img.name, "question": q, "max_new_tokens": 4096},
                      {"image": img.name, "question": q}])
    res = runner.invoke(app, ["run", str(src), "--preset", str(preset_file), "--out", str(out), "-q", "--no-exit"])
    assert res.exit_code == 1, res.output
    first, second, third = records(out)
    assert first["error"] == ("line 1: max_new_tokens 5,000 leaves no room for a prompt in the models' context of "
                              "4,096 tokens")
    assert second["error"] == ("line 2: max_new_tokens 4,096 leaves no room for a prompt in the models' context of "
                               "4,096 tokens")
    assert third["error"] is None and third["answer"] is not None


# -- 7d: resuming where the images resolve to other files --------------------------------------------------------
def _interrupted(folder: Path, preset_file: Path, named: str | None = None) -> tuple[Path, Path, list[str]]:
    """A whole run of three items in `folder` (the input `named` so, default: its absolute path), its output cut to
    two records as a kill leaves it."""
    imgs = make_images(folder, sizes=((56, 56), (84, 56), (56, 84)))
    src = write_jsonl(folder / "batch.jsonl", [{"image": p.name, "question": q} for p, q in zip(imgs, QUESTIONS)])
    out = folder.parent / "out.jsonl"
    res = runner.invoke(app, ["run", named or str(src), "--preset", str(preset_file), "--out", str(out), "-q",
                              "--no-exit", "--max-new-tokens", "3"])
    assert res.exit_code == 0, res.output
    whole = out.read_text().splitlines(keepends=True)
    out.write_text("".join(whole[:2]))
    return src, out, whole


def _resume(src: Path, out: Path, preset_file: Path):
    return runner.invoke(app, ["run", str(src), "--preset", str(preset_file), "--out", str(out), "--resume", "-q",
                               "--no-exit", "--max-new-tokens", "3"])


@pytest.mark.parametrize("how", ["symlink in another folder", "copy in another folder"])
def test_resume_from_elsewhere_says_the_images_resolve_to_other_files(tmp_path, preset_file, monkeypatch, how):
    """The input's bytes are unchanged, but its relative images resolve against another folder: the one line says
    so, naming an image's new and old file, not that "the input changed"; before any model loads."""
    from sgl_cli.engine.backends import transformers as models

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    src, out, _ = _interrupted(tmp_path / "a", preset_file)
    there = tmp_path / "b" / "items.jsonl"
    if how.startswith("symlink"):
        there.symlink_to(src)
    else:
        shutil.copy(src, there)
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("a model loaded"))
    before = out.read_bytes()
    res = _resume(there, out, preset_file)
    assert res.exit_code == 2, res.output
    a, b = (tmp_path / "a").resolve(), (tmp_path / "b").resolve()
    assert res.stderr == (f"sgl: error: cannot resume: line 1 of {there} is unchanged, but its images now resolve to "
                          f"other files than when record 1 of {out} was answered (image 'img0.png' is {b / 'img0.png'}"
                          f", was {a / 'img0.png'}); resume with the input where it was, or write to a new --out\n")
    assert out.read_bytes() == before


@pytest.mark.parametrize("how", ["another working folder", "a linked folder"])
def test_resume_of_the_same_files_named_otherwise_completes(tmp_path, preset_file, monkeypatch, how):
    """The same input and images reached by another name (a relative path from another working folder, a link to
    the folder) are the same files: the resume completes, and equals the whole run."""
    (tmp_path / "a").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    src, out, whole = _interrupted(tmp_path / "a", preset_file, named="batch.jsonl")
    monkeypatch.chdir(tmp_path)
    if how == "a linked folder":
        (tmp_path / "c").symlink_to(tmp_path / "a", target_is_directory=True)
        src = tmp_path / "c" / "batch.jsonl"
    res = _resume(src, out, preset_file)
    assert res.exit_code == 0, res.output
    strip = lambda recs: [{k: v for k, v in r.items() if k != "ms"} for r in recs]  # noqa: E731
    assert strip(records(out)) == strip(json.loads(line) for line in whole)


def test_an_edited_input_elsewhere_still_says_the_input_changed(tmp_path, preset_file):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    src, out, _ = _interrupted(tmp_path / "a", preset_file)
    there = tmp_path / "b" / "items.jsonl"
    there.write_text(src.read_text().replace("square", "circle"))
    res = _resume(there, out, preset_file)
    assert res.exit_code == 2
    assert (f"cannot resume: line 1 of {there} is not the item record 1 of {out} answered: the input changed since "
            "the interrupted run") in res.stderr


# -- 7e: `-` as the input ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", [["run"], ["eval"], ["calibrate", "--exit-rate", "0.5"]])
def test_stdin_as_the_input_is_refused_in_one_line(tmp_path, preset_file, no_model_loads, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, [command[0], "-", *command[1:], "--preset", str(preset_file), "-q"], input="{}\n")
    assert res.exit_code == 2, res.output
    assert res.stderr == (f"sgl: error: sgl {command[0]} reads its items from a file, not from stdin ('-'): it reads "
                          "the input more than once (to count it, to check a resumed run against it) and resolves "
                          "relative image paths against its folder; save the items to a file and name it (a file "
                          "named '-': by its full path)\n")


def test_a_file_named_dash_is_read_by_its_full_path(tmp_path, preset_file, monkeypatch):
    (img,) = make_images(tmp_path, sizes=((56, 56),))
    write_jsonl(tmp_path / "-", [{"image": img.name, "question": "What is red?"}])
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["run", str(tmp_path / "-"), "--preset", str(preset_file), "--out", "o.jsonl", "-q",
                              "--no-exit"])
    assert res.exit_code == 0, res.output
    (rec,) = records(tmp_path / "o.jsonl")
    assert rec["error"] is None and rec["line"] == 1


# -- 7f: lmms-eval's --model_args values -------------------------------------------------------------------------
def test_model_args_values_that_are_not_their_type_name_the_key():
    """lmms-eval gives `retain=abc` as the string 'abc', `retain=true` as True, `max_new_tokens=1.5` as 1.5: each
    is refused naming its key (not "could not convert string to float: 'abc'", not taken as 1.0 or 1)."""
    from sgl_cli.integrations.lmms_eval import SETTINGS, setting

    for key, kind in SETTINGS.items():
        if kind is str:
            assert setting(key, "x", kind) == "x" and setting(key, 3, kind) == "3"
            continue
        what = "an integer" if kind is int else "a number"
        for bad in ("abc", True, *([1.5] if kind is int else [])):
            with pytest.raises(ValueError) as got:
                setting(key, bad, kind)
            assert str(got.value) == f"{key}={bad} is {'not ' + what}"
        assert setting(key, 2, kind) == 2 and type(setting(key, 2, kind)) is kind
    assert setting("retain", "0.25", float) == 0.25 and setting("max_new_tokens", 16.0, int) == 16
    with pytest.raises(ValueError, match=r"^no_exit=abc is not true or false$"):
        setting("no_exit", "abc", bool)
    assert setting("no_exit", True, bool) is True and setting("no_exit", 0, bool) is False


# -- 7g: a backend's bad token ids -------------------------------------------------------------------------------
@pytest.fixture
def bad_ids_engine(echo, tiny_pair):
    """An Engine whose large backend is the echo plugin answering the token ids an item's question asks for."""
    from sgl_cli.engine import backends
    from sgl_cli.engine.core.generate import Generation
    from sgl_cli.engine.pipeline.engine import Engine
    from sgl_cli.engine.preset import ModelSpec, Preset, Settings

    echo_cls = backends.backend_class("echo")

    class Answers(echo_cls):
        def generate(self, works, inputs, kept, k, limits):
            tokens = super().generate(works, inputs, kept, k, limits).tokens
            asked = {"negative": [5, -5], "huge": [2 ** 70], "float": [3, 1.5], "crash": [7, 7, 7]}
            tokens = [asked.get(w.item.question, t) for w, t in zip(works, tokens)]
            return Generation(tokens, [[1.0] * len(t) for t in tokens])

        def decode(self, tokens):
            if tokens == [7, 7, 7]:
                exc = OverflowError("boom")
                exc.add_note("while processing 'ids'")
                raise exc
            return super().decode(tokens)

    def make(batch_size):
        settings = Settings(threshold=None, max_new_tokens=6, prompt_suffix="Answer with one word.", retain=0.25,
                            batch_size=batch_size)
        preset = Preset("t", ModelSpec(str(tiny_pair["small"]), dtype="float32"),
                        ModelSpec(str(tiny_pair["large"]), dtype="float32", backend="echo"), settings)
        eng = Engine.load(preset)
        return Engine(settings, eng.small, Answers.load(preset.large), preset)

    return make


def test_bad_token_ids_from_a_backend_name_it_and_the_item(bad_ids_engine, tmp_path):
    from sgl_cli.engine import read_items

    (img,) = make_images(tmp_path, sizes=((56, 56),))
    questions = ["fine", "negative", "huge", "float", "fine too"]
    src = write_jsonl(tmp_path / "q.jsonl", [{"image": img.name, "question": q} for q in questions])
    for batch_size in (1, 5):
        recs = list(bad_ids_engine(batch_size).run(read_items(src)))
        assert [r["line"] for r in recs] == [1, 2, 3, 4, 5]
        assert [r["error"] for r in recs] == [
            None,
            "line 2: the echo backend returned token id -5, outside the vocabulary of 320",
            f"line 3: the echo backend returned token id {2 ** 70}, outside the vocabulary of 320",
            # not an id at all: the contract every backend's answers are checked against (plugins.py) says so
            "line 4: large backend plugin 'echo': generate gave an answer that is not a list of token ids "
            "(list [3, 1.5])",
            None], batch_size
        assert recs[0]["answer"].startswith("kept ") and recs[4]["answer"].startswith("kept ")


def test_an_exception_note_follows_its_message_in_the_record(bad_ids_engine, tmp_path):
    """An exception that carries a note (tokenizers' "while processing 'ids'") is recorded by its own message,
    the note after it: not by the note alone."""
    from sgl_cli.engine.io.items import ImageRef, Item

    (img,) = make_images(tmp_path, sizes=((56, 56),))
    (rec,) = bad_ids_engine(1).process([Item(line=4, id=4, images=[ImageRef.path(img)], question="crash")])
    assert rec["error"] == "line 4: large stage failed: OverflowError: boom (while processing 'ids')"


# -- 6: lmms-eval's images in any mode a file may have -----------------------------------------------------------
def _picture(tmp_path: Path, mode: str) -> Path:
    """A noise picture in `mode`, saved in a format that keeps the mode."""
    import numpy as np
    from PIL import Image

    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8))
    if mode == "I;16":
        im = Image.fromarray((np.asarray(rgb.convert("L"), dtype=np.uint16) * 257))
    elif mode == "F":
        im = Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.float32) / 255)
    elif mode == "LAB":
        im = rgb.convert("LAB")
    else:
        im = rgb.convert(mode)
    assert im.mode == mode
    suffix = {"CMYK": ".jpg", "F": ".tif", "LAB": ".tif"}.get(mode, ".png")
    path = tmp_path / f"pic-{mode.replace(';', '')}{suffix}"
    im.save(path)
    return path


@pytest.mark.parametrize("mode", ["CMYK", "LAB", "F", "I;16", "RGBA", "LA", "P", "L", "1", "RGB"])
def test_a_task_image_in_any_mode_is_converted_as_its_file_is(tmp_path, mode):
    """What a task's doc_to_visual returns (the picture a dataset decoded, in its file's mode: a CMYK JPEG stays
    CMYK) reaches the engine as the same pixels `sgl run` reads from that file (before: "cannot write mode CMYK as
    PNG")."""
    import numpy as np
    from PIL import Image

    from sgl_cli.engine.io.images import load_image
    from sgl_cli.engine.io.items import ImageRef, Item
    from sgl_cli.integrations.lmms_eval import image_refs

    path = _picture(tmp_path, mode)
    with Image.open(path) as opened:
        opened.load()
        assert opened.mode == mode or mode == "I;16"  # a 16-bit PNG may open as I
        (ref,) = image_refs([opened], "t row 1")
    assert ref.kind == "bytes"
    from_task = load_image(Item(line=1, id=1, images=[ref]))
    from_file = load_image(Item(line=1, id=1, images=[ImageRef.path(path)]))
    assert from_task.mode == from_file.mode == "RGB"
    assert np.array_equal(np.asarray(from_task), np.asarray(from_file))


def test_a_task_image_sgl_cannot_convert_is_said_naming_it():
    from PIL import Image

    from sgl_cli.integrations.lmms_eval import image_refs

    with pytest.raises(ValueError, match=r"^visual 2 has float values from 300 to 300, outside 0-1 and 0-255"):
        image_refs([Image.new("RGB", (4, 4)), Image.new("F", (4, 4), 300.0)], "t row 1")


def test_a_cmyk_task_image_is_answered_as_sgl_run_answers_its_file(tmp_path, preset_file):
    """Through the engine (the transformers backend): the item the adapter makes from a CMYK picture gets the
    record `sgl run` writes for the CMYK JPEG it came from."""
    from PIL import Image

    from sgl_cli.engine import Engine, Item, load_preset, read_items
    from sgl_cli.integrations.lmms_eval import image_refs

    path = _picture(tmp_path, "CMYK")
    src = write_jsonl(tmp_path / "q.jsonl", [{"image": path.name, "question": "What is red?"}])
    engine = Engine.load(load_preset(str(preset_file)).with_settings(no_exit=True))
    (from_file,) = engine.run(read_items(src))
    with Image.open(path) as opened:
        item = Item(line=1, id=1, images=image_refs([opened], "t row 1"), question="What is red?", unit="line")
    (from_task,) = engine.run([item])
    assert from_file["error"] is None and from_file["answer"]
    assert {k: v for k, v in from_task.items() if k != "ms"} == {k: v for k, v in from_file.items() if k != "ms"}
