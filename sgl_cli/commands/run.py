"""`sgl run`: stream image-question JSONL through the engine, one output record per input line."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from ._common import domain_errors, err, note, progress_bar, with_help
from .options import (
    BatchSizeOption,
    CalibrationOption,
    ConsistencyRetainOption,
    GuideOption,
    MaxNewTokensOption,
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
Input: one JSON object per line with `image` (path, relative to the JSONL file), `question`, and optionally
`id`, `answer` (a reference, copied to the output as `reference`) and `max_new_tokens`.

Output (--out, default <input>.sgl.jsonl): one record per input line, in order, with `answer`, `exit`
("small": the small model's answer was confident and consistent; "large": the large model answered from
`retained_tokens` of `visual_tokens`), the scores, timings in ms and `error` (null or the reason).
The resolved settings are written beside it (<out>.preset.yaml).

Exit codes: 0 all items answered, 1 some items failed (see their `error`), 2 usage, preset or model error.

Examples:
  sgl run examples/batch.jsonl --retain 0.09
  sgl run data.jsonl --preset qwen2.5-vl-3b-72b --threshold 0.95 --out answers.jsonl
  sgl run data.jsonl --resume            # continue after Ctrl-C or a crash
  sgl run data.jsonl --preset qwen2.5-vl-3b-72b --quantize 4bit     # the large model in NF4
  sgl run data.jsonl --backend ray --num-workers 8 --gpus-per-worker 1  # on a Ray cluster
"""


def run(
    input: Path = typer.Argument(..., help="JSONL file of image-question items.", show_default=False),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output JSONL (default: <input>.sgl.jsonl). '-' writes to stdout."),
    preset: PresetOption = None,
    retain: RetainOption = None,
    threshold: ThresholdOption = None,
    no_exit: bool = typer.Option(False, "--no-exit", help="Never exit early: the large model answers every item."),
    calibration: CalibrationOption = None,
    consistency_retain: ConsistencyRetainOption = None,
    max_new_tokens: MaxNewTokensOption = None,
    prune_layer: PruneLayerOption = None,
    prompt_suffix: PromptSuffixOption = None,
    batch_size: BatchSizeOption = None,
    guide: GuideOption = None,
    seed: SeedOption = None,
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run: skip items already in --out."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out."),
    threads: ThreadsOption = None,
    quiet: QuietOption = False,
    quantize: Optional[str] = typer.Option(None, "--quantize", help="Quantize the large model's weights with bitsandbytes: 4bit (NF4, bf16 compute), 8bit or none (default: the preset's)."),
    backend: str = typer.Option("local", "--backend", help="local: models in this process; ray: a pool of Ray actors, on this machine or a cluster (needs the ray extra of sgl-cli)."),
    num_workers: Optional[int] = typer.Option(None, "--num-workers", help="--backend ray: actors, each loading the pair once (default: one per --gpus-per-worker GPUs of the cluster, else 1)."),
    gpus_per_worker: Optional[float] = typer.Option(None, "--gpus-per-worker", help="--backend ray: GPUs per actor, may be fractional (default: 1 when the cluster has GPUs, else 0)."),
) -> None:
    """Answer every item of a JSONL file with small-model guidance and early exit."""
    with domain_errors():
        code = _run(input, out, preset, dict(
            retain=retain, threshold=threshold, no_exit=no_exit, consistency_retain=consistency_retain,
            max_new_tokens=max_new_tokens, prune_layer=prune_layer, prompt_suffix=prompt_suffix,
            batch_size=batch_size, guide=guide, seed=seed,
        ), calibration, resume, overwrite, threads, quiet, backend, num_workers, gpus_per_worker, quantize)
    raise typer.Exit(code)


with_help(run, EXAMPLE)


def _run(input: Path, out: Optional[Path], preset_name: Optional[str], overrides: dict, calibration: Optional[Path],
         resume: bool, overwrite: bool, threads: Optional[int], quiet: bool, backend: str = "local",
         num_workers: Optional[int] = None, gpus_per_worker: Optional[float] = None,
         quantize: Optional[str] = None) -> int:
    from ..engine.errors import SglError
    from ..engine.io.run import Run
    from ..engine.preset import load_preset

    if overrides.get("guide") is not None:
        check_guides([overrides["guide"]])
    ray_options = None
    if backend == "local":
        given = [f for f, v in (("--num-workers", num_workers), ("--gpus-per-worker", gpus_per_worker)) if v is not None]
        if given:
            raise SglError(f"{' and '.join(given)} only appl{'y' if len(given) > 1 else 'ies'} with --backend ray")
    elif backend == "ray":
        from ..engine.io.ray_backend import RayOptions

        ray_options = RayOptions(num_workers, gpus_per_worker, threads)
    preset = load_preset(preset_name).with_settings(**overrides).with_quantize(quantize)
    to_stdout = out is not None and str(out) == "-"
    job = Run(input, preset, out=None if to_stdout else (out or "default"), resume=resume, overwrite=overwrite,
              calibration=calibration, backend=backend, ray_options=ray_options, threads=threads,
              notify=(lambda _: None) if quiet else note, warn=note)
    summary = job.summary
    with progress_bar("sgl run", quiet, job.remaining()) as advance:
        try:
            for record in job:
                if to_stdout:
                    from ..engine.io.output import record_line

                    sys.stdout.write(record_line(record))
                    sys.stdout.flush()
                advance(info=f"{summary.rate:.2f} it/s  exits {summary.small_exits}  errors {summary.errors}")
        except KeyboardInterrupt:
            err(f"sgl: interrupted after {summary.items} items; `sgl run {input} --resume` continues where it stopped.")
            return 130
    if not quiet:
        err(f"sgl: {summary.line()}")
    return 1 if summary.errors else 0
