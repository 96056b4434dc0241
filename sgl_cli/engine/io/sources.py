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
class Unreadable:
    """The payload of a table row whose data cannot be read (a corrupt Parquet page): why, naming where."""

    reason: str


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
    if kind in ("parquet", "dataset"):
        for path in table_files(source):  # a folder that is not a dataset, an unknown split, a damaged file: now
            _table_names(path)
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
    """OpenAI requests with a custom_id an earlier line used become `Duplicate` payloads (an error each). A line
    without a usable custom_id takes `sgl-line-N` (`openai.line_custom_id`): a later request naming that id is a
    duplicate too, so that no two output lines share one."""
    from .openai import Duplicate, line_custom_id, recover_custom_id

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


def _reason(exc: Exception) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _is_parquet(path: Path) -> bool:
    return path.suffix.lower() in (".parquet", ".pq")


def _parquet(path: Path):
    """The ParquetFile of `path` (its footer read), or an InputError naming the file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise InputError(f"{path}: not a Parquet file sgl can read ({_reason(exc)})") from None


def _arrow_batches(path: Path):
    """The record batches of an Arrow file (datasets write the IPC stream format; the file format is read too),
    each checked whole: an InputError naming the file if any part cannot be read (a stream has no footer saying
    how many rows it holds, so a damaged one cannot be read past row by row)."""
    import pyarrow as pa

    try:
        source = pa.memory_map(str(path))
        try:
            reader = pa.ipc.open_stream(source)
            batches = iter(reader)
        except pa.ArrowInvalid:
            reader = pa.ipc.open_file(source)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        for batch in batches:
            batch.validate(full=True)
            yield batch
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise InputError(f"{path}: not an Arrow file sgl can read ({_reason(exc)})") from None


def _arrow_schema(path: Path):
    import pyarrow as pa

    try:
        source = pa.memory_map(str(path))
        try:
            return pa.ipc.open_stream(source).schema
        except pa.ArrowInvalid:
            return pa.ipc.open_file(source).schema
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise InputError(f"{path}: not an Arrow file sgl can read ({_reason(exc)})") from None


def _table_names(path: Path) -> list[str]:
    """The columns of a Parquet or Arrow file, checking that it can be read (a Parquet file's footer; an Arrow
    file whole, its batches memory-mapped)."""
    if _is_parquet(path):
        return list(_parquet(path).schema_arrow.names)
    for _ in _arrow_batches(path):
        pass
    return list(_arrow_schema(path).names)


def _table_rows_count(path: Path) -> int:
    if _is_parquet(path):
        return _parquet(path).metadata.num_rows
    return sum(b.num_rows for b in _arrow_batches(path))


def _parquet_rows(path: Path, columns: list[str]) -> Iterator[dict | Unreadable]:
    """The rows of a Parquet file a row group at a time. A row group that cannot be read (a corrupt page) gives
    an `Unreadable` for each of its rows it did not give (its row count is in the footer), and the file reads on."""
    import pyarrow as pa

    pf = _parquet(path)
    names = set(pf.schema_arrow.names)
    wanted = [c for c in columns if c in names] or None
    groups = pf.metadata.num_row_groups
    for g in range(groups):
        size = pf.metadata.row_group(g).num_rows
        given = 0
        try:
            for batch in pf.iter_batches(batch_size=TABLE_BATCH_ROWS, row_groups=[g], columns=wanted):
                for values in batch.to_pylist():
                    given += 1
                    yield values
        except (pa.ArrowException, OSError, ValueError) as exc:
            why = Unreadable(f"{path.name}: row group {g + 1} of {groups} cannot be read ({_reason(exc)})")
            for _ in range(size - given):
                yield why


def table_rows(source: Source) -> Iterator[tuple[int, dict | Unreadable]]:
    """(row number from 1, the row's fields) for every row, a record batch at a time."""
    c = source.columns
    wanted = [c.image, c.question, c.id, c.answer, c.type]
    row = 0
    for path in table_files(source):
        names = _table_names(path)
        missing = [name for name in (c.image, c.question) if name not in names]
        if missing:
            raise InputError(f"{path}: no column {' or '.join(map(repr, missing))} (columns: {', '.join(names)}); "
                             "name them with --image-column / --question-column")
        if _is_parquet(path):
            rows = _parquet_rows(path, wanted)
        else:
            rows = (values for batch in _arrow_batches(path) for values in batch.to_pylist())
        for values in rows:
            row += 1
            yield row, values


def parse_row(values: dict | Unreadable, row: int, base: Path, columns: Columns) -> Item:
    """One table row as an item: its columns mapped to sgl's fields, the image cell to an ImageRef."""
    item = Item(line=row, id=row, unit="row")
    if isinstance(values, Unreadable):
        item.error = item.fail(values.reason)
        return item
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

