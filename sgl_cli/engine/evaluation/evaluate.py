"""`sgl eval`'s measurement: accuracy against retain, per guide, beside the small and large models alone.

Model outputs are reused wherever a setting's computation is identical: per batch the small model answers
once (its answer, SGP ranking and exit score do not depend on retain or on the guide), the large model's
image features and [CLS] scores are computed once, and its unpruned answer once (it is "large alone" and
every setting at retain 1.0, where no guide drops anything). Only the pruned large-model generations are
run per setting. A setting's items/s is computed from the measured time of every stage it needs, and its
relative compute as `sgl calibrate` computes it: the small model (for the guides that run it) + (1 - exit rate)
x the large model at that setting, each stage's cost the median over items of its time relative to the large
model alone on the same item.

With a calibration (`CalibratedPoint`), the result also checks the operating point it chose (the sgl guide at
its retain and threshold) on these items, beside what the file predicted.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from ..calibration import resolve_calibration
from ..pipeline.engine import Engine
from ..errors import SettingError
from ..io.batches import batches
from ..preset import Preset
from ..pipeline.stages import Work
from ..io.items import Item
from .calibrate import reference_strings
from .compare import Comparison
from ..calibration import CalibratedPoint
from ..metrics import get_metric
from .operating_points import Costs


@dataclass
class Tally:
    """One setting's running totals."""

    guide: str | None  # None: a model alone
    retain: float
    prune_layer: int = 0
    n: int = 0
    score: float = 0.0
    per_type: dict[str, list[float]] = field(default_factory=dict)  # type -> [score, n]
    large_calls: int = 0
    exits: int = 0
    retained: int = 0
    visual: int = 0
    seconds: float = 0.0
    # Per item the large model answered: its time there / the large model alone's on the item.
    large_cost: list[float] = field(default_factory=list)

    def add(self, kind: str | None, value: float, *, large: bool, retained: int, visual: int) -> None:
        self.n += 1
        self.score += value
        t = self.per_type.setdefault(kind or "all", [0.0, 0])
        t[0] += value
        t[1] += 1
        self.large_calls += large
        self.exits += not large and self.guide is not None
        self.retained += retained if large else 0
        self.visual += visual

    def summary(self, large_accuracy: float | None = None, relative_compute: float | None = None) -> dict[str, Any]:
        acc = self.score / self.n if self.n else None
        out = {
            "accuracy": _r(acc),
            "per_type": {k: _r(v[0] / v[1]) for k, v in sorted(self.per_type.items())},
            "items_per_s": _r(self.n / self.seconds if self.seconds > 0 else None, 3),
            "large_calls": self.large_calls,
            "n": self.n,
        }
        if self.guide is None:
            return out
        return {
            "guide": self.guide,
            "retain": self.retain,
            "prune_layer": self.prune_layer,
            **out,
            "relative_accuracy": _r(acc / large_accuracy if acc is not None and large_accuracy else None),
            "exit_rate": _r(self.exits / self.n if self.n else None),
            "relative_compute": _r(relative_compute),
            # Mean over the items the large model answered.
            "retained_tokens": _r(self.retained / self.large_calls if self.large_calls else None, 1),
            "visual_tokens": _r(self.visual / self.n if self.n else None, 1),
        }


DEFAULT_RETAINS = (1.0, 0.5, 0.25, 0.09)


def _r(x, nd: int = 4):
    return None if x is None else round(x, nd)


