"""`sgl eval`'s measurement: accuracy against retain, per guide, beside the small and large models alone.

Model outputs are reused wherever a setting's computation is identical: per batch the small model answers
once (its answer, SGP ranking and exit score do not depend on retain or on the guide), the large model's
image features and [CLS] scores are computed once, and its unpruned answer once (it is "large alone" and
every setting at retain 1.0, where no guide drops anything). Only the pruned large-model generations are
run per setting. A setting's items/s is computed from the measured time of every stage it needs.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch

from .calibrate_run import _reference
from .engine import Engine, Work
from .items import Item
from .metrics import get_metric


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

    def summary(self, large_accuracy: float | None = None) -> dict[str, Any]:
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
            # Mean over the items the large model answered.
            "retained_tokens": _r(self.retained / self.large_calls if self.large_calls else None, 1),
            "visual_tokens": _r(self.visual / self.n if self.n else None, 1),
        }


def _r(x, nd: int = 4):
    return None if x is None else round(x, nd)


class Evaluation:
    """Runs the settings over batches of labelled items; `result()` gives the JSON object of `sgl eval`."""

    def __init__(self, engine: Engine, guides: list[str], retains: list[float], metric: str,
                 threshold: float | None = None):
        if threshold is not None and engine.small is None:
            raise ValueError("early exit (a threshold) needs a small model")
        if "sgl" in guides and engine.small is None:
            raise ValueError("the sgl guide needs a small model; the preset names only large")
        self.metric_name = metric
        self.metric = get_metric(metric)
        self.threshold = threshold
        base = dataclasses.replace(engine.settings, threshold=threshold)
        self.engines = {g: Engine(dataclasses.replace(base, guide=g), engine.small, engine.large) for g in guides}
        self.base = next(iter(self.engines.values()))
        self.settings = [(g, r) for g in guides for r in retains]
        self.tallies = {s: Tally(s[0], s[1], self.engines[s[0]].guide.prune_layer(self.engines[s[0]]))
                        for s in self.settings}
        self.small_alone = Tally(None, 1.0) if engine.small is not None else None
        self.large_alone = Tally(None, 1.0)
        self.errors: list[str] = []

    @torch.inference_mode()
    def add_batch(self, items: list[Item]) -> list[dict]:
        """Evaluate one batch; returns per-item detail records (answers and correctness per setting)."""
        eng = self.base
        t0 = time.perf_counter()
        works = eng.analyze(items)  # the small model's part (nothing when there is no small model)
        t_analyze = time.perf_counter() - t0
        live = [w for w in works if w.error is None]
        self.errors += [w.error for w in works if w.error is not None]
        if not live:
            return []
        t0 = time.perf_counter()
        rows = eng.large_rows(live, cls_scores="cls" in self.engines)
        t_rows = (time.perf_counter() - t0) / len(live)  # per item
        t0 = time.perf_counter()
        full = [torch.arange(int(w.visual.sum())) for w in live]
        full_tokens = eng.large_generate(live, rows, full, prune_layer=0).tokens
        t_full = (time.perf_counter() - t0) / len(live)
        refs = [_reference(w.item.reference) for w in live]
        details = [{"id": w.item.id, "line": w.item.line, "type": w.item.type, "reference": w.item.reference}
                   for w in live]
        large_answers = [eng._decode(eng.large, t) for t in full_tokens]
        n_visual = [int(w.visual.sum()) for w in live]
        self._tally(self.large_alone, "large", live, refs, large_answers, details, [True] * len(live), n_visual,
                    n_visual, (t_rows + t_full) * len(live))
        small_s = 0.0
        if self.small_alone is not None:
            small_answers = [eng._decode(eng.small, w.small_tokens) for w in live]
            # The share of the batch's small-model time spent answering (not on the SEE re-read).
            small_s = t_analyze * sum(w.ms["small"] - w.ms.get("reread", 0.0) for w in live) / max(
                1e-9, sum(w.ms["small"] for w in live))
            self._tally(self.small_alone, "small", live, refs, small_answers, details, [False] * len(live),
                        [0] * len(live), n_visual, small_s)

        for guide, retain in self.settings:
            g_eng = self.engines[guide]
            exits = [guide == "sgl" and g_eng._exits(w) for w in live]
            todo = [i for i, e in enumerate(exits) if not e]
            answers = [eng._decode(eng.small, w.small_tokens) if e else None for w, e in zip(live, exits)]
            kept_n = [0] * len(live)
            seconds = t_analyze if guide == "sgl" else 0.0
            seconds += t_rows * len(todo)
            if todo and retain >= 1.0:  # nothing is dropped: the unpruned answer, whatever the guide
                for i in todo:
                    answers[i], kept_n[i] = large_answers[i], n_visual[i]
                seconds += t_full * len(todo)
            elif todo:
                t0 = time.perf_counter()
                gen, kept = g_eng.guide.generate(g_eng, [live[i] for i in todo], [rows[i] for i in todo], retain)
                seconds += time.perf_counter() - t0
                for i, tokens, idx in zip(todo, gen.tokens, kept):
                    answers[i], kept_n[i] = eng._decode(eng.large, tokens), len(idx)
            self._tally(self.tallies[(guide, retain)], f"{guide}@{retain:g}", live, refs, answers, details,
                        [not e for e in exits], kept_n, n_visual, seconds)
        return details

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

    def result(self) -> dict[str, Any]:
        large = self.large_alone.summary()
        return {
            "items": self.large_alone.n,
            "metric": self.metric_name,
            "threshold": self.threshold,
            "small_alone": self.small_alone.summary() if self.small_alone else None,
            "large_alone": {**large, "visual_tokens": _r(self.large_alone.visual / max(1, self.large_alone.n), 1)},
            "results": [self.tallies[s].summary(large["accuracy"]) for s in self.settings],
            "errors": self.errors,
        }


def evaluate(engine: Engine, items: Iterable[Item], guides: list[str], retains: list[float], metric: str,
             threshold: float | None = None, on_batch: Callable[[list[dict], int], None] | None = None) -> dict:
    """Evaluate `items` (labelled) in batches of the engine's batch size; `on_batch(details, n_items)` is
    called after each batch."""
    ev = Evaluation(engine, guides, retains, metric, threshold)
    batch: list[Item] = []
    size = engine.settings.batch_size

    def flush():
        details = ev.add_batch(batch)
        if on_batch:
            on_batch(details, len(batch))

    for item in items:
        batch.append(item)
        if len(batch) >= size:
            flush()
            batch = []
    if batch:
        flush()
    return ev.result()


def plot_eval(result: dict, path, title: str = "") -> None:
    """Accuracy against retain, one line per guide; the small and large models alone as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    by_guide: dict[str, list[tuple[float, float]]] = {}
    for r in result["results"]:
        if r["accuracy"] is not None:
            by_guide.setdefault(r["guide"], []).append((r["retain"], r["accuracy"]))
    for guide, pts in by_guide.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=guide)
    for name, style in (("large_alone", "-"), ("small_alone", "--")):
        acc = (result.get(name) or {}).get("accuracy")
        if acc is not None:
            ax.axhline(acc, color="grey", linestyle=style, linewidth=1, label=name.replace("_", " "))
    ax.set_xscale("log")
    retains = sorted({r["retain"] for r in result["results"]})
    ax.set_xticks(retains, [f"{r:g}" for r in retains])
    ax.minorticks_off()
    ax.set_xlabel("retain (fraction of visual tokens the large model keeps)")
    ax.set_ylabel(f"accuracy ({result['metric']})")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title or f"{result['items']} items", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
