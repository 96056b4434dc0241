"""The engine: items in, records out, as each batch completes.

Per item (method.md): the small VLM answers greedily while SGP importance is captured; SEE scores its answer
(confidence, and consistency from one teacher-forced re-read with the top `consistency_retain` visual tokens);
if `exit_score >= threshold` the small answer is returned, otherwise the large VLM answers from the top
`retain` fraction of visual tokens, in original order with their original position ids.

    engine = Engine.from_preset(load_preset("default").with_settings(retain=0.09))
    for record in engine.run(read_items(Path("batch.jsonl"))):
        print(record["answer"])
"""

from __future__ import annotations

import math
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch

from .capture import ImportanceCapture
from .errors import ItemError, ModelLoadError
from .generate import Row, answer_probs, collate, greedy, rows_device
from .guides import Guide, VisionAttentionScores, make_guide, n_keep, top_k_in_order
from .items import Item, load_image
from .models import LoadedModel, load_model
from .preset import Preset, Settings
from .prune import PruneAtLayer

__all__ = ["Engine", "Work", "n_keep", "top_k_in_order"]


@dataclass
class Work:
    """One item in flight through the stages."""

    item: Item
    enc_small: dict | None = None
    enc_large: dict | None = None
    visual: torch.Tensor | None = None  # (S,) bool: visual placeholder columns
    small_row: Row | None = None
    small_tokens: list[int] = field(default_factory=list)
    small_probs: list[float] = field(default_factory=list)
    importance: torch.Tensor | None = None  # (N,) fp32: the SGP ranking (the small model's attention)
    scores: dict[str, torch.Tensor] = field(default_factory=dict)  # other guides' rankings, by guide name
    consistency: float | None = None
    large_tokens: list[int] | None = None
    kept: torch.Tensor | None = None
    ms: dict[str, float] = field(default_factory=lambda: {"small": 0.0, "large": 0.0, "reread": 0.0})
    error: str | None = None


