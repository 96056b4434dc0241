"""`sgl run`: stream image-question JSONL through the engine, one output record per input line."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ._common import (STOPPED, data_stdout, domain_errors, err, interruption, note, progress_bar, quiet_libraries,
                      refuse_stdin, with_help)
from .options import (
    LargeBackendOption,
    LargeOptionOption,
    BatchSizeOption,
    LargeBatchSizeOption,
    CalibrationOption,
    ConsistencyRetainOption,
    GuideOption,
    MaxNewTokensOption,
    PipelineOption,
    PresetOption,
    PromptSuffixOption,
    PruneLayerOption,
    QuietOption,
    RetainOption,
    SeedOption,
    ThreadsOption,
    ThresholdOption,
    check_guides,
)

EXAMPLE = """
Input: told apart by its name and content. sgl JSONL: one item per line with `image` (a path relative to the
file, an http(s) URL or a data URI), `images` (a list of them) or `image_base64`, `question`, and optionally
`id`, `answer` (copied to the output as `reference`), `type` and `max_new_tokens`; or a `video` (a video file,
or a list of frame images) with optional `fps` and `max_frames` (Qwen2-VL, Qwen2.5-VL, Qwen3-VL); an OpenAI Batch
API file (lines with `custom_id`, `method`, `url` /v1/chat/completions and `body`: messages with image_url and
video_url parts, max_tokens), whose output is an OpenAI batch output file; a Parquet file or a folder saved with
the datasets library's save_to_disk, one item per row (columns image or video, question and optionally id, answer,
type; rename them with --image-column and the like).

Output (--out, default <input>.sgl.jsonl): exactly one strict-JSON record per input item, in order, with
`answer`, `exit` ("small": the small model's answer was confident and consistent; "large": the large model
answered from `retained_tokens` of `visual_tokens`), the scores, `finish_reason`, `usage`, timings in ms and
`error` (null, or why this item failed, naming its line or row). The resolved settings are written beside it
(<out>.preset.yaml). One run writes an output at a time; --resume continues an interrupted one.

Exit codes: 0 all items answered, 1 some items failed (see their `error`), 2 usage, preset, model or output
error, 130 interrupted (Ctrl-C), 143 terminated (SIGTERM); the message then says the command that continues.

Examples:
  sgl run examples/batch.jsonl --retain 0.09
  sgl run data.jsonl --preset qwen2.5-vl-3b-72b --threshold 0.95 --out answers.jsonl
  sgl run data.jsonl --resume            # continue after Ctrl-C or a crash
  sgl run requests.jsonl --preset qwen2.5-vl-3b-72b --out results.jsonl     # an OpenAI batch file
  sgl run vqa.parquet --question-column query --limit 1000
  sgl run data.jsonl --preset qwen2.5-vl-3b-72b --quantize 4bit     # the large model in NF4
  sgl run data.jsonl --backend ray --num-workers 8 --gpus-per-worker 1  # on a Ray cluster
