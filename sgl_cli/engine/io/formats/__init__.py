"""Input formats: the one place that says which formats sgl reads and which one a file is. One module per format.

- **sgl JSONL** (`jsonl.py`; `*.jsonl`, anything else that is text): one item object per line (`io/items.py`).
- **OpenAI Batch API** files (`openai.py`): JSONL whose lines are requests with `custom_id`, `method`, `url` and
  `body`, recognised from the content; their output is an OpenAI batch output file.
- **Parquet** (`parquet.py`; `*.parquet`) and **Hugging Face datasets saved with `save_to_disk`** (`dataset.py`; a
  folder): one item per row, with columns `image` and/or `video`, `question`, and optionally `id`, `answer`, `type`
  (renamed with `Columns`), read in record batches with pyarrow: a table is never in memory whole.

A format is a `Format`: it recognises a path, yields `(number, payload)` pairs (a line or row number from 1, and a
plain payload the Ray backend can ship to its workers as it is), parses one into an `Item`, and shapes the output
record of an item. Every input item yields exactly one pair, whatever is wrong with it. An installed package adds a
format under the entry-point group `sgl.formats` (`name = "module:FormatClass"`), as guides are added
(examples/format-plugin); it is tried after the formats known by name (a folder, `.parquet`) and before those known
by content (OpenAI, and sgl JSONL, the fallback).

A format is not trusted blindly (`plugins.py`'s rule): a plugin that cannot be loaded, or whose `recognise` raises,
is left out of recognition with a warning naming it. `Source` checks what a reader gives: numbers strictly
increasing from 1, each a (number, payload) pair. A reader that raises (other than an InputError, which says
itself) or breaks that contract ends the input there, with an InputError naming the format, the file and the last
good line: the items before it are read and get their records (the engine runs them before raising it), and a
resumed run stops at the same place, so the output holds one record per item read, in order. A `parse` that
raises, or gives no item of that number, is that item's error record.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ...errors import SglError
from ...plugins import Registry, pair_problem, warn, why
from ..items import Item

ENTRY_POINT_GROUP = "sgl.formats"
BUILTIN = {
    "dataset": "sgl_cli.engine.io.formats.dataset:Dataset",
    "parquet": "sgl_cli.engine.io.formats.parquet:Parquet",
    "openai": "sgl_cli.engine.io.formats.openai:OpenAIBatch",
    "sgl": "sgl_cli.engine.io.formats.jsonl:SglJsonl",  # the fallback: recognised last, whatever the file
}


class InputError(SglError):
    """An input file that cannot be read at all (missing, not a format sgl reads)."""


@dataclass(frozen=True)
class Columns:
    """Which table columns hold an item's fields (`--image-column` and the like)."""

    image: str = "image"
    question: str = "question"
    id: str = "id"
    answer: str = "answer"
    type: str = "type"
    video: str = "video"  # a video file per row (optional; a row may have a video, an image or both)


class Format:
    """One input format. Subclass it, set `name`, and implement `recognise`, `pairs` and `parse`."""

    name: str = ""
    unit: str = "line"  # what an item's number counts: "line" or "row" (it names the item in error messages)
    tables: bool = False  # a table of rows: the column options and --split apply

    def recognise(self, path: Path) -> bool:
        """Whether `path` (an existing file or folder) is in this format."""
        raise NotImplementedError

    def check(self, source: "Source") -> None:
        """What can be said about the input before any item is read (an InputError); nothing by default."""

    def pairs(self, source: "Source") -> Iterator[tuple[int, Any]]:
        """(number from 1, payload) for every item, in order; payloads are plain (picklable) values."""
        raise NotImplementedError

    def count(self, source: "Source") -> int:
        """How many items the input holds, without parsing them."""
        return sum(1 for _ in self.pairs(source))

    def parse(self, source: "Source", number: int, payload: Any) -> Item:
        """One pair as an item; what is wrong with it goes in `item.error` (never raises)."""
        raise NotImplementedError

    def identity(self, item: Item) -> Any:
        """What an output record is matched with its item by when a run resumes (output.py's `scan_output`)."""
        return item.line

    def name_identity(self, identity: Any) -> str:
        """An identity (`identity`'s value) in a message: `line 3`, `custom_id 'a'`."""
        return f"{self.unit} {identity}"

    def output(self, record: dict, model: str) -> dict:
        """The output line of an item's record (`model`: the preset's name)."""
        return record


# the order formats are recognised in: those known by their name (a folder, a suffix), then plugins, then those
# known by their content (OpenAI, and the sgl JSONL fallback)
_REGISTRY = Registry(ENTRY_POINT_GROUP, BUILTIN, noun="input format", last=("openai", "sgl"))


def refresh() -> None:
    """Look the installed formats up again (after installing a plugin in this process)."""
    _REGISTRY.refresh()
    get_format.cache_clear()


def format_names() -> list[str]:
    """Every format this installation reads, in the order they are recognised."""
    return _REGISTRY.names()


def _fail(problem: str, name: str, spec: str | None, exc: BaseException | None) -> Exception:
    if problem == "unknown":
        return InputError(f"unknown input format {name!r}; known: {', '.join(format_names())}")
    if problem == "import":  # a broken plugin is named, not a traceback
        return InputError(f"input format {name!r} ({spec}) cannot be loaded: {type(exc).__name__}: {exc}")
    return InputError(f"input format {name!r} ({spec}) is not a subclass of sgl_cli.engine.io.formats.Format")


@functools.cache
def get_format(name: str) -> Format:
    cls = _REGISTRY.load(name, Format, _fail)
    fmt = _REGISTRY.call(name, cls, "its constructor", cls)
    fmt.name = fmt.name or name
    return fmt


