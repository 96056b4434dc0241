"""`sgl run`: stream image-question JSONL through the engine, one output record per input line."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from ._common import (domain_errors, err, preset_calibration, read_calibration, set_threads, stderr_is_tty,
                      with_help)

EXAMPLE = """
Input: one JSON object per line with `image` (path, relative to the JSONL file), `question`, and optionally
`id`, `answer` (a reference, copied to the output as `reference`) and `max_new_tokens`.

Output (--out, default <input>.sgl.jsonl): one record per input line, in order, with `answer`, `exit`
("small": the small model's answer was confident and consistent; "large": the large model answered from
`retained_tokens` of `visual_tokens`), the scores, timings in ms and `error` (null or the reason).
The resolved settings are written beside it (<out>.preset.yaml).

Exit codes: 0 all items answered, 1 some items failed (see their `error`), 2 usage, preset or model error.

Examples:
  sgl run examples/batch.jsonl --retain 0.09
  sgl run data.jsonl --preset qwen2.5-vl-3b-72b --threshold 0.95 --out answers.jsonl
  sgl run data.jsonl --resume            # continue after Ctrl-C or a crash
  sgl run data.jsonl --preset qwen2.5-vl-3b-72b --quantize 4bit     # the large model in NF4
  sgl run data.jsonl --backend ray --num-workers 8 --gpus-per-worker 1  # on a Ray cluster
