"""Video items where the pair cannot take them (the models' side is tested in tests_vllm/test_video.py, in the
environment with torchvision): each such item is one error record saying why and what to do, and the image items
of the same run are answered as before."""

from __future__ import annotations

import json

import numpy as np
import pytest


def _clip(path, frames: int = 8, fps: int = 4):
    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        for i in range(frames):
            a = np.full((48, 64, 3), 20 * i, dtype=np.uint8)
            for packet in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)


def test_a_video_item_without_a_video_processor_is_one_error_record(engine_factory, tmp_path):
    from PIL import Image

    from sgl_cli.engine import read_items

    _clip(tmp_path / "clip.mp4")
    Image.new("RGB", (64, 48), (200, 30, 30)).save(tmp_path / "red.png")
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"video": "clip.mp4", "question": "what?"}) + "\n"
                   + json.dumps({"image": "red.png", "question": "what?"}) + "\n")
    eng = engine_factory(retain=0.5)
    video, image = list(eng.run(read_items(src)))
    # This environment has no torchvision: the tiny pair's processor is image-only.
    assert video["error"] == ("line 1: video 'clip.mp4': this processor has no video processor: transformers' video "
                              "processors need torchvision (pip install torchvision, the build matching your torch)")
    assert image["error"] is None and image["answer"] == list(engine_factory(retain=0.5).run(
        read_items(src)))[1]["answer"] and image["visual_tokens"] > 0


def test_a_video_item_on_a_backend_without_video_is_refused_by_name(engine_factory, tmp_path, monkeypatch):
    from sgl_cli.engine import read_items

    _clip(tmp_path / "clip.mp4")
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"video": "clip.mp4", "question": "what?"}) + "\n")
    eng = engine_factory()
    monkeypatch.setattr(eng.large, "takes_video", False)  # a backend that declares no video (vLLM, for now)
    (rec,) = list(eng.run(read_items(src)))
    assert rec["error"].startswith("line 1: video items are not supported on the ")
    assert "large model yet (sgl runs video on Qwen2-VL, Qwen2.5-VL and Qwen3-VL with transformers, and on " \
        "Qwen2-VL and Qwen2.5-VL with vLLM)" in rec["error"]


def test_resume_fingerprints_cover_where_the_video_resolves(tmp_path):
    """`input_sha` and the calibration cache's item key name the video's file: the same line with its relative
    video path read from another folder (another file) differs, and an image item's fingerprint is unchanged."""
    from sgl_cli.engine.evaluation.calibrate import item_key
    from sgl_cli.engine.io.items import parse_line
    from sgl_cli.engine.io.output import input_fingerprint

    line = json.dumps({"video": "clip.mp4", "question": "what?"}).encode()
    a, b = tmp_path / "a", tmp_path / "b"
    here, there = parse_line(line, 1, a), parse_line(line, 1, b)
    assert here.video.source.value == a / "clip.mp4"
    assert input_fingerprint(line, here) != input_fingerprint(line, there)
    assert item_key(here) != item_key(there)
    assert input_fingerprint(line, here) == input_fingerprint(line, parse_line(line, 1, a))
    image = json.dumps({"image": "x.png", "question": "what?"}).encode()
    faster = parse_line(json.dumps({"video": "clip.mp4", "question": "what?", "fps": 1}).encode(), 1, a)
    assert item_key(faster) != item_key(here)  # another sampling is another input
    assert input_fingerprint(image, parse_line(image, 1, a)) != input_fingerprint(image, parse_line(image, 1, b))


def test_lmms_eval_video_visuals_become_the_items_video(tmp_path):
    """lmms-eval's video tasks give the video file's path as a visual: it becomes the item's video (resolved from
    the working folder), the pictures beside it stay images, and a second video is refused naming it."""
    from PIL import Image

    from sgl_cli.integrations.lmms_eval import media_refs

    images, video = media_refs([Image.new("RGB", (8, 8), (1, 2, 3)), str(tmp_path / "clip.MP4")], "t row 1")
    assert [r.kind for r in images] == ["bytes"] and images[0].label == "t row 1 image 1"
    assert video.source.kind == "path" and video.source.value == tmp_path / "clip.MP4" and video.fps is None
    images, video = media_refs(str(tmp_path / "a.png"), "t row 2")
    assert video is None and images[0].value == tmp_path / "a.png"
    with pytest.raises(ValueError, match=r"^visual 2 is a second video; sgl takes one video per item$"):
        media_refs([str(tmp_path / "a.mp4"), str(tmp_path / "b.webm")], "t row 3")


def test_without_pyav_a_video_file_says_what_to_install(tmp_path, monkeypatch):
    import sys

    from sgl_cli.engine.errors import ItemError
    from sgl_cli.engine.io.items import parse_line
    from sgl_cli.engine.io.video import load_video

    (tmp_path / "clip.mp4").write_bytes(b"\0" * 64)
    item = parse_line(json.dumps({"video": "clip.mp4", "question": "q"}).encode(), 2, tmp_path)
    monkeypatch.setitem(sys.modules, "av", None)  # what `import av` meets where PyAV is not installed
    with pytest.raises(ItemError) as caught:
        load_video(item)
    assert str(caught.value) == "line 2: video 'clip.mp4': decoding a video needs PyAV (pip install 'sgl-cli[video]')"