class Evaluation:
    """Runs the settings over batches of labelled items; `result()` gives the JSON object of `sgl eval`."""

    def __init__(self, engine: Engine, guides: list[str], retains: list[float], metric: str,
                 threshold: float | None = None, calibration: CalibratedPoint | None = None,
                 save_scores: bool = False):
        self.save_scores = save_scores
        self.metric_name = metric
        self.metric = get_metric(metric)
        self.threshold = threshold
        self.calibration = calibration
        if calibration is not None and (calibration.retain not in retains or "sgl" not in guides
                                        or threshold != calibration.threshold):
            raise ValueError("checking a calibration needs the sgl guide at its retain and threshold")
        self.comparison = Comparison(engine, [(g, r) for g in guides for r in retains], threshold)
        self.settings = self.comparison.settings
        self.tallies = {s: Tally(s[0], s[1], self.comparison.prune_layer(s[0])) for s in self.settings}
        self.small_alone = Tally(None, 1.0) if engine.small is not None else None
        self.large_alone = Tally(None, 1.0)
        self.errors: list[str] = []
        self.small_ms: list[float] = []  # per item: the small model's pass
        self.alone_ms: list[float] = []  # per item: the large model alone
        self.needs_small = {g: self.comparison.guides[g].needs_small for g, _ in self.settings}
        self.preset: Preset | None = None  # set by from_preset: the result names it

    @classmethod
    def from_preset(cls, preset: Preset, guides: list[str] | None = None, retains: Iterable[float] = DEFAULT_RETAINS,
                    metric: str = "vqa", threshold: float | None = None, calibration: str | Path | None = None, *,
                    save_scores: bool = False, notify: Callable[[str], None] | None = None,
                    warn: Callable[[str], None] | None = None) -> "Evaluation":
        """Load `preset`'s models for `guides` at `retains` and evaluate with them (`EvaluationPlan`)."""
        return EvaluationPlan.make(preset, guides, retains, metric, threshold, calibration, save_scores=save_scores,
                                   notify=notify, warn=warn).load()

    @property
    def random_weights(self) -> bool:
        return self.comparison.engine.random_weights

    def close(self) -> None:
        """Free the engine's large backend (`Engine.close`)."""
        self.comparison.engine.close()

    def run(self, items: Iterable[Item], on_batch: Callable[[list[dict], int], None] | None = None,
            details: Path | None = None) -> dict:
        """Evaluate `items` (labelled) in batches of the engine's batch size and give `result()`. `details`: a JSONL
        file of every item's answers per setting (with `save_scores`, the rankings beside it:
        `io/scores.py`'s `scores_path`); `on_batch(details, n_items)` after each batch."""
        import json

        from ..pipeline.record import SCORES_KEY
        from ..io.scores import ScoreWriter, scores_path

        sink = details.open("w", encoding="utf-8") if details else None
        scores = ScoreWriter(scores_path(details), append=False, settings=True) if self.save_scores else None
        try:
            for batch in batches(items, self.comparison.engine.settings.batch_size):
                rows = self.add_batch(batch)
                for r in rows:
                    payloads = r.pop(SCORES_KEY, {})
                    if sink:
                        sink.write(json.dumps(r) + "\n")
                    for setting, payload in payloads.items():
                        scores.write(r["line"], payload, setting)
                if sink:
                    sink.flush()
                if on_batch:
                    on_batch(rows, len(batch))
        finally:
            if sink:
                sink.close()
            if scores:
                scores.close()
        return self.result()

    def add_batch(self, items: list[Item]) -> list[dict]:
        """Evaluate one batch; returns per-item detail records (answers and correctness per setting)."""
        batch = self.comparison.batch(items)
        live = batch.live
        self.errors += [w.error for w in batch.works if w.error is not None]
        if not live:
            return []
        refs = [reference_strings(w.item.reference) for w in live]
        details = [{"id": w.item.id, "line": w.item.line, "type": w.item.type, "reference": w.item.reference}
                   for w in live]
        n_visual = [w.encoded.n_visual for w in live]
        alone = batch.seconds["large_alone"] * 1000 / len(live)
        self.small_ms += [w.ms["small"] for w in live]
        self.alone_ms += [alone] * len(live)
        self._tally(self.large_alone, "large", live, refs, batch.large_alone, details, [True] * len(live),
                    n_visual, n_visual, batch.seconds["large_alone"])
        if self.small_alone is not None:
            self._tally(self.small_alone, "small", live, refs, [w.small.answer for w in live], details,
                        [False] * len(live), [0] * len(live), n_visual, batch.seconds["small_alone"])
        for guide, retain in self.settings:
            outcomes = batch.outcomes[(guide, retain)]
            large = [o.exit == "large" for o in outcomes]
            kept = [o.n_kept for o in outcomes]
            if any(large):
                share = batch.large_seconds[(guide, retain)] * 1000 / sum(large)
                self.tallies[(guide, retain)].large_cost += [share / alone if alone > 0 else 0.0] * sum(large)
            self._tally(self.tallies[(guide, retain)], f"{guide}@{retain:g}", live, refs,
                        [o.answer for o in outcomes], details, large, kept, n_visual, batch.seconds[(guide, retain)])
        if self.save_scores:
            self._attach_scores(batch, details)
        return details

    def _attach_scores(self, batch, details: list[dict]) -> None:
        """Each detail record carries, under SCORES_KEY, its ranking and kept tokens per setting (the guide's
        scores; after an exit, the small model's SGP importance and nothing kept; at retain 1, every token kept)."""
        from ..pipeline.record import SCORES_KEY, token_grids
        from ..io.scores import score_payload

        for i, (w, d) in enumerate(zip(batch.live, details)):
            grids = token_grids(self.comparison.engine, w)
            payloads = {}
            for guide, retain in self.settings:
                o = batch.outcomes[(guide, retain)][i]
                if o.exit == "small":
                    scores, kept = w.small.importance, []
                else:
                    scores, kept = o.ranking()
                    scores = scores if scores is not None else torch.empty(0)
                seen = grids if o.reduced is None else token_grids(self.comparison.engine, w, o.reduced)
                payloads[f"{guide}@{retain:g}"] = score_payload(scores.float(), kept, seen)
            d[SCORES_KEY] = payloads

    def _tally(self, tally: Tally, key: str, live: list[Work], refs, answers, details, large, kept, visual,
               seconds: float) -> None:
        tally.seconds += seconds
        for w, ref, answer, d, is_large, k, n in zip(live, refs, answers, details, large, kept, visual):
            value = self.metric(answer, ref)
            tally.add(w.item.type, value, large=is_large, retained=k, visual=n)
            d[key] = {"answer": answer, "correct": value}
            if tally.guide is not None:
                d[key]["exit"] = "large" if is_large else "small"
            if is_large:
                d[key]["retained_tokens"] = k

    def relative_compute(self, setting: tuple[str, float]) -> float | None:
        """The small model + (1 - exit rate) x the large model at `setting`, each stage's cost the median over items
        of its time relative to the large model alone on the item (`Costs.paired`)."""
        tally = self.tallies[setting]
        if not tally.n or not self.alone_ms:
            return None
        small = Costs.paired(self.small_ms, self.alone_ms, {}).small if self.needs_small[setting[0]] else 0.0
        pruned = statistics.median(tally.large_cost) if tally.large_cost else 0.0
        return Costs(small, 1.0, {setting[1]: pruned}).relative(setting[1], tally.exits / tally.n)

    def result(self) -> dict[str, Any]:
        large = self.large_alone.summary()
        out = {
            "items": self.large_alone.n,
            "metric": self.metric_name,
            "threshold": self.threshold,
            "small_alone": self.small_alone.summary() if self.small_alone else None,
            "large_alone": {**large, "visual_tokens": _r(self.large_alone.visual / max(1, self.large_alone.n), 1)},
            "results": [self.tallies[s].summary(large["accuracy"], self.relative_compute(s)) for s in self.settings],
            "errors": self.errors,
        }
        if self.calibration is not None:
            out["calibration"] = self.check(out)
        if self.preset is not None:
            out["preset"] = self.preset.name
        return out

    def check(self, result: dict[str, Any]) -> dict[str, Any]:
        """The calibrated operating point: what its file predicted, and what it measures on these items."""
        cal = self.calibration
        row = next(r for r in result["results"] if r["guide"] == "sgl" and r["retain"] == cal.retain)
        keys = ("exit_rate", "accuracy", "relative_accuracy", "relative_compute")
        predicted = {k: cal.predicted.get(k) for k in keys} if cal.predicted else None
        return {"file": str(cal.path), "retain": cal.retain, "prune_layer": row["prune_layer"],
                "threshold": cal.threshold, "predicted": predicted, "predicted_items": cal.n_items,
                "measured": {k: row[k] for k in keys}, "measured_items": row["n"]}


