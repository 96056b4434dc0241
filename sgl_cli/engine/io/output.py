"""The output file: one strict-JSON record per input item, in input order, each written whole and flushed.

- **Strict JSON.** Records are written with `allow_nan=False`: any reader accepts every line.
- **One writer.** An OS-level lock (`OutputLock`, beside the output) is taken before anything is checked or
  written, and dies with its process: a second run on the same output is refused at once, naming the first,
  whatever name it reaches the file by (a symlink, a hard link).
- **Resume.** Records are in input order, so a resumed run skips as many items as the file holds whole records,
  checking that each one is the item's: its line (or custom_id) and its `input_sha`, a fingerprint of the
  item's input content. Only the piece after the last newline can be torn by a kill; it is cut
  off in place (or completed, when it is a whole record whose newline was lost): the records before it are never
  rewritten, so no kill at any moment can lose them.
- **Full disk.** A write that fails stops the run with one line; the records before it stay whole, and the same
  command with `--resume` continues.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import socket
import sys
from pathlib import Path
from typing import IO, Callable

from ..errors import SglError
from .formats import Source


class OutputError(SglError):
    """The output cannot be written (a full disk, a read-only folder, another run holding it)."""


def default_output(input_path: Path) -> Path:
    stem = input_path.name if input_path.is_dir() else input_path.stem
    return input_path.with_name(f"{stem}.sgl.jsonl")


def settings_path(out: Path) -> Path:
    return out.with_name(out.name + ".preset.yaml") if out.suffix != ".jsonl" else out.with_suffix(".preset.yaml")


def record_line(record: dict) -> str:
    """One record as its output line: strict JSON (no NaN or Infinity), UTF-8 kept, newline last."""
    return json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n"


def scan_output(out: Path) -> list:
    """The identity of every whole record in `out`, in order (an sgl record's `line`, an OpenAI output line's
    `custom_id`), after repairing a torn last record in place. A line that is neither means the file is not an
    sgl output: refuse rather than touch it."""
    return [identity for identity, _ in scan_records(out)]


def scan_records(out: Path) -> list[tuple]:
    """(identity, input fingerprint) of every whole record in `out`, in order, after the same repair as
    `scan_output`; the fingerprint is None in a record written before sgl recorded it (`input_sha`)."""
    ids: list = []
    with out.open("rb") as f:
        number = 0
        end = 0  # offset just past the last newline
        tail = b""
        for raw in f:
            number += 1
            if not raw.endswith(b"\n"):
                tail = raw
                break
            end += len(raw)
            if raw.strip():
                ids.append(_identity(raw, out, number))
    if tail.strip():
        try:
            ids.append(_identity(tail, out, number))
            with out.open("ab") as f:  # a whole record whose newline was lost: complete it
                f.write(b"\n")
        except OutputError:
            os.truncate(out, end)  # a torn record: cut it off, in place
    elif tail:
        os.truncate(out, end)
    return ids


def completed_lines(out: Path) -> set[int]:
    """The input lines an sgl-record file holds (after the same repair)."""
    return {i for i in scan_output(out) if isinstance(i, int)}


def _identity(raw: bytes, out: Path, number: int) -> tuple:
    try:
        rec = json.loads(raw)
    except (ValueError, RecursionError):
        rec = None
    if isinstance(rec, dict) and isinstance(rec.get("line"), int):
        return rec["line"], _sha(rec)
    # custom_id null: an error line of an sgl before 0.3 for a request without a usable id (one sgl wrote, so
    # resumable; checked by position only)
    if isinstance(rec, dict) and (isinstance(rec.get("custom_id"), str) or rec.get("custom_id", 0) is None) \
            and "response" in rec:
        response, error = rec["response"], rec.get("error")
        body = response.get("body") if isinstance(response, dict) else None
        sgl = body.get("sgl") if isinstance(body, dict) else error.get("sgl") if isinstance(error, dict) else None
        return rec["custom_id"], _sha(sgl)
    raise OutputError(f"{out}: line {number} is not an sgl record; refusing to resume into this file")


def _sha(rec) -> str | None:
    sha = rec.get("input_sha") if isinstance(rec, dict) else None
    return sha if isinstance(sha, str) else None


def input_fingerprint(payload, item) -> str:
    """`input_sha`: the first 16 hex digits of a SHA-256 of an input item's content as read (a JSONL line's bytes,
    a table row's values) and of the files its images and video resolve to (`resolved_image`: a relative path means
    another file once the input moves; the same file named from another folder or through a link is the same).
    `--resume` compares it with each record's, so an edited input is noticed."""
    h = hashlib.sha256()
    _feed(h, payload)
    for ref in [*item.images, *(item.video.refs if item.video is not None else ())]:
        if ref.kind in ("path", "url"):  # bytes and data URIs are in the payload already
            where = resolved_image(ref.value) if ref.kind == "path" else ref.value
            h.update(b"\0ref\0" + ref.kind.encode() + b"\0" + where.encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:16]


def resolved_image(path) -> str:
    """The file an image path names: absolute, links resolved (lexically, where a path cannot be resolved)."""
    try:
        return os.path.realpath(path)
    except (OSError, ValueError):  # a NUL in the path: it names no file
        return os.path.abspath(path)


