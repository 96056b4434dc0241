"""`sgl run --save-scores`: each answered item's visual-token ranking, beside the output, compactly.

`<out stem>.scores.arrow` is an Arrow IPC stream (what pyarrow, pandas, polars and DuckDB read:
`pyarrow.ipc.open_stream(path).read_all()`), one row per record, appended right after its record is written:

- `line`: the record's `line` (its item's line or row)
- `scores`: float16, one per visual token in sequence order: the guide's scores, or after an early exit the small
  model's SGP importance
- `kept`: int32: the visual tokens the large model kept (empty after an exit)
- `grids`: per token grid: `image` (which of the item's images), `name`, `rows`, `cols`, `tokens` (the visual-token
  index at each cell, row-major; as `sgl inspect` lays them out)

`--resume` keeps the rows of the records already written and drops a row torn by a kill.

`sgl eval --details FILE --save-scores` writes `<FILE stem>.scores.arrow` with the same columns and `setting`
(`guide@retain`, as the details records name it): one row per item and setting.
"""

from __future__ import annotations

import os
from pathlib import Path

SUFFIX = ".scores.arrow"


def scores_path(out: Path) -> Path:
    stem = out.name[: -len(".jsonl")] if out.name.endswith(".jsonl") else out.name
    return out.with_name(stem + SUFFIX)


def _schema(settings: bool = False):
    import pyarrow as pa

    grid = pa.struct([("image", pa.int32()), ("name", pa.string()), ("rows", pa.int32()), ("cols", pa.int32()),
                      ("tokens", pa.list_(pa.int32()))])
    fields = [("line", pa.int64()), ("scores", pa.list_(pa.float16())), ("kept", pa.list_(pa.int32())),
              ("grids", pa.list_(grid))]
    return pa.schema(fields[:1] + [("setting", pa.string())] + fields[1:] if settings else fields)


def score_payload(scores, kept, grids) -> dict:
    """What a record carries to the writer: numpy arrays and plain grid dicts (picklable for the Ray backend)."""
    import numpy as np

    return {
        "scores": np.asarray(scores, dtype=np.float16),
        "kept": np.asarray(kept, dtype=np.int32),
        "grids": [{"image": int(g.image), "name": g.name, "rows": g.shape[0], "cols": g.shape[1],
                   "tokens": np.asarray(g.tokens, dtype=np.int32).reshape(-1)} for g in grids],
    }


class ScoreWriter:
    """Appends one row per record to the Arrow stream, flushed with it."""

    def __init__(self, path: Path, append: bool, keep_lines: set[int] | None = None, settings: bool = False):
        self.path = path
        self.schema = _schema(settings)
        if append and path.exists():
            repair(path, keep_lines)
        if not (append and path.exists()):
            # The schema message, then a row message per record; no end-of-stream marker (readers stop at EOF).
            path.write_bytes(self.schema.serialize().to_pybytes())
        self._f = path.open("ab")

    def write(self, line: int, payload: dict, setting: str | None = None) -> None:
        import pyarrow as pa

        grids = [{**g, "tokens": pa.array(g["tokens"], type=pa.int32())} for g in payload["grids"]]
        columns = [pa.array([line], type=pa.int64()),
                   pa.array([payload["scores"]], type=pa.list_(pa.float16())),
                   pa.array([payload["kept"]], type=pa.list_(pa.int32())),
                   pa.array([grids], type=self.schema.field("grids").type)]
        if "setting" in self.schema.names:
            columns.insert(1, pa.array([setting], type=pa.string()))
        batch = pa.record_batch(columns, schema=self.schema)
        self._f.write(batch.serialize())
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_scores(path: Path) -> dict[int, dict]:
    """line -> its row (the last one, if a line was written twice), from every whole row of the stream."""
    import pyarrow as pa

    rows: dict[int, dict] = {}
    try:
        reader = pa.ipc.open_stream(pa.memory_map(str(path)))
    except (pa.ArrowInvalid, OSError):
        return rows
    try:
        for batch in reader:
            for row in batch.to_pylist():
                rows[row["line"]] = row
    except (pa.ArrowInvalid, OSError):
        pass  # a row torn by a kill
    return rows


def repair(path: Path, keep_lines: set[int] | None = None) -> None:
    """Rewrite the stream without a torn last row and, given `keep_lines` (the records a resumed output holds),
    with only their rows, the last of each (atomically: a kill leaves the old file or the new one)."""
    import pyarrow as pa

    batches = []
    try:
        reader = pa.ipc.open_stream(pa.memory_map(str(path)))
        try:
            for batch in reader:
                batches.append(batch)
        except (pa.ArrowInvalid, OSError):
            pass
        schema = reader.schema
        if keep_lines is not None:
            last = {}
            for i, batch in enumerate(batches):
                for line in batch.column("line").to_pylist():
                    last[line] = i
            batches = [b for i, b in enumerate(batches)
                       if all(line in keep_lines and last[line] == i for line in b.column("line").to_pylist())]
    except (pa.ArrowInvalid, OSError):
        schema = _schema()
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        f.write(schema.serialize().to_pybytes())
        for batch in batches:
            f.write(batch.serialize().to_pybytes())
    os.replace(tmp, path)
