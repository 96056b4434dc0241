"""`sgl eval`: accuracy against retain, per guide, beside the small and large models alone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from ..engine.metrics import DEFAULT_METRIC, METRICS  # light: no torch
from ._common import (data_stdout, domain_errors, err, note, progress_bar, quiet_libraries, refuse_stdin, set_threads,
                      warn_random_weights, with_help)
from .options import (
    LargeBackendOption,
    LargeOptionOption,
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
the others go to the pruned large model); the other guides never exit. The small model's pass, the
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
    input: Path = typer.Argument(..., help="JSONL file of image-question items with reference answers.",
                                 show_default=False),
    guide: GuidesOption = None,
    retain: Optional[List[str]] = typer.Option(None, "--retain", "-r", help="Retain ratios, comma-separated or "
                                               "repeated, or auto (sgl calibrate's grid; default: "
                                               f"{DEFAULT_RETAINS})."),
    metric: str = typer.Option(DEFAULT_METRIC, "--metric", help=f"Answer correctness: {', '.join(METRICS)}."),
    preset: PresetOption = None,
    threshold: Optional[float] = typer.Option(None, help="Early-exit threshold for the guides that run the small "
                                              "model (the mixed system)."),
    calibration: CalibrationOption = None,
    prune_layer: PruneLayerOption = None,
    max_new_tokens: MaxNewTokensOption = None,
    prompt_suffix: PromptSuffixOption = None,
    batch_size: BatchSizeOption = None,
    seed: SeedOption = None,
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Evaluate only the first N labelled items."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object on stdout instead of the table."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="PNG of accuracy against retain, a line per guide."),
    details: Optional[Path] = typer.Option(None, "--details", help="JSONL of every item's answers and correctness "
                                           "per setting."),
    save_scores: bool = typer.Option(False, "--save-scores", help="With --details: also each item's visual-token "
                                     "ranking and kept tokens per setting, in <details stem>.scores.arrow (float16; "
                                     "`setting` names guide@retain, as in the details)."),
    large_backend: LargeBackendOption = None,
    large_option: LargeOptionOption = None,
    threads: ThreadsOption = None,
    quiet: QuietOption = False,
) -> None:
    """Measure accuracy against retain for each guide, beside the small and large models alone."""
    with domain_errors():
        refuse_stdin(input, "sgl eval")
        code = _eval(input, guide, retain, metric, preset, threshold, calibration, dict(
            prune_layer=prune_layer, max_new_tokens=max_new_tokens, prompt_suffix=prompt_suffix,
            batch_size=batch_size, seed=seed,
        ), limit, json_out, plot, details, save_scores, threads, quiet, large_backend,
        large_option)
    raise typer.Exit(code)


with_help(eval_command, EXAMPLE)


def _eval(input: Path, guides_opt, retains_opt, metric: str, preset_name, threshold, calibration, overrides: dict,
          limit, json_out: bool, plot: Optional[Path], details: Optional[Path], save_scores: bool, threads,
          quiet: bool, large_backend: Optional[str] = None, large_option: Optional[list[str]] = None) -> int:
    from ..engine.errors import SettingError, SglError
    from ..engine.evaluation.calibrate import read_labelled
    from ..engine.evaluation.evaluate import EvaluationPlan
    from ..engine.metrics import get_metric
    from ..engine.evaluation.retains import parse_retains
    from ..engine.io.scores import scores_path
    from ..engine.preset import load_preset, parse_options

    # Every usage error before the first model call.
    try:
        get_metric(metric)
    except ValueError as exc:
        raise SglError(str(exc)) from None
    try:
        retains = parse_retains(split_list(retains_opt or [DEFAULT_RETAINS]))
    except ValueError as exc:
        raise SettingError.about("retain", exc) from None
    if threshold is not None and calibration is not None:
        raise SettingError("give {} or {}, not both", "threshold", "calibration")
    if save_scores and details is None:
        raise SettingError("{} writes beside {} FILE: give both", "save_scores", "details")
    if not input.is_file():
        raise SglError(f"input file {input} not found")
    for path in (plot, details):
        if path is not None and not path.parent.is_dir():
            raise SglError(f"folder {path.parent} (for {path.name}) does not exist")
    preset = load_preset(preset_name).with_settings(**overrides).with_large_backend(
        large_backend, parse_options(large_option, "--large-option"))
    guides = check_guides(split_list(guides_opt)) if guides_opt else None
    plan = EvaluationPlan.make(preset, guides, retains, metric,
                               threshold, calibration, save_scores=save_scores, notify=None if quiet else note,
                               warn=note)
    data = read_labelled(input)
    for message in data.invalid[:10]:
        err(f"sgl: skipped {message}")
    if data.unlabelled:
        err(f"sgl: skipped {len(data.unlabelled)} line(s) without 'answer'")
    items = data.items[:limit] if limit else data.items
    if not items:
        raise SglError(f"{input}: no line has an 'answer'; eval needs reference answers")

    from ..engine.views.tables import calibration_check_table, eval_table
    from ..engine.evaluation.plots import plot_eval

    set_threads(threads)
    quiet_libraries(quiet)
    # While the models load, run and shut down, what the libraries log (vLLM: on stdout) goes to stderr: stdout is
    # the table or the JSON object alone.
    with data_stdout():
        evaluation = plan.load()
        try:
            if evaluation.random_weights:
                warn_random_weights("answers and accuracy")
            with progress_bar("sgl eval", quiet, len(items)) as advance:
                result = evaluation.run(items, lambda rows, n: advance(n), details=details)
        except ValueError as exc:
            raise SglError(str(exc)) from None
        finally:
            evaluation.close()
    for message in result["errors"][:10]:
        err(f"sgl: left out {message}")
    if plot:
        plot_eval(result, plot, title=f"{input.name}: {result['items']} items, preset {plan.preset.name}")
    if json_out:
        typer.echo(json.dumps(result, indent=1))
    else:
        eval_table(result)
        if result.get("calibration"):
            calibration_check_table(result["calibration"])
    if not quiet:
        written = [str(p) for p in (plot, details, scores_path(details) if save_scores else None) if p]
        if written:
            err(f"sgl: wrote {', '.join(written)}")
    return 1 if result["errors"] else 0
