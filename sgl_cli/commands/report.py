"""`sgl report OUT.jsonl`: one self-contained HTML page of a run's records, exits and kept tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..engine.metrics import DEFAULT_METRIC, METRICS  # light: no torch
from ._common import domain_errors, err, with_help


def report(
    output: Path = typer.Argument(..., help="A `sgl run` output (sgl records or an OpenAI batch output file).",
                                  show_default=False),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="The HTML file (default: <output stem>.report.html "
                                       "beside it)."),
    input: Optional[Path] = typer.Option(None, "--input", help="The run's input, for questions and images (default: "
                                         "the one named in <output stem>.run.json)."),
    metric: str = typer.Option(DEFAULT_METRIC, "--metric", help="Answer correctness against the records' references: "
                               f"{', '.join(METRICS)}."),
    fetch: bool = typer.Option(False, "--fetch", help="Fetch image URLs for the thumbnails (off by default: the report "
                               "makes no network request unless asked)."),
    title: Optional[str] = typer.Option(None, "--title", help="The page's title (default: the output's name)."),
) -> None:
    """Write one HTML page of a whole run: a summary, charts and a gallery of every record.

    The page is self-contained (scripts, styles, charts and thumbnails inline; no network) and opens in any browser.
    It shows the items, errors, exit rate, visual and retained tokens, time per item per stage and, when the records
    carry references, accuracy overall, per question type and per exit decision; histograms of the exit score (with
    the threshold), of the retained tokens and of the time per item; and one card per record: the image with the
    tokens the large model dropped shaded (from `sgl run --save-scores`; without it, the image alone), the
    question, the answers, the exit decision, the reference and whether it matched, the error. Filters (exited,
    large, wrong, errors), a search and pages keep tens of thousands of records responsive.

    Examples:
      sgl run batch.jsonl --save-scores && sgl report batch.sgl.jsonl
      sgl report answers.jsonl -o run.html --metric exact
    """
    with domain_errors():
        import time

        from ..engine.errors import SglError
        from ..engine.metrics import get_metric
        from ..engine.views.report import write_report
        from ..engine.views.report_data import gather

        if not output.is_file():
            raise SglError(f"{output} not found (give the output file of `sgl run`)")
        try:
            get_metric(metric)
        except ValueError as exc:
            raise SglError(str(exc)) from None
        target = out or output.with_name(f"{output.name.removesuffix('.jsonl')}.report.html")
        if not target.parent.is_dir():
            raise SglError(f"folder {target.parent} (for {target.name}) does not exist")
        t0 = time.perf_counter()
        data = gather(output, input, metric, fetch)
        for note in data.notes:
            err(f"sgl: {note}")
        size = write_report(data, target, title or f"sgl report: {output.name}")
        err(f"sgl: wrote {target} ({len(data.cards):,} records, {size / 1e6:.1f} MB, "
            f"{time.perf_counter() - t0:.1f} s)")
        typer.echo(str(target))


with_help(report)
