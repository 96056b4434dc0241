"""`sgl inspect IMAGE --question Q`: which visual tokens each guide finds important and which the large model keeps."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from ..engine.guides import guide_names  # light: no torch
from ._common import data_stdout, domain_errors, err, note, set_threads, warn_random_weights, with_help
from .options import PresetOption, ThreadsOption

EXAMPLE = """
Prints the small model's answer and SEE scores, whether the item would exit
at the preset's threshold (or its `calibration:` file's threshold, and its
retain and prune layer unless given, as `sgl eval --calibration` takes
them), and a heatmap of every visual token's importance on the image's token
grid (rows x columns of merged patches), the tokens the large model keeps at
--retain marked []. Multi-crop images are drawn as the model lays them out:
LLaVA-NeXT/OneVision's base crop beside its high-res grid (the crops in
their places, unpadded), InternVL's tiles in their places beside the
thumbnail; crop and tile boundaries are frame lines.

Guides and what they load and run:
  sgl     the small model's attention while it answers (the default; needs
          the preset's small model). The large model is not loaded.
  cls     the large model's vision-encoder attention: loads the large model
          and runs its vision tower only.
  fastv   the large model's own attention from the last prompt token at
          layer K-1: runs the large model's language model on the prompt
          (its prefill), by nature.
  random  uniform scores, seeded per image (the preset's seed).
  downsample  no ranking: shows the token grid of what the large model sees,
          the image resized to the budget before its vision tower (or, for
          LLaVA-1.5, its feature grid average-pooled), every token kept.
          Loads the large model and runs its vision tower only.
  others  guides installed plugins register (see `sgl inspect --help`'s
          --guide list).
  all     every guide that ranks the image's tokens (not downsample, whose
          grid is another), side by side when the maps fit 80 columns (else one
          after another), each with its own kept set, and how many of sgl's
          kept tokens each guide keeps too. Without a small model in the
          preset, sgl is skipped and says why.

When the preset has a small model, it answers and is scored whatever the
guide (only sgl uses its ranking and exits early). The large model answers
only with --answer-large: from each shown guide's kept tokens, one answer per
guide. With --guide all, --png writes one PNG with a panel per guide and
--json one object whose `guides` maps each guide to its importance, kept
indices and answer.

Exit codes: 0 done; 2 usage, preset or model error, or a missing, corrupt or
unsupported image.

Examples:
  sgl inspect examples/images/shapes_7_0000.jpg \\
      --question "What shape is blue?"
  sgl inspect photo.jpg --question "What does the sign say?" --retain 0.2
  sgl inspect photo.jpg --question "..." --guide all --png guides.png
  sgl inspect photo.jpg --question "..." --png heat.png --json > heat.json
"""



def inspect(
    image: List[Path] = typer.Argument(..., help="Image file; several for one item with several images (the "
                                       "families that take them: Qwen-VL, LLaVA-OneVision, InternVL).",
                                       show_default=False),
    question: str = typer.Option(..., "--question", help="The question to ask about the image.", show_default=False),
    guide: str = typer.Option("sgl", "--guide", "-g", help=f"What ranks the visual tokens: {', '.join(guide_names())}, "
                              "or all (see the list above; fastv runs the large model's language model on the prompt "
                              "by nature)."),
    preset: PresetOption = None,
    retain: Optional[float] = typer.Option(None, help="Fraction of visual tokens the large model keeps "
                                                      "(default: the preset's)."),
    png: Optional[Path] = typer.Option(None, "--png", help="Also write the image with the importance overlaid "
                                                           "to this PNG (with --guide all: one panel per guide)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (importance, grids and the "
                                                       "layout of every token, kept, answers, scores; with "
                                                       "--guide all, per guide under `guides`) instead of the "
                                                       "heatmap."),
    answer_large: bool = typer.Option(False, "--answer-large", help="Also run the large model on the kept tokens "
                                                                    "(of each shown guide) and show its answer."),
    threads: ThreadsOption = None,
) -> None:
    """Show which visual tokens matter for one image and question, and which the large model would keep."""
    with domain_errors():
        _inspect(image, question, guide, preset, retain, png, as_json, answer_large, threads)


with_help(inspect, EXAMPLE)


def _inspect(image_paths: list[Path], question: str, guide: str, preset_name: Optional[str],
             retain: Optional[float], png: Optional[Path], as_json: bool, answer_large: bool,
             threads: Optional[int]) -> None:
    from ..engine.errors import SettingError, SglError
    from ..engine.preset import load_preset
    from ..engine.views.inspect_item import inspect_item
    from .options import check_guides

    if not question.strip():
        raise SettingError("{} must not be empty", "question")
    if guide != "all":
        check_guides([guide])
    preset = load_preset(preset_name).with_settings(retain=retain)
    if png is not None and not png.parent.is_dir():
        raise SglError(f"--png {png}: folder {png.parent} does not exist")
    with data_stdout():  # what the libraries log while the models load and run (vLLM's: on stdout) goes to stderr
        result, images = inspect_item(preset, image_paths, question, guide, answer_large=answer_large, notify=note,
                                      on_random_weights=lambda: warn_random_weights("answers and importance"),
                                      before_load=lambda: set_threads(threads))
    if png is not None:
        from ..engine.views.png import save_png

        try:
            width, height = save_png(result, images, png)
        except OSError as exc:
            raise SglError(f"cannot write {png}: {exc.strerror or exc}") from None
        err(f"sgl: wrote {png} ({width} x {height} px)")
    if as_json:
        typer.echo(json.dumps(result.to_json(), ensure_ascii=False))
    else:
        from rich.console import Console

        from ..engine.views.terminal import render

        render(result, Console(highlight=False))