@dataclass
class EvaluationPlan:
    """What an evaluation will run, settled before any model loads (`make`), then `load`ed."""

    preset: Preset
    guides: list[str]
    retains: list[float]
    metric: str
    threshold: float | None
    calibration: CalibratedPoint | None
    save_scores: bool = False

    @classmethod
    def make(cls, preset: Preset, guides: list[str] | None = None, retains: Iterable[float] = DEFAULT_RETAINS,
             metric: str = "vqa", threshold: float | None = None, calibration: str | Path | None = None, *,
             save_scores: bool = False, notify: Callable[[str], None] | None = None,
             warn: Callable[[str], None] | None = None) -> "EvaluationPlan":
        """`guides` (default: every guide the preset can run) at `retains`. Nothing exits early unless
        `threshold`, or `calibration` (a file whose point is then measured too: the sgl guide at its retain, prune
        layer and threshold; `engine/calibration.py`, purpose "eval")."""
        from ..backends import check_preset, missing
        from ..guides import guide_class, usable_guides
        from ..guides.base import require_small

        get_metric(metric)
        if threshold is not None and calibration is not None:
            raise SettingError("give {} or {}, not both", "threshold", "calibration")
        preset = preset.with_settings(no_exit=True)
        guides = list(guides) if guides else [  # by default every guide the pair and its large backend can run
            g for g in usable_guides() if (preset.small is not None or not guide_class(g).needs_small)
            and not missing(preset, g)]
        check_preset(preset, guides)
        for g in guides:
            require_small(guide_class(g), preset.small is not None, preset.name)
        retains = list(retains)
        point = None
        if calibration is not None:
            resolved = resolve_calibration(preset, "eval", calibration, notify=notify, warn=warn or notify)
            preset, point, threshold = resolved.preset, resolved.point, resolved.threshold
        if point is not None:  # its operating point is among the settings
            retains = sorted({*retains, point.retain}, reverse=True)
            guides = guides if "sgl" in guides else ["sgl", *guides]
        if threshold is not None and preset.small is None:
            raise SettingError("early exit ({}/{}) needs a small model", "threshold", "calibration")
        return cls(preset.with_settings(guide=guides[0]), guides, retains, metric, threshold, point, save_scores)

    def load(self) -> Evaluation:
        """The models loaded (the small one whenever the preset names one: it is also measured alone)."""
        ev = Evaluation(Engine.load(self.preset, small=True), self.guides, self.retains, self.metric,
                        self.threshold, self.calibration, self.save_scores)
        ev.preset = self.preset
        return ev


def evaluate(engine: Engine, items: Iterable[Item], guides: list[str], retains: list[float], metric: str,
             threshold: float | None = None, on_batch: Callable[[list[dict], int], None] | None = None,
             calibration: CalibratedPoint | None = None, save_scores: bool = False) -> dict:
    """Evaluate `items` (labelled) in batches of the engine's batch size; `on_batch(details, n_items)` is
    called after each batch. With `calibration` (its threshold is `threshold`; the sgl guide and its retain
    among the settings), the result's `calibration` checks its operating point. With `save_scores`, each detail
    record carries its rankings per setting under `SCORES_KEY` (core/record.py)."""
    ev = Evaluation(engine, guides, retains, metric, threshold, calibration, save_scores)
    return ev.run(items, on_batch)
