"""`sgl eval`: accuracy against retain, per guide, beside the small and large models alone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from ..engine.evaluation.metrics import DEFAULT_METRIC, METRICS  # light: no torch
from ._common import domain_errors, err, note, progress_bar, set_threads, warn_random_weights, with_help
from .options import (
    BatchSizeOption,
    CalibrationOption,
    GuidesOption,
    MaxNewTokensOption,
    PresetOption,
    PromptSuffixOption,
    PruneLayerOption,
    QuietOption,
    SeedOption,
    ThreadsOption,
    check_guides,
    split_list,
)

DEFAULT_RETAINS = "1.0,0.5,0.25,0.09"

EXAMPLE = """
Input: the `sgl run` JSONL format with `answer` on every line; an optional `type` field (a question type)
gives per-type accuracy. Lines without `answer` are reported and skipped.

For each guide and retain ratio the large model answers from the kept visual tokens; the small and the
large model alone are the references. Without --threshold or --calibration nothing exits early, so the
table measures pruning alone; with one, the sgl rows are the mixed system (confident small answers exit,
the others go to the pruned large model). cls, fastv and random never exit. The small model's pass, the
large model's image features and its unpruned answer are computed once per item and shared by every
setting; a setting's items/s counts every stage it needs, and its compute, relative to the large model alone,
is the small model + (1 - exit rate) x the large model at that setting, each the median over the items of its
time over the large model alone's on the same item (as `sgl calibrate` measures it).

With --calibration, the operating point the file chose (the sgl guide at its retain, prune layer and
threshold) is among the settings and is reported beside what the file predicted: run it on items the
calibration did not see to check the choice.

Output: a table on stdout (or with --json, one JSON object: `results` with guide, retain, accuracy,
relative_accuracy, per_type, exit_rate, relative_compute, large_calls, retained_tokens, items_per_s per
setting, `small_alone`, `large_alone`, and with --calibration `calibration`: its predicted and measured
exit_rate, accuracy, relative_accuracy and relative_compute). --plot draws accuracy against retain; --details
writes every item's answers and correctness per setting as JSONL, and with --save-scores each setting's ranking
and kept tokens in <details stem>.scores.arrow (as sgl run --save-scores, with a `setting` column).

Examples:
  sgl demo shapes --n 500 --seed 1 && sgl eval shapes/batch.jsonl
  sgl eval labelled.jsonl --guide sgl,fastv --retain 0.5,0.09 --json > eval.json
  sgl eval held-out.jsonl --calibration labelled.calibration.yaml --plot eval.png
