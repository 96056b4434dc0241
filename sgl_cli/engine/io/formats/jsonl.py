"""sgl JSONL: one item object per line (`io/items.py` parses it); the fallback format (anything that is text).

Lines are split on "\\n" only, a UTF-8 BOM dropped, blank lines skipped; a line over MAX_LINE_BYTES is an error
record, read past without holding it. The OpenAI batch format reads its lines the same way (`jsonl_lines`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ..items import Item, parse_line
from . import Format

MAX_LINE_BYTES = 64 << 20  # a JSONL line larger than this is an error record, read past without holding it


@dataclass(frozen=True)
class Oversized:
    """The payload of a JSONL line over MAX_LINE_BYTES (its bytes are not kept)."""

    size: int


def jsonl_lines(path: Path, keep: bool = True) -> Iterator[tuple[int, Any]]:
    """(line number, bytes) of each non-blank line: split on "\\n" only (a bare "\\r" is data, a trailing one is
    dropped), a UTF-8 BOM on the first line dropped, a line over MAX_LINE_BYTES given as `Oversized` after being
    read past in pieces. `keep=False` yields None payloads (counting)."""
    with path.open("rb") as f:
        number = 0
        while True:
            raw = f.readline(MAX_LINE_BYTES + 1)
            if not raw:
                return
            number += 1
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                size = len(raw)
                while raw and not raw.endswith(b"\n"):  # read past the rest, a piece at a time
                    raw = f.readline(1 << 20)
                    size += len(raw)
                yield number, Oversized(size - raw.endswith(b"\n"))
                continue
            raw = raw[:-1] if raw.endswith(b"\n") else raw
            raw = raw[:-1] if raw.endswith(b"\r") else raw
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            if raw.strip():
                yield number, raw if keep else None


class SglJsonl(Format):
    name = "sgl"

    def recognise(self, path: Path) -> bool:
        return path.is_file()

    def pairs(self, source) -> Iterator[tuple[int, Any]]:
        return jsonl_lines(source.path)

    def count(self, source) -> int:
        return sum(1 for _ in jsonl_lines(source.path, keep=False))

    def parse(self, source, number: int, payload: Any) -> Item:
        if isinstance(payload, Oversized):
            item = Item(line=number, id=number)
            item.error = item.fail(f"the line is {payload.size:,} bytes, over the {MAX_LINE_BYTES >> 20} MiB a "
                                   "line may hold (put large images in files or URLs, not inline)")
            return item
        return parse_line(payload, number, source.base)
