"""OpenAI Batch API files: chat-completion requests in, an OpenAI batch output file out.

A request line: `{"custom_id": ..., "method": "POST", "url": "/v1/chat/completions", "body": {"messages": [...],
"max_tokens": ...}}`. The conversation's images (`image_url` parts: URLs, data URIs, paths) are the item's images,
in order, and a `video_url` part (as vLLM's OpenAI server takes them; at most one per request) its video, sampled at
the preset's rate unless `body.mm_processor_kwargs` gives `fps` / `max_frames` (vLLM's per-request processor
options). The last message must be the user's, and its text is the question; earlier turns and a system message go
into the chat template as they are. `max_tokens` / `max_completion_tokens` cap the answer. sgl decodes greedily: a
request for anything else (sampling, n > 1, stop sequences, tools, ...) is an error line, never a silent change of
meaning. The output line is OpenAI's, with sgl's own fields under `response.body.sgl`.

Every request line gets an output line with a `custom_id`, so that a run can resume from its own output: the
request's own, when the line holds a usable one (even a line refused for a NaN, a huge integer or bad bytes
elsewhere keeps it), else `sgl-line-N` (N the input line; an error line).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

from ..items import MAX_VIDEO_FRAMES, ImageRef, Item, VideoRef, bad_strings, describe, load_json_line
from . import Format
from .jsonl import Oversized, jsonl_lines

URL = "/v1/chat/completions"
# Body fields that leave greedy decoding's meaning unchanged at these values (None: any value is fine).
_NEUTRAL = {"model": None, "messages": None, "max_tokens": None, "max_completion_tokens": None, "seed": None,
            "user": None, "metadata": None, "store": None, "temperature": 0, "top_p": 1, "n": 1,
            "frequency_penalty": 0, "presence_penalty": 0, "stream": False, "logprobs": False,
            "mm_processor_kwargs": None}  # read by _read_sampling
_MAX_FPS = 60  # mm_processor_kwargs.fps's bound: sgl JSONL's `fps` has the same (items.parse_video)
_ROLES = ("system", "developer", "user", "assistant")
_DETECT_LINES = 20  # lines looked at to tell an OpenAI batch file from sgl JSONL


@dataclass(frozen=True)
class Duplicate:
    """The payload of a request whose custom_id an earlier line already used."""

    custom_id: str
    first_line: int


def line_custom_id(line: int) -> str:
    """The custom_id sgl gives the output line of a request that has no usable one of its own."""
    return f"sgl-line-{line}"


def recover_custom_id(raw: Any) -> str | None:
    """The custom_id a request line holds, read leniently (NaN, an integer over Python's digit limit, bytes that
    are not UTF-8 elsewhere in the line are let through), or None when it holds no non-empty string one."""
    if not isinstance(raw, (bytes, str)):
        return None
    text = raw.decode("utf-8", "surrogateescape") if isinstance(raw, bytes) else raw
    try:
        obj = json.loads(text, parse_constant=lambda _: None, parse_int=lambda _: 0)
    except (ValueError, RecursionError):
        return None
    value = obj.get("custom_id") if isinstance(obj, dict) else None
    return value if isinstance(value, str) and value and not bad_strings(value) else None


def parse_request(raw: Any, line: int, base: Path) -> Item:
    """One request line as an item (relative image paths resolve against `base`, the file's folder; `item.error`
    says what is wrong; never raises)."""
    item = Item(line=line, id=line)
    if isinstance(raw, Duplicate):
        item.custom_id = item.id = raw.custom_id
        item.error = item.fail(f"custom_id {raw.custom_id!r} repeats line {raw.first_line}'s; custom_ids must be "
                               "unique")
        return item
    item.custom_id = line_custom_id(line)  # until the line's own is read
    if not isinstance(raw, (bytes, str)):  # an oversized line
        item.error = item.fail(f"the line is {raw.size:,} bytes, too large a request")
        return item
    obj = load_json_line(raw, item)
    if obj is None:
        recovered = recover_custom_id(raw)
        if recovered is not None:
            item.custom_id = item.id = recovered
        return item
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        item.error = item.fail(f"'custom_id' must be a non-empty string, got {describe(custom_id)} (its output line "
                               f"has custom_id {item.custom_id!r})")
        return item
    item.custom_id = item.id = custom_id
    method, url = obj.get("method", "POST"), obj.get("url")
    if url is None:
        item.error = item.fail(f"missing field 'url': sgl answers POST {URL}")
        return item
    if method != "POST" or url != URL:
        shown = method if isinstance(method, str) and len(method) <= 20 else describe(method)
        item.error = item.fail(f"{shown} {describe(url)} is not supported: sgl answers POST {URL}")
        return item
    body = obj.get("body")
    if not isinstance(body, dict):
        item.error = item.fail(f"'body' must be an object, got {describe(body)}")
        return item
    why = _unsupported(body) or _read_messages(body.get("messages"), item, base)
    if why is None:
        why = _read_limit(body, item) or _read_sampling(body, item)
    if why is not None:
        item.error = item.fail(why)
    return item


def _unsupported(body: dict) -> str | None:
    for key, value in body.items():
        if key not in _NEUTRAL:
            return f"body field {describe(key)} is not supported by sgl (it decodes greedily, one answer per request)"
        neutral = _NEUTRAL[key]
        if neutral is not None and value is not None and value != neutral:
            what = "sgl decodes greedily: send temperature 0 or leave it out" if key == "temperature" else \
                f"sgl supports only {key} {neutral!r}"
            return f"body {key} {describe(value)}: {what}"
    return None


def _read_limit(body: dict, item: Item) -> str | None:
    limits = {k: body[k] for k in ("max_completion_tokens", "max_tokens") if body.get(k) is not None}
    for key, value in limits.items():
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 1_000_000:
            return f"body {key} must be a positive integer, got {describe(value)}"
    if limits:
        item.max_new_tokens = limits.get("max_completion_tokens", limits.get("max_tokens"))
    return None


def _read_sampling(body: dict, item: Item) -> str | None:
    """The video's own `fps` and `max_frames` from vLLM's `mm_processor_kwargs` (other processor options would
    change what the model sees in ways sgl does not reproduce: refused); or say what is wrong."""
    kwargs = body.get("mm_processor_kwargs")
    if kwargs is None:
        return None
    if not isinstance(kwargs, dict):
        return f"body mm_processor_kwargs must be an object, got {describe(kwargs)}"
    for key, value in kwargs.items():
        if key not in ("fps", "max_frames", "do_sample_frames"):
            return (f"body mm_processor_kwargs {describe(key)} is not supported by sgl (it takes fps, max_frames "
                    "and do_sample_frames true)")
        if key == "do_sample_frames" and value is not True:
            return f"body mm_processor_kwargs.do_sample_frames {describe(value)}: sgl always samples the frames itself"
    fps, frames = kwargs.get("fps"), kwargs.get("max_frames")
    if fps is None and frames is None:
        return None
    if item.video is None:
        key = "fps" if fps is not None else "max_frames"
        return f"body mm_processor_kwargs.{key} is given without a video_url part"
    if fps is not None and (not isinstance(fps, (int, float)) or isinstance(fps, bool) or not math.isfinite(fps)
                            or not 0 < fps <= _MAX_FPS):
        return (f"body mm_processor_kwargs.fps must be a number of frames per second, above 0 and at most {_MAX_FPS}, "
                f"got {describe(fps)}")
    if frames is not None and (not isinstance(frames, int) or isinstance(frames, bool)
                               or not 1 <= frames <= MAX_VIDEO_FRAMES):
        return f"body mm_processor_kwargs.max_frames must be an integer from 1 to {MAX_VIDEO_FRAMES}, got " \
            f"{describe(frames)}"
    item.video = replace(item.video, fps=float(fps) if fps is not None else None, max_frames=frames)
    return None


def _read_messages(messages: Any, item: Item, base: Path) -> str | None:
    """Fill the item's history, question, images and video from the messages; or say what is wrong."""
    if not isinstance(messages, list) or not messages:
        return f"body messages must be a non-empty list, got {describe(messages)}"
    turns = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in _ROLES:
            return f"messages[{i}] must be an object with a role ({', '.join(_ROLES)}), got {describe(message)}"
        content = _content(message.get("content"), i, item, base)
        if isinstance(content, str):
            return content
        role = "system" if message["role"] == "developer" else message["role"]
        turns.append({"role": role, "content": content})
    if turns[-1]["role"] != "user":
        return "the last message must be the user's (the question to answer)"
    last = turns.pop()
    text = "\n".join(part["text"] for part in last["content"] if part["type"] == "text").strip()
    if not text:
        return "the last user message has no text: sgl answers a question about the images or video"
    if not item.images and item.video is None:
        return "no image_url part in the messages, nor a video_url one: sgl answers questions about images and videos"
    item.question = text
    item.history = turns
    item.parts = last["content"]  # in the request's order
    return None


