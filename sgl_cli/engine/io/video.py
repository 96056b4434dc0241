"""An item's video as sampled RGB frames, within bounds; or an ItemError naming the video and the reason.

Decoding is PyAV's (FFmpeg's decoders in a wheel with no system FFmpeg: every container and codec a user's
footage comes in, the same wheels on Linux, macOS and Windows; torchcodec needs a matching torch and a system
FFmpeg, and transformers' own video loading decodes every frame). sgl samples the frames itself, at the family's
rate (`VideoLimits.fps`, Qwen's 2 per second by default) up to `max_frames`, and hands them to the processor with
their timing (`Video.fps`), so the processor does no sampling of its own and the temporal positions it computes
follow the footage's clock.

Bounds, each a refusal that names the video: a video longer than `max_seconds`, a frame larger than `max_pixels`,
decoding that takes longer than `timeout_s` (a wall-clock deadline checked between frames), an empty, damaged or
unreadable file. A list of frame images is a video too: its frames are read as images are, one per `1 / fps`
seconds.
"""

from __future__ import annotations

import io
import os
import time
from dataclasses import dataclass, field

from ..errors import ItemError
from .images import load_image, source_of
from .items import Item, VideoRef

SEEK_GAP_S = 4.0  # between sampled frames further apart than this, seek (to a keyframe) rather than decode through
END_SLACK_S = 1.0  # a stream whose frames end more than this before a sampled time is truncated, not just ending


@dataclass(frozen=True)
class VideoLimits:
    """How a video is sampled and what decoding one may cost (a preset's `video:` section; an item's own `fps` and
    `max_frames` take precedence over the first two)."""

    fps: float = 2.0  # frames sampled per second of footage
    max_frames: int = 64  # at most this many frames, spread evenly over the whole video when it has more
    max_seconds: float = 600.0  # a longer video is refused (sample a clip of it, or raise this)
    max_pixels: int = 3840 * 2160  # per frame, as stored (an 8K frame is refused, not decoded)
    timeout_s: float = 120.0  # wall-clock time to decode one video's sampled frames

    def __post_init__(self) -> None:
        if not self.fps > 0:
            raise ValueError(f"video fps must be positive, got {self.fps}")
        if self.max_frames < 1:
            raise ValueError(f"video max_frames must be at least 1, got {self.max_frames}")


@dataclass
class Video:
    """Sampled frames and their timing: what the processor is given."""

    frames: list  # RGB PIL images, in time order
    times: list[float]  # seconds from the start, per frame
    fps: float  # frames per second of the sampled frames (what the processor's temporal positions use)
    duration: float  # seconds of footage the frames span
    label: str = ""
    size: tuple[int, int] = field(default=(0, 0))  # (width, height) of a frame

    @property
    def metadata(self) -> dict:
        """transformers' `VideoMetadata` fields for the sampled frames."""
        return {"total_num_frames": len(self.frames), "fps": self.fps, "duration": self.duration,
                "frames_indices": list(range(len(self.frames)))}


def sample_times(duration: float, fps: float, max_frames: int) -> list[float]:
    """The times (seconds) to sample a video of `duration` at: one every `1 / fps` seconds from the start, each at
    the middle of its interval; when that is more than `max_frames`, `max_frames` spread evenly over the whole
    video instead. At least one frame."""
    n = max(1, min(max_frames, round(duration * fps)))
    step = duration / n
    return [step * (i + 0.5) for i in range(n)]


def load_video(item: Item, fetcher=None, limits: VideoLimits | None = None) -> Video:
    """The item's video, sampled (see the module docstring), or ItemError with the reason."""
    ref: VideoRef = item.video
    limits = limits or VideoLimits()
    fps = ref.fps or limits.fps
    max_frames = ref.max_frames or limits.max_frames
    if ref.frames:
        return _frame_list(item, ref, fetcher, fps, max_frames)
    try:
        import av  # noqa: F401 - the decoder, an optional dependency
    except ImportError:
        raise ItemError(item.fail(f"video '{ref.label}': decoding a video needs PyAV (pip install "
                                  "'sgl-cli[video]')")) from None
    source = _source(item, ref, fetcher)
    try:
        return decode_video(source, fps, max_frames, limits, ref.label)
    except _Refused as exc:
        raise ItemError(item.fail(f"video '{ref.label}' {exc}")) from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure is this video's, not the run's
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ItemError(item.fail(f"video '{ref.label}' cannot be read ({detail})")) from None


def _frame_list(item: Item, ref: VideoRef, fetcher, fps: float, max_frames: int) -> Video:
    """Frame images shown one per `1 / fps` seconds; more than `max_frames` of them: `max_frames` spread evenly
    (the middle one of each equal share), at the rate that spans the same time."""
    refs = list(ref.frames)
    duration = len(refs) / fps
    if len(refs) > max_frames:
        refs = [refs[int((i + 0.5) * len(refs) / max_frames)] for i in range(max_frames)]
        fps = len(refs) / duration
    frames = [load_image(item, f, fetcher) for f in refs]
    sizes = {im.size for im in frames}
    if len(sizes) > 1:
        named = ", ".join(sorted(f"{w}x{h}" for w, h in sizes))  # not inside the f-string: Python < 3.12
        raise ItemError(item.fail(f"video '{ref.label}': its frames differ in size ({named}); a video's frames "
                                  "share one size"))
    return Video(frames, [(i + 0.5) / fps for i in range(len(frames))], fps, duration, ref.label, frames[0].size)


