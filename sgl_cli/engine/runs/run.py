"""A `Run`: one input file answered into one output file, resumably, by either backend. What `sgl run` does.

    from sgl_cli.engine import Run, load_preset

    summary = Run("batch.jsonl", load_preset("default").with_settings(retain=0.09), out="answers.jsonl").execute()
    print(summary.line())

Everything that needs no model is checked when the Run is made (the input, the output path, a resumed run's
settings, the calibration), so a mistake costs no model load. The preset's calibration (or `calibration`) is
resolved once, here (`engine/calibration.py`, purpose "run"). Records are written as they complete, each flushed
whole, with the resolved settings beside them (`<out stem>.preset.yaml`), and the output file is created only when
the first record is ready: a backend that fails to start leaves nothing behind.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from ..errors import SettingError, SglError
from ..preset import SPEED_ONLY, ModelSpec, Preset, Settings
from ..io.fetch import FetchPolicy
from ..io.output import (OutputError, OutputLock, RecordWriter, default_output, input_fingerprint, moved_image,
                         resolved_image, scan_records, settings_path)


@dataclass
class RunSummary:
    """What a run did, counted as its records were written."""

    items: int = 0
    skipped: int = 0  # already in the output (resume)
    small_exits: int = 0
    large_calls: int = 0
    errors: int = 0
    retained: list[int] = field(default_factory=list)  # kept tokens of each large call
    started: float = field(default_factory=time.perf_counter)
    out: Path | None = None

    def add(self, rec: dict) -> None:
        self.items += 1
        if rec["error"]:
            self.errors += 1
        elif rec["exit"] == "small":
            self.small_exits += 1
        else:
            self.large_calls += 1
            self.retained.append(rec["retained_tokens"])

    @property
    def rate(self) -> float:
        """Items per second so far."""
        return self.items / max(time.perf_counter() - self.started, 1e-9)

    def line(self) -> str:
        mean = sum(self.retained) / len(self.retained) if self.retained else 0.0
        parts = [
            f"{self.items} items" + (f" (+{self.skipped} already done)" if self.skipped else ""),
            f"{self.small_exits} exited to small",
            f"{self.large_calls} large calls",
            f"{self.errors} errors",
            f"mean retained tokens {mean:.1f}",
            f"{self.rate:.2f} items/s",
        ]
        return ", ".join(parts) + (f" -> {self.out}" if self.out else "")


class Run:
    """Answer every item of `input` (any format sgl reads: `io/formats/`) with `preset` into `out` (default
    `<input stem>.sgl.jsonl` beside the input; None: records are only yielded). `resume` skips the items `out`
    already records (refusing other settings); `overwrite` replaces it. `backend` is "local" or "ray"
    (`ray_options`). `columns`, `split`, `limit` select what a table input holds; `fetch` bounds image URL fetches
    (`FetchPolicy(enabled=False)`: none). `save_scores` also writes each item's visual-token ranking beside the
    output (`io/scores.py`). `notify` receives one-line notes, `warn` one-line warnings (default: notify). An OpenAI
    batch input gets an OpenAI batch output file. Beside the output, `<out stem>.run.json` says what was run (the
    input, its format), for `sgl report`. Each record gets `input_sha`, its item's fingerprint
    (`input_fingerprint`), which `resume` checks: an input edited since the interrupted run is refused."""

    def __init__(self, input: str | Path, preset: Preset, *, out: str | Path | None = "default", resume: bool = False,
                 overwrite: bool = False, calibration: str | Path | None = None, backend: str = "local",
                 ray_options=None, threads: int | None = None, columns=None, split: str | None = None,
                 limit: int | None = None, fetch: FetchPolicy | None = None, save_scores: bool = False,
                 notify: Callable[[str], None] | None = None, warn: Callable[[str], None] | None = None):
        from ..calibration import resolve_calibration
        from ..io.formats import open_source

        self.lock: OutputLock | None = None
        self._engine = None  # the local engine while records are made
        self.input = Path(input)
        self.notify = notify or (lambda _: None)
        self.warn = warn or self.notify
        self.backend = backend
        self.ray_options = ray_options
        self.threads = threads
        self.fetch = fetch or FetchPolicy()
        self.save_scores = save_scores
        if resume and overwrite:
            raise SettingError("{} and {} contradict each other", "resume", "overwrite")
        self.source = open_source(self.input, columns=columns, split=split, limit=limit)
        self._check_backend()
        self.preset = resolve_calibration(preset, "run", calibration or None, notify=self.notify,
                                          warn=self.warn).preset
        from ..backends import check_preset

        check_preset(self.preset)  # a guide or prune layer the large backend cannot run: before anything else
        self.out = default_output(self.input) if out == "default" else (Path(out) if out is not None else None)
        if self.out is None and resume:
            raise SettingError("{} needs an output file, not stdout", "resume")
        if self.out is None and save_scores:
            raise SettingError("{} needs an output file, not stdout", "save_scores")
        self.done: list = []  # the identities of the records `out` holds (resume)
        self.done_shas: list = []  # their input fingerprints (None: written before sgl recorded them)
        self.done_lines: set[int] = set()  # their items' lines
        self._previous: dict = {}  # the interrupted run's `<out stem>.run.json` (resume)
        if self.out is not None:
            self._check_output(resume, overwrite)
        self.summary = RunSummary(skipped=len(self.done), out=self.out)

    def _check_output(self, resume: bool, overwrite: bool) -> None:
        """Everything about `out` that can be wrong, before a model loads; then the lock, then the existing file."""
        out = self.out
        if out.is_dir():
            raise OutputError(f"--out {out} is a folder; give the output file's path")
        if not out.parent.is_dir():
            raise OutputError(f"--out {out}: folder {out.parent} does not exist")
        if _same_file(out, self.input):
            raise OutputError(f"--out {out} is the input file itself; write the records to another file")
        for path in self._side_files():  # written once the first record is ready: a mistake costs no model load
            _check_writable(path)
        self.lock = OutputLock(out).acquire()  # a second run on this output is refused here, at once
        if out.exists():
            if not (resume or overwrite):
                self.release()
                raise OutputError(f"{out} exists; pass --resume to continue that run or --overwrite to replace it")
            if not os.access(out, os.W_OK):
                self.release()
                raise OutputError(f"{out} is not writable")
            if resume:
                try:
                    _check_same_settings(settings_path(self._real_out), self.preset.to_dict())
                    self._previous = _read_json(run_info_path(self._real_out))
                    recorded = scan_records(out)
                    self.done = [identity for identity, _ in recorded]
                    self.done_shas = [sha for _, sha in recorded]
                    self._verify_done(iter(self.source))
                except SglError:
                    self.release()
                    raise

    @property
    def _real_out(self) -> Path:
        """The output's real path: the files beside it belong to the file, whatever name it was given by."""
        try:
            return self.out.resolve()
        except (OSError, RuntimeError):
            return self.out

    def _side_files(self) -> list[Path]:
        """The files written beside the output: the settings, what was run, and the scores when saved."""
        from ..io.scores import scores_path

        real = self._real_out
        return [settings_path(real), run_info_path(real), *([scores_path(real)] if self.save_scores else [])]

    def release(self) -> None:
        """Let another run write the output (done when the records end)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _check_backend(self) -> None:
        if self.backend not in ("local", "ray"):
            raise SettingError(f"{{}} must be local or ray, got {self.backend!r}", "backend")
        if self.backend == "ray":
            from .ray_backend import RayOptions, import_ray

            self.ray_options = self.ray_options or RayOptions(threads=self.threads)
            self.ray_options.validate()
            import_ray()  # not installed: say how, before anything else happens

    def remaining(self) -> int:
        """Input items not yet recorded (for a progress bar)."""
        return max(0, self.source.count() - len(self.done))

    def _records(self) -> tuple[Iterator[dict], Callable[[], tuple[int, str]]]:
        """The records of the items after those `out` holds, and a function giving the next record's (line,
        input fingerprint)."""
        def warn_random() -> None:
            from ..builtin.pair import random_weights_warning

            self.warn(random_weights_warning())

        skip = len(self.done)
        if self.backend == "ray":
            from .ray_backend import run_records

            # Models load in the workers; the records come back in input order, so writing them is shared.
            pending = ((item.line, sha) for item, sha in self._pending())
            return run_records(self.source, self.preset, skip, self.ray_options, self.fetch,
                               on_random_weights=warn_random, notify=self.notify,
                               save_scores=self.save_scores), lambda: next(pending)
        from ..pipeline.engine import Engine

        from ..core.threads import use_threads

        use_threads(self.threads)
        engine = Engine.load(self.preset, fetch=self.fetch)  # resolved above
        self._engine = engine  # closed when the records end (`__iter__`)
        engine.save_scores = self.save_scores
        if engine.random_weights:
            warn_random()
        shas: collections.deque = collections.deque()  # the engine reads a few batches ahead of its records

        def items() -> Iterator:
            for item, sha in self._pending():
                shas.append((item.line, sha))
                yield item

        return engine.run(items()), shas.popleft

    def _verify_done(self, pairs: Iterator) -> None:
        """Read as many items as `out` holds records, checking that each record is the item's: its line (or
        custom_id) and the fingerprint of its content (an input edited since the interrupted run is refused, not
        answered into the wrong place)."""
        seen: dict = {}
        unchecked = 0
        unit = self.source.unit
        for n, (recorded, sha) in enumerate(zip(self.done, self.done_shas)):
            pair = next(pairs, None)
            if pair is None:
                raise SglError(f"cannot resume: {self.out} holds {len(self.done)} records but the input has only {n} "
                               "items; write to a new --out")
            line, payload = pair
            item = self.source.parse(line, payload)
            expected = self.source.identity(item)
            self.done_lines.add(item.line)
            if recorded is not None and recorded in seen:
                what = self.source.format.name_identity(recorded)
                raise SglError(f"cannot resume: {self.out} holds a duplicate record for {what} (records "
                               f"{seen[recorded]} and {n + 1}); it was not written by one sgl run alone; write to a "
                               "new --out")
            seen[recorded] = n + 1
            if recorded is not None and recorded != expected:
                raise SglError(f"cannot resume: record {n + 1} of {self.out} is for {recorded!r}, but the input's "
                               f"item {n + 1} is {expected!r}: the input changed since the interrupted run; write to "
                               "a new --out")
            if sha is None:
                unchecked += 1
            elif sha != input_fingerprint(payload, item):
                moved = moved_image(self.source, self._previous.get("image_base"), line, payload, item, sha)
                if moved is not None:
                    raise SglError(f"cannot resume: {unit} {line} of {self.input} is unchanged, but its images now "
                                   f"resolve to other files than when record {n + 1} of {self.out} was answered "
                                   f"({moved}); resume with the input where it was, or write to a new --out")
                raise SglError(f"cannot resume: {unit} {line} of {self.input} is not the item record {n + 1} of "
                               f"{self.out} answered: the input changed since the interrupted run; write to a new "
                               "--out")
        if unchecked:
            self.warn(f"warning: {unchecked} record(s) of {self.out} carry no input_sha (written by an older sgl): "
                      "resuming checks their lines, not their content")

    def _pending(self) -> Iterator[tuple]:
        """(item, input fingerprint) of the input's items after those `out` already records."""
        for n, (line, payload) in enumerate(self.source):
            if n >= len(self.done):
                item = self.source.parse(line, payload)
                yield item, input_fingerprint(payload, item)

    def __iter__(self) -> Iterator[dict]:
        """Yield each record as it is written (in input order). An input that breaks part-way (a format's reader
        that raises or breaks its contract) ends the run with an InputError once the records of the items read
        before it are written; resuming stops at the same place."""
        from ..io.formats import InputError
        from ..pipeline.record import SCORES_KEY

        records = None
        writer: RecordWriter | None = None
        scores = None
        try:
            records, next_sha = self._records()  # loads the models: one that fails releases the output too
            for record in records:
                payload = record.pop(SCORES_KEY, None)
                line, record["input_sha"] = next_sha()
                if line != record["line"]:  # records come in input order, one per item: never
                    raise SglError(f"internal error: the record of line {record['line']} came where line {line}'s "
                                   "was due")
                if self.out is not None:
                    writer = writer or self._open()
                    writer.write(record)
                    if self.save_scores:
                        scores = scores or self._open_scores()
                        if payload is not None:  # written after its record: a kill between loses scores, not a record
                            scores.write(record["line"], payload)
                self.summary.add(record)
                yield record
            if writer is None and self.out is not None:
                writer = self._open()
        except InputError as exc:  # the input broke part-way (a format's reader): the records before it are kept
            done = self.summary.items + self.summary.skipped
            if self.out is None or not done:
                raise
            raise InputError(f"{exc}; the records of the {done} items before it are in {self.out}") from exc
        finally:
            try:
                if hasattr(records, "close"):
                    records.close()  # a Ray backend it started shuts down
                if writer is not None:
                    writer.close()
                if scores is not None:
                    scores.close()
                self.release()
            finally:
                engine, self._engine = self._engine, None
                if engine is not None:  # vLLM's engine processes end here, not when the interpreter exits
                    engine.close()

    def shape(self, record: dict) -> dict:
        """A record as its output line's object, as the input's format shapes it (an OpenAI batch input: an OpenAI
        batch output line; sgl JSONL: the record itself)."""
        return self.source.output(record, self.preset.name)

    def _open(self) -> RecordWriter:
        import json

        import yaml

        from ... import __version__
        from ..io.scores import scores_path

        real = self._real_out
        about = {"input": str(self.input.resolve()), "image_base": resolved_image(self.source.base),
                 "format": self.source.kind,
                 "columns": dataclasses.asdict(self.source.columns), "split": self.source.split,
                 "limit": self.source.limit, "preset": self.preset.name, "threshold": self.preset.settings.threshold,
                 "scores": scores_path(real).name if self.save_scores else None, "sgl": __version__}
        for path, text in ((settings_path(real), yaml.safe_dump(self.preset.to_dict(), sort_keys=False)),
                           (run_info_path(real), json.dumps(about, indent=1) + "\n")):
            try:
                path.write_text(text)
            except OSError as exc:  # checked before the models loaded; changed since, or a full disk
                raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
        if self.lock is not None and self.out.exists():  # made since the lock was taken: lock it before writing
            self.lock.cover()
        writer = RecordWriter(self.out, append=bool(self.done), shape=self.shape)
        if self.lock is not None:
            self.lock.cover()  # the output exists now: a run that reaches it through a hard link is refused
        return writer

    def _open_scores(self):
        from ..io.scores import ScoreWriter, scores_path

        path = scores_path(self._real_out)
        try:
            return ScoreWriter(path, append=bool(self.done), keep_lines=self.done_lines)
        except OSError as exc:
            raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None

    def execute(self) -> RunSummary:
        """Run to the end; the summary."""
        for _ in self:
            pass
        return self.summary

    def __del__(self) -> None:
        self.release()


