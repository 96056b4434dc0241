"""`sgl calibrate` as a library: each labelled item's model passes, computed once and cached, and the choice of
the operating point (retain and threshold) from them.

    cal = Calibrator("labelled.jsonl", load_preset("default"), retains=["auto"])
    for done in cal.compute(Engine.from_preset(cal.preset)):   # only what the cache lacks
        ...
    result = cal.choose("vqa", target_accuracy=0.99)
    cal.save(result)                                            # the calibration file (and `plot=` a PNG)

Per item: the small model once (answer, SGP ranking, exit score), the large model alone once, and the large model
pruned once per retain value of the grid, through `Comparison` (which shares the encoding and the large model's
vision tower among them). The cache is a JSONL file beside the calibration file, one per model pair and settings
(`<input stem>.calibration-cache-<hash of the calibration fingerprint>.jsonl`; retain is not part of it). Each
line holds what one batch computed for one item,

    {"line": 3, "item_key": "...", "error": null,
     "small": {"answer", "tokens", "probs", "consistency", "exit_score", "importance" (float32, base64), "ms"},
     "large": {"answer", "ms"},                                  # the large model alone
     "pruned": {"0.09": {"answer", "ms", "kept"}, ...}}          # the large model at each retain

and an item's lines merge, the last winning. `item_key` hashes what answers depend on besides the settings (image
path, question, max_new_tokens): lines whose key no longer matches the input (an edited item) are ignored and the
item recomputed. Lines are flushed per batch: an interrupted calibration continues where it stopped. A retain
added to the grid runs only the pruned large model, from the cached SGP ranking; another target, metric,
confidence or corrected label runs no model (references are read from the input every time).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import statistics
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import SettingError, SglError
from ..io.batches import batches
from ..io.formats import read_items
from ..io.items import Item
from ..io.output import RecordWriter, completed_lines
from ..preset import Preset
from ..calibration import calibration_fingerprint, resolve_calibration
from .calibration_file import save_calibration, to_yaml_dict
from .operating_points import Choice, Costs, Outcome, choose
from .retains import parse_retains
from ..metrics import get_metric

CACHE_FORMAT = 2  # part of the cache's name: a cache of another format is never read
SMALL_SET = 200  # fewer labelled items than this: the choice fits them closely (say so)


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
    blob = json.dumps({**fingerprint, "cache_format": CACHE_FORMAT}, sort_keys=True)
    return folder / f"{input.stem}.calibration-cache-{hashlib.sha256(blob.encode()).hexdigest()[:12]}.jsonl"


def item_key(item: Item) -> str:
    """A hash of what an item's answers depend on besides the settings: its images, video, question and length."""
    digest = hashlib.sha256()

    def feed(refs) -> None:
        for ref in refs:
            value = ref.value.resolve() if ref.kind == "path" else ref.value
            digest.update(value if isinstance(value, bytes) else f"{ref.kind}:{value}".encode())
            digest.update(b"\0")

    feed(item.images)
    if item.video is not None:  # an image item's key stays what it was
        digest.update(b"video\0")
        feed(item.video.refs)
        digest.update(json.dumps([item.video.fps, item.video.max_frames]).encode())
    digest.update(json.dumps([item.question, item.history, item.parts, item.max_new_tokens]).encode())
    return digest.hexdigest()[:12]


def read_cache(path: Path, items: Iterable[Item]) -> dict[int, dict]:
    """Line -> the merged record of its cache lines that still match the input."""
    if not path.exists():
        return {}
    completed_lines(path)  # repairs a record torn by a kill; refuses a file that is not ours
    keys = {item.line: item_key(item) for item in items}
    cached: dict[int, dict] = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        if raw.strip():
            rec = json.loads(raw)
            if keys.get(rec["line"]) == rec.get("item_key"):
                merge(cached.setdefault(rec["line"], {"line": rec["line"], "pruned": {}}), rec)
    return cached


