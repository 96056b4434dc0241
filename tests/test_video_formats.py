"""Video in the other item formats: OpenAI Batch `video_url` parts (with vLLM's `mm_processor_kwargs` sampling) and
Parquet / datasets video columns, parsed field by field and decoded with `io/video.py`. Clips are written here with
PyAV; no model is loaded."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest

av = pytest.importorskip("av")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from sgl_cli.engine.io.formats import Columns, InputError, open_source, read_items  # noqa: E402
from sgl_cli.engine.io.items import ImageRef  # noqa: E402
from sgl_cli.engine.io.video import VideoLimits, load_video  # noqa: E402

Q = "What happens?"
W, H, FRAMES, RATE = 64, 48, 8, 4  # a 2 s clip


def write_clip(path: Path) -> Path:
    """8 solid frames at 4 fps, 64x48: 2 s of footage."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=RATE)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        for i in range(FRAMES):
            pixels = np.full((H, W, 3), i * 30, np.uint8)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        out.mux(stream.encode())
    return path


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return write_clip(tmp_path_factory.mktemp("clips") / "clip.mp4")


# -- OpenAI Batch files -----------------------------------------------------------------------------------------------
def request(custom_id: str, messages: list, **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "any", "messages": messages, **body}}


def video_part(url) -> dict:
    return {"type": "video_url", "video_url": {"url": url}}


def image_part(url) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def text(t: str) -> dict:
    return {"type": "text", "text": t}


def openai_items(path: Path, requests: list[dict]) -> list:
    path.write_text("".join(json.dumps(r) + "\n" for r in requests))
    source = open_source(path)
    assert source.kind == "openai"
    return list(read_items(path))


def test_openai_data_uri_video_keeps_its_place_and_decodes(tmp_path, clip):
    uri = "data:video/mp4;base64," + base64.b64encode(clip.read_bytes()).decode()
    (item,) = openai_items(tmp_path / "batch.jsonl", [
        request("v", [{"role": "user", "content": [text("Watch:"), video_part(uri), image_part("cat.png"), text(Q)]}],
                mm_processor_kwargs={"fps": 4, "max_frames": 6, "do_sample_frames": True}),
    ])
    assert item.error is None, item.error
    assert item.custom_id == item.id == "v" and item.line == 1
    assert item.images == [ImageRef("path", tmp_path / "cat.png", "cat.png")]
    video = item.video
    assert video.source == ImageRef("data", uri, "data URI") and video.frames == ()
    assert video.fps == 4.0 and isinstance(video.fps, float) and video.max_frames == 6
    assert video.label == "data URI"
    # The video stays where the request put it: between the first text and the image.
    want = [text("Watch:"), {"type": "video"}, {"type": "image"}, text(Q)]
    assert item.parts == want
    assert item.question == f"Watch:\n{Q}"
    assert item.messages() == [{"role": "user", "content": want}]
    assert item.messages("Be brief.")[-1]["content"][-1] == text(f"{Q}\nBe brief.")
    # Decoded at the request's own rate (4 fps over 2 s: 8 frames), capped at its max_frames (6, spread evenly).
    decoded = load_video(item, limits=VideoLimits(fps=1.0, max_frames=64))
    assert len(decoded.frames) == 6 and decoded.fps == pytest.approx(3.0)
    assert decoded.duration == pytest.approx(2.0) and decoded.size == (W, H) and decoded.label == "data URI"


