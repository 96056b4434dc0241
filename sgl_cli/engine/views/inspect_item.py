"""`sgl inspect` as a library function: one image (or several), a video, or both, and a question, ranked by each
guide.

    inspection, images = inspect_item(load_preset("default"), [Path("photo.jpg")], "What is blue?", guide="all")
    inspection, pictures = inspect_item(preset, [], "What moves?", video=Path("clip.mp4"), fps=1)

It resolves the preset's calibration for inspection (`engine/calibration.py`, purpose "inspect"), loads only what
the guides need (no large model for rankings that need none: the small model lays out the tokens), runs the
comparison `sgl eval` runs on the one item, and gives the `Inspection` the views draw.
"""

from __future__ import annotations

import dataclasses
import string
import traceback
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import ItemError, SettingError, SglError
from ..guides import guide_class, usable_guides
from ..guides.base import Kind, require_small
from ..io.items import MAX_VIDEO_FRAMES, ImageRef, Item, VideoRef
from ..preset import Preset

MAX_FPS = 60.0  # as an item's `fps` field


def inspect_item(preset: Preset, image_paths: list[Path], question: str, guide: str = "sgl", *,
                 video: Path | None = None, fps: float | None = None, max_frames: int | None = None,
                 answer_large: bool = False, notify: Callable[[str], None] | None = None,
                 on_random_weights: Callable[[], None] | None = None, before_load: Callable[[], None] | None = None):
    """The `Inspection` of `question` about the images (and `video`, sampled at `fps` up to `max_frames`, by
    default the preset's `video_fps` and `video_max_frames`) under `guide` (a guide's name, or "all"), and the
    pictures its grids are drawn on: the images, then the first sampled frame of each of the video's temporal
    patches (`TokenGrid.image` indexes them). Every usage error (an empty question, a guide the preset cannot run,
    a bad image or video) is raised before a model loads; `before_load` is called just before (threads, say)."""
    from ..calibration import resolve_calibration

    if not question.strip():
        raise SettingError("{} must not be empty", "question")
    if not image_paths and video is None:
        raise SettingError("give an image or a {}", "video")
    if video is None and (fps is not None or max_frames is not None):
        raise SettingError("{} is given without a video", "fps" if fps is not None else "max_frames")
    if fps is not None and not 0 < fps <= MAX_FPS:
        raise SettingError(f"{{}} must be above 0 and at most {MAX_FPS:g} frames per second, got {fps:g}", "fps")
    if max_frames is not None and not 1 <= max_frames <= MAX_VIDEO_FRAMES:
        raise SettingError(f"{{}} must be from 1 to {MAX_VIDEO_FRAMES}, got {max_frames}", "max_frames")
    # `all` compares rankings of the image's own tokens; a guide that reduces the input has other tokens.
    guides = [g for g in usable_guides() if guide_class(g).kind is not Kind.REDUCES] if guide == "all" else [guide]
    resolved = resolve_calibration(preset, "inspect", notify=notify)
    preset = resolved.preset
    skipped: dict[str, str] = {}
    if preset.small is None:
        for g in [g for g in guides if guide_class(g).needs_small]:
            if guide != "all":
                require_small(guide_class(g), False, preset.name, also=("all",))
            guides.remove(g)
            skipped[g] = f"preset {preset.name} names no small model, which it needs"
    from ..backends import check_preset, missing

    if guide == "all":  # every guide the large backend can run; each one asked for by name must
        for g in [g for g in guides if missing(preset, g)]:
            guides.remove(g)
            skipped[g] = f"the {preset.large.backend} large backend lacks {', '.join(sorted(missing(preset, g)))}"
    if video is not None:
        _video_guides(guides, skipped, guide)
    check_preset(preset, guides)
    settings = preset.settings
    ref = None if video is None else VideoRef(ImageRef.path(video), fps=settings.video_fps if fps is None else fps,
                                              max_frames=settings.video_max_frames if max_frames is None
                                              else max_frames)
    item = CommandLineItem(line=1, id=(image_paths[0] if image_paths else video).name,
                           images=[ImageRef.path(p) for p in image_paths], video=ref, question=question.strip())
    from ..io.images import load_images
    from ..io.video import VideoLimits, load_video

    try:  # before the models load: a bad image or video fails at once
        images = load_images(item) if item.images else []
        sampled = None if ref is None else load_video(
            item, limits=VideoLimits(fps=settings.video_fps, max_frames=settings.video_max_frames))
    except ItemError as exc:
        raise SglError(str(exc)) from None
    if before_load is not None:
        before_load()
    result = _analyze(preset, item, images, guides, skipped, guide, answer_large, on_random_weights, sampled)
    result.calibration = None if resolved.point is None else str(resolved.point.path)
    return result, images + _patch_frames(result)