def merge(into: dict, rec: dict) -> None:
    """Add one cache line to an item's record: its parts replace the older ones, its error is the item's."""
    for part in ("small", "large"):
        if part in rec:
            into[part] = rec[part]
    into["pruned"].update(rec.get("pruned") or {})
    into["item_key"], into["error"] = rec.get("item_key"), rec.get("error")
    if rec.get("timing") and rec["timing"] not in into.setdefault("timings", []):
        into["timings"].append(rec["timing"])


def _key(retain: float) -> str:
    return str(float(retain))


def encode_small(small, ms: float) -> dict:
    """A small pass as a cache entry; its importance (the SGP ranking) as float32 bytes, exactly."""
    importance = small.importance.float().numpy().astype("<f4").tobytes()
    return {"answer": small.answer, "tokens": list(small.tokens), "probs": list(small.probs),
            "consistency": small.consistency, "exit_score": small.exit_score,
            "importance": base64.b64encode(importance).decode("ascii"), "ms": round(ms, 3)}


def decode_small(entry: dict):
    """The cached small pass, as the engine's stages take it (`SmallPass`)."""
    import numpy as np
    import torch

    from ..pipeline.stages import SmallPass

    importance = np.frombuffer(base64.b64decode(entry["importance"]), dtype="<f4").copy()
    return SmallPass(entry["tokens"], entry["probs"], entry["answer"], torch.from_numpy(importance),
                     consistency=entry["consistency"])


def reference_strings(value: Any) -> str | list[str]:
    # The input allows numbers ("answer": 3); metrics compare strings.
    return [str(v) for v in value] if isinstance(value, list) else str(value)


@dataclass
class Calibrated:
    """A choice with what it was made from, as `Calibrator.save` writes it."""

    choice: Choice
    costs: Costs  # relative to the large model alone (Costs.paired)
    metric: str
    errors: list[str]  # the items that failed in a model pass, left out
    stage_ms: dict[str, Any]  # median ms per item of each stage, for the reader: small, large, pruned (by retain)
    # The conditions the stage times were measured under (host, device, threads, batch size), when the cache
    # holds more than one: its costs then compare times from different sessions.
    timings: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @property
    def small_set(self) -> bool:
        return self.choice.n_items < SMALL_SET