"""


def run(
    ctx: typer.Context,
    input: Path = typer.Argument(..., help="Input: sgl JSONL, an OpenAI batch file, Parquet, or a saved dataset "
                                 "folder.", show_default=False),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output JSONL (default: <input>.sgl.jsonl). '-' "
                                       "writes to stdout."),
    preset: PresetOption = None,
    retain: RetainOption = None,
    threshold: ThresholdOption = None,
    no_exit: bool = typer.Option(False, "--no-exit", help="Never exit early: the large model answers every item."),
    calibration: CalibrationOption = None,
    consistency_retain: ConsistencyRetainOption = None,
    max_new_tokens: MaxNewTokensOption = None,
    max_prompt_tokens: Optional[int] = typer.Option(None, help="Longer prompts are error records (default: the "
                                                    "models' context decides)."),
    prune_layer: PruneLayerOption = None,
    prompt_suffix: PromptSuffixOption = None,
    batch_size: BatchSizeOption = None,
    large_batch_size: LargeBatchSizeOption = None,
    pipeline: PipelineOption = None,
    guide: GuideOption = None,
    seed: SeedOption = None,
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run: skip the items already in "
                                "--out."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out."),
    no_fetch: bool = typer.Option(False, "--no-fetch", help="Never fetch image URLs: items with one are error "
                                  "records."),
    save_scores: bool = typer.Option(False, "--save-scores", help="Also write each item's visual-token ranking and "
                                     "kept tokens beside the output (<out>.scores.arrow), for `sgl report`."),
    image_column: str = typer.Option("image", help="Parquet / dataset column of the image (bytes, the datasets Image "
                                     "struct, or a path or URL)."),
    question_column: str = typer.Option("question", help="Parquet / dataset column of the question."),
    id_column: str = typer.Option("id", help="Parquet / dataset column of the item id (default: the row number)."),
    answer_column: str = typer.Option("answer", help="Parquet / dataset column of the reference answer, if any."),
    type_column: str = typer.Option("type", help="Parquet / dataset column of the question type, if any."),
    video_column: str = typer.Option("video", help="Parquet / dataset column of a video (bytes, the datasets Video "
                                     "struct, or a path or URL), if any."),
    split: Optional[str] = typer.Option(None, help="The split of a dataset saved with several (a DatasetDict folder)."),
    limit: Optional[int] = typer.Option(None, min=1, help="Only the first N items."),
    threads: ThreadsOption = None,
    quiet: QuietOption = False,
    quantize: Optional[str] = typer.Option(None, "--quantize", help="Quantize the large model's weights with "
                                           "bitsandbytes: 4bit (NF4, bf16 compute), 8bit or none (default: the "
                                           "preset's)."),
    large_backend: LargeBackendOption = None,
    large_option: LargeOptionOption = None,
    backend: str = typer.Option("local", "--backend", help="local: models in this process; ray: a pool of Ray "
                                "actors, on this machine or a cluster (needs the ray extra of sgl-cli)."),
    num_workers: Optional[int] = typer.Option(None, "--num-workers", help="--backend ray: actors, each loading the "
                                              "pair once (default: one per --gpus-per-worker GPUs of the cluster, "
                                              "else 1)."),
    gpus_per_worker: Optional[float] = typer.Option(None, "--gpus-per-worker", help="--backend ray: GPUs per actor, "
                                                    "may be fractional (default: 1 when the cluster has GPUs, else "
                                                    "0)."),
) -> None:
    """Answer every item of an input file with small-model guidance and early exit."""
    from ..engine.io.formats import Columns

    with domain_errors():
        refuse_stdin(input, "sgl run")
        code = _run(input, out, preset, dict(
            retain=retain, threshold=threshold, no_exit=no_exit, consistency_retain=consistency_retain,
            max_new_tokens=max_new_tokens, max_prompt_tokens=max_prompt_tokens, prune_layer=prune_layer,
            prompt_suffix=prompt_suffix, batch_size=batch_size, guide=guide, seed=seed,
            large_batch_size=large_batch_size, pipeline=pipeline,
        ), calibration, resume, overwrite, threads, quiet, backend, num_workers, gpus_per_worker, quantize,
            dict(columns=Columns(image_column, question_column, id_column, answer_column, type_column, video_column),
                 split=split, limit=limit), no_fetch, resume_command(ctx), save_scores, large_backend,
            large_option)
    raise typer.Exit(code)


with_help(run, EXAMPLE)


def resume_command(ctx) -> str:
    """The command that continues this run: as typed, with --resume (and without --overwrite)."""
    import shlex

    words = ["sgl", "run"]
    for param in ctx.command.params:
        source = ctx.get_parameter_source(param.name)
        if getattr(source, "name", None) not in ("COMMANDLINE", "ENVIRONMENT"):  # typer may carry its own click
            continue
        if param.name in ("overwrite", "resume"):
            continue
        value = ctx.params[param.name]
        if param.param_type_name == "argument":
            words.append(str(value))
        elif getattr(param, "is_flag", False):
            if value:
                words.append(param.opts[0])
        else:
            words += [param.opts[0], str(value)]
    return shlex.join(words + ["--resume"])


def _run(input: Path, out: Optional[Path], preset_name: Optional[str], overrides: dict, calibration: Optional[Path],
         resume: bool, overwrite: bool, threads: Optional[int], quiet: bool, backend: str = "local",
         num_workers: Optional[int] = None, gpus_per_worker: Optional[float] = None,
         quantize: Optional[str] = None, table: Optional[dict] = None, no_fetch: bool = False,
         again: str = "", save_scores: bool = False, large_backend: Optional[str] = None,
         large_option: Optional[list[str]] = None) -> int:
    from ..engine.errors import SglError
    from ..engine.io.fetch import FetchPolicy
    from ..engine.runs.run import Run
    from ..engine.preset import load_preset, parse_options

    if overrides.get("guide") is not None:
        check_guides([overrides["guide"]])
    ray_options = None
    if backend == "local":
        given = [f for f, v in (("--num-workers", num_workers), ("--gpus-per-worker", gpus_per_worker))
                 if v is not None]
        if given:
            raise SglError(f"{' and '.join(given)} only appl{'y' if len(given) > 1 else 'ies'} with --backend ray")
    elif backend == "ray":
        from ..engine.runs.ray_backend import RayOptions

        ray_options = RayOptions(num_workers, gpus_per_worker, threads)
    preset = load_preset(preset_name).with_settings(**overrides).with_quantize(quantize).with_large_backend(
        large_backend, parse_options(large_option, "--large-option"))
    quiet_libraries(quiet)
    to_stdout = out is not None and str(out) == "-"
    job = Run(input, preset, out=None if to_stdout else (out or "default"), resume=resume, overwrite=overwrite,
              calibration=calibration, backend=backend, ray_options=ray_options, threads=threads,
              fetch=FetchPolicy(enabled=not no_fetch), save_scores=save_scores,
              notify=(lambda _: None) if quiet else note, warn=note,
              **(table or {}))
    summary = job.summary
    from ..engine.io.output import record_line

    # stdout carries the records alone (`-o -`): what vLLM and the other libraries log goes to stderr.
    with data_stdout() as data, progress_bar("sgl run", quiet, job.remaining()) as advance:
        records = iter(job)
        try:
            for record in records:
                if to_stdout:
                    data.write(record_line(job.shape(record)))
                    data.flush()
                advance(info=f"{summary.rate:.2f} it/s  exits {summary.small_exits}  errors {summary.errors}")
        except STOPPED as exc:  # Ctrl-C, or SIGTERM (`Terminated`)
            records.close()  # the engine shut down (vLLM's processes), the output closed, the lock released
            job.release()
            what, code = interruption(exc)
            where = f"; `{again}` continues where it stopped" if job.out is not None else ""
            err(f"sgl: {what} after {summary.items} items{where}.")
            return code
    if not quiet:
        err(f"sgl: {summary.line()}")
    return 1 if summary.errors else 0
