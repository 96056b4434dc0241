"""Input items, and sgl's own JSONL format: one JSON object per line.

Whatever the input format (sgl JSONL, an OpenAI batch file, Parquet, a saved dataset: `io/formats/`), every
input item becomes one `Item`, and every item yields exactly one output record: an item that cannot be run carries
its `error` ("line 17: ..." or "row 17: ...") and the run goes on. Parsing never raises.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAX_IMAGES = 64  # per item: a bound on work per item, far above what any VLM context holds
MAX_VIDEO_FRAMES = 4096  # per item's `max_frames` (the preset's `video_max_frames` is the usual bound)


@dataclass(frozen=True)
class ImageRef:
    """Where one image of an item comes from: a file, a URL, a data URI or bytes (inline base64, a Parquet cell)."""

    kind: str  # "path", "url", "data" (a data: URI), "bytes", or "unsupported" (a URL of another scheme)
    value: Any  # Path, URL string, data-URI string, bytes
    label: str  # how messages name it: 'cat.png', 'https://...', 'data URI', 'inline bytes'

    @classmethod
    def path(cls, path: str | Path) -> "ImageRef":
        path = Path(path)
        return cls("path", path, path.name)

    @classmethod
    def parse(cls, text: str, base: Path) -> "ImageRef":
        """A string naming an image: `data:image/...;base64,...`, `http(s)://...`, `file://...` or a path (relative
        to `base`, the input file's folder)."""
        low = text[:16].lower()
        if low.startswith("data:"):
            return cls("data", text, "data URI")
        if low.startswith(("http://", "https://")):
            return cls("url", text, _short(text))
        scheme = re.match(r"([a-z][a-z0-9+.-]*)://", text[:40].lower())
        if scheme and scheme.group(1) != "file":  # ftp://, s3://...: a URL sgl does not fetch, not a path
            return cls("unsupported", text, _short(text))
        if low.startswith("file://"):
            from urllib.parse import unquote, urlparse

            text = unquote(urlparse(text).path)
        path = Path(text).expanduser()
        return cls.path(path if path.is_absolute() else base / path)


@dataclass(frozen=True)
class VideoRef:
    """An item's video: a video file (`source`: a path, URL, data URI or bytes) or a list of frame images
    (`frames`), and its own sampling (`fps`, `max_frames`; None: the preset's)."""

    source: ImageRef | None = None
    frames: tuple[ImageRef, ...] = ()
    fps: float | None = None
    max_frames: int | None = None

    @property
    def label(self) -> str:
        return self.source.label if self.source is not None else f"{len(self.frames)} frames"

    @property
    def refs(self) -> tuple[ImageRef, ...]:
        """The files or bytes it is read from."""
        return (self.source,) if self.source is not None else self.frames


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class Item:
    line: int  # 1-based line (or row) of the input
    id: Any
    images: list[ImageRef] = field(default_factory=list)
    video: VideoRef | None = None  # at most one video, shown after the images unless `parts` places it
    question: str = ""  # the final user turn's text
    reference: Any = None  # the input's `answer`, when given
    has_reference: bool = False
    max_new_tokens: int | None = None
    type: str | None = None  # the input's `type` (question type), for per-type accuracy in `sgl eval`
    error: str | None = None  # set for an item that cannot be run
    history: list[dict] = field(default_factory=list)  # chat turns before the final user one (system included)
    parts: list[dict] | None = None  # the final user turn's parts in order (None: the images, then the question)
    custom_id: str | None = None  # an OpenAI batch request's id
    unit: str = "line"  # how errors name the item's place: "line" or "row"

    def fail(self, message: str) -> str:
        return f"{self.unit} {self.line}: {message}"

    def messages(self, suffix: str = "") -> list[dict]:
        """The chat turns to prompt with: the history, then the final user turn with `suffix` appended to its text
        (images are {"type": "image"} parts, in the order of `images`; the video a {"type": "video"} part)."""
        parts = [dict(p) for p in self.parts] if self.parts is not None else (
            [{"type": "image"} for _ in self.images] + [{"type": "video"}] * (self.video is not None)
            + [{"type": "text", "text": self.question}])
        if suffix:
            last = max(i for i, p in enumerate(parts) if p["type"] == "text")
            parts[last]["text"] = f"{parts[last]['text']}\n{suffix}"
        return [*self.history, {"role": "user", "content": parts}]


def bad_strings(value: Any) -> bool:
    """Whether a JSON value holds a lone surrogate (json.loads accepts "\\ud800"; no UTF-8 output can carry it).
    Iterative: json.loads accepts nesting deeper than Python's recursion limit leaves room for."""
    stack = [value]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            if any("\ud800" <= c <= "\udfff" for c in value):
                return True
        elif isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return False


def loads_strict(text: str) -> Any:
    """json.loads that refuses NaN and Infinity (not JSON; a strict reader of our output would reject them)."""

    def refuse(name: str):
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def load_json_line(raw: bytes | str, item: Item) -> dict | None:
    """The JSON object of one line, or None with `item.error` set (not UTF-8, not JSON, too deep, too large a
    number, NaN, a lone surrogate, not an object). Never raises."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError as exc:
        item.error = item.fail(f"not UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})")
        return None
    try:
        obj = loads_strict(text)
    except json.JSONDecodeError as exc:
        # Some of json's messages end in "at" ("Unterminated string starting at"): say the place once.
        msg = exc.msg[:-3] if exc.msg.endswith(" at") else exc.msg
        item.error = item.fail(f"not valid JSON ({msg} at column {exc.colno})")
        return None
    except RecursionError:
        item.error = item.fail("not valid JSON: nested too deeply")
        return None
    except ValueError as exc:  # NaN / Infinity, or an integer over Python's digit limit
        reason = str(exc).splitlines()[0]
        if "digits" in reason:
            reason = "an integer with too many digits"
        item.error = item.fail(f"not valid JSON: {reason}")
        return None
    if not isinstance(obj, dict):
        item.error = item.fail(f"expected a JSON object, got {type(obj).__name__}")
        return None
    bad = next((k for k, v in obj.items() if bad_strings(k) or bad_strings(v)), None)
    if bad is not None:
        item.error = item.fail(f"field {_name(bad)!r} holds a lone surrogate (an unpaired \\ud800-\\udfff escape): "
                               "not valid Unicode")
        return None
    return obj


def _name(key: str) -> str:
    return key.encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace")[:40]


def is_reference(value: Any) -> bool:
    scalar = (str, int, float)
    ok = lambda v: isinstance(v, scalar) and not isinstance(v, bool) and not (  # noqa: E731
        isinstance(v, float) and not math.isfinite(v))
    return ok(value) or (isinstance(value, list) and bool(value) and all(ok(v) for v in value))


def describe(value: Any, limit: int = 60) -> str:
    """A value for an error message: its repr, cut to `limit` characters (a value nested too deeply for repr is
    named by its type)."""
    try:
        text = repr(value)
    except RecursionError:
        return f"a {type(value).__name__} nested too deeply"
    return text if len(text) <= limit else text[: limit - 4] + "...'"


def parse_line(raw: bytes | str, line: int, base: Path) -> Item:
    """Parse one non-blank line of sgl JSONL (relative image paths resolve against `base`, the file's folder)."""
    item = Item(line=line, id=line)
    obj = load_json_line(raw, item)
    if obj is None:
        return item
    return parse_object(obj, item, base)


def parse_object(obj: dict, item: Item, base: Path) -> Item:
    """Fill `item` from an sgl item object; errors name the field."""
    images = _images(obj, item, base)
    if images is None:
        return item
    item.images = images
    if obj.get("video") is not None or "fps" in obj or "max_frames" in obj:
        item.video = parse_video(obj, item, base)
        if item.video is None:
            return item
    return parse_fields(obj, item)


def parse_video(obj: dict, item: Item, base: Path) -> VideoRef | None:
    """The item's `video` (a path, URL or data URI of a video file, or a list of frame images) with its `fps` and
    `max_frames`; None with `item.error` set."""
    value = obj.get("video")
    if value is None:
        key = "fps" if "fps" in obj else "max_frames"
        item.error = item.fail(f"field '{key}' is given without a 'video'")
        return None
    fps = obj.get("fps")
    if fps is not None and (not isinstance(fps, (int, float)) or isinstance(fps, bool) or not math.isfinite(fps)
                            or not 0 < fps <= 60):
        item.error = item.fail(f"field 'fps' must be a number of frames per second, above 0 and at most 60, got "
                               f"{describe(fps)}")
        return None
    frames = obj.get("max_frames")
    if frames is not None and (not isinstance(frames, int) or isinstance(frames, bool)
                               or not 1 <= frames <= MAX_VIDEO_FRAMES):
        item.error = item.fail(f"field 'max_frames' must be an integer from 1 to {MAX_VIDEO_FRAMES}, got "
                               f"{describe(frames)}")
        return None
    fps = float(fps) if fps is not None else None
    if isinstance(value, str) and value.strip():
        return VideoRef(ImageRef.parse(value.strip(), base), fps=fps, max_frames=frames)
    if isinstance(value, list) and value:
        if len(value) > MAX_VIDEO_FRAMES:
            item.error = item.fail(f"field 'video' has {len(value)} frames; at most {MAX_VIDEO_FRAMES}")
            return None
        refs = []
        for i, v in enumerate(value):
            if not isinstance(v, str) or not v.strip():
                item.error = item.fail(f"field 'video[{i}]' must be a frame image's path, URL or data URI, got "
                                       f"{describe(v)}")
                return None
            refs.append(ImageRef.parse(v.strip(), base))
        return VideoRef(frames=tuple(refs), fps=fps, max_frames=frames)
    item.error = item.fail("field 'video' must be a video's path, URL or data URI, or a non-empty list of frame "
                           f"images, got {describe(value)}")
    return None


def parse_fields(obj: dict, item: Item) -> Item:
    """Fill `item`'s fields but its images from an sgl item object (a JSONL line or a table row's columns)."""
    if "id" in obj:
        value = obj["id"]
        if not isinstance(value, (str, int)) or isinstance(value, bool):
            item.error = item.fail(f"field 'id' must be a string or an integer, got {describe(value)}")
            return item
        item.id = value
    if obj.get("answer") is not None:
        if not is_reference(obj["answer"]):
            item.error = item.fail("field 'answer' must be a string, a finite number or a non-empty list of them, got "
                                   f"{describe(obj['answer'])}")
            return item
        item.reference, item.has_reference = obj["answer"], True
    if "question" not in obj:
        item.error = item.fail("missing field 'question'")
        return item
    if not isinstance(obj["question"], str) or not obj["question"].strip():
        item.error = item.fail(f"field 'question' must be a non-empty string, got {describe(obj['question'])}")
        return item
    item.question = obj["question"].strip()
    if obj.get("max_new_tokens") is not None:
        value = obj["max_new_tokens"]
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 1_000_000:
            item.error = item.fail(f"field 'max_new_tokens' must be a positive integer, got {describe(value)}")
            return item
        item.max_new_tokens = value
    if obj.get("type") is not None:
        if not isinstance(obj["type"], str) or not obj["type"].strip():
            item.error = item.fail(f"field 'type' must be a non-empty string, got {describe(obj['type'])}")
            return item
        item.type = obj["type"].strip()
    return item


def _images(obj: dict, item: Item, base: Path) -> list[ImageRef] | None:
    given = [k for k in ("image", "images", "image_base64") if obj.get(k) is not None]
    if not given and obj.get("video") is not None:
        return []
    if not given:
        item.error = item.fail("missing field 'image' (or 'video')")
        return None
    if len(given) > 1:
        item.error = item.fail(f"give one of 'image', 'images' and 'image_base64', not {' and '.join(given)}")
        return None
    key = given[0]
    values = obj[key] if key == "images" else [obj[key]]
    if key == "images" and (not isinstance(values, list) or not values):
        item.error = item.fail(f"field 'images' must be a non-empty list of paths, URLs or data URIs, got "
                               f"{describe(obj[key])}")
        return None
    if len(values) > MAX_IMAGES:
        item.error = item.fail(f"field 'images' has {len(values)} images; at most {MAX_IMAGES} per item")
        return None
    refs = []
    for i, value in enumerate(values):
        where = f"{key}[{i}]" if key == "images" else key
        if not isinstance(value, str) or not value.strip():
            item.error = item.fail(f"field '{where}' must be a non-empty string, got {describe(value)}")
            return None
        if key == "image_base64":
            refs.append(ImageRef("data", "data:;base64," + value.strip(), "inline base64"))
        else:
            refs.append(ImageRef.parse(value.strip(), base))
    return refs