class Calibrator:
    """The calibration of `preset` (sgl guide, with a small model) on the labelled items of `input`, over the
    retain values `retains` (numbers, or "auto"). `out`: the calibration file (default `<input
    stem>.calibration.yaml` beside the input); the cache lies beside it. `resume=False` recomputes every item;
    `retry_failed` computes again what the items that failed before lack (else they are left out, so that a
    cached calibration makes no model call)."""

    def __init__(self, input: str | Path, preset: Preset, retains: Iterable[str | float] = ("auto",), *,
                 out: str | Path | None = None, resume: bool = True, retry_failed: bool = False):
        self.input = Path(input)
        if not self.input.is_file():
            raise SglError(f"input file {self.input} not found")
        if preset.settings.guide != "sgl" or preset.small is None:
            raise SglError(f"preset {preset.name!r}: only the sgl guide, with a small model, exits early; there is "
                           f"no threshold to calibrate for the {preset.settings.guide} guide"
                           + ("" if preset.small is not None else " nor without a small model"))
        try:
            self.retains = parse_retains(list(retains))
        except ValueError as exc:
            raise SettingError.about("retain", exc) from None
        # Both models on every item; the preset's own calibration file is not applied to its calibration.
        self.preset = resolve_calibration(preset.with_settings(no_exit=True), "calibrate").preset
        from ..backends import check_preset

        check_preset(self.preset)  # backends, their options, the guide: before anything is read or loaded
        self.fingerprint = calibration_fingerprint(self.preset)
        self.out = Path(out) if out is not None else self.input.with_name(f"{self.input.stem}.calibration.yaml")
        if not self.out.parent.is_dir():
            raise SglError(f"folder {self.out.parent} (for {self.out.name}) does not exist")
        self.cache = cache_path(self.out.parent, self.input, self.fingerprint)
        self.data = read_labelled(self.input)
        if not self.data.items:
            raise SglError(f"{self.input}: no line has an 'answer'; calibration needs reference answers")
        self.records = read_cache(self.cache, self.data.items) if resume else {}
        self._append = resume
        self._retry = retry_failed
        self._failed_now: set[int] = set()  # failed in this object's `compute`: not retried again by it

    # -- what is missing -------------------------------------------------------------------------------------
    def missing(self, item: Item) -> tuple[float, ...] | None:
        """What `item` still needs: None, every pass (a new or edited item); else the retain values whose
        pruned answer is not cached (() when it is complete, or failed)."""
        rec = self.records.get(item.line)
        if rec is not None and rec.get("error") and (not self._retry or item.line in self._failed_now):
            return ()  # failed: left out (its good parts stay cached) until retried
        if rec is None or "small" not in rec or "large" not in rec:
            return None
        need = tuple(r for r in self.retains if r < 1.0 and _key(r) not in rec["pruned"])
        return need if need or not rec.get("error") else None

    def pending(self) -> dict[tuple[float, ...] | None, list[Item]]:
        """The items that need a model pass, grouped: None -> new items (every pass), retains -> cached items
        that need only the large model at those retain values."""
        groups: dict[tuple[float, ...] | None, list[Item]] = {}
        for item in self.data.items:
            need = self.missing(item)
            if need != ():
                groups.setdefault(need, []).append(item)
        return groups

    def plan(self) -> str:
        """What `compute` will run, in words."""
        parts = []
        for need, items in self.pending().items():
            if need is None:
                parts.append(f"{len(items)} new item(s): the small model, the large model alone and at retain "
                             f"{', '.join(f'{r:g}' for r in self.retains if r < 1.0) or '-'}")
            else:
                parts.append(f"{len(items)} cached item(s): the large model at retain "
                             f"{', '.join(f'{r:g}' for r in need)}")
        return "; ".join(parts) or "nothing: every item is cached"

    # -- computing -------------------------------------------------------------------------------------------
    def load_engine(self):
        """The engine `compute` runs on: both models of `self.preset` (which names no calibration file: its own is
        not applied to its calibration)."""
        from ..pipeline.engine import Engine

        return Engine.from_preset(self.preset)

    def compute(self, engine) -> Iterator[int]:
        """Run what the cache lacks on `engine` (loaded from `self.preset`), appending to the cache as each
        batch completes; yields the number of items of each batch."""
        from .compare import Comparison

        groups = self.pending()
        if not groups:
            return
        with RecordWriter(self.cache, append=self._append and self.cache.exists()) as writer:
            self._append = True
            for need, items in groups.items():
                retains = [r for r in (self.retains if need is None else need) if r < 1.0]
                comparison = Comparison(engine, [("sgl", r) for r in retains])
                for batch in batches(items, engine.settings.batch_size):
                    for rec in self._batch(comparison, retains, batch, full=need is None):
                        writer.write(rec)
                        merge(self.records.setdefault(rec["line"], {"line": rec["line"], "pruned": {}}), rec)
                        if rec["error"]:
                            self._failed_now.add(rec["line"])
                    yield len(batch)

    @staticmethod
    def _conditions(engine) -> dict[str, Any]:
        """What a stage time depends on besides the item and the settings the fingerprint holds."""
        import socket

        import torch

        return {"host": socket.gethostname(), "device": engine.large.device,
                "threads": torch.get_num_threads(), "batch_size": engine.settings.batch_size}

    def _batch(self, comparison, retains: list[float], items: list[Item], full: bool) -> list[dict]:
        from ..io.batches import alone_on_failure

        def failed(item: Item, exc: BaseException) -> list[dict]:
            detail = f"{type(exc).__name__}: {exc}".splitlines()[0]
            return [{"line": item.line, "item_key": item_key(item), "error": item.fail(f"model pass failed: {detail}")}]

        return [rec for part in alone_on_failure(items, lambda group: self._records(comparison, retains, group, full),
                                                 failed) for rec in part]

    def _records(self, comparison, retains: list[float], items: list[Item], full: bool) -> list[dict]:
        known = None if full else [decode_small(self.records[item.line]["small"]) for item in items]
        res = comparison.batch(items, large_alone=full, small=known)
        index = {id(w): i for i, w in enumerate(res.live)}
        n = max(1, len(res.live))
        timing = self._conditions(comparison.engine)
        out = []
        for w in res.works:
            rec: dict[str, Any] = {"line": w.item.line, "item_key": item_key(w.item), "error": w.error}
            i = index.get(id(w))
            if w.error is None and i is not None:
                rec["timing"] = timing
                if full:
                    rec["small"] = encode_small(w.small, w.ms["small"])
                    rec["large"] = {"answer": res.large_alone[i], "ms": round(res.seconds["large_alone"] * 1000 / n, 3)}
                rec["pruned"] = {_key(r): {"answer": res.outcomes[("sgl", r)][i].answer,
                                           "kept": res.outcomes[("sgl", r)][i].n_kept,
                                           "ms": round(res.large_seconds[("sgl", r)] * 1000 / n, 3)}
                                 for r in retains}
            out.append(rec)
        return out

    # -- choosing --------------------------------------------------------------------------------------------
    def outcomes(self, metric: str) -> tuple[list[Outcome], dict[str, Any], list[str]]:
        """Each item's correctness under `metric`, each stage's times per item (ms: `small`, `large`, `pruned`
        by retain, aligned with the outcomes) and the failed items."""
        fn = get_metric(metric)
        outcomes, errors = [], []
        small_ms, large_ms, pruned_ms = [], [], {r: [] for r in self.retains if r < 1.0}
        timings: list[dict] = []
        for item in self.data.items:
            rec = self.records.get(item.line)
            if self.missing(item) != ():
                raise SglError(f"line {item.line} has not been computed yet (run `compute` first)")
            if rec["error"]:
                errors.append(rec["error"])
                continue
            timings += [t for t in rec.get("timings", []) if t not in timings]
            ref = reference_strings(item.reference)
            small, large = rec["small"], rec["large"]
            pruned = {r: fn(rec["pruned"][_key(r)]["answer"], ref) for r in pruned_ms}
            outcomes.append(Outcome(small["exit_score"], fn(small["answer"], ref), fn(large["answer"], ref), pruned))
            small_ms.append(small["ms"])
            large_ms.append(large["ms"])
            for r, times in pruned_ms.items():
                times.append(rec["pruned"][_key(r)]["ms"])
        if not outcomes:
            raise SglError("every labelled item failed (see above); nothing to calibrate on")
        return outcomes, {"small": small_ms, "large": large_ms, "pruned": pruned_ms, "timings": timings}, errors

    def choose(self, metric: str, *, target_accuracy: float | None = None, exit_rate: float | None = None,
               confidence: float | None = None) -> Calibrated:
        """The operating point for one target (see `operating_points.choose`), from the cache alone."""
        outcomes, ms, errors = self.outcomes(metric)
        costs = Costs.paired(ms["small"], ms["large"], ms["pruned"])
        try:
            choice = choose(outcomes, costs, self.retains, target_accuracy=target_accuracy, exit_rate=exit_rate,
                            confidence=confidence)
        except ValueError as exc:
            raise SglError(str(exc)) from None
        medians = {"small": statistics.median(ms["small"]), "large": statistics.median(ms["large"]),
                   "pruned": {r: statistics.median(t) for r, t in ms["pruned"].items()}}
        timings = ms["timings"] if len(ms["timings"]) > 1 else []
        return Calibrated(choice, costs, metric, errors, medians, timings)

    def save(self, result: Calibrated, plot: str | Path | None = None, title: str = "") -> None:
        """Write the calibration file (`self.out`) and, with `plot`, its PNG."""
        save_calibration(to_yaml_dict(result.choice, metric=result.metric, fingerprint=self.fingerprint,
                                      prune_layer=self.preset.settings.prune_layer, costs=result.costs,
                                      retains=self.retains, stage_ms=result.stage_ms), self.out)
        if plot is not None:
            from .plots import plot_calibration

            plot_calibration(result.choice, plot, title=title)
