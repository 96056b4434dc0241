"""The data behind `sgl calibrate`: one small and one large answer per labelled item, cached.

The cache is a JSONL file of `sgl run --no-exit` records (small and large answers, `exit_score`, timings)
with one field added, `item_key`: a hash of what an answer depends on besides the settings (image path,
question, max_new_tokens). The cache's file name carries a hash of the calibration fingerprint, so every
model pair and setting has its own; a record whose `item_key` no longer matches its input line (the file
was edited) is recomputed, and the last record of a line wins. Records are flushed as they complete, so an
interrupted calibration continues where it stopped. References are read from the input every time: another
target, metric or corrected label costs no model calls.
"""

from __future__ import annotations

import hashlib
import json
import statistics
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..io.items import Item, read_items
from ..io.output import RecordWriter, completed_lines
from .calibration import Outcome
from .metrics import get_metric


@dataclass
class Labelled:
    """The input, split: items to score, and the lines that cannot be."""

    items: list[Item]
    unlabelled: list[int]  # line numbers without an `answer`
    invalid: list[str]  # parse errors, each naming its line


def read_labelled(path: Path) -> Labelled:
    out = Labelled([], [], [])
    for item in read_items(path):
        if item.error is not None:
            out.invalid.append(item.error)
        elif not item.has_reference:
            out.unlabelled.append(item.line)
        else:
            out.items.append(item)
    return out


def cache_path(folder: Path, input: Path, fingerprint: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:12]
    return folder / f"{input.stem}.calibration-cache-{digest}.jsonl"


def item_key(item: Item) -> str:
    """A hash of what an item's answers depend on besides the settings: its images, question and length."""
    digest = hashlib.sha256()
    for ref in item.images:
        value = ref.value.resolve() if ref.kind == "path" else ref.value
        digest.update(value if isinstance(value, bytes) else f"{ref.kind}:{value}".encode())
        digest.update(b"\0")
    digest.update(json.dumps([item.question, item.history, item.parts, item.max_new_tokens]).encode())
    return digest.hexdigest()[:12]


def read_cache(path: Path, items: Iterable[Item]) -> dict[int, dict]:
    """Line -> cached record, for the items whose record is still valid."""
    if not path.exists():
        return {}
    completed_lines(path)  # repairs a record torn by a kill; refuses a file that is not ours
    keys = {item.line: item_key(item) for item in items}
    cached: dict[int, dict] = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        if raw.strip():
            rec = json.loads(raw)
            if keys.get(rec["line"]) == rec.get("item_key"):
                cached[rec["line"]] = rec
    return cached


def compute(engine, items: list[Item], path: Path, append: bool) -> Iterator[dict]:
    """Run `engine` (threshold None: both models on every item) and append each record to the cache."""
    keys = {item.line: item_key(item) for item in items}
    with RecordWriter(path, append=append) as writer:
        for rec in engine.run(items):
            rec["item_key"] = keys[rec["line"]]
            writer.write(rec)
            yield rec


def reference_strings(value: Any) -> str | list[str]:
    # The input allows numbers ("answer": 3); metrics compare strings.
    return [str(v) for v in value] if isinstance(value, list) else str(value)


@dataclass
class Scored:
    outcomes: list[Outcome]
    errors: list[str]  # the items that failed in a model pass, excluded
    relative_cost_small: float


def score(items: list[Item], records: dict[int, dict], metric: str) -> Scored:
    """Correctness of both answers for every item in `records`, in input order."""
    fn = get_metric(metric)
    outcomes, errors, small_ms, large_ms = [], [], [], []
    for item in items:
        rec = records[item.line]
        if rec["error"]:
            errors.append(rec["error"])
            continue
        ref = reference_strings(item.reference)
        outcomes.append(Outcome(rec["exit_score"], fn(rec["small_answer"], ref), fn(rec["answer"], ref)))
        small_ms.append(rec["ms"]["small"])
        large_ms.append(rec["ms"]["large"])
    return Scored(outcomes, errors, relative_cost(small_ms, large_ms))


def relative_cost(small_ms: list[float], large_ms: list[float]) -> float:
    """The small model's cost as a fraction of the large model's: the ratio of their median times per item.

    Measured rather than derived from parameter counts, which would miss that the small model reads every
    visual token (twice: answer and consistency re-read) while the large one reads only `retain` of them.
    Medians, because the first batch pays for warm-up.
    """
    if not large_ms:
        return 0.0
    large = statistics.median(large_ms)
    return statistics.median(small_ms) / large if large > 0 else 0.0
