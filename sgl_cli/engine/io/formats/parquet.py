"""Parquet files (`*.parquet`, `*.pq`): one item per row, read a record batch at a time with pyarrow.

Columns `image` and/or `video` (each the datasets `Image` / `Video` layout, a struct of `bytes` and `path`; raw
bytes; or a path, URL or data URI string), `question`, and optionally `id`, `answer`, `type` (renamed with
`Columns`). A row needs an image, a video or both; the video is sampled at the preset's rate (a table has no
per-row `fps`). The row reading here serves the datasets folders too (`dataset.py`: Arrow files).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ..items import ImageRef, Item, VideoRef, describe, parse_fields
from . import Columns, Format, InputError

TABLE_BATCH_ROWS = 64  # rows per record batch read from Parquet / Arrow
SUFFIXES = (".parquet", ".pq")


@dataclass(frozen=True)
class Unreadable:
    """The payload of a table row whose data cannot be read (a corrupt Parquet page): why, naming where."""

    reason: str


class Table(Format):
    """A table of rows (Parquet, or a dataset's Arrow files): `files` names them."""

    unit = "row"
    tables = True

    def files(self, source) -> list[Path]:
        raise NotImplementedError

    def check(self, source) -> None:
        for path in self.files(source):  # a folder that is not a dataset, an unknown split, a damaged file: now
            table_names(path)

    def pairs(self, source) -> Iterator[tuple[int, Any]]:
        return table_rows(source, self.files(source))

    def count(self, source) -> int:
        return sum(_table_rows_count(f) for f in self.files(source))

    def parse(self, source, number: int, payload: Any) -> Item:
        return parse_row(payload, number, source.base, source.columns)


class Parquet(Table):
    name = "parquet"

    def recognise(self, path: Path) -> bool:
        return path.is_file() and path.suffix.lower() in SUFFIXES

    def files(self, source) -> list[Path]:
        return [source.path]


def _reason(exc: Exception) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _is_parquet(path: Path) -> bool:
    return path.suffix.lower() in SUFFIXES


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


def table_names(path: Path) -> list[str]:
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


def table_rows(source, files: list[Path]) -> Iterator[tuple[int, dict | Unreadable]]:
    """(row number from 1, the row's fields) for every row of the table `files`, a record batch at a time."""
    c = source.columns
    wanted = [c.image, c.video, c.question, c.id, c.answer, c.type]
    row = 0
    for path in files:
        names = table_names(path)
        # a table of videos needs no image column
        missing = [c.image] * (c.image not in names and c.video not in names) + [c.question] * (c.question not in names)
        if missing:
            videos = f" (or a {c.video!r} column of videos)" if c.image in missing else ""
            raise InputError(f"{path}: no column {' or '.join(map(repr, missing))} (columns: {', '.join(names)}); "
                             f"name them with --image-column / --question-column{videos}")
        if _is_parquet(path):
            rows = _parquet_rows(path, wanted)
        else:
            rows = (values for batch in _arrow_batches(path) for values in batch.to_pylist())
        for values in rows:
            row += 1
            yield row, values


def parse_row(values: dict | Unreadable, row: int, base: Path, columns: Columns) -> Item:
    """One table row as an item: its columns mapped to sgl's fields, the image cell to an ImageRef, the video
    cell (None: no video) to a VideoRef."""
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
    image, video = values.get(columns.image), values.get(columns.video)
    if video is not None:
        ref = _cell(video, row, base, "video")
        if isinstance(ref, str):
            item.error = item.error or item.fail(ref)
        else:
            item.video = VideoRef(ref)
    if image is None and video is None and columns.video in values:  # a table with a video column: either will do
        item.error = item.error or item.fail("the row holds neither an image nor a video (its video column is empty)")
    elif image is not None or video is None:
        ref = _cell(image, row, base, "image")
        if isinstance(ref, str):
            item.error = item.error or item.fail(ref)
        else:
            item.images = [ref]
    return item


def _cell(cell: Any, row: int, base: Path, what: str) -> ImageRef | str:
    """The image or video (`what`) of a row: the datasets Image / Video struct, bytes, or a path / URL / data URI;
    or why there is none."""
    if isinstance(cell, dict):  # datasets' Image and Video features: {"bytes": ..., "path": ...}
        if cell.get("bytes"):
            return ImageRef("bytes", bytes(cell["bytes"]), f"row {row} {what} bytes")
        cell = cell.get("path")
    if isinstance(cell, (bytes, bytearray, memoryview)) and len(cell):
        return ImageRef("bytes", bytes(cell), f"row {row} {what} bytes")
    if isinstance(cell, str) and cell.strip():
        return ImageRef.parse(cell.strip(), base)
    return f"the {what} column holds no {what} (got {describe(cell)})"

