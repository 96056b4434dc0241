"""What `sgl inspect` shows, as data: one image's visual-token importance per guide, on the image's own token grids,
and the small model's answer and SEE scores. An item with a video has a grid per temporal patch of the video (two
sampled frames, one picture after the item's images: `TokenGrid.image`), drawn on the patch's first frame. The
terminal (`terminal.py`) and PNG (`png.py`) views draw it; its `to_json` is `sgl inspect --json`.

Every view colours a token by its share of its guide's scores over the whole image (score / sum), on a linear
scale from that guide's smallest to its largest share; the tokens the large model would keep are marked. With
several guides each map has its own scale, and each guide's kept set is compared with sgl's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..families.base import TokenGrid

COLORMAP = "inferno"


@dataclass
class GuideMap:
    """One guide's ranking of the image's visual tokens."""

    name: str  # the guide's registered name
    importance: list[float]  # one per visual token, in sequence order (placeholders without newlines)
    kept: list[int]  # indices the large model keeps at `retain`, in order
    prune_layer: int = 0  # where the large model drops the other tokens (0: before the language model)
    what: str = ""  # what the scores are, one line
    large_answer: str | None = None  # the large model's answer from `kept` (--answer-large)
    sgl_overlap: int | None = None  # how many of `kept` sgl keeps too (None: sgl itself, or no small model)
    can_exit: bool = False  # the guide runs the small model, so its item exits when the small answer clears
    noun: str = "score"  # what its scores are called in legends: "attention" or "score"


@dataclass
class VideoInfo:
    """An item's video as the model saw it: the frames sgl sampled and their timing."""

    path: Path
    size: tuple[int, int]  # (width, height) of a frame
    fps: float  # sampled frames per second
    duration: float  # seconds of footage
    times: list[float]  # seconds from the start, per sampled frame
    frames: list = field(default_factory=list, repr=False)  # the sampled frames (RGB PIL images; not in the JSON)

    @property
    def n_frames(self) -> int:
        return len(self.times)

    def patch_frames(self, k: int, patches: int) -> list[int]:
        """The sampled frames (0-based) temporal patch k of `patches` covers: two each (a last one of an odd count
        is the last frame, repeated by the processor: only that frame is listed)."""
        per = max(1, -(-self.n_frames // max(1, patches)))
        return list(range(k * per, min((k + 1) * per, self.n_frames)))

    def patch_time(self, frames: list[int]) -> float:
        """The middle of a patch's frames' times (seconds)."""
        return sum(self.times[i] for i in frames) / len(frames) if frames else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"path": str(self.path), "size": list(self.size), "fps": self.fps, "duration": self.duration,
                "frames": self.n_frames, "times": self.times}


@dataclass
class Inspection:
    """One image and question through one guide or several: the small model's answer and scores (when the preset
    has a small model) and each guide's importance map."""

    image: Path
    image_size: tuple[int, int]  # (width, height) in pixels
    question: str
    guide: str  # what --guide asked for: a guide's name, or "all"
    preset: str
    threshold: float | None
    retain: float
    grids: list[TokenGrid]  # the image's token grids (one for most families), in the order of their tokens
    maps: list[GuideMap]
    small_answer: str | None = None  # None: the preset names no small model
    confidence: float | None = None
    consistency: float | None = None
    exit_score: float | None = None
    skipped: dict[str, str] = field(default_factory=dict)  # guide -> why it is not shown
    calibration: str | None = None  # the calibration file the threshold comes from, if any
    images: list[Path] = field(default_factory=list)  # every image of the item (default: `image` alone)
    image_sizes: list[tuple[int, int]] = field(default_factory=list)
    # A guide that reduces the large model's input (downsample): `grids` are what the large model saw, every
    # token kept; `full_tokens` the image's visual tokens at full size; `seen_sizes` the images' sizes as the large
    # model encoded them (resized), or `pooled_from` the feature grid that was pooled (fixed-resolution towers).
    full_tokens: int | None = None
    seen_sizes: list[tuple[int, int]] = field(default_factory=list)
    pooled_from: tuple[int, int] | None = None
    # The item's video (None: it has none); its temporal patches' grids are the pictures after `images` (a video
    # alone: `images` is empty and `image`, `image_size` are the video's path and frame size).
    video: VideoInfo | None = None

    def __post_init__(self) -> None:
        if self.video is None:
            self.images = self.images or [self.image]
            self.image_sizes = self.image_sizes or [self.image_size]

    # -- the video's temporal patches -----------------------------------------------------------------------
    def is_video(self, g: TokenGrid) -> bool:
        """Whether the grid is one of the video's temporal patches (a picture after the item's images)."""
        return self.video is not None and g.image >= len(self.images)

    @property
    def video_grids(self) -> list[TokenGrid]:
        return [g for g in self.grids if self.is_video(g)]

    def patch_frames(self, g: TokenGrid) -> list[int]:
        """The sampled frames (0-based) a video grid covers."""
        return self.video.patch_frames(g.image - len(self.images), len(self.video_grids))

    def patch_name(self, g: TokenGrid) -> str:
        """`frames 3-4 (1.5 s)`: a temporal patch's sampled frames (1-based) and their middle time."""
        frames = self.patch_frames(g)
        which = (f"frame {frames[0] + 1}" if len(frames) == 1 else f"frames {frames[0] + 1}-{frames[-1] + 1}") \
            if frames else g.name
        return f"{which} ({self.video.patch_time(frames):.3g} s)"

    @property
    def video_text(self) -> str:
        """`clip.mp4 (112 x 84 px, 4 s): 8 frames at 2 per second, 4 temporal patches of 3 x 4 tokens`."""
        v = self.video
        w, h = v.size
        grids = self.video_grids
        shapes = {g.shape for g in grids}
        shape = f" of {grids[0].shape[0]} x {grids[0].shape[1]} tokens" if len(shapes) == 1 else ""
        return (f"{v.path.name} ({w} x {h} px, {v.duration:.3g} s): {v.n_frames} frame{'s' * (v.n_frames != 1)} "
                f"at {v.fps:.3g} per second, {len(grids)} temporal patch{'es' * (len(grids) != 1)}{shape}")

    @property
    def whole(self) -> str:
        """What the shares are of: "image" (one image or several), "video", or "item" (images and a video)."""
        return "image" if self.video is None else "item" if self.images else "video"

    @property
    def reduced_text(self) -> str:
        """What the large model saw instead of the image (a guide that reduces its input), one line; "" else."""
        if self.full_tokens is None:
            return ""
        if self.pooled_from is not None:
            r, c = self.pooled_from
            how = f"its {r} x {c} feature grid average-pooled"
        else:
            sizes = ", ".join(f"{w} x {h}" for w, h in self.seen_sizes)
            same = list(map(tuple, self.seen_sizes)) == list(map(tuple, self.image_sizes))
            how = "the image unchanged" if same else f"the image resized to {sizes} px"
        return (f"the large model sees {how}: {self.n} visual tokens (the image has {self.full_tokens} at full "
                f"size), all kept")

    def grid_label(self, g: TokenGrid) -> str:
        """A grid's label, with its image when the item has several; a video's temporal patch by its frames."""
        if self.is_video(g):
            return self.patch_name(g)
        return f"image {g.image + 1} {g.label}" if len(self.images) > 1 else g.label

    def grids_text(self) -> str:
        """The grids, one line: each grid's label (`image 3 x 4 + frames 1-2 (0.5 s) + ...`); a video's patches
        once, as their count and shape (`4 temporal patches of 3 x 4`)."""
        if self.video is None:
            return " + ".join(self.grid_label(g) for g in self.grids)
        grids = self.video_grids
        shapes = {g.shape for g in grids}
        shape = f" of {grids[0].shape[0]} x {grids[0].shape[1]}" if len(shapes) == 1 else ""
        video = f"{len(grids)} temporal patch{'es' * (len(grids) != 1)}{shape}"
        return " + ".join([self.grid_label(g) for g in self.grids if not self.is_video(g)] + [video])

    @property
    def grid(self) -> tuple[int, int] | None:
        """(rows, cols) of the image's one token grid; None when it has several (or a video)."""
        return self.grids[0].shape if len(self.grids) == 1 and self.video is None else None

    @property
    def n(self) -> int:
        return sum(g.size for g in self.grids)

    @property
    def about(self) -> str:
        """What the grids are, one line ("" for one grid)."""
        if len(self.grids) == 1 and self.video is None:
            return ""
        if self.video is not None:
            parts = [f"{self.grid_label(g)}: {g.about}" for g in self.grids if not self.is_video(g)]
            return "; ".join(parts + ["video: a grid per temporal patch, two sampled frames' merged patches in "
                                      "raster order, drawn on its first frame"])
        if len(self.images) > 1:
            return "; ".join(f"{self.grid_label(g)}: {g.about}" for g in self.grids)
        return "; ".join(f"{g.name}: {g.about}" for g in self.grids)

    @property
    def has_small(self) -> bool:
        return self.small_answer is not None

    @property
    def sgl_exits(self) -> bool:
        """Whether the small model's answer clears the threshold (only the sgl guide exits on it)."""
        return self.has_small and self.threshold is not None and self.exit_score >= self.threshold

    def exits(self, guide: str) -> bool:
        return self.sgl_exits and any(m.can_exit for m in self.maps if m.name == guide)

    @property
    def n_kept(self) -> int:
        return len(self.maps[0].kept)

    @property
    def same_kept(self) -> bool:
        """Whether every guide keeps as many tokens (not so for cls on a multi-crop image: top `retain` per crop)."""
        return len({len(m.kept) for m in self.maps}) == 1

    def kept_count(self) -> str:
        """`12 of 60`, `12 per guide`, or each guide's count when they differ: `sgl 80, cls 82 of 400`."""
        if len(self.maps) == 1:
            return f"{self.n_kept} of {self.n}"
        if self.same_kept:
            return f"{self.n_kept} per guide"
        return ", ".join(f"{m.name} {len(m.kept)}" for m in self.maps) + f" of {self.n}"

    @property
    def sgl_kept(self) -> int:
        """How many tokens sgl keeps (its budget is global over the image)."""
        from ..guides.base import n_keep

        return n_keep(self.n, self.retain)

    def chance(self, m: GuideMap) -> float:
        """Tokens m's kept set shares with sgl's on average when one is drawn at random: k_sgl * k / n."""
        return self.sgl_kept * len(m.kept) / self.n

    def shares(self, m: GuideMap) -> np.ndarray:
        """(N,) share of the guide's total score per visual token (index it with a grid's `tokens`)."""
        values = np.asarray(m.importance, dtype=np.float64)
        total = values.sum()
        return values / total if total > 0 else np.full_like(values, 1 / len(values))

    def kept_mask(self, m: GuideMap) -> np.ndarray:
        """(N,) whether the large model keeps each visual token."""
        mask = np.zeros(self.n, dtype=bool)
        mask[m.kept] = True
        return mask

    def layout_json(self) -> dict[str, Any]:
        """`grids` (name, shape, crops in it), `crops` (per crop or tile: its grid, origin and shape there, token
        count) and `layout` ([crop, row, col] per visual token: row and column within its crop's box)."""
        grids, crops = [], []
        layout: list[list[int]] = [[]] * self.n
        for gi, g in enumerate(self.grids):
            ids = sorted(int(c) for c in np.unique(g.crops))
            grids.append({"name": g.name, "image": g.image, "shape": list(g.shape), "crops": ids,
                          "crop_grid": list(g.crop_grid) if g.crop_grid else None, "about": g.about})
            if self.is_video(g):  # a temporal patch: its sampled frames (0-based) and their middle time
                frames = self.patch_frames(g)
                grids[-1].update(label=self.patch_name(g), frames=frames, time=self.video.patch_time(frames))
            for c in ids:
                rows, cols = np.nonzero(g.crops == c)
                r0, c0 = int(rows.min()), int(cols.min())
                crops.append({"crop": c, "grid": gi, "origin": [r0, c0],
                              "shape": [int(rows.max()) - r0 + 1, int(cols.max()) - c0 + 1], "tokens": len(rows)})
                for r, col in zip(rows.tolist(), cols.tolist()):
                    layout[int(g.tokens[r, col])] = [c, r - r0, col - c0]
        return {"grids": grids, "crops": sorted(crops, key=lambda c: c["crop"]), "layout": layout}

    def to_json(self) -> dict[str, Any]:
        """One guide: its fields beside the common ones (flat). Several: the common fields and `guides`, a map
        of guide name to its fields, and `skipped` (guide name -> why)."""
        common = {
            "image": str(self.image) if self.images else None,  # None: a video alone
            "image_size": list(self.image_size) if self.images else None,
            "images": [str(p) for p in self.images],
            "image_sizes": [list(s) for s in self.image_sizes],
            **({} if self.video is None else {"video": self.video.to_json()}),
            "question": self.question,
            "guide": self.guide,
            "preset": self.preset,
            "small_answer": self.small_answer,
            "exit_score": self.exit_score,
            "confidence": self.confidence,
            "consistency": self.consistency,
            "threshold": self.threshold,
            "retain": self.retain,
            "calibration": self.calibration,
            # As in `sgl run`'s records: the image's own count (full size), whatever the guide gave the large model.
            "visual_tokens": self.n if self.full_tokens is None else self.full_tokens,
            "grid": list(self.grid) if self.grid else None,  # None: several grids (see `grids`)
            **({} if self.full_tokens is None else {
                "seen_image_sizes": [list(s) for s in self.seen_sizes] or None,
                "pooled_from": list(self.pooled_from) if self.pooled_from else None}),
            **self.layout_json(),
        }
        if self.guide != "all":
            return {**common, **self._guide_json(self.maps[0])}
        return {**common, "guides": {m.name: self._guide_json(m) for m in self.maps}, "skipped": self.skipped}

    def _guide_json(self, m: GuideMap) -> dict[str, Any]:
        return {
            "exit": "small" if self.exits(m.name) else "large",
            "large_answer": m.large_answer,
            "prune_layer": m.prune_layer,
            "retained_tokens": len(m.kept),
            "kept_by_sgl_too": m.sgl_overlap,
            "kept": m.kept,
            "importance": m.importance,
        }


def normalise(values: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Values mapped linearly onto [0, 1] from their min to their max, with that min and max."""
    lo, hi = float(values.min()), float(values.max())
    return (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values), lo, hi


def pool(values: np.ndarray, mask: np.ndarray, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """Blocks of factor x factor tokens: the max value (so a lone important token stays visible and the scale
    is the unpooled one) and whether any token of the block is kept. Edge blocks may be partial."""
    rows, cols = values.shape
    pr, pc = -(-rows // factor), -(-cols // factor)
    padded = np.full((pr * factor, pc * factor), -np.inf)
    padded[:rows, :cols] = values
    kept = np.zeros(padded.shape, dtype=bool)
    kept[:rows, :cols] = mask
    blocks = (pr, factor, pc, factor)
    return padded.reshape(blocks).max(axis=(1, 3)), kept.reshape(blocks).any(axis=(1, 3))


def percent(share: float, digits: int = 3) -> str:
    return f"{100 * share:.{digits}g}%"


def span(lo: float, hi: float) -> tuple[str, str]:
    """`lo` and `hi` as percentages with enough digits (up to 6) that they differ where they do."""
    digits = 3
    while digits < 6 and lo != hi and percent(lo, digits) == percent(hi, digits):
        digits += 1
    return percent(lo, digits), percent(hi, digits)


def printable(text: str) -> str:
    """Control characters escaped: a model's answer may hold any token, and a raw one can upset a terminal."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text) or "(empty)"


def overlap_summary(insp: Inspection) -> str | None:
    """`kept by sgl too (of 12; 2.4 by chance): cls 7, fastv 5, random 3`, or None without sgl's ranking."""
    others = [m for m in insp.maps if m.sgl_overlap is not None]
    if not others:
        return None
    if insp.same_kept:
        counts = ", ".join(f"{m.name} {m.sgl_overlap}" for m in others)
        return f"kept by sgl too (of {insp.n_kept}; {insp.chance(others[0]):.2g} by chance): {counts}"
    counts = ", ".join(f"{m.name} {m.sgl_overlap} of {len(m.kept)} ({insp.chance(m):.2g} by chance)" for m in others)
    return f"kept by sgl too (sgl keeps {insp.sgl_kept}): {counts}"


def threshold_text(insp: Inspection) -> str:
    """`threshold 0.9`, and the calibration file it comes from (`threshold 0.9 of cal.yaml`)."""
    where = f" of {Path(insp.calibration).name}" if insp.calibration else ""
    return f"threshold {insp.threshold:g}{where}"


def sgl_part(insp: Inspection, m: GuideMap) -> str:
    if m.sgl_overlap is None:
        return f"keeps {len(m.kept)} of {insp.n}"
    return f"sgl keeps {m.sgl_overlap} of these {len(m.kept)} too"
