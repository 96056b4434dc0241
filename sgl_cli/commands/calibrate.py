"""`sgl calibrate`: choose the early-exit threshold from labelled items, for `sgl run --calibration`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..engine.evaluation.metrics import DEFAULT_METRIC, METRICS  # light: no torch
from ._common import domain_errors, err, progress_bar, set_threads, warn_random_weights, with_help
from .options import (
    BatchSizeOption,
    ConsistencyRetainOption,
    MaxNewTokensOption,
    PresetOption,
    PromptSuffixOption,
    PruneLayerOption,
    ThreadsOption,
)

EXAMPLE = """
Input: the `sgl run` JSONL format with `answer` on every line (a string, a number, or a list of the
annotators' answers); lines without one are reported and skipped. Each item is answered once by the small
model (answer, exit_score) and once by the large model with the run's pruning settings. The answers are
cached beside --out (<input>.calibration-cache-<fingerprint>.jsonl): another target or metric costs no model
calls, and an interrupted calibration continues where it stopped (--rerun recomputes).

Output (--out, default <input>.calibration.yaml beside the input; its path on stdout): the threshold, the
target, the metric, the table of operating points and a fingerprint of the models and settings it is valid
for. On stderr, a table of operating points with the chosen one marked; a plot goes to --plot.

Exit codes: 0 written; 1 written, but some items failed and were left out (see stderr); 2 usage, preset or
model error.

Examples:
  sgl calibrate labelled.jsonl --preset qwen2.5-vl-3b-72b --target-accuracy 0.99
  sgl calibrate labelled.jsonl --preset qwen2.5-vl-3b-72b --exit-rate 0.4 --out exit40.yaml
  sgl run batch.jsonl --preset qwen2.5-vl-3b-72b --calibration labelled.calibration.yaml
"""

# Operating points shown on stderr besides the chosen one: the closest at or below each exit rate.
TABLE_EXIT_RATES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
_MAX_LISTED = 10  # lines listed per kind of problem, so that a bad file does not flood the terminal


def calibrate(
    input: Path = typer.Argument(..., help="JSONL file of image-question items with reference answers.", show_default=False),
    target_accuracy: Optional[float] = typer.Option(None, "--target-accuracy", help="Most exits whose mixed accuracy is at least this fraction of the large model's (e.g. 0.99).", show_default=False),
    exit_rate: Optional[float] = typer.Option(None, "--exit-rate", help="Exit this fraction of items (or the closest below that tied scores allow).", show_default=False),
    metric: str = typer.Option(DEFAULT_METRIC, "--metric", help=f"Answer correctness: {', '.join(METRICS)}. vqa is the VQAv2 soft accuracy over a list of references and exact match (normalised) for one."),
    preset: PresetOption = None,
    retain: Optional[float] = typer.Option(None, help="Fraction of visual tokens the large model keeps."),
    prune_layer: PruneLayerOption = None,
    consistency_retain: ConsistencyRetainOption = None,
    max_new_tokens: MaxNewTokensOption = None,
    prompt_suffix: PromptSuffixOption = None,
    batch_size: BatchSizeOption = None,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Calibration file (default: <input>.calibration.yaml beside the input)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="PNG plot of accuracy and compute against exit rate (default: <out>.png)."),
    resume: bool = typer.Option(True, "--resume/--rerun", help="Reuse the cached answers, or recompute every item."),
    threads: ThreadsOption = None,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or table (warnings still go to stderr)."),
) -> None:
    """Choose the early-exit threshold from labelled items, for a target accuracy or exit rate."""
    with domain_errors():
        code = _calibrate(input, target_accuracy, exit_rate, metric, preset, dict(
            retain=retain, prune_layer=prune_layer, consistency_retain=consistency_retain,
            max_new_tokens=max_new_tokens, prompt_suffix=prompt_suffix, batch_size=batch_size,
        ), out, plot, resume, threads, quiet)
    raise typer.Exit(code)


with_help(calibrate, EXAMPLE)


def _calibrate(input: Path, target_accuracy: Optional[float], exit_rate: Optional[float], metric: str,
               preset_name: Optional[str], overrides: dict, out: Optional[Path], plot: Optional[Path],
               resume: bool, threads: Optional[int], quiet: bool) -> int:
    from ..engine.errors import SglError
    from ..engine.evaluation import calibration as cal
    from ..engine.evaluation.calibrate import cache_path, compute, read_cache, read_labelled, score
    from ..engine.evaluation.fingerprint import fingerprint as run_fingerprint
    from ..engine.evaluation.metrics import get_metric
    from ..engine.preset import load_preset
    from ..engine.views.plots import plot_calibration

    # Every usage error before the first model call.
    try:
        cal.validate_target(target_accuracy, exit_rate)
        get_metric(metric)
    except ValueError as exc:
        raise SglError(str(exc).replace("target_accuracy", "--target-accuracy").replace("exit_rate", "--exit-rate")) from None
    if not input.is_file():
        raise SglError(f"input file {input} not found")
    # Both models on every item: the calibration needs the large answer where the small one would exit.
    preset = load_preset(preset_name).with_settings(**overrides, no_exit=True)
    if preset.settings.guide != "sgl" or preset.small is None:
        raise SglError(f"preset {preset.name!r}: only the sgl guide, with a small model, exits early; there is no "
                       "threshold to calibrate for the cls, fastv or random guides")
    fingerprint = run_fingerprint(preset)
    out = out or input.with_name(f"{input.stem}.calibration.yaml")
    plot = plot or out.with_suffix(".png")
    for path in (out, plot):
        if not path.parent.is_dir():
            raise SglError(f"folder {path.parent} (for {path.name}) does not exist")
    cache = cache_path(out.parent, input, fingerprint)

    data = read_labelled(input)
    _report("skipped", data.invalid)
    if data.unlabelled:
        err(f"sgl: skipped {len(data.unlabelled)} line(s) without 'answer': {_lines(data.unlabelled)}")
    if not data.items:
        raise SglError(f"{input}: no line has an 'answer'; calibration needs reference answers")

    records = read_cache(cache, data.items) if resume else {}
    todo = [item for item in data.items if item.line not in records]
    if todo:
        if records and not quiet:
            err(f"sgl: {len(records)} item(s) cached in {cache}; answering the other {len(todo)}")
        from ..engine.core.engine import Engine

        set_threads(threads)
        engine = Engine.from_preset(preset)
        if engine.random_weights:
            warn_random_weights("answers, and so this calibration,")
        done = 0
        try:
            with progress_bar("sgl calibrate", quiet, len(todo)) as advance:
                for rec in compute(engine, todo, cache, append=resume and cache.exists()):
                    records[rec["line"]] = rec
                    done += 1
                    advance()
        except KeyboardInterrupt:
            err(f"sgl: interrupted after {done} item(s); the same command continues from the cache {cache}")
            return 130
    elif not quiet:
        err(f"sgl: all {len(records)} item(s) cached in {cache}; no model calls")

    scored = score(data.items, records, metric)
    _report("left out", scored.errors)
    if not scored.outcomes:
        raise SglError("every labelled item failed (see above); nothing to calibrate on")
    cost = scored.relative_cost_small
    points = cal.operating_points(scored.outcomes, cost)
    choice = cal.choose_threshold(scored.outcomes, target_accuracy=target_accuracy, exit_rate=exit_rate,
                                  relative_cost_small=cost)
    n = len(scored.outcomes)
    cal.save_calibration(cal.to_yaml_dict(choice, points, metric=metric, fingerprint=fingerprint, n_items=n,
                                          relative_cost_small=cost), out)
    plot_calibration(points, choice.point, plot, title=f"{input.name}: {n} items, metric {metric}")

    if not quiet:
        large = max(points, key=lambda p: p.threshold).accuracy
        small = min(points, key=lambda p: p.threshold).accuracy
        err(f"sgl: {n} items, metric {metric}: large model accuracy {large:.3f}, small model {small:.3f}; "
            f"small model cost {cost:.2f} x large (measured)")
        _table(points, choice.point)
    err(("sgl: " if choice.met else "sgl: warning: ") + choice.message)
    lo, hi = choice.interval
    err(f"sgl: mixed accuracy {choice.point.accuracy:.3f} at the chosen threshold, 95% bootstrap interval "
        f"{lo:.3f}-{hi:.3f} over {n} items; more labelled items narrow it")
    if not quiet:
        err(f"sgl: wrote {out} and {plot}; use it with: sgl run ... --calibration {out}")
    typer.echo(str(out))
    return 1 if scored.errors else 0


def _lines(numbers: list[int]) -> str:
    shown = ", ".join(str(n) for n in numbers[:_MAX_LISTED])
    return shown + (f" and {len(numbers) - _MAX_LISTED} more" if len(numbers) > _MAX_LISTED else "")


def _report(what: str, messages: list[str]) -> None:
    for message in messages[:_MAX_LISTED]:
        err(f"sgl: {what} {message}")
    if len(messages) > _MAX_LISTED:
        err(f"sgl: {what} {len(messages) - _MAX_LISTED} more line(s) like these")


def _table(points, chosen) -> None:
    from rich.console import Console
    from rich.table import Table

    shown = {chosen.threshold: chosen}
    for rate in TABLE_EXIT_RATES:
        # Points ascend by threshold, so exit rates descend: the first at or below `rate` is the closest.
        p = next(p for p in points if p.exit_rate <= rate + 1e-12)
        shown[p.threshold] = p
    table = Table(title="operating points", title_justify="left",
                  caption="compute: 1 = the large model on every item", caption_justify="left")
    for name in ("", "threshold", "exit rate", "accuracy", "x large", "compute"):
        table.add_column(name, justify="right")
    for p in sorted(shown.values(), key=lambda p: p.exit_rate):
        mark = p.threshold == chosen.threshold
        # The exit-nothing threshold is a hair above the top score: printed, the two would look equal.
        threshold = f"{p.threshold:.6g}" if p.n_exit else "above all"
        table.add_row("chosen" if mark else "", threshold, f"{p.exit_rate:.1%}", f"{p.accuracy:.3f}",
                      f"{p.relative_accuracy:.3f}", f"{p.relative_compute:.2f}", style="bold" if mark else None)
    Console(stderr=True).print(table)