def run_info_path(out: Path) -> Path:
    """`<out stem>.run.json`: what a run read (its input and format), for `sgl report`."""
    stem = out.name[: -len(".jsonl")] if out.name.endswith(".jsonl") else out.name
    return out.with_name(stem + ".run.json")


def _read_json(path: Path) -> dict:
    """A JSON object from a file sgl wrote, or {} (missing, unreadable, or not one)."""
    import json

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _check_writable(path: Path) -> None:
    """That `path` can be written: a regular file that is writable, or a new file in a writable folder."""
    import stat

    try:
        st = os.stat(path)
    except FileNotFoundError:
        if not os.access(path.parent, os.W_OK):
            raise OutputError(f"cannot write {path}: its folder is not writable") from None
        return
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(st.st_mode):
        raise OutputError(f"cannot write {path}: it is a folder; move it away or write to another --out")
    if not stat.S_ISREG(st.st_mode):
        raise OutputError(f"cannot write {path}: it is not a regular file; move it away or write to another --out")
    if not os.access(path, os.W_OK):
        raise OutputError(f"cannot write {path}: it is not writable")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _check_same_settings(saved: Path, current: dict) -> None:
    import yaml

    if not saved.exists():
        return
    previous = _with_defaults(yaml.safe_load(saved.read_text()) or {})
    current = _with_defaults(current)
    # Batch sizes and the pipeline change speed, not results; anything else would mix two runs' answers in one file.
    changed = sorted(k for k in set(previous) | set(current)
                     if k not in SPEED_ONLY and previous.get(k) != current.get(k))
    if changed:
        raise SglError(
            f"cannot resume: settings differ from the interrupted run ({', '.join(changed)}; see {saved}); "
            "rerun with the same settings, or write to a new --out"
        )


def _with_defaults(d: dict) -> dict:
    """A saved preset with the keys it predates filled with their defaults (a run saved before `quantize`
    existed resumes as an unquantized run)."""

    def defaults(cls) -> dict:
        return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}

    out = {**defaults(Settings), **d}
    for role in ("small", "large"):
        if isinstance(out.get(role), dict):
            spec = dict(out[role])
            if "vllm" in spec:  # sgl 0.2's name of the backend's options
                spec["options"] = spec.pop("vllm")
            out[role] = {**defaults(ModelSpec), **spec}
    return out