class Engine:
    def __init__(self, settings: Settings, small: LoadedModel | None, large: LoadedModel,
                 preset: Preset | None = None):
        self.settings = settings
        self.small = small
        self.large = large
        self.preset = preset
        self.guide: Guide = make_guide(settings.guide, settings.seed)
        if self.guide.needs_small and small is None:
            raise ModelLoadError(f"the {self.guide.name} guide needs a small model; the preset names only large "
                                 "(use --guide cls, fastv or random, or add a small model)")
        if small is not None and small.family.name != large.family.name:
            raise ModelLoadError(
                f"small ({small.family.name}) and large ({large.family.name}) models are not of one family"
            )
        if settings.prune_layer > large.num_layers:
            raise ModelLoadError(
                f"prune_layer {settings.prune_layer} is beyond the large model's {large.num_layers} layers"
            )

    @classmethod
    def from_preset(cls, preset: Preset) -> "Engine":
        needs_small = make_guide(preset.settings.guide).needs_small
        if needs_small and preset.small is None:
            raise ModelLoadError(f"preset {preset.name!r} names no small model, which the sgl guide needs "
                                 "(use --guide cls, fastv or random)")
        small = load_model(preset.small, "small") if needs_small else None
        large = load_model(preset.large, "large")
        return cls(preset.settings, small, large, preset)

    @property
    def random_weights(self) -> bool:
        return (self.small is not None and self.small.random_weights) or self.large.random_weights

    # -- streaming -------------------------------------------------------------------------------------------
    def run(self, items: Iterable[Item]) -> Iterator[dict]:
        """Yield one record per item, in input order, as each batch of `batch_size` runnable items completes."""
        pending: list[Item] = []
        runnable = 0
        for item in items:
            pending.append(item)
            runnable += item.error is None
            if runnable >= self.settings.batch_size:
                yield from self.process(pending)
                pending, runnable = [], 0
        if pending:
            yield from self.process(pending)

    @torch.inference_mode()
    def analyze(self, items: list[Item]) -> list[Work]:
        """The small model's part for a batch: its answer, the SGP importance and the SEE scores."""
        works = [Work(item, error=item.error) for item in items]
        self._stage(works, self._encode, per_item=True)
        if self.small is not None:
            self._stage(works, self._small_stage)
            self._stage(works, self._consistency_stage)
        return works

    @torch.inference_mode()
    def process(self, items: list[Item]) -> list[dict]:
        """Run a batch of items through every stage; failures are confined to their own records."""
        t0 = time.perf_counter()
        works = self.analyze(items)
        self._stage(works, self._large_stage)
        total_ms = (time.perf_counter() - t0) * 1000 / max(1, len(works))
        return [self._record(w, total_ms) for w in works]

    def _stage(self, works: list[Work], fn, per_item: bool = False) -> None:
        live = [w for w in works if w.error is None]
        if not live:
            return
        groups = [[w] for w in live] if per_item else [live]
        for group in groups:
            try:
                fn(group)
            except ItemError as exc:
                for w in group:
                    w.error = str(exc)
            except Exception as exc:  # noqa: BLE001 - a model failure fails its items, not the run
                if len(group) > 1:  # retry one by one so one bad item does not fail its batch
                    for w in group:
                        self._stage([w], fn, per_item=True)
                    continue
                detail = traceback.format_exception_only(type(exc), exc)[-1].strip()
                for w in group:
                    w.error = w.item.fail(f"{fn.__name__.strip('_').replace('_', ' ')} failed: {detail}")

    # -- stages ----------------------------------------------------------------------------------------------
    def _prompt(self, item: Item) -> str:
        suffix = self.settings.prompt_suffix.strip()
        return f"{item.question}\n{suffix}" if suffix else item.question

    def _encode(self, group: list[Work]) -> None:
        (w,) = group
        image = load_image(w.item)
        prompt = self._prompt(w.item)
        w.enc_large = self.large.family.encode(self.large.processor, image, prompt)
        if self.small is None:
            w.visual = self.large.family.visual_mask(self.large.model, w.enc_large)
            if not w.visual.any():
                raise ItemError(w.item.fail("the prompt has no visual tokens (check the chat template)"))
            return
        w.enc_small = (
            w.enc_large if self.large.processor is self.small.processor
            else self.small.family.encode(self.small.processor, image, prompt)
        )
        ids_s, ids_l = w.enc_small["input_ids"][0], w.enc_large["input_ids"][0]
        n_s = int((ids_s == self.small.image_token_id).sum())
        n_l = int((ids_l == self.large.image_token_id).sum())
        if n_s != n_l or not torch.equal(ids_s, ids_l):
            raise ItemError(w.item.fail(
                f"small and large processors disagree on this image ({n_s} vs {n_l} visual tokens"
                + (")" if n_s != n_l else ", different input_ids)") + "; the models are not a pair"
            ))
        if n_s == 0:
            raise ItemError(w.item.fail("the prompt has no visual tokens (check the chat template)"))
        w.visual = self.small.family.visual_mask(self.small.model, w.enc_small)

    @staticmethod
    def _rows(m: LoadedModel, encs: list[dict]) -> list[Row]:
        return m.family.rows(m.model, encs)

    def large_rows(self, works: list[Work], cls_scores: bool = False) -> list[Row]:
        """The large model's rows (full sequences and image features); with `cls_scores`, the vision
        encoder's attention scores of each item's visual tokens are also stored as `scores["cls"]`."""
        m = self.large
        encs = [w.enc_large for w in works]
        if not cls_scores:
            return self._rows(m, encs)
        module, cls_index = m.family.cls_layer(m.model)
        with VisionAttentionScores(m.model, module, cls_index) as cap:
            rows = self._rows(m, encs)
        for w, s in zip(works, m.family.merge_patch_scores(m.model, cap.per_image, encs)):
            w.scores["cls"] = s
        return rows

    def small_generate(self, works: list[Work], rows: list[Row], capture: bool = True):
        """The small model's greedy answers; with `capture`, also the SGP importance per item (else None)."""
        m = self.small
        batch = collate(rows, m.pad_id, rows_device(m.model))
        width = batch.input_ids.shape[1]
        limits = [w.item.max_new_tokens or self.settings.max_new_tokens for w in works]
        if not capture:
            return greedy(m.model, batch, limits, m.eos_ids, m.pad_id), None
        # SGP's prompt rows: every position after the row's last visual token (left padding shifts rows).
        prompt_rows = torch.zeros_like(batch.input_ids, dtype=torch.bool)
        for i, w in enumerate(works):
            offset = width - len(w.visual)
            prompt_rows[i, offset + int(w.visual.nonzero().max()) + 1:] = True
        with ImportanceCapture(m.model, n_keys=width) as cap:
            gen = greedy(m.model, batch, limits, m.eos_ids, m.pad_id, capture=cap, prompt_rows=prompt_rows)
        scores = cap.scores.float().cpu()
        importance = [scores[i, width - len(w.visual):][w.visual] for i, w in enumerate(works)]
        return gen, importance

    def large_generate(self, works: list[Work], rows: list[Row], kept: list[torch.Tensor],
                       prune_layer: int | None = None):
        """The large model's greedy answers from the `kept` visual tokens of each row, at the prune layer."""
        m = self.large
        k = self.settings.prune_layer if prune_layer is None else prune_layer
        limits = [w.item.max_new_tokens or self.settings.max_new_tokens for w in works]
        device = rows_device(m.model)
        if k == 0:  # dropped tokens never enter the language model
            batch = collate([row.keep(w.visual, idx) for w, row, idx in zip(works, rows, kept)], m.pad_id, device)
            return greedy(m.model, batch, limits, m.eos_ids, m.pad_id)
        # Layers < k see every token; hooks drop the rest at layer k.
        m.family.check_prune_layer(m.model, k)
        batch = collate(rows, m.pad_id, device)
        keep = torch.zeros_like(batch.input_ids, dtype=torch.bool)
        for i, (w, row, idx) in enumerate(zip(works, rows, kept)):
            keep[i, keep.shape[1] - len(row.ids):] = Row.columns(w.visual, idx)
        with PruneAtLayer(m.model, k, keep.to(device)):
            return greedy(m.model, batch, limits, m.eos_ids, m.pad_id)

    def _small_stage(self, works: list[Work]) -> None:
        t0 = time.perf_counter()
        rows = self._rows(self.small, [w.enc_small for w in works])
        gen, importance = self.small_generate(works, rows)
        for i, w in enumerate(works):
            w.small_row = rows[i]
            w.small_tokens, w.small_probs = gen.tokens[i], gen.probs[i]
            w.importance = importance[i]
        self._charge(works, "small", t0)

    def _consistency_stage(self, works: list[Work]) -> None:
        m = self.small
        t0 = time.perf_counter()
        rows = [
            w.small_row.keep(w.visual, top_k_in_order(w.importance, n_keep(len(w.importance),
                                                                             self.settings.consistency_retain)))
            for w in works
        ]
        probs = answer_probs(m.model, rows, [w.small_tokens for w in works], m.pad_id)
        for w, p in zip(works, probs):
            w.consistency = float(math.prod(p))
        self._charge(works, "small", t0)
        self._charge(works, "reread", t0)  # also kept apart, for `sgl eval`'s small-alone speed

    def _large_stage(self, works: list[Work]) -> None:
        todo = [w for w in works if not self._exits(w)]
        if not todo:
            return
        t0 = time.perf_counter()
        rows = self.large_rows(todo, cls_scores=self.guide.name == "cls")
        gen, kept = self.guide.generate(self, todo, rows, self.settings.retain)
        for w, tokens, idx in zip(todo, gen.tokens, kept):
            w.large_tokens, w.kept = tokens, idx
        self._charge(todo, "large", t0)

    @staticmethod
    def _charge(works: list[Work], stage: str, t0: float) -> None:
        # A batch's time is shared equally by its items.
        share = (time.perf_counter() - t0) * 1000 / len(works)
        for w in works:
            w.ms[stage] += share

    # -- decisions and records -------------------------------------------------------------------------------
    @staticmethod
    def confidence(w: Work) -> float:
        """Geometric mean of the generated tokens' probabilities (EOS included)."""
        return math.exp(sum(math.log(max(p, 1e-45)) for p in w.small_probs) / len(w.small_probs))

    def exit_score(self, w: Work) -> float:
        return (self.confidence(w) + w.consistency) / 2

    def _exits(self, w: Work) -> bool:
        t = self.settings.threshold
        return self.guide.needs_small and t is not None and self.exit_score(w) >= t

    def _decode(self, m: LoadedModel, tokens: list[int]) -> str:
        return m.processor.tokenizer.decode(tokens, skip_special_tokens=True).strip()

    def _record(self, w: Work, total_ms: float) -> dict:
        item = w.item
        rec: dict[str, Any] = {"id": item.id, "line": item.line, "guide": self.guide.name}
        k = self.guide.prune_layer(self)
        if w.error is None:
            exited = self._exits(w)
            n_visual = int(w.visual.sum())
            kept = 0 if exited else len(w.kept)
            layers = self.large.num_layers
            small = self.small is not None
            small_answer = self._decode(self.small, w.small_tokens) if small else None
            rec.update(
                answer=small_answer if exited else self._decode(self.large, w.large_tokens),
                exit="small" if exited else "large",
                # Unrounded: the exit decision is `exit_score >= threshold` on exactly this number.
                exit_score=self.exit_score(w) if small else None,
                confidence=self.confidence(w) if small else None,
                consistency=w.consistency,
                small_answer=small_answer,
                visual_tokens=n_visual,
                retained_tokens=kept,
                prune_layer=k,
                token_ratio=round((k + (layers - k) * kept / n_visual) / layers, 6),
            )
        else:
            rec.update(answer=None, exit=None, exit_score=None, confidence=None, consistency=None,
                       small_answer=None, visual_tokens=None, retained_tokens=None, prune_layer=k,
                       token_ratio=None)
        rec["large_quantize"] = self.large.spec.quantize  # "nf4", "8bit" or None: how the large model's weights ran
        rec["ms"] = {"small": round(w.ms["small"], 1), "large": round(w.ms["large"], 1),
                     "total": round(total_ms, 1)}
        if item.has_reference:
            rec["reference"] = item.reference
        rec["error"] = w.error
        return rec
