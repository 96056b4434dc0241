"""The options several commands share, declared once: the same name, type, default and help everywhere.

`--guide` reads the guide registry (built-ins and installed plugins), so a plugin's guide is a choice of every
command. A command takes one guide (`GuideOption`) or, `sgl eval`, several (`GuidesOption`: comma-separated or
repeated).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from ..engine.guides import guide_names  # light: entry-point metadata, no torch


def _guides_help() -> str:
    return ", ".join(guide_names())


PresetOption = Annotated[Optional[str], typer.Option(
    "--preset", "-p", help="Preset name (see `sgl presets`) or YAML file (default: the built-in pair).")]
RetainOption = Annotated[Optional[float], typer.Option(
    help="Fraction of visual tokens the large model keeps (at least 1 token; default: the preset's).")]
PruneLayerOption = Annotated[Optional[int], typer.Option(
    help="Decoder layer at which the large model drops tokens (0: before the language model; fastv: 2 when 0).")]
ThresholdOption = Annotated[Optional[float], typer.Option(
    help="Exit early when the small model's exit_score >= this.")]
CalibrationOption = Annotated[Optional[Path], typer.Option(
    "--calibration", help="Use the settings of this `sgl calibrate` file; refused unless it was made for these "
    "models and settings.")]
ConsistencyRetainOption = Annotated[Optional[float], typer.Option(
    help="Visual tokens kept for the small model's consistency re-read.")]
MaxNewTokensOption = Annotated[Optional[int], typer.Option(
    help="Longest answer, in tokens (an item's own `max_new_tokens` wins).")]
PromptSuffixOption = Annotated[Optional[str], typer.Option(
    help="Text appended to every question (\"\" for none; default: the preset's).")]
BatchSizeOption = Annotated[Optional[int], typer.Option(help="Items per model call (the small stage's batch).")]
LargeBatchSizeOption = Annotated[Optional[int], typer.Option(
    "--large-batch-size", min=1, help="The large stage's batch (transformers) or the requests it keeps in flight "
    "(vllm's continuous batching); default: the backend's (transformers: --batch-size; vllm: its max_num_seqs, "
    "else 256).", show_default=False)]
PipelineOption = Annotated[Optional[str], typer.Option(
    "--pipeline", help="streaming: the small and the large stage run at once, records written in input order as "
    "soon as they are ready; serial: each batch through both stages in turn; auto (default): serial where both "
    "models compute on the CPU (they would contend for its cores), else streaming. The records are the same.",
    show_default=False)]
SeedOption = Annotated[Optional[int], typer.Option(help="Seed of the random guide.")]
ThreadsOption = Annotated[Optional[int], typer.Option(
    help="Torch CPU threads (on a busy machine, fewer is faster).")]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary.")]
GuideOption = Annotated[Optional[str], typer.Option(
    "--guide", "-g", help=f"What ranks the visual tokens: {_guides_help()} (sgl: the small model's attention, the only "
    "guide that exits early; cls: the large model's vision-encoder attention, FasterVLM; fastv: the large model's own "
    "layer K-1 attention; random; others: installed plugins) (default: the preset's).")]
GuidesOption = Annotated[Optional[List[str]], typer.Option(
    "--guide", "-g", help=f"Guides to compare, comma-separated or repeated: {_guides_help()} (default: all; without a "
    "small model, those that need none).")]


def split_list(values: list[str] | None) -> list[str]:
    """Repeated options and comma lists both work: `--guide sgl --guide cls` or `--guide sgl,cls`."""
    return [v.strip() for value in values or [] for v in value.split(",") if v.strip()]


def check_guides(names: list[str]) -> list[str]:
    """The names, deduplicated in order, or an SglError naming the unknown ones and the choices."""
    from ..engine.errors import SglError

    known = guide_names()
    unknown = [g for g in names if g not in known]
    if unknown:
        raise SglError(f"--guide: unknown {', '.join(unknown)}; choose from {', '.join(known)}")
    return list(dict.fromkeys(names))


def _backends_help() -> str:
    from ..engine.backends import backend_names  # light: entry-point metadata, no torch

    return ", ".join(backend_names())


LargeOptionOption = Annotated[Optional[list[str]], typer.Option(
    "--large-option", help="An engine option of the large backend, KEY=VALUE (repeat it for several; e.g. "
    "max_num_seqs=64 for vllm): over the preset's large.options. Each backend declares the options it takes.",
    show_default=False)]

LargeBackendOption = Annotated[Optional[str], typer.Option(
    "--large-backend", help=f"What runs the large model: {_backends_help()} (default: the preset's, else "
    "transformers; vllm needs the vllm extra). Not --backend (local or ray: where the pair runs).",
    show_default=False)]
