"""`sgl calibrate`: choose the retain ratio and the early-exit threshold from labelled items, for `sgl run
--calibration`."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ..engine.metrics import DEFAULT_METRIC, METRICS  # light: no torch
from ..engine.evaluation.retains import AUTO_RETAINS  # light: no numpy
from ._common import (STOPPED, data_stdout, domain_errors, err, interruption, progress_bar, quiet_libraries,
                      refuse_stdin, set_threads, stderr_is_tty, warn_random_weights, with_help)
from .options import (
    LargeBackendOption,
    LargeOptionOption,
    BatchSizeOption,
    ConsistencyRetainOption,
    MaxNewTokensOption,
    PresetOption,
    PromptSuffixOption,
    PruneLayerOption,
    ThreadsOption,
    split_list,
)

EXAMPLE = """
Input: the `sgl run` JSONL format with `answer` on every line (a string, a number, or a list of the
annotators' answers); lines without one are reported and skipped.

Every (retain, threshold) pair is a candidate operating point: the small model's answer where its exit_score
>= threshold, the large model's from the top `retain` of the visual tokens otherwise. Each item runs the small
model once, the large model alone once and the pruned large model once per retain value; the answers are
cached beside --out (<input>.calibration-cache-<fingerprint>.jsonl), so another target, metric, confidence or
corrected label costs no model call, a retain value added later runs only the large model at it, and an
interrupted calibration continues where it stopped (--rerun recomputes). Compute is measured on this machine,
relative to the large model alone: the small model + (1 - exit rate) x the large model at that retain, each the
median over the items of its time over the large model alone's on the same item.

--target-accuracy A chooses the cheapest point whose accuracy is at least A x the large model alone's (with
--confidence C: whose bootstrap lower bound at C is); when none is, the most accurate, and stderr says so.
--exit-rate E chooses the threshold that exits a fraction E and, at it, the most accurate of the retain values
(give one --retain to fix the retain).

Output (--out, default <input>.calibration.yaml beside the input; its path on stdout): retain, prune_layer and
threshold, the chosen row, a table of points (per retain, one per whole percent of exit rate), the measured
stage times and a fingerprint of the models and settings it is valid for. On stderr, per retain, its best
threshold and its cost, the chosen one marked; a plot of accuracy against compute goes to --plot. Check the
choice on held-out items with `sgl eval held-out.jsonl --calibration FILE`.

Exit codes: 0 written; 1 written, but some items failed and were left out (see stderr); 2 usage, preset or
model error.

Examples:
  sgl calibrate labelled.jsonl --preset qwen2.5-vl-3b-72b --target-accuracy 0.99
  sgl calibrate labelled.jsonl --preset qwen2.5-vl-3b-72b --target-accuracy 0.99 --confidence 0.95
  sgl calibrate labelled.jsonl --preset qwen2.5-vl-3b-72b --retain 0.09 --exit-rate 0.4 --out exit40.yaml
  sgl run batch.jsonl --preset qwen2.5-vl-3b-72b --calibration labelled.calibration.yaml
