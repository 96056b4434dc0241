"""Several settings (guide x retain) over the same items, sharing every model output that does not depend on them.

Per batch: the items are encoded and the small model answers once (its answer, SGP ranking and exit score depend
on neither retain nor guide); the large model's vision tower runs once, under every guide's `watch_vision`, which
gives each guide's scores; the unpruned large answer is computed once when asked for (it is "large alone" and
every setting at retain 1.0, where no guide drops anything). Only the pruned generations run per setting. Each
setting's time adds the measured time of every stage it needs. A small pass known already (a cache: `small=`) is
reused instead of run again.

`sgl eval` tallies accuracy from it, `sgl inspect` draws one item's rankings, and both see the same numbers as
the engine (tested equal to running each guide alone).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..backends.base import LargeInputs
from ..errors import ContractError
from ..pipeline.engine import Engine, exits
from ..pipeline.stages import Reduced, SmallPass, Work
from ..guides import make_guide
from ..guides.base import Guide, Kind, require_small
from ..io.items import Item


@dataclass
class SettingOutcome:
    """One setting's result for one item."""

    exit: str  # "small" (the small answer was returned; nothing was pruned) or "large"
    answer: str | None  # None when answers were not asked for (a ranking alone)
    scores: torch.Tensor | None = None  # the guide's scores (None after an exit, for a reduced input, or at retain
    # 1 for a guide that ranks inside the large model's prefill, which the unpruned answer does not run)
    kept: torch.Tensor | None = None  # the kept visual tokens, in order (None after an exit or for a reduced input)
    prune_layer: int = 0
    reduced: Reduced | None = None  # what the large model saw, for a guide that reduces its input (downsample)

    @property
    def n_kept(self) -> int:
        """The visual tokens the large model read (0 after an exit)."""
        if self.exit == "small":
            return 0
        return self.reduced.n_visual if self.reduced is not None else len(self.kept)

    def ranking(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(scores, kept) as views draw and save them: for a reduced input, which nothing ranked, every token of
        what the large model saw, kept, scored alike."""
        if self.reduced is not None:
            n = self.reduced.n_visual
            return torch.ones(n), torch.arange(n)
        return self.scores, self.kept


@dataclass
class BatchResult:
    works: list[Work]  # every item of the batch, failed ones included (`error` set)
    live: list[Work]  # the items that went through, in order; every list below is aligned with it
    large_alone: list[str] | None = None  # the large model's unpruned answers, when asked for
    outcomes: dict[tuple[str, float], list[SettingOutcome]] = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)  # per setting, "large_alone", "small_alone": stage time it needs
    # Per setting: the large model's share of its time alone (vision tower and pruned pass, for the items it ran).
    large_seconds: dict = field(default_factory=dict)


class Comparison:
    """`settings` (guide name, retain) pairs run on `engine`'s models. `threshold` lets the items of guides that
    run the small model exit early (the mixed system); None measures pruning alone."""

    def __init__(self, engine: Engine, settings: list[tuple[str, float]], threshold: float | None = None):
        self.engine = engine
        self.settings = list(settings)
        self.threshold = threshold
        self.guides: dict[str, Guide] = {}
        for name, _ in self.settings:
            self.guides.setdefault(name, make_guide(name, engine.settings))
        for guide in self.guides.values():
            require_small(type(guide), engine.small is not None, engine.preset.name if engine.preset else None)
        if threshold is not None and engine.small is None:
            raise ValueError("early exit (a threshold) needs a small model")

    def prune_layer(self, guide: str) -> int:
        return self.engine.prune_layer(self.guides[guide])

    @torch.inference_mode()
    def batch(self, items: list[Item], *, answers: bool = True, large_alone: bool = True,
              small: list[SmallPass | None] | None = None) -> BatchResult:
        """One batch. Without `answers`, the large model runs only where a guide ranks inside it (one token).
        `small`, aligned with `items`: each item's small pass when it is known already (None: run it); those
        items skip the small model, and their `ms["small"]` stays 0."""
        eng = self.engine
        t0 = time.perf_counter()
        works = eng.prepare(items)
        for w, known in zip(works, small or []):
            if known is not None and w.ok:
                w.small = known
        eng.small_pass([w for w in works if w.small is None])
        t_small = time.perf_counter() - t0
        live = [w for w in works if w.ok]
        if not live:
            return BatchResult(works, live)
        # A guide or backend that breaks its contract on an item (checked, named: a ContractError) fails that item
        # alone (Engine.stage: a batch that fails is retried item by item), which is left out of every setting;
        # the others are compared. Any other failure is the comparison's, as ever.
        t0 = time.perf_counter()
        parts: list[LargeInputs] = []
        eng.stage(live, lambda group: parts.append(eng.large_inputs(group, self.guides.values())), "large stage",
                  ContractError)
        live = [w for w in live if w.ok]
        if not live:
            return BatchResult(works, live)
        inputs = LargeInputs.join(parts).select(live)
        t_rows = (time.perf_counter() - t0) / len(live)  # per item
        t_full = 0.0
        full = None
        seconds: dict = {}
        if large_alone:
            t0 = time.perf_counter()
            full = self._each(live, lambda group: eng.large_pass(group, inputs, guide=_Everything(), retain=1.0))
            for w in live:
                if id(w) in full and full[id(w)].error is not None:  # the backend failed this item alone
                    w.error = w.item.fail(full[id(w)].error)
            t_full = (time.perf_counter() - t0) / len(live)
            seconds["large_alone"] = (t_rows + t_full) * len(live)
        if eng.small is not None:
            # The share of the small model's time spent answering (not on the SEE re-read).
            small = sum(w.ms["small"] for w in live)
            seconds["small_alone"] = t_small * sum(w.ms["small"] - w.ms["reread"] for w in live) / max(1e-9, small)

        settled: dict[tuple[str, float], tuple[dict[int, SettingOutcome], int]] = {}
        large_seconds: dict = {}
        for name, retain in self.settings:
            guide = self.guides[name]
            k = self.prune_layer(name)
            todo = [w for w in live if w.ok and not exits(w, guide, self.threshold)]
            # A guide that reduces the input runs the vision tower on its own images (timed in its pass), except
            # where the unpruned answer is its answer.
            reduces = guide.kind is Kind.REDUCES
            own_rows = reduces and not (retain >= 1.0 and full is not None)
            spent = 0.0 if own_rows else t_rows * len(todo)
            results: dict[int, SettingOutcome] = {}  # by id(work); absent: the item exited (or failed)
            if todo and retain >= 1.0 and full is not None:  # nothing is dropped: the unpruned answer, any guide
                ranked = dict(zip(map(id, inputs.works), inputs.scores[name])) if name in inputs.scores else {}
                for w in todo:  # a prefill ranker has no scores here
                    if id(w) in full:
                        a = full[id(w)]
                        results[id(w)] = SettingOutcome("large", a.answer, ranked.get(id(w)), a.kept, k)
                spent += t_full * len(todo)
            elif todo and reduces and not answers:  # what the large model would see, no answer
                seen = self._each(todo, lambda group: eng.reduced(group, guide, retain))
                for key, r in seen.items():
                    results[key] = SettingOutcome("large", None, None, None, k, r)
            elif todo and (answers or guide.kind is not Kind.RANKS):
                t0 = time.perf_counter()
                got = self._each(todo, lambda group: eng.large_pass(group, inputs, guide=guide, retain=retain,
                                                                    max_new_tokens=None if answers else 1))
                spent += time.perf_counter() - t0
                for w in todo:
                    a = got.get(id(w))
                    if a is not None and a.error is not None:  # the backend failed this item alone
                        w.error = w.item.fail(a.error)
                    elif a is not None:
                        results[id(w)] = SettingOutcome("large", a.answer if answers else None, a.scores, a.kept,
                                                        k, a.reduced)
            elif todo:
                def keep(group, name=name, guide=guide, retain=retain):
                    sub = inputs.select(group)
                    return [eng.keep(guide, item, s, retain) for item, s in zip(sub.items, sub.scores[name])]

                ranked = dict(zip(map(id, inputs.works), inputs.scores[name]))
                for key, kept in self._each(todo, keep).items():
                    results[key] = SettingOutcome("large", None, ranked[key], kept, k)
            settled[(name, retain)] = (results, k)
            large_seconds[(name, retain)] = spent
            seconds[(name, retain)] = spent + (t_small if guide.needs_small else 0.0)

        # Every list is aligned with the items that went through every setting (those that failed in one are out).
        live = [w for w in live if w.ok]
        out = BatchResult(works, live, seconds=seconds, large_seconds=large_seconds)
        if full is not None:
            out.large_alone = [full[id(w)].answer for w in live]
        for key, (results, k) in settled.items():
            out.outcomes[key] = [results.get(id(w)) or SettingOutcome("small", w.small.answer, None, None, k)
                                 for w in live]
        return out

    def _each(self, works: list[Work], fn) -> dict[int, Any]:
        """`fn(group)` (a list aligned with `group`) for `works`, by id(work); a ContractError fails its items
        (`Engine.stage`), which then have no entry."""
        got: dict[int, Any] = {}

        def run(group: list[Work]) -> None:
            got.update(zip(map(id, group), fn(group)))

        self.engine.stage(works, run, "large stage", ContractError)
        return got


class _Everything(Guide):
    """Keeps every visual token (retain 1, before the language model): the large model alone."""

    name = "everything"

    def prune_layer(self, settings, num_layers: int) -> int:
        return 0

    def score(self, item) -> torch.Tensor:
        return torch.ones(item.n_visual)
