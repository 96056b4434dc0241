"""Input items: one JSON object per line of a JSONL file; a bad line becomes an item that carries its error."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator


@dataclass
class Item:
    line: int  # 1-based line number in the input file
    id: Any
    image: Path | None = None
    question: str = ""
    reference: Any = None  # the input's `answer`, when given
    has_reference: bool = False
    max_new_tokens: int | None = None
    type: str | None = None  # the input's `type` (question type), for per-type accuracy in `sgl eval`
    error: str | None = None  # set for a line that cannot be run

    def fail(self, message: str) -> str:
        return f"line {self.line}: {message}"


def _is_reference(value: Any) -> bool:
    scalar = (str, int, float)
    return (isinstance(value, scalar) and not isinstance(value, bool)) or (
        isinstance(value, list) and all(isinstance(v, scalar) and not isinstance(v, bool) for v in value)
    )


def parse_line(text: str, line: int, base: Path) -> Item:
    """Parse one non-blank line; relative image paths resolve against `base` (the JSONL file's folder)."""
    item = Item(line=line, id=line)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        item.error = item.fail(f"not valid JSON ({exc.msg} at column {exc.colno})")
        return item
    if not isinstance(obj, dict):
        item.error = item.fail(f"expected a JSON object, got {type(obj).__name__}")
        return item
    if "id" in obj:
        if not isinstance(obj["id"], (str, int)) or isinstance(obj["id"], bool):
            item.error = item.fail(f"field 'id' must be a string or an integer, got {obj['id']!r}")
            return item
        item.id = obj["id"]
    if "answer" in obj:
        if not _is_reference(obj["answer"]):
            item.error = item.fail("field 'answer' must be a string, a number or a list of them")
            return item
        item.reference, item.has_reference = obj["answer"], True
    for name in ("image", "question"):
        if name not in obj:
            item.error = item.fail(f"missing field '{name}'")
            return item
        if not isinstance(obj[name], str) or not obj[name].strip():
            item.error = item.fail(f"field '{name}' must be a non-empty string, got {obj[name]!r}")
            return item
    item.question = obj["question"].strip()
    image = Path(obj["image"]).expanduser()
    item.image = image if image.is_absolute() else base / image
    if "max_new_tokens" in obj:
        value = obj["max_new_tokens"]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            item.error = item.fail(f"field 'max_new_tokens' must be a positive integer, got {value!r}")
            return item
        item.max_new_tokens = value
    if "type" in obj:
        if not isinstance(obj["type"], str) or not obj["type"].strip():
            item.error = item.fail(f"field 'type' must be a non-empty string, got {obj['type']!r}")
            return item
        item.type = obj["type"].strip()
    return item


def read_items(path: str | Path, skip_lines: set[int] | None = None) -> Iterator[Item]:
    """Stream the items of a JSONL file, skipping blank lines and the line numbers in `skip_lines`."""
    path = Path(path)
    base = path.parent
    with path.open("r", encoding="utf-8", errors="replace") as f:
        for line, text in enumerate(f, start=1):
            if not text.strip() or (skip_lines and line in skip_lines):
                continue
            yield parse_line(text, line, base)
