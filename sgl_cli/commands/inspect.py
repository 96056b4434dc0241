"""`sgl inspect IMAGE --question Q` (or `--video CLIP`): which visual tokens each guide finds important and which the
large model keeps."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from ..engine.guides import guide_names  # light: no torch
from ._common import FLAGS, data_stdout, domain_errors, err, note, set_threads, warn_random_weights, with_help
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

A video (--video, with images or alone; Qwen2-VL, Qwen2.5-VL and Qwen3-VL)
is sampled at --fps up to --max-frames
(default: the preset's video_fps and video_max_frames) and drawn as one map per
temporal patch, the two sampled frames the model merges into one grid of
tokens, labelled by its frames and their time ("frames 3-4 (1.5 s)"); one
colour scale and one budget span the images and every patch. --png draws
each patch on its first frame; --json gives each patch's grid with its
frames and time, and the video's sampled frames' times under `video`. cls
and downsample do not rank a video's tokens (all leaves cls out).

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
unsupported image or video.

Examples:
  sgl inspect examples/images/shapes_7_0000.jpg \\
      --question "What shape is blue?"
  sgl inspect photo.jpg --question "What does the sign say?" --retain 0.2
  sgl inspect photo.jpg --question "..." --guide all --png guides.png
  sgl inspect photo.jpg --question "..." --png heat.png --json > heat.json
  sgl inspect --video clip.mp4 --question "What moves?" --fps 1 --png frames.png
"""


def inspect(
    image: Optional[List[Path]] = typer.Argument(None, help="Image file; several for one item with several images "
                                                 "(the families that take them: Qwen-VL, LLaVA-OneVision, "
                                                 "InternVL). None with --video alone.", show_default=False),
    question: str = typer.Option(..., "--question", help="The question to ask about the image.", show_default=False),
    video: Optional[Path] = typer.Option(None, "--video", help="A video file for the item (after its images, if any): "
                                         "one map per temporal patch of two sampled frames.", show_default=False),
    fps: Optional[float] = typer.Option(None, "--fps", help="The video's frames sampled per second (default: the "
                                        "preset's video_fps).", show_default=False),
    max_frames: Optional[int] = typer.Option(None, "--max-frames", help="At most this many of the video's frames, "
                                             "spread over the whole video (default: the preset's "
                                             "video_max_frames).", show_default=False),
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
    """Show which visual tokens matter for one image (or video) and question, and which the large model would keep."""
    from ..engine.errors import SettingError, SglError

    with domain_errors():
        try:
            _inspect(list(image or []), question, guide, preset, retain, png, as_json, answer_large, threads, video,
                     fps, max_frames)
        except SettingError as exc:  # the video settings by their flags here
            raise SglError(exc.worded(FLAGS)) from None


with_help(inspect, EXAMPLE)


def _inspect(image_paths: list[Path], question: str, guide: str, preset_name: Optional[str],
             retain: Optional[float], png: Optional[Path], as_json: bool, answer_large: bool,
             threads: Optional[int], video: Optional[Path] = None, fps: Optional[float] = None,
             max_frames: Optional[int] = None) -> None:
    from ..engine.errors import SettingError, SglError
    from ..engine.preset import load_preset
    from ..engine.views.inspect_item import inspect_item
    from .options import check_guides

    if not question.strip():
        raise SettingError("{} must not be empty", "question")
    if not image_paths and video is None:
        raise SglError("give an image (IMAGE...) or a --video")
    if guide != "all":
        check_guides([guide])
    preset = load_preset(preset_name).with_settings(retain=retain)
    if png is not None and not png.parent.is_dir():
        raise SglError(f"--png {png}: folder {png.parent} does not exist")
    with data_stdout():  # what the libraries log while the models load and run (vLLM's: on stdout) goes to stderr
        result, images = inspect_item(preset, image_paths, question, guide, video=video, fps=fps,
                                      max_frames=max_frames, answer_large=answer_large, notify=note,
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