def _video_guides(guides: list[str], skipped: dict[str, str], asked: str) -> None:
    """Leave out (`all`) or refuse (one asked for by name) the guides that cannot rank a video's tokens: one that
    reduces the large model's input (downsample resizes images, not a video's frames) and one that reads the
    vision tower's attention (cls: the tower's images only)."""
    for g in list(guides):
        cls = guide_class(g)
        why = ("it resizes the images the large model sees, not a video's frames" if cls.kind is Kind.REDUCES
               else "it reads the vision tower's attention over images only" if "vision_attention" in cls.needs
               else None)
        if why is None:
            continue
        if asked != "all":
            raise SettingError(f"the {g} guide does not rank a video's tokens ({why}); choose another {{}}", "guide")
        guides.remove(g)
        skipped[g] = f"no video: {why}"


def _patch_frames(result) -> list:
    """The first sampled frame of each of the video's temporal patches (what its grid is drawn on)."""
    if result.video is None:
        return []
    frames = result.video.frames
    return [frames[(result.patch_frames(g) or [len(frames) - 1])[0]] for g in result.video_grids]


def _analyze(preset, item: Item, images: list, guides: list[str], skipped: dict[str, str], asked: str,
             answer_large: bool, on_random_weights, sampled=None):
    """Load what the guides need, run them on the one item (the comparison `sgl eval` runs) and return the
    Inspection."""
    from ..pipeline.engine import Engine
    from ..guides import make_guide

    settings = preset.settings
    made = {g: make_guide(g, settings) for g in guides}
    # The large model loads only when a guide ranks with it, its answer is asked for, or there is no small model
    # to read the token grid with: a 72B checkpoint is not loaded just to look at the sgl heatmap.
    real_large = preset.small is None or answer_large or any(g.uses_large for g in made.values())
    engine = Engine.load(dataclasses.replace(preset, settings=dataclasses.replace(settings, guide=guides[0])),
                         small=True, large=real_large)
    try:
        return _inspect_loaded(engine, preset, item, images, guides, made, skipped, asked, answer_large,
                               on_random_weights, sampled)
    finally:
        engine.close()  # vLLM's engine processes end here


