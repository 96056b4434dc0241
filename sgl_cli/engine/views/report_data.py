"""What `sgl report` shows, gathered from a run's files: its records (sgl or OpenAI batch output), the input they
answer (for questions, images and question types; named in `<out stem>.run.json`), the saved rankings
(`--save-scores`, when there are any), thumbnails, and the summary statistics."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

THUMB_SIDE = 160  # px, the long side of a gallery thumbnail
MAX_QUESTION = 600  # characters of a question shown on its card


@dataclass
class Card:
    """One record as the gallery shows it (plain JSON types only)."""

    id: Any
    line: int
    question: str | None
    answer: str | None
    small_answer: str | None
    exit: str | None
    exit_score: float | None
    reference: Any
    correct: float | None
    type: str | None
    error: str | None
    ms: dict
    visual: int | None
    retained: int | None
    images: list[str] = field(default_factory=list)  # thumbnail keys (see ReportData.thumbs), "" for none
    overlays: list[dict | None] = field(default_factory=list)  # per image: rows, cols, kept mask (packed bits)


@dataclass
class ReportData:
    out: Path
    cards: list[Card]
    thumbs: dict[str, str]  # key -> data URI (JPEG)
    summary: dict
    threshold: float | None
    metric: str | None
    notes: list[str]


def normalise(rec: dict) -> dict:
    """An sgl record, or an OpenAI batch output line turned into one."""
    if "response" in rec and "custom_id" in rec:
        body = (rec.get("response") or {}).get("body") or {}
        sgl = dict(body.get("sgl") or {})
        content = ((body.get("choices") or [{}])[0].get("message") or {}).get("content")
        error = (rec.get("error") or {}).get("message") if rec.get("error") else None
        return {**sgl, "id": rec["custom_id"], "line": sgl.get("line"), "answer": content, "error": error}
    return rec


def load_records(out: Path) -> list[dict]:
    recs = []
    with out.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                recs.append(normalise(json.loads(raw)))
            except ValueError as exc:
                from ..errors import SglError

                raise SglError(f"{out}: line {number} is not a record ({exc})") from None
    return recs


def _items_by_line(about: dict, input_override: Path | None, notes: list[str]) -> dict[int, Any]:
    from ..errors import SglError
    from ..io.formats import Columns, open_source

    path = input_override or (Path(about["input"]) if about.get("input") else None)
    if path is None:
        notes.append("the input is not known (no .run.json beside the output): no questions or images; give --input")
        return {}
    if not path.exists():
        notes.append(f"the input {path} is gone: no questions or images; give --input")
        return {}
    try:
        source = open_source(path, columns=Columns(**about["columns"]) if about.get("columns") else None,
                             split=about.get("split"), limit=about.get("limit"))
    except SglError as exc:
        notes.append(f"the input cannot be read ({exc}): no questions or images")
        return {}
    return {line: source.parse(line, payload) for line, payload in source}


def _thumb(item, ref, fetcher) -> str | None:
    """A JPEG data URI of the image, THUMB_SIDE px on its long side; None when it cannot be had."""
    from ..errors import ItemError
    from ..io.images import load_image

    try:
        image = load_image(item, ref, fetcher, max_pixels=THUMB_SIDE ** 2)
    except ItemError:
        return None
    image.thumbnail((THUMB_SIDE, THUMB_SIDE))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=72)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _video_thumbs(item, fetcher) -> list[str]:
    """JPEG data URIs of a video's temporal patches (Qwen's two frames each: the first of them), sampled as a run
    samples it by default (the item's own `fps` and `max_frames`, else 2 per second and 64 frames); none when it
    cannot be had."""
    from ..errors import ItemError
    from ..io.video import load_video

    try:
        video = load_video(item, fetcher)
    except (ItemError, ImportError):
        return []
    out = []
    for frame in video.frames[::2]:
        frame = frame.copy()
        frame.thumbnail((THUMB_SIDE, THUMB_SIDE))
        buf = io.BytesIO()
        frame.save(buf, format="JPEG", quality=72)
        out.append("data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii"))
    return out


def _ref_key(ref) -> str:
    value = ref.value if isinstance(ref.value, bytes) else f"{ref.kind}:{ref.value}".encode()
    return hashlib.sha1(value).hexdigest()[:16]


def _overlay(row: dict | None, image: int) -> dict | None:
    """The kept tokens on an image's finest grid, as a packed bit mask (row-major cells)."""
    import numpy as np

    if not row or not row["kept"]:
        return None
    grids = [g for g in row["grids"] if g["image"] == image]
    if not grids:
        return None
    g = max(grids, key=lambda g: g["rows"] * g["cols"])
    kept = np.zeros(len(row["scores"]), dtype=bool)
    kept[np.asarray(row["kept"], dtype=np.int64)] = True
    mask = kept[np.asarray(g["tokens"], dtype=np.int64)]
    return {"rows": g["rows"], "cols": g["cols"],
            "mask": base64.b64encode(np.packbits(mask.astype(np.uint8)).tobytes()).decode("ascii")}


def _quantiles(values: list[float]) -> dict:
    if not values:
        return {"median": None, "p90": None, "p99": None}
    values = sorted(values)

    def q(p):
        return values[min(len(values) - 1, int(round(p * (len(values) - 1))))]

    return {"median": statistics.median(values), "p90": q(0.9), "p99": q(0.99)}


def gather(out: Path, input: Path | None = None, metric: str = "vqa", fetch: bool = False) -> ReportData:
    """Everything the report shows, from the output file and what lies beside it."""
    from ..evaluation.calibrate import reference_strings
    from ..metrics import get_metric
    from ..runs.run import run_info_path
    from ..io.scores import read_scores, scores_path

    notes: list[str] = []
    records = load_records(out)
    info = run_info_path(out)
    about = json.loads(info.read_text()) if info.exists() else {}
    items = _items_by_line(about, input, notes)
    scores_file = out.with_name(about["scores"]) if about.get("scores") else scores_path(out)
    scores = read_scores(scores_file) if scores_file.exists() else {}
    if not scores:
        notes.append("no saved rankings (run with --save-scores to see the kept tokens): images alone")
    from ..io.fetch import Fetcher, FetchPolicy

    score_of = get_metric(metric)
    fetcher = Fetcher(FetchPolicy(enabled=fetch))
    thumbs: dict[str, str] = {}
    video_thumbs: dict[str, list[str]] = {}  # a video's key -> its patches' thumbnails
    cards = []
    for rec in records:
        item = items.get(rec.get("line"))
        ref = rec.get("reference")
        correct = None
        if ref is not None and rec.get("answer") is not None:
            correct = score_of(rec["answer"], reference_strings(ref))
        keys, overlays = [], []
        for i, image_ref in enumerate(item.images if item is not None else []):
            key = _ref_key(image_ref)
            if key not in thumbs:
                thumbs[key] = _thumb(item, image_ref, fetcher) or ""
            keys.append(key)
            overlays.append(_overlay(scores.get(rec.get("line")), i))
        if item is not None and item.video is not None:
            v = item.video  # its files and its sampling: the same file at another rate is other thumbnails
            sampled = f"{'+'.join(_ref_key(r) for r in v.refs)}@{v.fps}/{v.max_frames}"
            video_key = hashlib.sha1(sampled.encode()).hexdigest()[:16]
            if video_key not in video_thumbs:  # a video several records share is decoded once
                video_thumbs[video_key] = _video_thumbs(item, fetcher)
            for k, thumb in enumerate(video_thumbs[video_key]):
                key = f"{video_key}-{k}"
                thumbs.setdefault(key, thumb)
                keys.append(key)
                overlays.append(_overlay(scores.get(rec.get("line")), len(item.images) + k))
        question = item.question if item is not None and item.question else None
        cards.append(Card(
            id=rec.get("id"), line=rec.get("line"),
            question=question[:MAX_QUESTION] if question else None, answer=rec.get("answer"),
            small_answer=rec.get("small_answer"), exit=rec.get("exit"), exit_score=rec.get("exit_score"),
            reference=ref, correct=correct, type=item.type if item is not None else None, error=rec.get("error"),
            ms=rec.get("ms") or {}, visual=rec.get("visual_tokens"), retained=rec.get("retained_tokens"),
            images=keys, overlays=overlays))
    fetcher.close()
    threshold = about.get("threshold")
    return ReportData(out, cards, {k: v for k, v in thumbs.items() if v}, summarise(cards, threshold), threshold,
                      metric if any(c.correct is not None for c in cards) else None, notes)


def summarise(cards: list[Card], threshold: float | None) -> dict:
    answered = [c for c in cards if c.error is None]
    exits = [c for c in answered if c.exit == "small"]
    large = [c for c in answered if c.exit == "large"]
    visual = [c.visual for c in answered if c.visual]
    retained = [c.retained for c in large if c.retained is not None]

    def accuracy(group: list[Card]):
        scored = [c.correct for c in group if c.correct is not None]
        return (sum(scored) / len(scored), len(scored)) if scored else None

    per_type: dict[str, list[Card]] = {}
    for c in answered:
        if c.type:
            per_type.setdefault(c.type, []).append(c)
    return {
        "items": len(cards), "answered": len(answered), "errors": len(cards) - len(answered),
        "exit_rate": len(exits) / len(answered) if answered else None,
        "visual_tokens": statistics.mean(visual) if visual else None,
        "retained_tokens": statistics.mean(retained) if retained else None,
        "token_ratio": (sum(retained) / sum(c.visual for c in large if c.visual)) if retained else None,
        # The large stage over the items it ran on (an exit costs it nothing); the others over every item.
        "ms": {stage: _quantiles([c.ms[stage] for c in (large if stage == "large" else answered)
                                  if c.ms.get(stage) is not None]) for stage in ("small", "large", "total")},
        "accuracy": accuracy(answered),
        "accuracy_by_exit": {"small": accuracy(exits), "large": accuracy(large)},
        "accuracy_by_type": {t: accuracy(g) for t, g in sorted(per_type.items())},
        "threshold": threshold,
    }
