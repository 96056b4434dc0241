"""`sgl inspect IMAGE --question Q`: which visual tokens the guide finds important and which the large model keeps."""

from __future__ import annotations

import dataclasses
import json
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from ..engine.items import Item  # light: no torch
from ._common import domain_errors, err, set_threads

EXAMPLE = """
Prints the small model's answer and SEE scores, whether the item would exit
at the preset's threshold, and a heatmap of every visual token's importance
on the image's token grid (rows x columns of merged patches), the tokens the
large model keeps at --retain marked []. The large model runs only with
--answer-large.

Exit codes: 0 done; 2 usage, preset or model error, or a missing, corrupt or
unsupported image.

Examples:
  sgl inspect examples/images/shapes_7_0000.jpg \\
      --question "What shape is blue?"
  sgl inspect photo.jpg --question "What does the sign say?" --retain 0.2
  sgl inspect photo.jpg --question "..." --png heat.png --json > heat.json
"""


class Guide(str, Enum):
    sgl = "sgl"
    cls = "cls"
    fastv = "fastv"
    random = "random"
    all = "all"


AVAILABLE = (Guide.sgl,)


def inspect(
    image: Path = typer.Argument(..., help="Image file.", show_default=False),
    question: str = typer.Option(..., "--question", help="The question to ask about the image.", show_default=False),
    guide: Guide = typer.Option(Guide.sgl, "--guide", help="What ranks the visual tokens."),
    preset: Optional[str] = typer.Option(None, "--preset", "-p",
                                         help="Preset name or YAML file (default: the built-in pair)."),
    retain: Optional[float] = typer.Option(None, help="Fraction of visual tokens the large model keeps "
                                                      "(default: the preset's)."),
    png: Optional[Path] = typer.Option(None, "--png", help="Also write the image with the importance overlaid "
                                                           "to this PNG."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (importance, grid, kept, answers, "
                                                       "scores) instead of the heatmap."),
    answer_large: bool = typer.Option(False, "--answer-large", help="Also run the large model on the kept tokens "
                                                                    "and show its answer."),
    threads: Optional[int] = typer.Option(None, help="Torch CPU threads."),
) -> None:
    """Show which visual tokens matter for one image and question, and which the large model would keep."""
    with domain_errors():
        _inspect(image, question, guide, preset, retain, png, as_json, answer_large, threads)


inspect.__doc__ = (inspect.__doc__ or "") + "\n" + EXAMPLE


def _inspect(image_path: Path, question: str, guide: Guide, preset_name: Optional[str], retain: Optional[float],
             png: Optional[Path], as_json: bool, answer_large: bool, threads: Optional[int]) -> None:
    from ..engine.errors import ItemError, SglError
    from ..engine.items import load_image
    from ..engine.preset import load_preset

    if guide not in AVAILABLE:
        raise SglError(f"--guide {guide.value} is not available yet; available: "
                       f"{', '.join(g.value for g in AVAILABLE)}")
    if not question.strip():
        raise SglError("--question must not be empty")
    preset = load_preset(preset_name).with_settings(retain=retain)
    if png is not None and not png.parent.is_dir():
        raise SglError(f"--png {png}: folder {png.parent} does not exist")
    item = _CommandLineItem(line=1, id=image_path.name, image=image_path, question=question.strip())
    try:  # before the models load: a bad image fails at once
        image = load_image(item)
    except ItemError as exc:
        raise SglError(str(exc)) from None

    from ..engine.engine import Engine, n_keep, top_k_in_order
    from ..engine.heatmap import Inspection, render, save_png
    from ..engine.models import load_model

    set_threads(threads)
    small = load_model(preset.small, "small")
    # analyze() never runs the large model, so unless its answer is asked for the small one stands in for it and
    # a 72B checkpoint is not loaded just to look at a heatmap.
    large = load_model(preset.large, "large") if answer_large else small
    engine = Engine(preset.settings, small, large, preset)
    if engine.random_weights:
        err("sgl: warning: the built-in pair has random weights: its answers and importance are noise; "
            "use --preset with real checkpoints.")
    (work,) = engine.analyze([item])
    if work.error:
        raise SglError(work.error)
    rows, cols = small.family.token_grid(small.model, work.enc_small)
    n = len(work.importance)
    if rows * cols != n:
        raise SglError(f"the token grid {rows} x {cols} does not match the {n} visual tokens")
    settings = engine.settings
    large_answer = None
    if answer_large:
        # Without a threshold the large model answers even when the small model would exit.
        always_large = Engine(dataclasses.replace(settings, threshold=None), small, large)
        (record,) = always_large.process([item])
        if record["error"]:
            raise SglError(record["error"])
        large_answer = record["answer"]

    result = Inspection(
        image=image_path, image_size=image.size, question=item.question, guide=guide.value,
        preset=preset.name, small_answer=small.processor.tokenizer.decode(
            work.small_tokens, skip_special_tokens=True).strip(),
        confidence=engine.confidence(work), consistency=work.consistency, exit_score=engine.exit_score(work),
        threshold=settings.threshold, retain=settings.retain, grid=(rows, cols),
        importance=work.importance.tolist(),
        kept=top_k_in_order(work.importance, n_keep(n, settings.retain)).tolist(),
        large_answer=large_answer,
    )
    if png is not None:
        try:
            width, height = save_png(result, image, png)
        except OSError as exc:
            raise SglError(f"cannot write {png}: {exc.strerror or exc}") from None
        err(f"sgl: wrote {png} ({width} x {height} px)")
    if as_json:
        typer.echo(json.dumps(result.to_json(), ensure_ascii=False))
    else:
        from rich.console import Console

        render(result, Console(highlight=False))


class _CommandLineItem(Item):
    """The item is the command line itself: its errors need no line number."""

    def fail(self, message: str) -> str:
        return message
