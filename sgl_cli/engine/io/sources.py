"""Input files: what formats sgl reads, and how each becomes items.

- **sgl JSONL** (`*.jsonl`, anything else that is text): one item object per line (`io/items.py`).
- **OpenAI Batch API** files: JSONL whose lines are requests with `custom_id`, `method`, `url` and `body`,
  detected from the content (`io/openai.py`); their output is an OpenAI batch output file.
- **Parquet** (`*.parquet`) and **Hugging Face datasets saved with `save_to_disk`** (a folder): one item per row,
  with columns `image` (the datasets `Image` layout, a struct of `bytes` and `path`; raw bytes; or a path, URL or
  data URI string), `question`, and optionally `id`, `answer`, `type` (renamed with `Columns`). Read in record
  batches with pyarrow: a table is never in memory whole.

A source yields `(line, payload)` pairs, line numbered from 1 (a JSONL line, or a table row), and `parse` turns one
into an `Item`. Payloads are plain bytes or dicts, so the Ray backend ships them to its workers as they are.
Every input item yields exactly one pair, whatever is wrong with it (an oversized line, bad bytes, a bad row).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ..errors import SglError
from .items import ImageRef, Item, describe, parse_fields, parse_line

MAX_LINE_BYTES = 64 << 20  # a JSONL line larger than this is an error record, read past without holding it
TABLE_BATCH_ROWS = 64  # rows per record batch read from Parquet / Arrow
_DETECT_LINES = 20  # lines looked at to tell an OpenAI batch file from sgl JSONL


class InputError(SglError):
    """An input file that cannot be read at all (missing, not a format sgl reads)."""


@dataclass(frozen=True)
class Oversized:
    """The payload of a JSONL line over MAX_LINE_BYTES (its bytes are not kept)."""

    size: int


@dataclass(frozen=True)
class Columns:
    """Which table columns hold an item's fields (`--image-column` and the like)."""

    image: str = "image"
    question: str = "question"
    id: str = "id"
    answer: str = "answer"
    type: str = "type"


@dataclass
class Source:
    """One input file; iterate it for (line, payload) pairs, `parse` each. Picklable (the Ray backend ships it)."""

    path: Path
    kind: str  # "sgl", "openai", "parquet" or "dataset"
    columns: Columns = field(default_factory=Columns)
    split: str | None = None
    limit: int | None = None

    @property
    def base(self) -> Path:
        """Where relative image paths resolve: the input file's folder (a dataset's own folder)."""
        return self.path if self.path.is_dir() else self.path.parent

    @property
    def unit(self) -> str:
        return "row" if self.kind in ("parquet", "dataset") else "line"

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        pairs = jsonl_lines(self.path) if self.kind in ("sgl", "openai") else table_rows(self)
        if self.kind == "openai":
            pairs = _unique_custom_ids(pairs)
        for n, pair in enumerate(pairs):
            if self.limit is not None and n >= self.limit:
                return
            yield pair

    def count(self) -> int:
        """How many items the source holds (after `limit`), without parsing them."""
        if self.kind in ("parquet", "dataset"):
            n = sum(_table_rows_count(f) for f in table_files(self))
        else:
            n = sum(1 for _ in jsonl_lines(self.path, keep=False))
        return n if self.limit is None else min(n, self.limit)

    def parse(self, line: int, payload: Any) -> Item:
        if self.kind == "openai":
            from .openai import parse_request

            return parse_request(payload, line, self.base)
        if self.kind == "sgl":
            if isinstance(payload, Oversized):
                item = Item(line=line, id=line)
                item.error = item.fail(f"the line is {payload.size:,} bytes, over the {MAX_LINE_BYTES >> 20} MiB a "
                                       "line may hold (put large images in files or URLs, not inline)")
                return item
            return parse_line(payload, line, self.base)
        return parse_row(payload, line, self.base, self.columns)


def open_source(path: Path, *, columns: Columns | None = None, split: str | None = None,
                limit: int | None = None) -> Source:
    """The source for `path`: its format from its name and, for JSONL, its content."""
    path = Path(path)
    if limit is not None and limit < 1:
        raise InputError(f"--limit must be >= 1, got {limit}")
    if path.is_dir():
        kind = "dataset"
    elif not path.exists():
        raise InputError(f"input {path} not found")
    elif not path.is_file():
        raise InputError(f"input {path} is not a regular file or a dataset folder")
    elif path.suffix.lower() in (".parquet", ".pq"):
        kind = "parquet"
    else:
        kind = "openai" if _looks_openai(path) else "sgl"
    if kind in ("parquet", "dataset"):
        _import_pyarrow()
    elif split is not None or columns is not None and columns != Columns():
        raise InputError("--split and the column options apply to Parquet files and dataset folders, not JSONL")
    source = Source(path, kind, columns or Columns(), split, limit)
    if kind == "dataset":
        table_files(source)  # a folder that is not a dataset, or an unknown split, is said now
    return source


# -- JSONL --------------------------------------------------------------------------------------------------------
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


def _unique_custom_ids(pairs):
    """OpenAI requests with a custom_id an earlier line used become `Duplicate` payloads (an error each)."""
    from .openai import Duplicate

    seen: dict[str, int] = {}
    for line, raw in pairs:
        custom_id = _custom_id(raw)
        if custom_id is not None:
            if custom_id in seen:
                yield line, Duplicate(custom_id, seen[custom_id])
                continue
            seen[custom_id] = line
        yield line, raw