def _source(item: Item, ref: VideoRef, fetcher):
    """A path or a bytes buffer to decode (the checks images get: regular files, sizes, schemes)."""
    return source_of(item, ref.source, fetcher, what="video")


class _Refused(ValueError):
    """A video sgl will not decode (the message completes "video 'x' ...")."""


def decode_video(source, fps: float, max_frames: int, limits: VideoLimits, label: str = "") -> Video:
    """Sampled RGB frames of the video at `source` (a path or a file object), or _Refused / a decoder error."""
    import av

    deadline = time.monotonic() + limits.timeout_s
    if not (source.getbuffer().nbytes if isinstance(source, io.BytesIO) else os.path.getsize(source)):
        raise _Refused("is empty (0 bytes)")
    try:
        container = av.open(source if isinstance(source, io.BytesIO) else str(source), mode="r",
                            timeout=(limits.timeout_s, limits.timeout_s))
    except av.error.InvalidDataError:
        raise _Refused("cannot be read: it is not a video in a format sgl reads (FFmpeg found no container)") \
            from None
    with container:
        if not container.streams.video:
            raise _Refused("has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        w, h = stream.codec_context.width, stream.codec_context.height
        if w * h > limits.max_pixels:
            raise _Refused(f"has {w}x{h} frames, over the {limits.max_pixels:,}-pixel limit per frame")
        duration = _duration(container, stream)
        if duration is not None and duration > limits.max_seconds:
            raise _Refused(f"is {duration:,.0f} s long, over the {limits.max_seconds:g} s limit (cut a clip, or "
                           "raise video.max_seconds)")
        if duration is None or duration <= 0:
            duration = _scan_duration(container, stream, limits, deadline)
            container.seek(0)
        # Never more samples than the footage has frames (a rate above its own would repeat frames, and tokens).
        own = stream.frames or (round(duration * float(stream.average_rate)) if stream.average_rate else 0)
        times = sample_times(duration, fps, min(max_frames, own) if own > 0 else max_frames)
        frames = _frames_at(container, stream, times, deadline, limits)
    if not frames:
        raise _Refused("has no frames that decode")
    got = [t for t, _ in frames]
    images = [im for _, im in frames]
    return Video(images, got, len(images) / duration, duration, label, images[0].size)


def _duration(container, stream) -> float | None:
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / 1_000_000
    return None


def _scan_duration(container, stream, limits: VideoLimits, deadline: float) -> float:
    """A stream that states no duration (raw streams, some WebM): the last frame's end, found by demuxing."""
    end = 0.0
    for packet in container.demux(stream):
        _check(deadline, limits)
        if packet.pts is not None and packet.time_base:
            end = max(end, float((packet.pts + (packet.duration or 0)) * packet.time_base))
            if end > limits.max_seconds:
                raise _Refused(f"is over the {limits.max_seconds:g} s limit (cut a clip, or raise "
                               "video.max_seconds)")
    if end <= 0:
        raise _Refused("has no frames that decode")
    return end


def _check(deadline: float, limits: VideoLimits) -> None:
    if time.monotonic() > deadline:
        raise _Refused(f"took over {limits.timeout_s:g} s to decode")


def _frames_at(container, stream, times: list[float], deadline: float, limits: VideoLimits) -> list:
    """(time, RGB image) of the frame shown at each of `times`: the last frame starting at or before it."""
    out: list = []
    want = 0
    last = None  # the latest decoded frame before the wanted time: (time, av frame)

    def take(frame_time: float, frame) -> None:
        out.append((frame_time, frame.to_image()))

    position = -1.0
    while want < len(times):
        if times[want] - max(position, 0.0) > SEEK_GAP_S:
            container.seek(int(times[want] / stream.time_base), stream=stream, backward=True, any_frame=False)
            last = None
        for frame in container.decode(stream):
            _check(deadline, limits)
            if frame.time is None:
                continue
            position = frame.time
            while want < len(times) and frame.time > times[want]:
                take(*(last if last is not None else (frame.time, frame)))
                want += 1
            last = (frame.time, frame)
            if want < len(times) and times[want] - position > SEEK_GAP_S:
                break  # seek ahead
            if want >= len(times):
                break
        else:  # the stream ended: the last frame is shown until the end
            # ... unless the frames stop well before the sampled times (a cut-off file whose index, at its start,
            # promises more): refuse it rather than answer from one frame repeated, or from fewer frames.
            end = last[0] + _frame_seconds(last[1], stream) if last is not None else None
            if want < len(times) and (end is None or times[-1] > end + END_SLACK_S):
                raise _Refused(f"has frames only up to {end or 0:.2f} s of the {times[-1]:.2f} s sampled: it is "
                               "truncated or damaged")
            while want < len(times) and last is not None:
                take(*last)
                want += 1
            break
    return out


def _frame_seconds(frame, stream) -> float:
    """How long a decoded frame is shown (its stated duration, else one frame at the stream's rate, else 0)."""
    if getattr(frame, "duration", None) and frame.time_base:
        return float(frame.duration * frame.time_base)
    rate = stream.average_rate or stream.guessed_rate
    return float(1 / rate) if rate else 0.0
