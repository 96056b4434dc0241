"""`sgl inspect IMAGE --question Q`: which visual tokens each guide finds important and which the large model keeps."""

from __future__ import annotations

import json
import string
import traceback
from pathlib import Path
from typing import List, Optional

import typer

from ..engine.guides import guide_names  # light: no torch
from ..engine.io.items import Item  # light: no torch
from ._common import domain_errors, err, note, set_threads, warn_random_weights, with_help
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
    from ..engine.errors import ItemError, SglError
    from ..engine.guides import guide_class
    from ..engine.io.images import load_images
    from ..engine.io.items import ImageRef
    from ..engine.preset import load_preset
    from .options import check_guides

    if not question.strip():
        raise SglError("--question must not be empty")
    # `all` compares rankings of the image's own tokens; a guide that reduces the input has other tokens.
    guides = [g for g in guide_names() if not guide_class(g).reduces_input] if guide == "all" \
        else check_guides([guide])
    preset = load_preset(preset_name).with_settings(retain=retain)
    preset, calibration = _calibrated(preset)
    if png is not None and not png.parent.is_dir():
        raise SglError(f"--png {png}: folder {png.parent} does not exist")
    skipped: dict[str, str] = {}
    if preset.small is None:
        for g in [g for g in guides if guide_class(g).needs_small]:
            if guide != "all":
                raise SglError(f"preset {preset.name!r} names no small model, which the {g} guide needs "
                               "(use --guide cls, fastv, random or all)")
            guides.remove(g)
            skipped[g] = f"preset {preset.name} names no small model, which it needs"
    item = _CommandLineItem(line=1, id=image_paths[0].name, images=[ImageRef.path(p) for p in image_paths],
                            question=question.strip())
    try:  # before the models load: a bad image fails at once
        images = load_images(item)
    except ItemError as exc:
        raise SglError(str(exc)) from None

    set_threads(threads)
    result = _analyze(preset, item, images, guides, skipped, guide, answer_large)
    result.calibration = calibration
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


def _analyze(preset, item: Item, images: list, guides: list[str], skipped: dict[str, str], asked: str,
             answer_large: bool):
    """Load what the guides need, run them on the one item (the comparison `sgl eval` runs) and return the
    Inspection."""
    import dataclasses

    from ..engine.core.engine import Engine
    from ..engine.core.models import load_model
    from ..engine.errors import SglError
    from ..engine.evaluation.compare import Comparison
    from ..engine.guides import make_guide
    from ..engine.guides.base import n_keep, top_k_in_order
    from ..engine.views.inspection import GuideMap, Inspection

    settings = preset.settings
    made = {g: make_guide(g, settings) for g in guides}
    small = load_model(preset.small, "small") if preset.small is not None else None
    # The large model loads only when a guide ranks with it, its answer is asked for, or there is no small model
    # to read the token grid with: a 72B checkpoint is not loaded just to look at the sgl heatmap.
    real_large = small is None or answer_large or any(g.uses_large for g in made.values())
    large = load_model(preset.large, "large") if real_large else small
    # Standing in for the large model, the small one cannot check the preset's prune layer against it.
    base = settings if real_large else dataclasses.replace(settings, prune_layer=0)
    engine = Engine(dataclasses.replace(base, guide=guides[0]), small, large, preset)
    if engine.random_weights:
        warn_random_weights("answers and importance")
    comparison = Comparison(engine, [(g, settings.retain) for g in guides])
    batch = _guarded("the large model", lambda: comparison.run([item], answers=answer_large, large_alone=False))
    (work,) = batch.works
    if work.error:
        raise SglError(work.error)
    (first,) = batch.outcomes[(guides[0], settings.retain)]
    reduced = first.reduced if made[guides[0]].reduces_input else None  # one guide alone (`all` has none)
    if reduced is not None:  # the grid of what the large model saw
        grids = _guarded("the large model", lambda: reduced.grids(large))
        n = reduced.n_visual
    else:
        grids = _grids(large, work.encoded.large, [im.size for im in images])
        n = work.encoded.n_visual
    cells = sorted(int(t) for g in grids for t in g.tokens.flat)
    if cells != list(range(n)):
        shapes = " + ".join(g.label for g in grids)
        raise SglError(f"the token grids {shapes} do not match the {n} visual tokens")
    sgl_kept = set(top_k_in_order(work.small.importance, n_keep(n, settings.retain)).tolist()) \
        if small is not None else None
    maps = []
    for g, guide in made.items():
        (outcome,) = batch.outcomes[(g, settings.retain)]
        # (A stand-in large model runs only guides that do not rank with the large model; their K is the preset's.)
        k = guide.prune_layer(settings, large.num_layers)
        kept = outcome.kept.tolist()
        maps.append(GuideMap(
            name=g, importance=outcome.scores.tolist(), kept=kept, prune_layer=k,
            what=_describe(guide, k, settings.seed), large_answer=outcome.answer if answer_large else None,
            sgl_overlap=None if sgl_kept is None or g == "sgl" or reduced is not None
            else len(sgl_kept.intersection(kept)),
            can_exit=guide.needs_small, noun=guide.score_noun,
        ))
    s = work.small
    return Inspection(
        image=item.images[0].value, image_size=images[0].size, question=item.question, guide=asked, preset=preset.name,
        threshold=settings.threshold, retain=settings.retain, grids=grids, maps=maps, skipped=skipped,
        small_answer=s.answer if s else None, confidence=s.confidence if s else None,
        consistency=s.consistency if s else None, exit_score=s.exit_score if s else None,
        images=[ref.value for ref in item.images], image_sizes=[im.size for im in images],
        full_tokens=work.encoded.n_visual if reduced is not None else None,
        seen_sizes=list(reduced.image_sizes) if reduced is not None and reduced.pooled is None else [],
        pooled_from=reduced.pooled_from if reduced is not None else None,
    )


def _describe(guide, k: int, seed: int) -> str:
    """The guide's description with its prune layer and seed filled in (unknown fields left as written)."""

    class Keep(dict):
        def __missing__(self, key):
            return "{" + key + "}"

    return string.Formatter().vformat(guide.description, (), Keep(k=k, k_1=k - 1, seed=seed))


def _grids(model, enc: dict, image_sizes: list[tuple[int, int]]):
    """The images' token grids as the family lays them out, for drawing."""
    from ..engine.errors import SglError

    try:
        return model.family.token_grids(model.model, enc, image_sizes, model.processor)
    except ValueError as exc:
        raise SglError(f"cannot lay out the image's visual tokens: {exc}") from None


def _calibrated(preset):
    """The preset with its `calibration:` file's threshold, and its retain and prune layer unless given (as `sgl eval
    --calibration` takes them), and that file's path (None without one). The guide may differ from the file's."""
    from ..engine.evaluation.fingerprint import calibration_point, preset_calibration_path

    path = preset_calibration_path(preset)
    if path is None:
        return preset, None
    point = calibration_point(preset, path, note)
    taken = {"retain": point.retain, "prune_layer": point.prune_layer}
    taken = {k: v for k, v in taken.items() if v is not None and k not in preset.overridden}
    if taken:
        note(" and ".join(f"{k.replace('_', ' ')} {v:g}" for k, v in taken.items()) + f" from the calibration {path}")
    return preset.with_settings(threshold=point.threshold, **taken), str(path)


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