def _content(content: Any, index: int, item: Item, base: Path) -> list[dict] | str:
    """A message's content as chat-template parts ({"type": "text"} / {"type": "image"} / {"type": "video"}), images
    appended to the item, the video set on it; or what is wrong."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        return f"messages[{index}].content must be a string or a list of parts, got {describe(content)}"
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str) or not url.strip():
                return f"messages[{index}].content[{j}].image_url.url must be a non-empty string, got {describe(url)}"
            item.images.append(ImageRef.parse(url.strip(), base))
            parts.append({"type": "image"})
        elif kind == "video_url":
            url = part.get("video_url")
            url = url.get("url") if isinstance(url, dict) else url
            where = f"messages[{index}].content[{j}].video_url"
            if not isinstance(url, str) or not url.strip():
                return f"{where}.url must be a non-empty string, got {describe(url)}"
            if item.video is not None:
                return f"{where}: a second video; sgl takes one video per request"
            item.video = VideoRef(ImageRef.parse(url.strip(), base))
            parts.append({"type": "video"})
        else:
            return f"messages[{index}].content[{j}] must be a text, image_url or video_url part, got {describe(part)}"
    return parts


def output_line(record: dict, item_model: str) -> dict:
    """An sgl record as an OpenAI batch output line."""
    custom_id = record.get("custom_id")  # None for a line too broken to name one
    digest = hashlib.sha256(f"{custom_id}\0{record['line']}".encode()).hexdigest()
    out: dict[str, Any] = {"id": f"batch_req_{digest[:24]}", "custom_id": custom_id}
    if record["error"] is not None:
        code = "invalid_request" if record.get("exit") is None and record.get("visual_tokens") is None else "failed"
        out["response"] = None
        out["error"] = {"code": code, "message": record["error"]}
        return out
    usage = record["usage"]
    sgl = {k: v for k, v in record.items() if k not in ("id", "custom_id", "answer", "error", "usage",
                                                         "finish_reason")}
    out["response"] = {
        "status_code": 200,
        "request_id": digest[24:48],
        "body": {
            "id": f"chatcmpl-{digest[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": item_model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": record["answer"], "refusal": None},
                         "logprobs": None, "finish_reason": record["finish_reason"]}],
            "usage": {"prompt_tokens": usage["prompt_tokens"], "completion_tokens": usage["completion_tokens"],
                      "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]},
            "sgl": sgl,
        },
    }
    out["error"] = None
    return out


class OpenAIBatch(Format):
    """Recognised from the content: the first JSON object of the file is a request (`custom_id` and `body`)."""

    name = "openai"

    def recognise(self, path: Path) -> bool:
        return path.is_file() and _looks_openai(path)

    def pairs(self, source) -> Iterator[tuple[int, Any]]:
        return _unique_custom_ids(jsonl_lines(source.path))

    def count(self, source) -> int:
        return sum(1 for _ in jsonl_lines(source.path, keep=False))

    def parse(self, source, number: int, payload: Any) -> Item:
        return parse_request(payload, number, source.base)

    def identity(self, item: Item) -> Any:
        return item.custom_id

    def name_identity(self, identity: Any) -> str:
        return f"custom_id {identity!r}"

    def output(self, record: dict, model: str) -> dict:
        line = output_line(record, model)
        if isinstance(line.get("error"), dict):  # an answered line carries sgl's fields under response.body.sgl
            line["error"]["sgl"] = {"line": record["line"], "input_sha": record.get("input_sha")}
        return line


def _unique_custom_ids(pairs):
    """OpenAI requests with a custom_id an earlier line used become `Duplicate` payloads (an error each). A line
    without a usable custom_id takes `sgl-line-N` (`openai.line_custom_id`): a later request naming that id is a
    duplicate too, so that no two output lines share one."""
    seen: dict[str, int] = {}
    for line, raw in pairs:
        custom_id = recover_custom_id(raw)
        if custom_id is not None and custom_id in seen:
            yield line, Duplicate(custom_id, seen[custom_id])
            continue
        seen.setdefault(custom_id or line_custom_id(line), line)
        yield line, raw


def _looks_openai(path: Path) -> bool:
    """Whether the first JSON objects of a JSONL file are OpenAI batch requests (`custom_id` and `body`)."""
    seen = 0
    for _, raw in jsonl_lines(path):
        if isinstance(raw, Oversized):
            continue
        try:
            obj = json.loads(raw)
        except (ValueError, RecursionError):
            continue
        if isinstance(obj, dict):
            return "custom_id" in obj and "body" in obj
        seen += 1
        if seen >= _DETECT_LINES:
            break
    return False
