"""A `Run`: one input file answered into one output file, resumably, by either backend. What `sgl run` does.

    from sgl_cli.engine import Run, load_preset

    summary = Run("batch.jsonl", load_preset("default").with_settings(retain=0.09), out="answers.jsonl").execute()
    print(summary.line())

Everything that needs no model is checked when the Run is made (the input, the output path, a resumed run's
settings, the calibration), so a mistake costs no model load. The preset's calibration (or `calibration`) is
applied as `Engine.from_preset` applies it. Records are written as they complete, each flushed whole, with the
resolved settings beside them (`<out stem>.preset.yaml`), and the output file is created only when the first
record is ready: a backend that fails to start leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from ..errors import SglError
from ..preset import ModelSpec, Preset, Settings
from .output import RecordWriter, completed_lines, default_output, settings_path


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
    """Answer every item of `input` with `preset` into `out` (default `<input stem>.sgl.jsonl` beside the input;
    None: records are only yielded). `resume` skips the items `out` already records (refusing other settings);
    `overwrite` replaces it. `backend` is "local" or "ray" (`ray_options`). `notify` receives one-line notes,
    `warn` one-line warnings (default: notify)."""

    def __init__(self, input: str | Path, preset: Preset, *, out: str | Path | None = "default", resume: bool = False,
                 overwrite: bool = False, calibration: str | Path | None = None, backend: str = "local",
                 ray_options=None, threads: int | None = None, notify: Callable[[str], None] | None = None,
                 warn: Callable[[str], None] | None = None):
        from ..evaluation.fingerprint import apply_calibration

        self.input = Path(input)
        self.notify = notify or (lambda _: None)
        self.warn = warn or self.notify
        self.backend = backend
        self.ray_options = ray_options
        self.threads = threads
        if not self.input.is_file():
            raise SglError(f"input file {self.input} not found")
        if resume and overwrite:
            raise SglError("--resume and --overwrite contradict each other")
        self._check_backend()
        self.preset = apply_calibration(preset, Path(calibration) if calibration else None, notify=self.notify,
                                        warn=self.warn)
        self.out = default_output(self.input) if out == "default" else (Path(out) if out is not None else None)
        if self.out is None and resume:
            raise SglError("--resume needs an output file, not stdout")
        self.done: set[int] = set()
        if self.out is not None:
            if self.out.exists() and not (resume or overwrite):
                raise SglError(f"{self.out} exists; pass --resume to continue that run or --overwrite to replace it")
            if resume and self.out.exists():
                _check_same_settings(settings_path(self.out), self.preset.to_dict())
                self.done = completed_lines(self.out)
        self.summary = RunSummary(skipped=len(self.done), out=self.out)

    def _check_backend(self) -> None:
        if self.backend not in ("local", "ray"):
            raise SglError(f"--backend must be local or ray, got {self.backend!r}")
        if self.backend == "ray":
            from .ray_backend import RayOptions, import_ray

            self.ray_options = self.ray_options or RayOptions(threads=self.threads)
            self.ray_options.validate()
            import_ray()  # not installed: say how, before anything else happens

    def remaining(self) -> int:
        """Input items not yet recorded (for a progress bar)."""
        with self.input.open("rb") as f:
            return sum(1 for line in f if line.strip()) - len(self.done)

    def _records(self) -> Iterator[dict]:
        def warn_random() -> None:
            self.warn("warning: a model of this preset has random weights: its answers are noise; use a trained "
                      "pair (the default preset, or real checkpoints) for real answers.")

        if self.backend == "ray":
            from .ray_backend import run_records

            # Models load in the workers; the records come back in input order, so writing them is shared.
            return run_records(self.input, self.preset, self.done, self.ray_options, on_random_weights=warn_random,
                               notify=self.notify)
        from ..core.engine import Engine
        from .items import read_items

        if self.threads is not None:
            import torch

            torch.set_num_threads(self.threads)
        engine = Engine.from_preset(self.preset)
        if engine.random_weights:
            warn_random()
        return engine.run(read_items(self.input, skip_lines=self.done))

    def __iter__(self) -> Iterator[dict]:
        """Yield each record as it is written (in input order)."""
        records = self._records()
        writer: RecordWriter | None = None
        try:
            for record in records:
                if self.out is not None:
                    writer = writer or self._open()
                    writer.write(record)
                self.summary.add(record)
                yield record
            if writer is None and self.out is not None:
                writer = self._open()
        finally:
            if hasattr(records, "close"):
                records.close()  # a Ray backend it started shuts down
            if writer is not None:
                writer.close()

    def _open(self) -> RecordWriter:
        import yaml

        settings_path(self.out).write_text(yaml.safe_dump(self.preset.to_dict(), sort_keys=False))
        return RecordWriter(self.out, append=bool(self.done))

    def execute(self) -> RunSummary:
        """Run to the end; the summary."""
        for _ in self:
            pass
        return self.summary


def _check_same_settings(saved: Path, current: dict) -> None:
    import yaml

    if not saved.exists():
        return
    previous = _with_defaults(yaml.safe_load(saved.read_text()) or {})
    current = _with_defaults(current)
    # Batch size changes speed, not results; anything else would mix two runs' answers in one file.
    changed = sorted(k for k in set(previous) | set(current)
                     if k != "batch_size" and previous.get(k) != current.get(k))
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
            out[role] = {**defaults(ModelSpec), **out[role]}
    return out