def test_openai_video_without_images_and_without_sampling(tmp_path, clip):
    uri = "data:video/mp4;base64," + base64.b64encode(clip.read_bytes()).decode()
    items = openai_items(tmp_path / "batch.jsonl", [
        request("url", [{"role": "user", "content": [video_part("https://example.com/v/clip.mp4"), text(Q)]}]),
        request("path", [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": [text(Q), {"type": "video_url", "video_url": "clips/a.mp4"}]}]),
        request("data", [{"role": "user", "content": [video_part(uri), text(Q)]}], mm_processor_kwargs={}),
        request("history", [{"role": "user", "content": [video_part("first.mp4"), text("What is shown?")]},
                            {"role": "assistant", "content": "A ball."},
                            {"role": "user", "content": Q}]),
    ])
    assert [i.error for i in items] == [None] * 4
    url, path, data, history = items
    assert url.images == [] and url.video.source == ImageRef("url", "https://example.com/v/clip.mp4",
                                                             "https://example.com/v/clip.mp4")
    assert url.video.fps is None and url.video.max_frames is None
    assert url.messages() == [{"role": "user", "content": [{"type": "video"}, text(Q)]}]
    # A bare string under video_url, as for image_url; a relative path resolves against the batch file's folder.
    assert path.video.source == ImageRef("path", tmp_path / "clips" / "a.mp4", "a.mp4")
    assert path.messages() == [{"role": "system", "content": [text("Be brief.")]},
                               {"role": "user", "content": [text(Q), {"type": "video"}]}]
    # No sampling in the request: the preset's (VideoLimits) applies, 2 fps over 2 s.
    decoded = load_video(data, limits=VideoLimits(fps=2.0, max_frames=64))
    assert len(decoded.frames) == 4 and decoded.fps == pytest.approx(2.0)
    # A video in an earlier turn is the item's video, shown in that turn.
    assert history.video.source == ImageRef("path", tmp_path / "first.mp4", "first.mp4")
    assert history.history == [{"role": "user", "content": [{"type": "video"}, text("What is shown?")]},
                               {"role": "assistant", "content": [text("A ball.")]}]
    assert history.parts == [text(Q)] and history.question == Q


@pytest.mark.parametrize("messages, body, why", [
    ([{"role": "user", "content": [video_part("a.mp4"), video_part("b.mp4"), text(Q)]}], {},
     "messages[0].content[1].video_url: a second video; sgl takes one video per request"),
    ([{"role": "user", "content": [video_part("a.mp4"), text("?")]}, {"role": "assistant", "content": "x"},
      {"role": "user", "content": [text(Q), video_part("b.mp4")]}], {},
     "messages[2].content[1].video_url: a second video"),
    ([{"role": "user", "content": [text(Q), video_part("  ")]}], {},
     "messages[0].content[1].video_url.url must be a non-empty string, got '  '"),
    ([{"role": "user", "content": [{"type": "video_url", "video_url": {"uri": "a.mp4"}}, text(Q)]}], {},
     "messages[0].content[0].video_url.url must be a non-empty string, got None"),
    ([{"role": "user", "content": [text(Q), {"type": "input_video", "url": "a.mp4"}]}], {},
     "messages[0].content[1] must be a text, image_url or video_url part"),
    ([{"role": "user", "content": Q}], {},
     "no image_url part in the messages, nor a video_url one"),
    ([{"role": "user", "content": [video_part("a.mp4")]}], {},
     "the last user message has no text"),
    ([{"role": "user", "content": [image_part("a.png"), text(Q)]}], {"mm_processor_kwargs": {"fps": 1}},
     "body mm_processor_kwargs.fps is given without a video_url part"),
    ([{"role": "user", "content": [video_part("a.mp4"), text(Q)]}], {"mm_processor_kwargs": {"fps": 0}},
     "body mm_processor_kwargs.fps must be a number of frames per second, above 0 and at most 60, got 0"),
    ([{"role": "user", "content": [video_part("a.mp4"), text(Q)]}], {"mm_processor_kwargs": {"fps": True}},
     "body mm_processor_kwargs.fps must be a number"),
    ([{"role": "user", "content": [video_part("a.mp4"), text(Q)]}], {"mm_processor_kwargs": {"max_frames": 2.5}},
     "body mm_processor_kwargs.max_frames must be an integer from 1 to 4096, got 2.5"),
    ([{"role": "user", "content": [video_part("a.mp4"), text(Q)]}], {"mm_processor_kwargs": {"max_pixels": 9}},
     "body mm_processor_kwargs 'max_pixels' is not supported by sgl"),
    ([{"role": "user", "content": [video_part("a.mp4"), text(Q)]}],
     {"mm_processor_kwargs": {"do_sample_frames": False}},
     "body mm_processor_kwargs.do_sample_frames False: sgl always samples the frames itself"),
    ([{"role": "user", "content": [video_part("a.mp4"), text(Q)]}], {"mm_processor_kwargs": [1]},
     "body mm_processor_kwargs must be an object, got [1]"),
])
def test_openai_video_errors_name_the_line_and_field(tmp_path, messages, body, why):
    ok = request("ok", [{"role": "user", "content": [video_part("a.mp4"), text(Q)]}])
    first, item = openai_items(tmp_path / "batch.jsonl", [ok, request("bad", messages, **body)])
    assert first.error is None and first.video is not None
    assert item.custom_id == "bad" and item.line == 2
    assert item.error.startswith(f"line 2: {why}"), item.error


# -- Parquet and datasets ---------------------------------------------------------------------------------------------
def test_parquet_video_bytes_row_without_an_image_decodes(tmp_path, clip):
    data = clip.read_bytes()
    src = tmp_path / "videos.parquet"
    pq.write_table(pa.table({"video": [data], "question": [Q], "answer": ["a ball"]}), src)
    (item,) = read_items(src)
    assert item.error is None, item.error
    assert item.unit == "row" and item.line == item.id == 1 and item.reference == "a ball"
    assert item.images == []
    assert item.video.source == ImageRef("bytes", data, "row 1 video bytes")
    assert item.video.fps is None and item.video.max_frames is None and item.video.label == "row 1 video bytes"
    assert item.parts is None
    assert item.messages() == [{"role": "user", "content": [{"type": "video"}, text(Q)]}]
    decoded = load_video(item, limits=VideoLimits(fps=4.0, max_frames=64))
    assert len(decoded.frames) == FRAMES and decoded.fps == pytest.approx(RATE)
    assert decoded.size == (W, H) and decoded.label == "row 1 video bytes"


def test_parquet_image_and_video_columns_row_by_row(tmp_path, clip):
    data = clip.read_bytes()
    src = tmp_path / "mixed.parquet"
    pq.write_table(pa.table({
        "image": ["cat.png", None, None, None, "dog.png"],
        "video": [{"bytes": None, "path": "clip.mp4"}, None, {"bytes": data, "path": "ignored.mp4"},
                  {"bytes": None, "path": None}, None],
        "question": [Q] * 5,
        "id": ["a", "b", "c", "d", "e"],
    }), src, row_group_size=2)
    items = list(read_items(src))
    assert [i.line for i in items] == [1, 2, 3, 4, 5] and [i.id for i in items] == list("abcde")
    both, neither, struct, null_struct, image = items
    assert both.error is None and both.images == [ImageRef("path", tmp_path / "cat.png", "cat.png")]
    assert both.video.source == ImageRef("path", tmp_path / "clip.mp4", "clip.mp4")
    assert both.messages() == [{"role": "user", "content": [{"type": "image"}, {"type": "video"}, text(Q)]}]
    assert neither.error == "row 2: the row holds neither an image nor a video (its video column is empty)"
    assert neither.images == [] and neither.video is None
    assert struct.error is None and struct.images == []
    assert struct.video.source == ImageRef("bytes", data, "row 3 video bytes")
    assert null_struct.error == "row 4: the video column holds no video (got None)"
    assert image.error is None and image.video is None
    assert image.images == [ImageRef("path", tmp_path / "dog.png", "dog.png")]
    assert image.messages() == [{"role": "user", "content": [{"type": "image"}, text(Q)]}]
    # The struct's bytes decode as the file does.
    decoded = load_video(struct, limits=VideoLimits(fps=2.0, max_frames=64))
    assert len(decoded.frames) == 4 and decoded.fps == pytest.approx(2.0)
    # Strings in a table of videos alone (no image column): URLs, data URIs, paths; an empty one is the row's error.
    uri = "data:video/mp4;base64," + base64.b64encode(data).decode()
    strings = tmp_path / "strings.parquet"
    pq.write_table(pa.table({"video": ["https://example.com/v.mp4", uri, "", None], "question": [Q] * 4}), strings)
    url, inline, empty, none = read_items(strings)
    assert url.error is None and url.images == []
    assert url.video.source == ImageRef("url", "https://example.com/v.mp4", "https://example.com/v.mp4")
    assert inline.error is None and inline.video.source == ImageRef("data", uri, "data URI")
    assert empty.error == "row 3: the video column holds no video (got '')" and empty.video is None
    assert none.error == "row 4: the row holds neither an image nor a video (its video column is empty)"


def test_the_video_column_is_renamed_with_columns(tmp_path, clip):
    src = tmp_path / "renamed.parquet"
    pq.write_table(pa.table({"clip": [clip.name], "video": ["not this one.mp4"], "query": [Q]}), src)
    (item,) = read_items(src, columns=Columns(question="query", video="clip"))
    assert item.error is None and item.images == []
    assert item.video.source == ImageRef("path", tmp_path / clip.name, clip.name)
    # A table with neither an image column nor a video column is refused before any row, naming both.
    bare = tmp_path / "bare.parquet"
    pq.write_table(pa.table({"query": [Q]}), bare)
    with pytest.raises(InputError) as exc:
        list(read_items(bare, columns=Columns(question="query")))
    assert "no column 'image' (columns: query); name them with --image-column / --question-column (or a 'video' " \
        "column of videos)" in str(exc.value)


def test_a_saved_dataset_with_a_video_feature(tmp_path, clip):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"video": datasets.Video(decode=False), "question": datasets.Value("string")})
    ds = datasets.Dataset.from_dict({"video": [str(clip), clip.read_bytes()], "question": [Q, Q]}, features=features)
    ds.save_to_disk(str(tmp_path / "ds"))
    first, second = read_items(tmp_path / "ds")
    assert first.error is None and second.error is None and first.images == second.images == []
    # save_to_disk embeds a local file's bytes in the struct (beside its path): the bytes are read, as for images.
    assert first.video.source == ImageRef("bytes", clip.read_bytes(), "row 1 video bytes")
    assert second.video.source == ImageRef("bytes", clip.read_bytes(), "row 2 video bytes")
    assert len(load_video(second, limits=VideoLimits(fps=4.0, max_frames=64)).frames) == FRAMES