def _custom_id(raw: Any) -> str | None:
    if isinstance(raw, Oversized):
        return None
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    value = obj.get("custom_id") if isinstance(obj, dict) else None
    return value if isinstance(value, str) and value else None


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


# -- Parquet and datasets -----------------------------------------------------------------------------------------
def _import_pyarrow():
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise InputError("reading Parquet and datasets needs pyarrow: pip install pyarrow") from None


def table_files(source: Source) -> list[Path]:
    """The Parquet file, or the Arrow files of the dataset folder (its split's, for a DatasetDict)."""
    if source.kind == "parquet":
        return [source.path]
    folder = source.path
    dict_file = folder / "dataset_dict.json"
    if dict_file.is_file():
        splits = _json(dict_file).get("splits") or []
        if source.split is None:
            if len(splits) != 1:
                raise InputError(f"{folder} is a dataset with splits {', '.join(splits)}: choose one with --split")
            split = splits[0]
        elif source.split not in splits:
            raise InputError(f"{folder} has no split {source.split!r}; its splits: {', '.join(splits)}")
        else:
            split = source.split
        folder = folder / split
    elif source.split is not None:
        raise InputError(f"{folder} is a dataset without splits; leave out --split")
    state = folder / "state.json"
    if not state.is_file():
        raise InputError(f"{source.path} is a folder but not a dataset saved with save_to_disk (no state.json or "
                         "dataset_dict.json)")
    files = [folder / f["filename"] for f in _json(state).get("_data_files", [])]
    missing = [str(f) for f in files if not f.is_file()]
    if not files or missing:
        raise InputError(f"{folder}: the dataset's data files are missing ({', '.join(missing) or 'none listed'})")
    return files


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: {exc}") from None
    return data if isinstance(data, dict) else {}


def _batches(path: Path, columns: list[str] | None):
    """Record batches of a Parquet or Arrow (datasets: IPC stream, else file) table."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.suffix.lower() in (".parquet", ".pq"):
        try:
            pf = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as exc:
            raise InputError(f"{path}: not a Parquet file sgl can read ({exc})") from None
        names = set(pf.schema_arrow.names)
        yield from pf.iter_batches(batch_size=TABLE_BATCH_ROWS,
                                   columns=[c for c in columns or names if c in names] or None)
        return
    try:
        reader = pa.ipc.open_stream(pa.memory_map(str(path)))
    except pa.ArrowInvalid:
        reader = pa.ipc.open_file(pa.memory_map(str(path)))
        for i in range(reader.num_record_batches):
            yield reader.get_batch(i)
        return
    yield from reader


def _schema_names(path: Path) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.suffix.lower() in (".parquet", ".pq"):
        try:
            return list(pq.ParquetFile(path).schema_arrow.names)
        except (pa.ArrowException, OSError) as exc:
            raise InputError(f"{path}: not a Parquet file sgl can read ({exc})") from None
    try:
        return list(pa.ipc.open_stream(pa.memory_map(str(path))).schema.names)
    except pa.ArrowInvalid:
        return list(pa.ipc.open_file(pa.memory_map(str(path))).schema.names)


def _table_rows_count(path: Path) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.suffix.lower() in (".parquet", ".pq"):
        return pq.ParquetFile(path).metadata.num_rows
    try:
        return sum(b.num_rows for b in pa.ipc.open_stream(pa.memory_map(str(path))))
    except pa.ArrowInvalid:
        return pa.ipc.open_file(pa.memory_map(str(path))).count_rows()


def table_rows(source: Source) -> Iterator[tuple[int, dict]]:
    """(row number from 1, the row's fields) for every row, a record batch at a time."""
    c = source.columns
    wanted = [c.image, c.question, c.id, c.answer, c.type]
    row = 0
    for path in table_files(source):
        names = _schema_names(path)
        missing = [name for name in (c.image, c.question) if name not in names]
        if missing:
            raise InputError(f"{path}: no column {' or '.join(map(repr, missing))} (columns: {', '.join(names)}); "
                             "name them with --image-column / --question-column")
        for batch in _batches(path, wanted):
            for values in batch.to_pylist():
                row += 1
                yield row, values


def parse_row(values: dict, row: int, base: Path, columns: Columns) -> Item:
    """One table row as an item: its columns mapped to sgl's fields, the image cell to an ImageRef."""
    item = Item(line=row, id=row, unit="row")
    obj: dict[str, Any] = {}
    for name, col in (("question", columns.question), ("id", columns.id), ("answer", columns.answer),
                      ("type", columns.type)):
        if values.get(col) is not None:
            obj[name] = values[col]
    item = parse_fields(obj, item)  # the id first, so that a row's error record carries it
    ref = _image_cell(values.get(columns.image), row, base)
    if isinstance(ref, str):
        item.error = item.error or item.fail(ref)
    else:
        item.images = [ref]
    return item


def _image_cell(cell: Any, row: int, base: Path) -> ImageRef | str:
    """The image of a row (the datasets Image struct, bytes, or a path / URL / data URI), or why there is none."""
    if isinstance(cell, dict):  # datasets' Image feature: {"bytes": ..., "path": ...}
        if cell.get("bytes"):
            return ImageRef("bytes", bytes(cell["bytes"]), f"row {row} image bytes")
        cell = cell.get("path")
    if isinstance(cell, (bytes, bytearray, memoryview)) and len(cell):
        return ImageRef("bytes", bytes(cell), f"row {row} image bytes")
    if isinstance(cell, str) and cell.strip():
        return ImageRef.parse(cell.strip(), base)
    return f"the image column holds no image (got {describe(cell)})"

