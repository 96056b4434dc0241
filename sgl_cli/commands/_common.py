"""What every command shares: turning domain errors into one-line messages, stderr output, threads."""

from __future__ import annotations

import contextlib
import inspect
import sys
from typing import Callable, Iterator

import typer

USAGE_ERROR = 2


def with_help(command: Callable, text: str = "") -> None:
    """Set the command's --help to its docstring plus `text`. Prose paragraphs are unwrapped so the terminal
    wraps them to its width (Typer keeps every line break); a paragraph with indented lines (examples) is kept
    as written."""
    full = inspect.cleandoc(command.__doc__ or "") + ("\n\n" + text.strip("\n") if text.strip() else "")
    paragraphs = []
    for para in full.split("\n\n"):
        lines = para.splitlines()
        paragraphs.append(para if any(x.startswith(" ") for x in lines) else " ".join(x.strip() for x in lines))
    command.__doc__ = "\n\n".join(paragraphs)


def err(message: str) -> None:
    typer.echo(message, err=True)


@contextlib.contextmanager
def domain_errors() -> Iterator[None]:
    """A preset, settings or model problem ends the command with one line on stderr and exit code 2."""
    from ..engine.errors import SglError

    try:
        yield
    except SglError as exc:
        err(f"sgl: error: {exc}")
        raise typer.Exit(USAGE_ERROR) from None


def set_threads(threads: int | None) -> None:
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def stderr_is_tty() -> bool:
    return sys.stderr.isatty()


@contextlib.contextmanager
def progress_bar(label: str, quiet: bool, total: int) -> Iterator[Callable[[int], None]]:
    """A rich progress bar on stderr, only when stderr is a terminal and not --quiet; yields `advance(n=1)`."""
    if quiet or not stderr_is_tty():
        yield lambda n=1: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True)) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n=1: bar.advance(task, n)


def read_calibration(path) -> dict:
    """An `sgl calibrate` file, or a one-line error naming it."""
    from ..engine.calibration import load_calibration
    from ..engine.errors import SglError

    if not path.is_file():
        raise SglError(f"calibration file {path} not found")
    try:
        return load_calibration(path)
    except ValueError as exc:
        raise SglError(str(exc)) from None


def preset_calibration(preset):
    """The path of the preset's `calibration:` file, relative to the preset file so that a preset travels with
    its calibration; None without one."""
    from pathlib import Path

    if preset.settings.calibration is None:
        return None
    path = Path(preset.settings.calibration).expanduser()
    if not path.is_absolute() and preset.source:
        path = Path(preset.source).parent / path
    return path


def calibrated_threshold(preset, path, quiet: bool) -> float:
    """The threshold of a calibration file made for this pair and exit settings. Retain, prune layer and guide
    may differ: the exit decision depends only on the small model's pass (for `sgl eval` and `sgl inspect`,
    which vary them)."""
    from ..engine.calibration import fingerprint, fingerprint_differences
    from ..engine.errors import SglError

    cal = read_calibration(path)
    free = ("retain", "prune_layer", "guide")

    def fixed(fp: dict) -> dict:
        return {k: v for k, v in fp.items() if k not in free}

    differences = fingerprint_differences(fixed(cal["fingerprint"]), fixed(fingerprint(preset)))
    if differences:
        raise SglError(f"calibration {path} was made for other models or settings: {'; '.join(differences)}")
    if not quiet:
        err(f"sgl: threshold {cal['threshold']:.6g} from the calibration {path}")
    return float(cal["threshold"])