"""


def run(
    input: Path = typer.Argument(..., help="JSONL file of image-question items.", show_default=False),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output JSONL (default: <input>.sgl.jsonl). '-' writes to stdout."),
    preset: Optional[str] = typer.Option(None, "--preset", "-p", help="Preset name (see `sgl presets`) or YAML file (default: the built-in pair)."),
    retain: Optional[float] = typer.Option(None, help="Fraction of visual tokens the large model keeps (at least 1)."),
    threshold: Optional[float] = typer.Option(None, help="Exit early when the small model's exit_score >= this."),
    no_exit: bool = typer.Option(False, "--no-exit", help="Never exit early: the large model answers every item."),
    calibration: Optional[Path] = typer.Option(None, "--calibration", help="Use the threshold of this `sgl calibrate` file; refused unless it was made for this run's models and settings."),
    consistency_retain: Optional[float] = typer.Option(None, help="Visual tokens kept for the small model's consistency re-read."),
    max_new_tokens: Optional[int] = typer.Option(None, help="Longest answer, in tokens (an item's own `max_new_tokens` wins)."),
    prune_layer: Optional[int] = typer.Option(None, help="Decoder layer at which the large model drops tokens (0: before the LM)."),
    prompt_suffix: Optional[str] = typer.Option(None, help="Text appended to every question (\"\" for none)."),
    batch_size: Optional[int] = typer.Option(None, help="Items per model call."),
    guide: Optional[str] = typer.Option(None, "--guide", "-g", help="What ranks the visual tokens: sgl (the small model's attention; the only guide that exits early), cls (the large model's vision-encoder attention, FasterVLM), fastv (the large model's own layer K-1 attention; K = --prune-layer, 2 when 0) or random (default: the preset's, sgl)."),
    seed: Optional[int] = typer.Option(None, help="Seed of the random guide."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run: skip items already in --out."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out."),
    threads: Optional[int] = typer.Option(None, help="Torch CPU threads (on a busy machine, fewer is faster); with --backend ray, per worker."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary."),
    quantize: Optional[str] = typer.Option(None, "--quantize", help="Quantize the large model's weights with bitsandbytes: 4bit (NF4, bf16 compute), 8bit or none (default: the preset's)."),
    backend: str = typer.Option("local", "--backend", help="local: models in this process; ray: a pool of Ray actors, on this machine or a cluster (needs the ray extra of sgl-cli)."),
    num_workers: Optional[int] = typer.Option(None, "--num-workers", help="--backend ray: actors, each loading the pair once (default: one per --gpus-per-worker GPUs of the cluster, else 1)."),
    gpus_per_worker: Optional[float] = typer.Option(None, "--gpus-per-worker", help="--backend ray: GPUs per actor, may be fractional (default: 1 when the cluster has GPUs, else 0)."),
) -> None:
    """Answer every item of a JSONL file with small-model guidance and early exit."""
    with domain_errors():
        code = _run(input, out, preset, dict(
            retain=retain, threshold=threshold, no_exit=no_exit, consistency_retain=consistency_retain,
            max_new_tokens=max_new_tokens, prune_layer=prune_layer, prompt_suffix=prompt_suffix,
            batch_size=batch_size, guide=guide, seed=seed,
        ), calibration, resume, overwrite, threads, quiet,
            _Backend(backend, num_workers, gpus_per_worker, quantize))
    raise typer.Exit(code)


with_help(run, EXAMPLE)


class _Backend:
    """Where the items run (`--backend`) and what `--quantize` asks of the large model."""

    def __init__(self, name: str = "local", num_workers: Optional[int] = None,
                 gpus_per_worker: Optional[float] = None, quantize: Optional[str] = None):
        self.name, self.num_workers, self.gpus_per_worker, self.quantize = name, num_workers, gpus_per_worker, quantize

    def check(self) -> None:
        from ..engine.errors import SglError

        if self.name not in ("local", "ray"):
            raise SglError(f"--backend must be local or ray, got {self.name!r}")
        if self.name == "local":
            given = [f for f, v in (("--num-workers", self.num_workers), ("--gpus-per-worker", self.gpus_per_worker))
                     if v is not None]
            if given:
                raise SglError(f"{' and '.join(given)} only appl{'y' if len(given) > 1 else 'ies'} with --backend ray")
            return
        from ..engine.ray_backend import RayOptions, import_ray

        RayOptions(self.num_workers, self.gpus_per_worker).validate()
        import_ray()  # not installed: say how, before anything else happens


def _run(input: Path, out: Optional[Path], preset_name: Optional[str], overrides: dict, calibration: Optional[Path],
         resume: bool, overwrite: bool, threads: Optional[int], quiet: bool, backend: Optional[_Backend] = None) -> int:
    from ..engine.errors import SglError
    from ..engine.output import completed_lines, default_output, settings_path
    from ..engine.preset import load_preset

    backend = backend or _Backend()
    if not input.is_file():
        raise SglError(f"input file {input} not found")
    if resume and overwrite:
        raise SglError("--resume and --overwrite contradict each other")
    backend.check()
    preset = load_preset(preset_name).with_settings(**overrides).with_quantize(backend.quantize)
    preset = _calibrated(preset, calibration, overrides, quiet)
    to_stdout = out is not None and str(out) == "-"
    out = None if to_stdout else (out or default_output(input))
    if to_stdout and resume:
        raise SglError("--resume needs an output file, not stdout")

    done: set[int] = set()
    saved = None
    if out is not None:
        saved = settings_path(out)
        if out.exists() and not (resume or overwrite):
            raise SglError(f"{out} exists; pass --resume to continue that run or --overwrite to replace it")
        if resume and out.exists():
            _check_same_settings(saved, preset.to_dict())
            done = completed_lines(out)

    from ..engine.output import RecordWriter

    def warn_random() -> None:
        err("sgl: warning: a model of this preset has random weights: its answers are noise; use a trained pair "
            "(the default preset, or real checkpoints) for real answers.")

    if backend.name == "ray":
        from ..engine.ray_backend import RayOptions, run_records

        # Models load in the workers; the records come back in input order, so everything below is shared.
        records = run_records(input, preset, done, RayOptions(backend.num_workers, backend.gpus_per_worker, threads),
                              on_random_weights=warn_random, notify=None if quiet else err)
    else:
        from ..engine.engine import Engine
        from ..engine.items import read_items

        set_threads(threads)
        engine = Engine.from_preset(preset)
        if engine.random_weights:
            warn_random()
        records = engine.run(read_items(input, skip_lines=done))

    writer: Optional[RecordWriter] = None

    def open_output() -> Optional[RecordWriter]:
        # At the first record (or at the end, for none): a backend that fails to start leaves no files behind.
        if out is None:
            return None
        if saved is not None:
            import yaml

            saved.write_text(yaml.safe_dump(preset.to_dict(), sort_keys=False))
        return RecordWriter(out, append=bool(done))

    stats = _Stats()
    progress = _progress(quiet, _count_lines(input) - len(done))
    try:
        for record in records:
            if out is not None:
                writer = writer or open_output()
                writer.write(record)
            else:
                sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
                sys.stdout.flush()
            stats.add(record)
            progress.advance(stats)
        if writer is None:
            writer = open_output()
    except KeyboardInterrupt:
        progress.stop()
        err(f"sgl: interrupted after {stats.items} items; `sgl run {input} --resume` continues where it stopped.")
        return 130
    finally:
        progress.stop()
        if hasattr(records, "close"):
            records.close()  # a Ray backend it started shuts down
        if writer is not None:
            writer.close()
    if not quiet:
        err(stats.summary(len(done), out))
    return 1 if stats.errors else 0


def _calibrated(preset, cli_file: Optional[Path], overrides: dict, quiet: bool):
    """The preset with the threshold of --calibration (else of the preset's `calibration:`), once its fingerprint
    matches this run's settings. An explicit --threshold or --no-exit wins."""
    from ..engine.calibration import fingerprint, fingerprint_differences
    from ..engine.errors import SglError

    if cli_file is None and preset.settings.calibration is None:
        return preset
    path = cli_file or preset_calibration(preset)
    cal = read_calibration(path)
    if overrides["threshold"] is not None or overrides["no_exit"]:
        flag = "--no-exit" if overrides["no_exit"] else f"--threshold {overrides['threshold']:g}"
        err(f"sgl: {flag} overrides the threshold {cal['threshold']:.6g} of the calibration {path}")
        return preset.with_settings(calibration=str(path))
    differences = fingerprint_differences(cal["fingerprint"], fingerprint(preset))
    if differences:
        raise SglError(f"calibration {path} was made for other settings: {'; '.join(differences)}; run "
                       "`sgl calibrate` with this run's settings, or run with the calibrated ones")
    if not quiet:
        target = ", ".join(f"{k} {v}" for k, v in cal["target"].items())
        err(f"sgl: threshold {cal['threshold']:.6g} from the calibration {path} ({target}, {cal['n_items']} items)")
    return preset.with_settings(threshold=cal["threshold"], calibration=str(path))


def _check_same_settings(saved: Path, current: dict) -> None:
    import yaml

    from ..engine.errors import SglError

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
    import dataclasses

    from ..engine.preset import ModelSpec, Settings

    def defaults(cls) -> dict:
        return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}

    out = {**defaults(Settings), **d}
    for role in ("small", "large"):
        if isinstance(out.get(role), dict):
            out[role] = {**defaults(ModelSpec), **out[role]}
    return out