def _inspect_loaded(engine, preset, item: Item, images: list, guides: list[str], made: dict,
                    skipped: dict[str, str], asked: str, answer_large: bool, on_random_weights, sampled=None):
    from ..evaluation.compare import Comparison
    from ..guides.base import n_keep, top_k_in_order
    from .inspection import GuideMap, Inspection, VideoInfo

    settings = preset.settings
    small, large = engine.small, engine.large
    if engine.random_weights and on_random_weights is not None:
        on_random_weights()
    comparison = Comparison(engine, [(g, settings.retain) for g in guides])
    batch = _guarded("the large model", lambda: comparison.batch([item], answers=answer_large, large_alone=False))
    (work,) = batch.works
    if work.error:
        raise SglError(work.error)
    (first,) = batch.outcomes[(guides[0], settings.retain)]
    reduced = first.reduced if made[guides[0]].kind is Kind.REDUCES else None  # one guide alone (`all` has none)
    if reduced is not None:  # the grid of what the large model saw
        grids = _guarded("the large model", lambda: reduced.grids(large))
        n = reduced.n_visual
    else:
        grids = _grids(large, work.encoded.large, [im.size for im in images])
        n = work.encoded.n_visual
    video = None
    if item.video is not None:
        sampled = getattr(work.encoded, "video", None) or sampled  # the frames the model was given
        video = VideoInfo(path=item.video.source.value, size=tuple(sampled.size), fps=sampled.fps,
                          duration=sampled.duration, times=[float(t) for t in sampled.times],
                          frames=list(sampled.frames))
        grids = _video_grids(grids, len(images), video)
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
        scores, kept = outcome.ranking()
        kept = kept.tolist()
        maps.append(GuideMap(
            name=g, importance=scores.tolist(), kept=kept, prune_layer=k,
            what=_describe(guide, k, settings.seed), large_answer=outcome.answer if answer_large else None,
            sgl_overlap=None if sgl_kept is None or g == "sgl" or reduced is not None
            else len(sgl_kept.intersection(kept)),
            can_exit=guide.needs_small, noun=guide.score_noun,
        ))
    s = work.small
    first = (item.images[0].value, images[0].size) if images else (video.path, video.size)
    return Inspection(
        image=first[0], image_size=first[1], question=item.question, guide=asked, preset=preset.name,
        threshold=settings.threshold, retain=settings.retain, grids=grids, maps=maps, skipped=skipped,
        small_answer=s.answer if s else None, confidence=s.confidence if s else None,
        consistency=s.consistency if s else None, exit_score=s.exit_score if s else None,
        images=[ref.value for ref in item.images], image_sizes=[im.size for im in images],
        full_tokens=work.encoded.n_visual if reduced is not None else None,
        seen_sizes=list(reduced.image_sizes) if reduced is not None and reduced.pooled is None else [],
        pooled_from=reduced.pooled_from if reduced is not None else None, video=video,
    )


def _video_grids(grids: list, n_images: int, video) -> list:
    """The family's grids with the video's: one per temporal patch, after the images (`TokenGrid.image`), each its
    own crop (numbered by its picture, as the images' are), so that a token's crop names its picture. A family
    that laid the video out otherwise (no grid per temporal patch) is an error, not a wrong picture."""
    patches = [g for g in grids if g.image >= n_images]
    if not 1 <= len(patches) <= video.n_frames:
        raise SglError(f"cannot lay out the video's visual tokens: {len(patches)} temporal patch grids for "
                       f"{video.n_frames} sampled frames")
    return [dataclasses.replace(g, crops=np.full_like(g.crops, g.image)) if g.image >= n_images else g
            for g in grids]


def _describe(guide, k: int, seed: int) -> str:
    """The guide's description with its prune layer and seed filled in (unknown fields left as written)."""

    class Keep(dict):
        def __missing__(self, key):
            return "{" + key + "}"

    return string.Formatter().vformat(guide.description, (), Keep(k=k, k_1=k - 1, seed=seed))


def _grids(model, enc: dict, image_sizes: list[tuple[int, int]]):
    """The images' token grids as the family lays them out, for drawing."""

    try:
        return model.family.token_grids(model.model, enc, image_sizes, model.processor)
    except ValueError as exc:
        raise SglError(f"cannot lay out the image's visual tokens: {exc}") from None
    except StopIteration:  # the family met more runs of visual tokens in the prompt than it has grids for
        raise SglError(f"cannot lay out the visual tokens: the {model.family.name} family found more runs of them "
                       "in the prompt than images and videos") from None


def _guarded(what: str, fn):
    """`fn()`, its failure one line: a preset setting it cannot run with, or a model error."""
    try:
        return fn()
    except SglError:
        raise
    except (ValueError, NotImplementedError) as exc:  # a setting or family the guide cannot run with: it says
        raise SglError(str(exc)) from None
    except (RuntimeError, IndexError) as exc:
        detail = traceback.format_exception_only(type(exc), exc)[-1].strip()
        raise SglError(f"{what} failed: {detail}") from None


class CommandLineItem(Item):
    """The item is the command line itself: its errors need no line number."""

    def fail(self, message: str) -> str:
        return message
