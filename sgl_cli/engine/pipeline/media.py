"""An item's media for the models: its video, sampled where the pair takes one, and its encoding through a
family's processor (a video's refusals as the item's error)."""

from __future__ import annotations

from ..backends import backend_label
from ..errors import ItemError
from ..io.items import Item


def item_video(item: Item, models, settings, fetcher):
    """The item's video, sampled at the settings' `video_fps` up to `video_max_frames` (its own `fps` and
    `max_frames` first); None when it has none. Refused (ItemError) where a model of the pair cannot take one."""
    if item.video is None:
        return None
    small = models[0]
    for m in models:
        if m is not None and not (m.takes_video and m.family.takes_video):
            raise ItemError(item.fail(f"video items are not supported on the {backend_label(m)} {m.family.name} "
                                      f"{'small' if m is small else 'large'} model yet (sgl runs video on Qwen2-VL, "
                                      "Qwen2.5-VL and Qwen3-VL with transformers, and on Qwen2-VL and Qwen2.5-VL "
                                      "with vLLM)"))
    from ..io.video import VideoLimits, load_video

    return load_video(item, fetcher, VideoLimits(fps=settings.video_fps, max_frames=settings.video_max_frames))


def encode_item(item: Item, family, processor, images, prompt, video) -> dict:
    """`family.encode` of the item's images (and video); a processor that cannot take the video (no video processor:
    torchvision missing) is the item's error naming the video."""
    if video is None:
        return family.encode(processor, images, prompt)
    try:
        return family.encode(processor, images, prompt, video=video)
    except ValueError as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ItemError(item.fail(f"video '{video.label}': {reason}")) from None