"""


def eval_command(
    input: Path = typer.Argument(..., help="JSONL file of image-question items with reference answers.", show_default=False),
    guide: GuidesOption = None,
    retain: Optional[List[str]] = typer.Option(None, "--retain", "-r", help="Retain ratios, comma-separated or "
                                               f"repeated, or auto (sgl calibrate's grid; default: {DEFAULT_RETAINS})."),
    metric: str = typer.Option(DEFAULT_METRIC, "--metric", help=f"Answer correctness: {', '.join(METRICS)}."),
    preset: PresetOption = None,
    threshold: Optional[float] = typer.Option(None, help="Early-exit threshold for the guides that run the small model (the mixed system)."),
    calibration: CalibrationOption = None,
    prune_layer: PruneLayerOption = None,
    max_new_tokens: MaxNewTokensOption = None,
    prompt_suffix: PromptSuffixOption = None,
    batch_size: BatchSizeOption = None,
    seed: SeedOption = None,
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Evaluate only the first N labelled items."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object on stdout instead of the table."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="PNG of accuracy against retain, a line per guide."),
    details: Optional[Path] = typer.Option(None, "--details", help="JSONL of every item's answers and correctness per setting."),
    save_scores: bool = typer.Option(False, "--save-scores", help="With --details: also each item's visual-token "
                                     "ranking and kept tokens per setting, in <details stem>.scores.arrow (float16; "
                                     "`setting` names guide@retain, as in the details)."),
    threads: ThreadsOption = None,
    quiet: QuietOption = False,
) -> None:
    """Measure accuracy against retain for each guide, beside the small and large models alone."""
    with domain_errors():
        code = _eval(input, guide, retain, metric, preset, threshold, calibration, dict(
            prune_layer=prune_layer, max_new_tokens=max_new_tokens, prompt_suffix=prompt_suffix,
            batch_size=batch_size, seed=seed,
        ), limit, json_out, plot, details, save_scores, threads, quiet)
    raise typer.Exit(code)


with_help(eval_command, EXAMPLE)


def _eval(input: Path, guides_opt, retains_opt, metric: str, preset_name, threshold, calibration, overrides: dict,
          limit, json_out: bool, plot: Optional[Path], details: Optional[Path], save_scores: bool, threads,
          quiet: bool) -> int:
    from ..engine.errors import SglError
    from ..engine.evaluation.calibrate import read_labelled
    from ..engine.evaluation.fingerprint import calibration_point
    from ..engine.evaluation.metrics import get_metric
    from ..engine.evaluation.retains import parse_retains
    from ..engine.guides import guide_class
    from ..engine.preset import load_preset

    # Every usage error before the first model call.
    try:
        get_metric(metric)
    except ValueError as exc:
        raise SglError(str(exc)) from None
    try:
        retains = parse_retains(split_list(retains_opt or [DEFAULT_RETAINS]))
    except ValueError as exc:
        raise SglError(f"--retain: {exc}") from None
    if threshold is not None and calibration is not None:
        raise SglError("give --threshold or --calibration, not both")
    if save_scores and details is None:
        raise SglError("--save-scores writes beside --details FILE: give both")
    if not input.is_file():
        raise SglError(f"input file {input} not found")
    for path in (plot, details):
        if path is not None and not path.parent.is_dir():
            raise SglError(f"folder {path.parent} (for {path.name}) does not exist")
    preset = load_preset(preset_name).with_settings(**overrides, no_exit=True)
    from ..engine.guides import guide_names

    guides = check_guides(split_list(guides_opt)) if guides_opt else [
        g for g in guide_names() if preset.small is not None or not guide_class(g).needs_small]
    needs_small = [g for g in guides if guide_class(g).needs_small]
    if needs_small and preset.small is None:
        raise SglError(f"preset {preset.name!r} names no small model: the {needs_small[0]} guide needs one")
    point = None
    if calibration is not None:
        point = calibration_point(preset, calibration, None if quiet else note)
        threshold = point.threshold
        if point.retain is None:
            err(f"sgl: {calibration} names no retain: only its threshold is used")
            point = None
    if point is not None:  # its operating point is among the settings
        retains = sorted({*retains, point.retain}, reverse=True)
        guides = guides if "sgl" in guides else ["sgl", *guides]
        k = point.prune_layer
        if k is not None and k != preset.settings.prune_layer:
            if overrides.get("prune_layer") is None:
                preset = preset.with_settings(prune_layer=k)
            else:
                err(f"sgl: warning: the calibration chose prune layer {k}; --prune-layer "
                    f"{preset.settings.prune_layer} checks another operating point")
    if threshold is not None and preset.small is None:
        raise SglError("early exit (--threshold/--calibration) needs a small model")

    data = read_labelled(input)
    for message in data.invalid[:10]:
        err(f"sgl: skipped {message}")
    if data.unlabelled:
        err(f"sgl: skipped {len(data.unlabelled)} line(s) without 'answer'")
    items = data.items[:limit] if limit else data.items
    if not items:
        raise SglError(f"{input}: no line has an 'answer'; eval needs reference answers")

    from ..engine.core.engine import Engine
    from ..engine.core.models import load_model
    from ..engine.evaluation.evaluate import evaluate
    from ..engine.views.plots import plot_eval

    set_threads(threads)
    small = load_model(preset.small, "small") if preset.small is not None else None
    large = load_model(preset.large, "large")
    preset = preset.with_settings(guide=guides[0])
    engine = Engine(preset.settings, small, large, preset)
    if engine.random_weights:
        warn_random_weights("answers and accuracy")
    from ..engine.core.record import SCORES_KEY
    from ..engine.io.scores import ScoreWriter, scores_path

    sink = details.open("w", encoding="utf-8") if details else None
    scores = ScoreWriter(scores_path(details), append=False, settings=True) if save_scores else None
    try:
        with progress_bar("sgl eval", quiet, len(items)) as advance:
            def on_batch(rows: list[dict], n: int) -> None:
                for r in rows:
                    payloads = r.pop(SCORES_KEY, {})
                    if sink:
                        sink.write(json.dumps(r) + "\n")
                    for setting, payload in payloads.items():
                        scores.write(r["line"], payload, setting)
                if sink:
                    sink.flush()
                advance(n)

            result = evaluate(engine, items, guides, retains, metric, threshold, on_batch, calibration=point,
                              save_scores=save_scores)
    except ValueError as exc:
        raise SglError(str(exc)) from None
    finally:
        if sink:
            sink.close()
        if scores:
            scores.close()
    result["preset"] = preset.name
    for message in result["errors"][:10]:
        err(f"sgl: left out {message}")
    if plot:
        plot_eval(result, plot, title=f"{input.name}: {result['items']} items, preset {preset.name}")
    if json_out:
        typer.echo(json.dumps(result, indent=1))
    else:
        _table(result)
        if result.get("calibration"):
            _check(result["calibration"])
    if not quiet:
        written = [str(p) for p in (plot, details, scores_path(details) if save_scores else None) if p]
        if written:
            err(f"sgl: wrote {', '.join(written)}")
    return 1 if result["errors"] else 0


def _table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    types = sorted({t for r in [result["large_alone"], *result["results"]] for t in r["per_type"]})
    large_acc = result["large_alone"]["accuracy"]
    exit_note = f", threshold {result['threshold']:.4g}" if result["threshold"] is not None else ", no early exit"
    table = Table(title=f"{result['items']} items, metric {result['metric']}{exit_note}", title_justify="left",
                  caption="rel: accuracy / large alone's; kept: mean visual tokens the large model kept",
                  caption_justify="left")
    for name in ("setting", "retain", "K", "accuracy", "rel", *types, "exit", "compute", "large calls", "kept",
                 "items/s"):
        table.add_column(name, justify="left" if name == "setting" else "right")

    def fmt(x, spec=".3f"):
        return "-" if x is None else format(x, spec)

    def row(name, r, retain="1", k="", rel=None, exit_rate=None, kept=None, compute=None, style=None):
        table.add_row(name, retain, k, fmt(r["accuracy"]), fmt(rel), *(fmt(r["per_type"].get(t)) for t in types),
                      fmt(exit_rate, ".1%"), fmt(compute, ".2f"), str(r["large_calls"]), fmt(kept, ".1f"),
                      fmt(r["items_per_s"], ".2f"), style=style)

    if result["small_alone"]:
        s = result["small_alone"]
        row("small alone", s, rel=s["accuracy"] / large_acc if large_acc else None, style="dim")
    la = result["large_alone"]
    row("large alone", la, rel=1.0 if large_acc else None, kept=la["visual_tokens"], compute=1.0, style="bold")
    for r in result["results"]:
        row(r["guide"], r, retain=f"{r['retain']:g}", k=str(r["prune_layer"]), rel=r["relative_accuracy"],
            exit_rate=r["exit_rate"], kept=r["retained_tokens"], compute=r["relative_compute"])
    import sys

    # Piped or redirected, rich would wrap at 80 columns; a table in a file should stay one row per line.
    Console(width=None if sys.stdout.isatty() else 110 + 8 * len(types)).print(table)


def _check(check: dict) -> None:
    """The calibrated operating point: predicted by its file, measured on these items."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"calibrated operating point ({check['file']}): sgl, retain {check['retain']:g}, prune layer "
                        f"{check['prune_layer']}, threshold {check['threshold']:.6g}", title_justify="left",
                  caption="x large: accuracy / the large model alone's; compute: 1 = the large model alone",
                  caption_justify="left")
    for name in ("", "items", "exit rate", "accuracy", "x large", "compute"):
        table.add_column(name, justify="left" if not name else "right")

    def fmt(x, spec):
        return "-" if x is None else format(x, spec)

    for name, values, n in (("predicted (its items)", check["predicted"], check["predicted_items"]),
                            ("measured (these items)", check["measured"], check["measured_items"])):
        values = values or {}
        table.add_row(name, str(n), fmt(values.get("exit_rate"), ".1%"), fmt(values.get("accuracy"), ".3f"),
                      fmt(values.get("relative_accuracy"), ".3f"), fmt(values.get("relative_compute"), ".2f"))
    Console(width=120).print(table)
