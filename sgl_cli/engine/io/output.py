"""Output JSONL: one record per input item, flushed as it completes, resumable after any interruption."""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO

from ..errors import SglError


def default_output(input_path: Path) -> Path:
    return input_path.with_name(f"{input_path.stem}.sgl.jsonl")


def settings_path(out: Path) -> Path:
    return out.with_name(out.name + ".preset.yaml") if out.suffix != ".jsonl" else out.with_suffix(".preset.yaml")


def completed_lines(out: Path) -> set[int]:
    """Input line numbers already recorded in `out`, after repairing a partly written last record.

    Each record is written with its newline last, so every newline-terminated line is whole; only the piece
    after the last newline can be torn by a kill. It is cut off (or, if it is a whole record whose newline was
    lost, completed). Any other unreadable line means the file is not ours: refuse rather than lose it.
    """
    data = out.read_bytes()
    *whole, tail = data.split(b"\n")
    done: set[int] = set()
    for number, raw in enumerate(whole, start=1):
        if raw.strip():
            done.add(_recorded_line(raw, out, number))
    if tail.strip():
        try:
            done.add(_recorded_line(tail, out, len(whole) + 1))
            repaired = data + b"\n"
        except SglError:
            repaired = data[: len(data) - len(tail)]
        out.write_bytes(repaired)
    return done


def _recorded_line(raw: bytes, out: Path, number: int) -> int:
    try:
        rec = json.loads(raw)
    except ValueError:
        rec = None
    if not isinstance(rec, dict) or not isinstance(rec.get("line"), int):
        raise SglError(f"{out}: line {number} is not an sgl record; refusing to resume into this file")
    return rec["line"]


def record_line(record: dict) -> str:
    """One record as its output line: JSON, UTF-8 kept, newline last."""
    return json.dumps(record, ensure_ascii=False) + "\n"


class RecordWriter:
    """Appends records as JSON lines, flushing each so that a crash loses at most the one being written."""

    def __init__(self, path: Path, append: bool):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._f: IO[str] = path.open("a" if append else "w", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._f.write(record_line(record))
        self._f.flush()

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "RecordWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