def _count_lines(path: Path) -> int:
    with path.open("rb") as f:
        return sum(1 for line in f if line.strip())


class _Stats:
    def __init__(self) -> None:
        self.items = self.small_exits = self.large_calls = self.errors = 0
        self.retained: list[int] = []
        self.t0 = time.perf_counter()

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
        return self.items / max(time.perf_counter() - self.t0, 1e-9)

    def summary(self, skipped: int, out: Optional[Path]) -> str:
        mean = sum(self.retained) / len(self.retained) if self.retained else 0.0
        parts = [
            f"{self.items} items" + (f" (+{skipped} already done)" if skipped else ""),
            f"{self.small_exits} exited to small",
            f"{self.large_calls} large calls",
            f"{self.errors} errors",
            f"mean retained tokens {mean:.1f}",
            f"{self.rate:.2f} items/s",
        ]
        return "sgl: " + ", ".join(parts) + (f" -> {out}" if out else "")


class _progress:
    """A rich progress bar on stderr, only when stderr is a terminal and not --quiet."""

    def __init__(self, quiet: bool, total: int):
        self.bar = None
        if quiet or not stderr_is_tty():
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(
            TextColumn("[bold]sgl run"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), console=Console(stderr=True), transient=False,
        )
        self.task = self.bar.add_task("run", total=total, info="")
        self.bar.start()

    def advance(self, stats: _Stats) -> None:
        if self.bar is not None:
            info = f"{stats.rate:.2f} it/s  exits {stats.small_exits}  errors {stats.errors}"
            self.bar.update(self.task, advance=1, info=info)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
