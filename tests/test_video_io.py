"""Video input (`io/video.py`, `io/items.py`'s `video`): sampling times, decoded frames checked against decoding
every frame with PyAV, limits, refusals, frame-image lists and JSONL parsing. Videos are written here with PyAV."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest

av = pytest.importorskip("av")

from sgl_cli.engine.errors import ItemError  # noqa: E402
from sgl_cli.engine.io import video as video_mod  # noqa: E402
from sgl_cli.engine.io.items import parse_line  # noqa: E402
from sgl_cli.engine.io.video import VideoLimits, load_video, sample_times  # noqa: E402

W, H = 64, 48


def colour(i: int) -> tuple[int, int, int]:
    """Frame i's solid colour: its number in steps of 16 (survives yuv420p), unique up to 4096 frames."""
    return (i % 16 * 16 + 8, i // 16 % 16 * 16 + 8, i // 256 * 16 + 8)


def frame_number(pixels: np.ndarray) -> int:
    r, g, b = (round((int(v) - 8) / 16) for v in pixels[H // 2, W // 2])
    return r + 16 * g + 256 * b


def write_video(path: Path, n: int, fps: int, gop: int = 12, faststart: bool = False) -> Path:
    with av.open(str(path), "w", options={"movflags": "faststart"} if faststart else {}) as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.options = {"crf": "0"}
        stream.codec_context.gop_size = gop
        for i in range(n):
            pixels = np.empty((H, W, 3), np.uint8)
            pixels[:] = colour(i)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        out.mux(stream.encode())
    return path


def every_frame(path: Path) -> list[tuple[float, np.ndarray]]:
    """The reference: (time, RGB pixels) of every frame, decoded straight through."""
    with av.open(str(path)) as c:
        return [(f.time, f.to_ndarray(format="rgb24")) for f in c.decode(c.streams.video[0])]


def shown_at(frames: list, t: float) -> tuple[int, float, np.ndarray]:
    """The frame shown at time t: the last one whose time is at or before it."""
    i = max(k for k, (time, _) in enumerate(frames) if time <= t + 1e-9)
    return (i, *frames[i])


def item_of(obj: dict, base: Path, line: int = 3):
    item = parse_line(json.dumps({"question": "What happens?", **obj}).encode(), line, base)
    assert item.error is None, item.error
    return item


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("videos")
    return {"short": write_video(d / "short.mp4", 50, 25),  # 2 s
            "long": write_video(d / "long.mp4", 300, 10, gop=20),  # 30 s, a keyframe every 2 s
            "faststart": write_video(d / "fast.mp4", 50, 25, faststart=True)}  # its index before its frames


@pytest.mark.parametrize("duration, fps, max_frames, expected", [
    (2.0, 2.0, 64, [0.25, 0.75, 1.25, 1.75]),  # one per 1/fps s, at the middle of each interval
    (1.3, 2.0, 64, [1.3 / 6, 1.3 / 2, 1.3 * 5 / 6]),  # round(2.6) = 3, spread over the whole duration
    (0.2, 2.0, 64, [0.1]),  # round(0.4) = 0: still one frame
    (10.0, 2.0, 4, [1.25, 3.75, 6.25, 8.75]),  # 20 capped at 4, spread evenly over the whole video
    (30.0, 0.2, 64, [2.5, 7.5, 12.5, 17.5, 22.5, 27.5]),
])
def test_sample_times(duration, fps, max_frames, expected):
    assert sample_times(duration, fps, max_frames) == pytest.approx(expected)


class SeekCounter:
    """av.open, counting the container's seeks."""

    def __init__(self, monkeypatch):
        self.seeks: list[int] = []
        real_open = av.open
        counter = self

        class Counted:
            def __init__(self, container):
                self._c = container

            def __getattr__(self, name):
                return getattr(self._c, name)

            def __enter__(self):
                self._c.__enter__()
                return self

            def __exit__(self, *exc):
                return self._c.__exit__(*exc)

            def seek(self, offset, **kw):
                counter.seeks.append(offset)
                return self._c.seek(offset, **kw)

        monkeypatch.setattr(av, "open", lambda *a, **kw: Counted(real_open(*a, **kw)))


@pytest.mark.parametrize("name, fps, max_frames, count, duration, seeks", [
    ("short", 2.0, 64, 4, 2.0, False),
    ("short", 25.0, 64, 50, 2.0, False),  # every frame
    ("short", 2.0, 3, 3, 2.0, False),
    ("long", 0.2, 64, 6, 30.0, True),  # samples 5 s apart: over SEEK_GAP_S, so the decoder seeks
    ("long", 0.5, 8, 8, 30.0, False),
])
def test_sampled_frames_are_the_frames_shown(videos, tmp_path, monkeypatch, name, fps, max_frames, count, duration,
                                             seeks):
    path = videos[name]
    reference = every_frame(path)
    counter = SeekCounter(monkeypatch)
    item = item_of({"video": str(path)}, tmp_path)
    video = load_video(item, limits=VideoLimits(fps=fps, max_frames=max_frames))
    assert bool(counter.seeks) is seeks
    assert len(video.frames) == len(video.times) == count
    assert video.duration == pytest.approx(duration)
    assert video.fps == pytest.approx(count / duration)
    assert video.size == (W, H) and video.label == path.name
    assert video.metadata["total_num_frames"] == count
    for t, got_time, image in zip(sample_times(duration, fps, max_frames), video.times, video.frames):
        i, ref_time, ref_pixels = shown_at(reference, t)
        pixels = np.asarray(image)
        assert image.mode == "RGB" and got_time == pytest.approx(ref_time)
        assert np.array_equal(pixels, ref_pixels), f"sample at {t:.2f} s is not frame {i}"
        assert frame_number(pixels) == i
    if seeks:  # decoding straight through, without seeking, gives the same frames
        monkeypatch.setattr(video_mod, "SEEK_GAP_S", float("inf"))
        counter.seeks.clear()
        straight = load_video(item, limits=VideoLimits(fps=fps, max_frames=max_frames))
        assert not counter.seeks
        assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(straight.frames, video.frames))


@pytest.mark.parametrize("own, limits, count", [
    ({}, VideoLimits(fps=1.0), 2),
    ({"fps": 4}, VideoLimits(fps=1.0), 8),  # the item's fps over the preset's
    ({"fps": 4, "max_frames": 5}, VideoLimits(fps=1.0, max_frames=64), 5),  # and its max_frames
    ({"max_frames": 3}, VideoLimits(fps=25.0, max_frames=2), 3),
    ({"fps": 4}, VideoLimits(max_frames=6), 6),  # the preset's max_frames still bounds the item's fps
])
def test_item_sampling_overrides_limits(videos, tmp_path, own, limits, count):
    video = load_video(item_of({"video": str(videos["short"]), **own}, tmp_path), limits=limits)
    assert len(video.frames) == count
    assert video.fps == pytest.approx(count / 2.0)


def test_data_uri_video_decodes_like_the_file(videos, tmp_path):
    uri = "data:video/mp4;base64," + base64.b64encode(videos["short"].read_bytes()).decode()
    from_uri = load_video(item_of({"video": uri}, tmp_path), limits=VideoLimits(fps=2.0))
    from_file = load_video(item_of({"video": str(videos["short"])}, tmp_path), limits=VideoLimits(fps=2.0))
    assert from_uri.label == "data URI" and len(from_uri.frames) == 4
    assert from_uri.times == from_file.times
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(from_uri.frames, from_file.frames))


def _refusal_source(case: str, videos: dict, tmp: Path) -> str:
    if case == "empty":
        (tmp / "empty.mp4").write_bytes(b"")
    elif case == "text":
        (tmp / "notes.mp4").write_text("these are my notes, not a video\n" * 20)
    elif case == "cut":  # the first half of an mp4 whose index comes last: no index at all
        data = videos["short"].read_bytes()
        (tmp / "cut.mp4").write_bytes(data[: len(data) // 2])
    elif case == "cut_faststart":  # index first, half the frames missing: not one frame repeated
        data = videos["faststart"].read_bytes()
        (tmp / "cut_fast.mp4").write_bytes(data[: len(data) // 2])
    elif case == "folder":
        (tmp / "clips.mp4").mkdir()
    return {"empty": "empty.mp4", "text": "notes.mp4", "cut": "cut.mp4", "cut_faststart": "cut_fast.mp4",
            "missing": "nowhere.mp4", "folder": "clips.mp4", "long": str(videos["long"]),
            "pixels": str(videos["short"]), "wrong_type": "data:text/plain;base64," + base64.b64encode(b"hi").decode(),
            "url": "https://example.com/clip.mp4"}[case]


@pytest.mark.parametrize("case, label, reason, limits", [
    ("empty", "empty.mp4", "is empty (0 bytes)", None),
    ("text", "notes.mp4", "cannot be read: it is not a video", None),
    ("cut", "cut.mp4", "cannot be read", None),
    ("cut_faststart", "cut_fast.mp4", "truncated or damaged", None),
    ("missing", "nowhere.mp4", "not found", None),
    ("folder", "clips.mp4", "is a folder", None),
    ("long", "long.mp4", "is 30 s long, over the 10 s limit", VideoLimits(max_seconds=10)),
    ("pixels", "short.mp4", "has 64x48 frames, over the 3,071-pixel limit", VideoLimits(max_pixels=W * H - 1)),
    ("wrong_type", "data URI", "is text/plain, not a video", None),
    ("url", "https://example.com/clip.mp4", "is a URL and fetching is off", None),
])
def test_refusals_name_the_line_and_the_video(videos, tmp_path, case, label, reason, limits):
    item = item_of({"video": _refusal_source(case, videos, tmp_path)}, tmp_path, line=7)
    with pytest.raises(ItemError) as info:
        load_video(item, fetcher=None, limits=limits)
    message = str(info.value)
    assert message.startswith(f"line 7: video '{label}'"), message
    assert reason in message, message


@pytest.fixture
def frame_files(tmp_path) -> list[str]:
    from PIL import Image

    names = []
    for i in range(3):
        names.append(f"f{i}.png")
        Image.new("RGB", (W, H), colour(i * 5)).save(tmp_path / names[-1])
    return names


def test_frame_images_are_a_video(tmp_path, frame_files):
    item = item_of({"video": frame_files, "fps": 4}, tmp_path)
    assert [r.label for r in item.video.frames] == frame_files and item.video.label == "3 frames"
    video = load_video(item, limits=VideoLimits(fps=1.0))
    assert [frame_number(np.asarray(im)) for im in video.frames] == [0, 5, 10]  # in order, exact (PNG)
    assert video.fps == 4.0 and video.duration == pytest.approx(0.75)
    assert video.times == pytest.approx([0.125, 0.375, 0.625])
    assert video.size == (W, H)
    # More frames than max_frames: that many, the middle one of each equal share, spanning the same time.
    fewer = load_video(item_of({"video": frame_files, "fps": 4, "max_frames": 2}, tmp_path))
    assert [frame_number(np.asarray(im)) for im in fewer.frames] == [0, 10]
    assert fewer.duration == pytest.approx(0.75) and fewer.fps == pytest.approx(2 / 0.75)
    assert fewer.times == pytest.approx([0.1875, 0.5625])


def test_frame_images_of_different_sizes_are_refused(tmp_path, frame_files):
    from PIL import Image

    Image.new("RGB", (32, 32), (0, 0, 0)).save(tmp_path / "small.png")
    item = item_of({"video": [*frame_files, "small.png"]}, tmp_path, line=4)
    with pytest.raises(ItemError, match=r"^line 4: video '4 frames': its frames differ in size \(32x32, 64x48\)"):
        load_video(item)


@pytest.mark.parametrize("obj, error", [
    ({"video": "v.mp4", "fps": 0}, "line 3: field 'fps' must be a number of frames per second, above 0 and at most 60"),
    ({"video": "v.mp4", "fps": 61}, "line 3: field 'fps' must be"),
    ({"video": "v.mp4", "fps": "2"}, "line 3: field 'fps' must be"),
    ({"video": "v.mp4", "fps": True}, "line 3: field 'fps' must be"),
    ({"video": "v.mp4", "max_frames": 0}, "line 3: field 'max_frames' must be an integer from 1 to 4096, got 0"),
    ({"video": "v.mp4", "max_frames": True}, "line 3: field 'max_frames' must be an integer from 1 to 4096, got True"),
    ({"video": "v.mp4", "max_frames": 2.0}, "line 3: field 'max_frames' must be an integer"),
    ({"image": "a.png", "fps": 2}, "line 3: field 'fps' is given without a 'video'"),
    ({"image": "a.png", "max_frames": 2}, "line 3: field 'max_frames' is given without a 'video'"),
    ({"video": []}, "line 3: field 'video' must be a video's path, URL or data URI, or a non-empty list"),
    ({"video": "  "}, "line 3: field 'video' must be"),
    ({"video": ["a.png", 5]}, "line 3: field 'video[1]' must be a frame image's path, URL or data URI, got 5"),
    ({"question": "q"}, "line 3: missing field 'image' (or 'video')"),
])
def test_jsonl_video_errors(tmp_path, obj, error):
    item = parse_line(json.dumps({"question": "q", **obj}), 3, tmp_path)
    assert item.error is not None and item.error.startswith(error), item.error
    assert item.video is None


def test_jsonl_video_alone_and_with_images(tmp_path):
    alone = parse_line(b'{"video": "clips/v.mp4", "question": " What happens? "}', 2, tmp_path)
    assert alone.error is None and alone.images == []
    assert alone.video.source.kind == "path" and alone.video.source.value == tmp_path / "clips" / "v.mp4"
    assert alone.video.label == "v.mp4" and alone.video.fps is None and alone.video.max_frames is None
    assert alone.messages() == [{"role": "user", "content": [{"type": "video"},
                                                             {"type": "text", "text": "What happens?"}]}]

    both = parse_line(json.dumps({"images": ["a.png", "b.png"], "video": "https://x.org/v.webm", "fps": 1.5,
                                  "max_frames": 8, "question": "Compare."}), 5, tmp_path)
    assert both.error is None and [r.label for r in both.images] == ["a.png", "b.png"]
    assert both.video.source.kind == "url" and both.video.fps == 1.5 and both.video.max_frames == 8
    content = both.messages(suffix="Answer briefly.")[-1]["content"]
    assert [p["type"] for p in content] == ["image", "image", "video", "text"]
    assert content[-1]["text"] == "Compare.\nAnswer briefly."
    assert parse_line(b'{"image": "a.png", "question": "q"}', 1, tmp_path).messages()[-1]["content"] == [
        {"type": "image"}, {"type": "text", "text": "q"}]  # no video part without a video
