"""Parquet files (`*.parquet`, `*.pq`): one item per row, read a record batch at a time with pyarrow.

Columns `image` (the datasets `Image` layout, a struct of `bytes` and `path`; raw bytes; or a path, URL or data URI
string), `question`, and optionally `id`, `answer`, `type` (renamed with `Columns`). The row reading here serves
the datasets folders too (`dataset.py`: Arrow files).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from ..items import ImageRef, Item, describe, parse_fields
from . import Columns, Format, InputError

TABLE_BATCH_ROWS = 64  # rows per record batch read from Parquet / Arrow
SUFFIXES = (".parquet", ".pq")


class Table(Format):
    """A table of rows (Parquet, or a dataset's Arrow files): `files` names them."""

    unit = "row"
    tables = True

    def files(self, source) -> list[Path]:
        raise NotImplementedError

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


def _batches(path: Path, columns: list[str] | None):
    """Record batches of a Parquet or Arrow (datasets: IPC stream, else file) table."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.suffix.lower() in SUFFIXES:
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

    if path.suffix.lower() in SUFFIXES:
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

    if path.suffix.lower() in SUFFIXES:
        return pq.ParquetFile(path).metadata.num_rows
    try:
        return sum(b.num_rows for b in pa.ipc.open_stream(pa.memory_map(str(path))))
    except pa.ArrowInvalid:
        return pa.ipc.open_file(pa.memory_map(str(path))).count_rows()


def table_rows(source, files: list[Path]) -> Iterator[tuple[int, dict]]:
    """(row number from 1, the row's fields) for every row of the table `files`, a record batch at a time."""
    c = source.columns
    wanted = [c.image, c.question, c.id, c.answer, c.type]
    row = 0
    for path in files:
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

