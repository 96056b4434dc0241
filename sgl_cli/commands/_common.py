"""What every command shares: turning domain errors into one-line messages, stderr output, threads."""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator

import typer

USAGE_ERROR = 2


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