"""

_MAX_LISTED = 10  # lines listed per kind of problem, so that a bad file does not flood the terminal


def calibrate(
    input: Path = typer.Argument(..., help="JSONL file of image-question items with reference answers.",
                                 show_default=False),
    target_accuracy: Optional[float] = typer.Option(None, "--target-accuracy", help="Cheapest point whose accuracy "
                                                    "is at least this fraction of the large model alone's (e.g. 0.99).",
                                                    show_default=False),
    exit_rate: Optional[float] = typer.Option(None, "--exit-rate", help="Exit this fraction of items (or the closest "
                                              "below that tied scores allow), at the most accurate retain.",
                                              show_default=False),
    confidence: Optional[float] = typer.Option(None, "--confidence", help="With --target-accuracy: require the "
                                               "bootstrap lower bound of the accuracy at this confidence (e.g. 0.95) "
                                               "to meet it.", show_default=False),
    retain: Optional[List[str]] = typer.Option(None, "--retain", "-r", help="Retain values to choose from, "
                                               "comma-separated or repeated, or auto "
                                               f"({', '.join(f'{r:g}' for r in AUTO_RETAINS)}; the default). 1 is "
                                               "free: the large model alone runs anyway."),
    metric: str = typer.Option(DEFAULT_METRIC, "--metric", help=f"Answer correctness: {', '.join(METRICS)}. vqa is "
                               "the VQAv2 soft accuracy over a list of references and exact match (normalised) for "
                               "one."),
    preset: PresetOption = None,
    prune_layer: PruneLayerOption = None,
    consistency_retain: ConsistencyRetainOption = None,
    max_new_tokens: MaxNewTokensOption = None,
    prompt_suffix: PromptSuffixOption = None,
    batch_size: BatchSizeOption = None,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Calibration file (default: "
                                       "<input>.calibration.yaml beside the input)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="PNG plot of accuracy against compute, a curve per "
                                        "retain (default: <out>.png)."),
    resume: bool = typer.Option(True, "--resume/--rerun", help="Reuse the cached answers, or recompute every item."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Compute again what the items that failed "
                                      "before lack (else they stay left out and a cached run makes no model call)."),
    large_backend: LargeBackendOption = None,
    large_option: LargeOptionOption = None,
    threads: ThreadsOption = None,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or table (warnings still go to stderr)."),
) -> None:
    """Choose the retain ratio and the early-exit threshold from labelled items, for a target accuracy or exit
    rate."""
    with domain_errors():
        refuse_stdin(input, "sgl calibrate")
        code = _calibrate(input, target_accuracy, exit_rate, confidence, split_list(retain) or ["auto"], metric,
                          preset, dict(prune_layer=prune_layer, consistency_retain=consistency_retain,
                                       max_new_tokens=max_new_tokens, prompt_suffix=prompt_suffix,
                                       batch_size=batch_size), out, plot, resume, retry_failed, threads, quiet,
                          large_backend, large_option)
    raise typer.Exit(code)


with_help(calibrate, EXAMPLE)


def _calibrate(input: Path, target_accuracy: Optional[float], exit_rate: Optional[float],
               confidence: Optional[float], retains: list[str], metric: str, preset_name: Optional[str],
               overrides: dict, out: Optional[Path], plot: Optional[Path], resume: bool, retry_failed: bool,
               threads: Optional[int], quiet: bool, large_backend: Optional[str] = None,
               large_option: Optional[list[str]] = None) -> int:
    from ..engine.errors import SglError
    from ..engine.evaluation.calibrate import Calibrator
    from ..engine.evaluation.operating_points import validate_target
    from ..engine.metrics import get_metric
    from ..engine.preset import load_preset, parse_options

    # Every usage error before the first model call.
    validate_target(target_accuracy, exit_rate, confidence)  # a SettingError: the CLI names the flags
    try:
        get_metric(metric)
    except ValueError as exc:
        raise SglError(str(exc)) from None
    if confidence is not None and target_accuracy is None:
        raise SglError("--confidence applies to --target-accuracy (an exit rate is exact on the items)")
    preset = load_preset(preset_name).with_settings(**overrides).with_large_backend(
        large_backend, parse_options(large_option, "--large-option"))
    cal = Calibrator(input, preset, retains, out=out, resume=resume,
                     retry_failed=retry_failed)
    plot = plot or cal.out.with_suffix(".png")
    if not plot.parent.is_dir():
        raise SglError(f"folder {plot.parent} (for {plot.name}) does not exist")
    _report("skipped", cal.data.invalid)
    if cal.data.unlabelled:
        err(f"sgl: skipped {len(cal.data.unlabelled)} line(s) without 'answer': {_lines(cal.data.unlabelled)}")

    pending = sum(len(items) for items in cal.pending().values())
    if pending:
        if not quiet:
            err(f"sgl: computing {cal.plan()} (cache {cal.cache})")
        set_threads(threads)
        quiet_libraries(quiet)
        done = 0
        try:
            # What the libraries log while the models load, run and shut down goes to stderr (vLLM's: to stdout),
            # so that stdout says the calibration file alone.
            with data_stdout():
                engine = cal.load_engine()
                try:
                    if engine.random_weights:
                        warn_random_weights("answers, and so this calibration,")
                    with progress_bar("sgl calibrate", quiet, pending) as advance:
                        for n in cal.compute(engine):
                            done += n
                            advance(n)
                finally:
                    engine.close()  # vLLM's engine processes end here
        except STOPPED as exc:  # Ctrl-C, or SIGTERM (`Terminated`)
            what, code = interruption(exc)
            err(f"sgl: {what} after {done} item(s); the same command continues from the cache {cal.cache}")
            return code
    elif not quiet:
        err(f"sgl: all {len(cal.data.items)} item(s) cached in {cal.cache}; no model calls")

    result = cal.choose(metric, target_accuracy=target_accuracy, exit_rate=exit_rate, confidence=confidence)
    _report("left out", result.errors)
    if result.errors:
        err(f"sgl: {len(result.errors)} item(s) left out after a failed pass; --retry-failed computes again what "
            "they lack")
    if result.timings:
        seen = "; ".join(", ".join(f"{k} {v}" for k, v in t.items()) for t in result.timings)
        err(f"sgl: warning: the cache's stage times were measured under different conditions ({seen}), so the "
            "compute ratios compare them; --rerun measures every item again here")
    choice = result.choice
    n = choice.n_items
    cal.save(result, plot, title=f"{input.name}: {n} items, metric {metric}")
    ms = result.stage_ms
    if not quiet:
        err(f"sgl: {n} items, metric {metric}: large model alone {choice.large_accuracy:.3f}, small model "
            f"{choice.small_accuracy:.3f}; measured per item: the large model alone {ms['large']:.1f} ms, the small "
            f"model {ms['small']:.1f} ms ({result.costs.small:.2f} of the large model's time, item by item)")
        from ..engine.views.tables import calibration_table

        calibration_table(choice, result.costs, stderr_is_tty())
    err(("sgl: " if choice.met else "sgl: warning: ") + choice.message)
    if choice.point.relative_compute >= 1:
        err(f"sgl: warning: the chosen point costs {choice.point.relative_compute:.2f} x the large model alone: the "
            f"small model costs {result.costs.small:.2f} x the large one here, so at this target the pair saves no "
            "compute on this machine; sgl pays off when the small model is much cheaper than the large one")
    lo, hi = choice.interval
    err(f"sgl: mixed accuracy {choice.point.accuracy:.3f} at the chosen point, 95% bootstrap interval "
        f"{lo:.3f}-{hi:.3f} over {n} items; more labelled items narrow it")
    if result.small_set:
        err(f"sgl: warning: only {n} labelled items: the chosen point fits them and may do worse on others"
            + ("" if confidence else "; --confidence 0.95 asks the bootstrap lower bound to meet the target")
            + "; check it on held-out items with `sgl eval HELD-OUT.jsonl --calibration FILE`")
    if not quiet:
        err(f"sgl: wrote {cal.out} and {plot}; use it with: sgl run ... --calibration {cal.out}")
    typer.echo(str(cal.out))
    return 1 if result.errors else 0


def _lines(numbers: list[int]) -> str:
    shown = ", ".join(str(n) for n in numbers[:_MAX_LISTED])
    return shown + (f" and {len(numbers) - _MAX_LISTED} more" if len(numbers) > _MAX_LISTED else "")


def _report(what: str, messages: list[str]) -> None:
    for message in messages[:_MAX_LISTED]:
        err(f"sgl: {what} {message}")
    if len(messages) > _MAX_LISTED:
        err(f"sgl: {what} {len(messages) - _MAX_LISTED} more line(s) like these")