def moved_image(source, image_base, line: int, payload, item, sha: str) -> str | None:
    """Why an item's fingerprint differs from `sha` when its content is what an earlier run read but its images
    resolved elsewhere then (the input reached through a link or copied to another folder, a folder moved):
    "image 'x' is NEW, was OLD", for its first image that moved. None when the content itself changed, or where
    relative paths resolved then (`image_base`, from `<out stem>.run.json`) is not known."""
    if not isinstance(image_base, str) or image_base == resolved_image(source.base):
        return None
    try:
        fields = {f.name: getattr(source, f.name) for f in dataclasses.fields(source)}
        then = _Rebased(**fields, at=Path(image_base)).parse(line, payload)
    except Exception:  # noqa: BLE001 - a format plugin's parse failed: no diagnosis, the plain refusal stands
        return None
    if input_fingerprint(payload, then) != sha:
        return None
    for now, was in zip(item.images, then.images):
        if now.kind == "path" and resolved_image(now.value) != resolved_image(was.value):
            return f"image '{now.label}' is {resolved_image(now.value)}, was {resolved_image(was.value)}"
    return None


@dataclasses.dataclass
class _Rebased(Source):
    """The input as if in another folder (`at`): where its relative image paths resolved for an earlier run."""

    at: Path = Path(".")

    @property
    def base(self) -> Path:
        return self.at


def _feed(h, value) -> None:
    """Hash a payload (bytes, or a row's plain values), each value tagged with its type and length; iterative, so
    no nesting is too deep."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, (bytes, bytearray, memoryview)):
            data = bytes(v)
            h.update(b"b%d:" % len(data) + data)
        elif isinstance(v, str):
            data = v.encode("utf-8", "surrogatepass")
            h.update(b"s%d:" % len(data) + data)
        elif isinstance(v, dict):
            h.update(b"d%d:" % len(v))
            for key, item in reversed(list(v.items())):
                stack += [item, key]
        elif isinstance(v, (list, tuple)):
            h.update(b"l%d:" % len(v))
            stack += reversed(v)
        else:  # numbers, None, a payload that is a note (an oversized line, a repeated custom_id)
            data = f"{type(v).__name__}:{v!r}".encode("utf-8", "surrogatepass")
            h.update(b"o%d:" % len(data) + data)


class RecordWriter:
    """Appends records as JSON lines, flushing each, so that a crash loses at most the one being written.
    `shape` turns a record into the line's object (an OpenAI output line, say)."""

    def __init__(self, path: Path, append: bool, shape: Callable[[dict], dict] | None = None):
        self.path = path
        self.shape = shape or (lambda record: record)
        self.written = 0
        try:
            self._f: IO[str] = path.open("a" if append else "w", encoding="utf-8")
        except OSError as exc:
            raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None

    def write(self, record: dict) -> None:
        line = record_line(self.shape(record))
        try:
            self._f.write(line)
            self._f.flush()
        except OSError as exc:
            raise OutputError(
                f"cannot write to {self.path}: {exc.strerror or exc}; the {self.written} record(s) written by this "
                "run are whole and kept: make room and run the same command with --resume") from None
        self.written += 1

    def close(self) -> None:
        try:
            self._f.close()
        except OSError:
            pass  # the write that failed said why

    def __enter__(self) -> "RecordWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class OutputLock:
    """An exclusive OS-level lock on an output file, held while a run writes it; the operating system drops it
    when the process ends, however it ends. It locks the file, not the name it was given: a lock file named
    after the resolved path (`.<name>.lock` beside the real file, so a symlink finds it), and, once the output
    exists, the output file itself (its inode, so a hard link finds it too; not on Windows, whose locks forbid
    the writes)."""

    def __init__(self, out: Path):
        self._fd: int | None = None
        self._file_fd: int | None = None
        self.out = out
        try:
            real = out.resolve()
        except (OSError, RuntimeError) as exc:  # a symlink loop
            raise OutputError(f"--out {out} cannot be resolved ({exc})") from None
        self.path = real.with_name(f".{real.name}.lock")

    def acquire(self) -> "OutputLock":
        folder = self.path.parent
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise OutputError(f"cannot write in {folder} ({exc.strerror or exc})") from None
            if not _try_lock(fd):
                holder = _read(fd)
                os.close(fd)
                raise OutputError(f"{self.out} is being written by another sgl run ({holder or 'holder unknown'}); "
                                  "wait for it to end, or write to another --out")
            try:  # the file we locked may have been removed by a holder that just finished: lock the new one
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self._fd = fd
        try:
            os.ftruncate(fd, 0)
            started = datetime.datetime.now().isoformat(timespec="seconds")
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {started}: "
                         f"{' '.join(sys.argv[:1] + sys.argv[1:])[:500]}".encode("utf-8", "replace"))
        except OSError as exc:  # a full disk: no lock file left behind
            self.release()
            raise OutputError(f"cannot write in {folder} ({exc.strerror or exc})") from None
        if self.out.exists():
            try:
                self.cover()
            except OutputError:
                self.release()
                raise
        return self

    def cover(self) -> None:
        """Lock the output file itself (once it exists): a run that reaches it through a hard link is refused."""
        if self._file_fd is not None or sys.platform == "win32":
            return
        try:
            fd = os.open(self.out, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO: no wait
        except OSError as exc:
            raise OutputError(f"cannot read {self.out} ({exc.strerror or exc})") from None
        if not _try_lock(fd):
            os.close(fd)
            raise OutputError(f"{self.out} is being written by another sgl run, through another name for the same "
                              "file (a link); wait for it to end, or write to another --out")
        self._file_fd = fd

    def release(self) -> None:
        if self._file_fd is not None:
            os.close(self._file_fd)
            self._file_fd = None
        if self._fd is None:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self._fd)  # closing drops the lock
        self._fd = None

    def __del__(self) -> None:
        self.release()


def _try_lock(fd: int) -> bool:
    if sys.platform == "win32":
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _read(fd: int) -> str:
    try:
        return os.pread(fd, 600, 0).decode("utf-8", "replace").strip()
    except OSError:
        return ""
