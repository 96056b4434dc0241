"""The `sgl` command: one module per subcommand under `sgl_cli/commands`, composed here.

Heavy imports (torch, transformers) happen inside the commands, so `sgl --help` is instant.
"""

from __future__ import annotations

import typer

from . import __version__
from .commands import bench, calibrate, demo, inspect, presets, report, run
from .commands import eval as eval_cmd

app = typer.Typer(
    name="sgl",
    help=(
        "Batch inference with vision-language models at a fraction of the large model's cost.\n\n"
        "A small VLM of the same family answers first; the attention its visual tokens receive ranks them, "
        "and the large VLM sees only the top --retain fraction. Confident, consistent small answers exit "
        "early and the large model never runs."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.command("run")(run.run)
app.command("calibrate")(calibrate.calibrate)
app.command("eval")(eval_cmd.eval_command)
app.command("demo")(demo.demo)
app.command("inspect")(inspect.inspect)
app.command("bench")(bench.bench)
app.command("presets")(presets.presets)
app.command("report")(report.report)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"sgl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    pass


def main() -> None:
    import sys

    from .commands._common import TERMINATED, Terminated, sigterm_as_interrupt

    try:
        with sigterm_as_interrupt():
            app()
    except Terminated:  # before a command's own handling (while the command line is parsed)
        sys.exit(TERMINATED)