def format_label(name: str) -> str:
    """How messages name format `name`: "input format 'sgl'", "input format plugin 'csv'"."""
    return _REGISTRY.label(name, type(get_format(name)))


@dataclass
class Source:
    """One input file in one format; iterate it for (number, payload) pairs, `parse` each. Picklable (the Ray
    backend ships it; a worker looks its format up by name)."""

    path: Path
    kind: str  # the format's name: "sgl", "openai", "parquet", "dataset" or a plugin's
    columns: Columns = field(default_factory=Columns)
    split: str | None = None
    limit: int | None = None

    @property
    def format(self) -> Format:
        return get_format(self.kind)

    @property
    def base(self) -> Path:
        """Where relative image paths resolve: the input file's folder (a dataset's own folder)."""
        return self.path if self.path.is_dir() else self.path.parent

    @property
    def unit(self) -> str:
        return self.format.unit

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        """The format's pairs (up to `limit`), checked: a reader that raises or breaks the contract (numbers
        strictly increasing from 1) ends them with an InputError naming the format, the file and where."""
        fmt, unit, last, n = self.format, self.unit, 0, 0
        try:
            pairs = iter(fmt.pairs(self))
            while self.limit is None or n < self.limit:
                try:
                    pair = next(pairs)
                except StopIteration:
                    return
                problem = pair_problem(pair, last, unit)
                if problem is not None:
                    raise InputError(f"{format_label(self.kind)}: {self.path.name}: {problem}")
                last, n = int(pair[0]), n + 1
                yield last, pair[1]
        except SglError:
            raise
        except Exception as exc:  # noqa: BLE001 - a reader's failure is named, the items before it kept
            at = f"after {unit} {last}" if last else f"at its first {unit}"
            raise InputError(f"{format_label(self.kind)}: reading {self.path.name} failed {at}: {why(exc)}") from exc

    def count(self) -> int:
        """How many items the source holds (after `limit`), without parsing them (a count that fails: the items
        its reader gives before it breaks)."""
        try:
            n = self.format.count(self)
        except SglError:
            raise
        except Exception:  # noqa: BLE001 - reading says why, in one line; a count is for a progress bar
            n = None
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            n = 0
            try:
                for _ in self:
                    n += 1
            except InputError:
                pass
        return n if self.limit is None else min(n, self.limit)

    def parse(self, line: int, payload: Any) -> Item:
        """One pair as an item (never raises: a `parse` that fails, or gives no item numbered `line`, is the item's
        error record, naming the format)."""
        try:
            item = self.format.parse(self, line, payload)
        except Exception as exc:  # noqa: BLE001 - parsing never raises; a format's failure names it
            return self._failed(line, f"parse raised {why(exc)}")
        if not isinstance(item, Item) or item.line != line:
            got = f"an item of {item.unit} {item.line}" if isinstance(item, Item) else f"a {type(item).__name__}"
            return self._failed(line, f"parse gave {got}, not an item of {self.unit} {line}")
        return item

    def _failed(self, line: int, problem: str) -> Item:
        item = Item(line=line, id=line, unit=self.unit)
        item.error = item.fail(f"{format_label(self.kind)}: {problem}")
        return item

    def identity(self, item: Item) -> Any:
        return self.format.identity(item)

    def output(self, record: dict, model: str) -> dict:
        return self.format.output(record, model)


def open_source(path: Path, *, columns: Columns | None = None, split: str | None = None,
                limit: int | None = None) -> Source:
    """The source for `path`: the first format that recognises it (built-ins, plugins, then sgl JSONL)."""
    path = Path(path)
    if limit is not None and limit < 1:
        raise InputError(f"--limit must be >= 1, got {limit}")
    if not path.is_dir():
        if not path.exists():
            raise InputError(f"input {path} not found")
        if not path.is_file():
            raise InputError(f"input {path} is not a regular file or a dataset folder")
    fmt = recognise(path)
    if fmt.tables:
        import_pyarrow()
    elif split is not None or columns is not None and columns != Columns():
        raise InputError("--split and the column options apply to Parquet files and dataset folders, not JSONL")
    source = Source(path, fmt.name, columns or Columns(), split, limit)
    # a folder that is not a dataset, or an unknown split, is said now
    _REGISTRY.call(fmt.name, type(fmt), "check", fmt.check, source)
    return source


def recognise(path: Path) -> Format:
    """The first format that recognises `path`, in `format_names()`'s order. A plugin that cannot be loaded, or
    whose `recognise` raises, is left out with a PluginWarning naming it (sgl JSONL, last, takes any file)."""
    for name in _REGISTRY.usable(Format):
        if _REGISTRY.is_builtin(name):
            if get_format(name).recognise(path):
                return get_format(name)
            continue
        try:
            fmt = get_format(name)
        except SglError as exc:  # its constructor raised
            warn(f"{exc}; left out")
            continue
        try:
            if fmt.recognise(path):
                return fmt
        except Exception as exc:  # noqa: BLE001 - a plugin that cannot tell does not recognise the file
            warn(f"{_REGISTRY.label(name)}: recognise raised {why(exc)}; taken as not recognising {path.name}")
    raise InputError(f"input {path}: no input format recognises it")


def read_items(path: str | Path, skip: int = 0, **options) -> Iterator[Item]:
    """Stream the items of an input file of any format sgl reads, from the `skip`-th on."""
    source = open_source(Path(path), **options)
    for n, (line, payload) in enumerate(source):
        if n >= skip:
            yield source.parse(line, payload)


def import_pyarrow():
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise InputError("reading Parquet and datasets needs pyarrow: pip install pyarrow") from None
