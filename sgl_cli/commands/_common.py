"""What every command shares: turning domain errors into one-line messages, SIGTERM into Ctrl-C's path, stdout for
data alone, stderr output, threads, one progress bar, one random-weights warning."""

from __future__ import annotations

import contextlib
import inspect
import os
import signal
import sys
import threading
from typing import Callable, Iterator, TextIO

import typer

USAGE_ERROR = 2
INTERRUPTED, TERMINATED = 130, 143  # Ctrl-C, SIGTERM: 128 + the signal's number, as a shell reports them


class Terminated(BaseException):
    """SIGTERM (what `timeout`, Slurm, systemd and `docker stop` send), raised in the main thread as Ctrl-C raises
    KeyboardInterrupt: the same clean-up runs (vLLM's engine shut down, the output closed) and the same line is
    printed, with exit code 143. Not a KeyboardInterrupt: vLLM swallows those while its engine starts (its
    `zmq_socket_ctx` around the start-up handshake)."""


STOPPED = (KeyboardInterrupt, Terminated)  # what a command catches to stop cleanly with one line


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Inside, SIGTERM raises `Terminated` in the main thread; a second one ends the process at once. Only the
    command line installs this (sgl_cli.cli.main): the library leaves the process's signals to its caller."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminated(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def interruption(exc: BaseException) -> tuple[str, int]:
    """What stopped the command, in words, and its exit code: Ctrl-C or SIGTERM."""
    return ("terminated (SIGTERM)", TERMINATED) if isinstance(exc, Terminated) else ("interrupted", INTERRUPTED)


@contextlib.contextmanager
def data_stdout() -> Iterator[TextIO]:
    """Inside, only what is written to the yielded stream reaches stdout: sys.stdout and file descriptor 1 (which the
    processes started inside inherit: vLLM's engine, whose logs go to stdout) point at stderr, so that what the
    libraries log or print cannot mix with the command's data (`-o -`'s records, `--json`'s object)."""
    stream = sys.stdout
    stream.flush()
    saved = None
    try:
        fd = stream.fileno()
        saved = os.dup(fd)
        os.dup2(sys.stderr.fileno(), fd)
    except (AttributeError, OSError, ValueError):  # not a file (a captured stream): Python's stream alone
        if saved is not None:
            os.close(saved)
        saved = None
    data = stream if saved is None else open(saved, "w", encoding=getattr(stream, "encoding", None) or "utf-8",
                                             closefd=False)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield data
    finally:
        data.flush()
        if saved is not None:
            stream.flush()  # what was written to the old stream inside (by a logger holding it) goes to stderr too
            data.close()
            os.dup2(saved, fd)
            os.close(saved)


def quiet_libraries(quiet: bool) -> None:
    """--quiet: vLLM logs warnings and errors only, in this process and in the engine processes it starts (vLLM's
    own setting, which it reads when an engine is made; one the user set is kept). torch and transformers log
    warnings and above already."""
    if quiet:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


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


# The library names settings (`SettingError`); the command line calls them by these flags. The one table.
FLAGS = {
    "backend": "--backend", "large_backend": "--large-backend", "large_options": "--large-option",
    "large_quantize": "--quantize", "small_backend": "small.backend", "calibration": "--calibration",
    "confidence": "--confidence", "details": "--details",
    "exit_rate": "--exit-rate", "guide": "--guide", "overwrite": "--overwrite", "question": "--question",
    "resume": "--resume",
    "max_new_tokens": "--max-new-tokens",
    "retain": "--retain", "save_scores": "--save-scores", "target_accuracy": "--target-accuracy",
    "threshold": "--threshold", "video": "--video", "fps": "--fps", "max_frames": "--max-frames",
}


@contextlib.contextmanager
def domain_errors() -> Iterator[None]:
    """A preset, settings or model problem ends the command with one line on stderr and exit code 2; Ctrl-C or
    SIGTERM with one line and 130 or 143. A plugin the library leaves out (a PluginWarning) is one line on stderr,
    once per command."""
    from ..engine.errors import SettingError, SglError

    try:
        with plugin_warnings():
            yield
    except SglError as exc:
        err(f"sgl: error: {exc.worded(FLAGS) if isinstance(exc, SettingError) else exc}")
        raise typer.Exit(USAGE_ERROR) from None
    except STOPPED as exc:  # a command that says more (run, calibrate) catches it itself
        what, code = interruption(exc)
        err(f"sgl: {what}.")
        raise typer.Exit(code) from None


@contextlib.contextmanager
def plugin_warnings() -> Iterator[None]:
    """While the command runs, each PluginWarning is printed once as `sgl: warning: ...` (the warnings module's
    own scope: restored on exit); other warnings are shown as Python shows them."""
    import warnings

    from ..engine.plugins import PluginWarning

    shown: set[str] = set()
    with warnings.catch_warnings():
        warnings.simplefilter("always", PluginWarning)  # once per command, counted here, not per code location
        python_shows = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if not issubclass(category, PluginWarning):
                python_shows(message, category, filename, lineno, file, line)
            elif str(message) not in shown:
                shown.add(str(message))
                err(f"sgl: warning: {message}")

        warnings.showwarning = show
        yield


def set_threads(threads: int | None) -> None:
    from ..engine import use_threads

    use_threads(threads)


def stderr_is_tty() -> bool:
    return sys.stderr.isatty()


@contextlib.contextmanager
def progress_bar(label: str, quiet: bool, total: int) -> Iterator[Callable[..., None]]:
    """A rich progress bar on stderr, only when stderr is a terminal and not --quiet; yields
    `advance(n=1, info="")` (`info`: a short status shown beside the bar)."""
    if quiet or not stderr_is_tty():
        yield lambda n=1, info="": None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                  TimeElapsedColumn(), console=Console(stderr=True)) as bar:
        task = bar.add_task(label, total=total, info="")
        yield lambda n=1, info="": bar.update(task, advance=n, info=info)


def warn_random_weights(what: str = "answers") -> None:
    """The one warning for a preset whose models have random weights (the built-in random pairs)."""
    from ..engine import random_weights_warning

    err(f"sgl: {random_weights_warning(what)}")


def refuse_stdin(input, command: str) -> None:
    """`-` as the input is stdin by convention, which a command that reads its input more than once (to count it,
    to check a resumed run against it) and resolves relative image paths against its folder cannot take: say so,
    rather than "input - not found"."""
    from ..engine.errors import SglError

    if str(input) == "-":
        raise SglError(f"{command} reads its items from a file, not from stdin ('-'): it reads the input more than "
                       "once (to count it, to check a resumed run against it) and resolves relative image paths "
                       "against its folder; save the items to a file and name it (a file named '-': by its full path)")


def note(message: str) -> None:
    """A library note or warning on stderr, as sgl prints them."""
    err(f"sgl: {message}")
