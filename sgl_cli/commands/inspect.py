"""`sgl inspect IMAGE --question Q`: which visual tokens each guide finds important and which the large model keeps."""

from __future__ import annotations

import dataclasses
import json
import traceback
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from ..engine.items import Item  # light: no torch
from ._common import domain_errors, err, set_threads, with_help

EXAMPLE = """
Prints the small model's answer and SEE scores, whether the item would exit
at the preset's threshold (or its `calibration:` file's, as `sgl run` uses
it), and a heatmap of every visual token's importance on the image's token
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
  all     every guide, side by side when the maps fit 80 columns (else one
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


class Guide(str, Enum):
    sgl = "sgl"
    cls = "cls"
    fastv = "fastv"
    random = "random"
    all = "all"


GUIDES = ("sgl", "cls", "fastv", "random")  # the order of --guide all
LARGE_GUIDES = ("cls", "fastv")  # they rank with the large model itself


def inspect(
    image: Path = typer.Argument(..., help="Image file.", show_default=False),
    question: str = typer.Option(..., "--question", help="The question to ask about the image.", show_default=False),
    guide: Guide = typer.Option(Guide.sgl, "--guide", help="What ranks the visual tokens (see the list above; "
                                "fastv runs the large model's language model on the prompt by nature)."),
    preset: Optional[str] = typer.Option(None, "--preset", "-p",
                                         help="Preset name or YAML file (default: the built-in pair)."),
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
    threads: Optional[int] = typer.Option(None, help="Torch CPU threads."),
) -> None:
    """Show which visual tokens matter for one image and question, and which the large model would keep."""
    with domain_errors():
        _inspect(image, question, guide, preset, retain, png, as_json, answer_large, threads)


with_help(inspect, EXAMPLE)


def _inspect(image_path: Path, question: str, guide: Guide, preset_name: Optional[str], retain: Optional[float],
             png: Optional[Path], as_json: bool, answer_large: bool, threads: Optional[int]) -> None:
    from ..engine.errors import ItemError, SglError
    from ..engine.items import load_image
    from ..engine.preset import load_preset

    if not question.strip():
        raise SglError("--question must not be empty")
    preset = load_preset(preset_name).with_settings(retain=retain)
    preset, calibration = _calibrated(preset)
    if png is not None and not png.parent.is_dir():
        raise SglError(f"--png {png}: folder {png.parent} does not exist")
    guides = list(GUIDES) if guide is Guide.all else [guide.value]
    skipped: dict[str, str] = {}
    if preset.small is None and "sgl" in guides:
        if guide is Guide.sgl:
            raise SglError(f"preset {preset.name!r} names no small model, which the sgl guide needs "
                           "(use --guide cls, fastv, random or all)")
        guides.remove("sgl")
        skipped["sgl"] = f"preset {preset.name} names no small model, which it needs"
    item = _CommandLineItem(line=1, id=image_path.name, image=image_path, question=question.strip())
    try:  # before the models load: a bad image fails at once
        image = load_image(item)
    except ItemError as exc:
        raise SglError(str(exc)) from None

    from ..engine.heatmap import render, save_png

    set_threads(threads)
    result = _analyze(preset, item, image, guides, skipped, guide.value, answer_large)
    result.calibration = calibration
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


def _analyze(preset, item: Item, image, guides: list[str], skipped: dict[str, str], asked: str,
             answer_large: bool):
    """Load what the guides need, run them on the one item and return the Inspection."""
    import torch

    from ..engine.engine import Engine, n_keep, top_k_in_order
    from ..engine.errors import SglError
    from ..engine.heatmap import WHAT, GuideMap, Inspection
    from ..engine.models import load_model

    settings = preset.settings
    small = load_model(preset.small, "small") if preset.small is not None else None
    # The large model loads only when a guide ranks with it, its answer is asked for, or there is no small model
    # to read the token grid with: a 72B checkpoint is not loaded just to look at the sgl heatmap.
    real_large = small is None or answer_large or any(g in LARGE_GUIDES for g in guides)
    large = load_model(preset.large, "large") if real_large else small
    # Standing in for the large model, the small one cannot check the preset's prune layer against it.
    base_settings = settings if real_large else dataclasses.replace(settings, prune_layer=0)
    engines = {g: Engine(dataclasses.replace(base_settings, guide=g), small, large, preset) for g in guides}
    base = engines[guides[0]]
    if base.random_weights:
        err("sgl: warning: the built-in pair has random weights: its answers and importance are noise; "
            "use --preset with real checkpoints.")

    with torch.inference_mode():
        (work,) = base.analyze([item])
        if work.error:
            raise SglError(work.error)
        grids = _grids(large, work.enc_large, image.size)
        n = int(work.visual.sum())
        cells = sorted(int(t) for g in grids for t in g.tokens.flat)
        if cells != list(range(n)):
            shapes = " + ".join(g.label for g in grids)
            raise SglError(f"the token grids {shapes} do not match the {n} visual tokens")
        k = n_keep(n, settings.retain)
        large_rows = None
        if answer_large or any(g in LARGE_GUIDES for g in guides):
            large_rows = _guarded("the large model's vision tower", lambda: base.large_rows(
                [work], cls_scores="cls" in guides))
        sgl_kept = set(top_k_in_order(work.importance, k).tolist()) if small is not None else None
        maps = []
        for g in guides:
            eng = engines[g]
            # (A stand-in large model runs only sgl or random, whose prune layer is the preset's.)
            prune_layer = eng.guide.prune_layer(eng) if real_large else settings.prune_layer
            gen = None
            if g == "fastv":
                # FastV ranks inside the large model's prefill; one new token suffices unless its answer is shown.
                run = eng if answer_large else Engine(dataclasses.replace(eng.settings, max_new_tokens=1), small,
                                                      large, preset)
                gen, (kept,) = _guarded("the fastv guide", lambda: eng.guide.generate(run, [work], large_rows,
                                                                                       settings.retain))
                scores = work.scores["fastv"]
            else:
                (scores,) = eng.guide.scores(eng, [work])
                kept = eng.guide.kept(eng, work, scores, settings.retain)
                if answer_large:
                    gen, _ = _guarded(f"the large model ({g}'s kept tokens)", lambda: eng.guide.generate(
                        eng, [work], large_rows, settings.retain))
            kept = kept.tolist()
            what = WHAT[g].format(k=prune_layer, k_1=prune_layer - 1, seed=settings.seed)
            maps.append(GuideMap(
                name=g, importance=scores.tolist(), kept=kept, prune_layer=prune_layer, what=what,
                large_answer=eng._decode(large, gen.tokens[0]) if answer_large else None,
                sgl_overlap=None if sgl_kept is None or g == "sgl" else len(sgl_kept.intersection(kept)),
            ))

    return Inspection(
        image=item.image, image_size=image.size, question=item.question, guide=asked, preset=preset.name,
        threshold=settings.threshold, retain=settings.retain, grids=grids, maps=maps, skipped=skipped,
        small_answer=base._decode(small, work.small_tokens) if small is not None else None,
        confidence=base.confidence(work) if small is not None else None,
        consistency=work.consistency,
        exit_score=base.exit_score(work) if small is not None else None,
    )


def _grids(model, enc: dict, image_size: tuple[int, int]):
    """The image's token grids as the family lays them out, for drawing."""
    from ..engine.errors import SglError
    from ..engine.heatmap import Grid

    try:
        grids = model.family.token_grids(model.model, enc, image_size, model.processor)
    except ValueError as exc:
        raise SglError(f"cannot lay out the image's visual tokens: {exc}") from None
    return [Grid(g.name, g.tokens.numpy(), g.crops.numpy(), g.about, g.crop_grid) for g in grids]


def _calibrated(preset):
    """The preset with the threshold of its `calibration:` file, as `sgl run` takes it, and that file's path (None
    without one). Retain, prune layer and guide may differ from the file's: inspect varies them."""
    from ._common import calibrated_threshold, preset_calibration

    path = preset_calibration(preset)
    if path is None:
        return preset, None
    return preset.with_settings(threshold=calibrated_threshold(preset, path, quiet=False)), str(path)


def _guarded(what: str, fn):
    """`fn()`, its failure one line: a preset setting it cannot run with, or a model error."""
    from ..engine.errors import SglError

    try:
        return fn()
    except SglError:
        raise
    except (ValueError, NotImplementedError) as exc:  # a setting or family the guide cannot run with: it says
        raise SglError(str(exc)) from None
    except (RuntimeError, IndexError) as exc:
        detail = traceback.format_exception_only(type(exc), exc)[-1].strip()
        raise SglError(f"{what} failed: {detail}") from None


class _CommandLineItem(Item):
    """The item is the command line itself: its errors need no line number."""

    def fail(self, message: str) -> str:
        return message
