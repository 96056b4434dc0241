"""The engine: items in, records out, as each batch completes.

Per item (docs/method.md): the small VLM answers greedily while SGP importance is captured; SEE scores its answer
(confidence, and consistency from one teacher-forced re-read with the top `consistency_retain` visual tokens); if
`exit_score >= threshold` the small answer is returned, otherwise the large VLM answers from the top `retain`
fraction of visual tokens as the guide ranks them, in original order with their original position ids.

    engine = Engine.from_preset(load_preset("default").with_settings(retain=0.09))
    for record in engine.run(read_items(Path("batch.jsonl"))):
        print(record["answer"])

The stages are public, each with a typed result (`pipeline.stages`), so that other drivers (`sgl eval`'s comparison
of guides, `sgl inspect`, `sgl bench`) compose them rather than re-orchestrate the models:

    works = engine.prepare(items)            # Work.encoded
    engine.small_pass(works)                 # Work.small (nothing without a small model)
    todo = [w for w in works if w.ok and not engine.exits(w)]
    inputs = engine.large_inputs(todo)       # the large model's rows (vision tower), every guide's scores
    engine.large_pass(todo, inputs)          # Work.large
    records = [engine.record(w) for w in works]
"""

from __future__ import annotations

import collections
import dataclasses
import math
import time
import traceback
from typing import Any, Callable, Iterable, Iterator

import torch

from ..errors import ItemError, ModelLoadError
from ..backends import DEFAULT as DEFAULT_BACKEND, backend_class
from ..backends.base import LargeBackend, LargeInputs, check
from ..backends.transformers import TransformersLarge
from ..guides import guide_class, make_guide
from ..guides.base import Guide, GuideBatch, n_keep, top_k_in_order
from ..io.batches import batches
from ..io.fetch import Fetcher, FetchPolicy
from ..io.images import load_images
from ..io.items import Item
from ..preset import Preset, Settings
from ..core.capture import ImportanceCapture
from ..core.generate import Generation, Row, answer_probs, collate, greedy, rows_device
from ..core.limits import check_text
from .models import LoadedModel
from .record import make_record
from .stages import Encoded, LargeAnswer, SmallPass, Work

__all__ = ["Engine", "LargeInputs", "exits"]


def exits(work: Work, guide: Guide, threshold: float | None) -> bool:
    """SEE: the small answer is returned when its exit score reaches the threshold (only guides that run the small
    model can exit)."""
    return guide.needs_small and threshold is not None and work.small is not None \
        and work.small.exit_score >= threshold


class Engine:
    def __init__(self, settings: Settings, small: LoadedModel | None, large: LargeBackend | LoadedModel,
                 preset: Preset | None = None, fetch: FetchPolicy | None = None):
        self.settings = settings
        self.small = small
        # The large model is a backend (backends/); a transformers model loaded by hand is put behind its own.
        self.large: LargeBackend = large if isinstance(large, LargeBackend) else TransformersLarge(large)
        large = self.large
        self.preset = preset
        self.fetch = fetch or FetchPolicy()
        self.fetcher = Fetcher(self.fetch)
        self.save_scores = False  # records carry each item's ranking for `--save-scores` (core/record.py)
        self.guide: Guide = make_guide(settings.guide, settings)
        check(type(self.guide), type(large), settings.prune_layer)
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
    def from_preset(cls, preset: Preset, notify: Callable[[str], None] | None = None,
                    fetch: FetchPolicy | None = None) -> "Engine":
        """Load the preset's models (the small one only when the guide needs it). A preset that names a
        `calibration:` file runs with its settings, as `sgl run` does (`notify` receives what was taken)."""
        from ..calibration import resolve_calibration

        return cls.load(resolve_calibration(preset, "run", notify=notify).preset, fetch)

    @classmethod
    def load(cls, preset: Preset, fetch: FetchPolicy | None = None, *, small: bool | None = None,
             large: bool = True) -> "Engine":
        """Load the models of a preset whose calibration is resolved already (`resolve_calibration`), as it is.
        `small`: None loads the small model when the guide needs it, True whenever the preset names one.
        `large=False` loads no large model: the small one encodes and lays out the tokens in its place (for
        rankings that need no large model, `sgl inspect`'s); the prune layer is then 0, it cannot be checked."""
        from ..backends import transformers as models  # looked up at call time (tests count the loads)

        guide_cls = guide_class(preset.settings.guide)
        backend = backend_class(preset.large.backend or DEFAULT_BACKEND)
        check(guide_cls, backend, preset.settings.prune_layer)  # before any model loads
        if large:
            backend.check_spec(preset.large)
        needs_small = guide_cls.needs_small
        if needs_small and preset.small is None:
            raise ModelLoadError(f"preset {preset.name!r} names no small model, which the {preset.settings.guide} "
                                 "guide needs (use --guide cls, fastv or random)")
        want_small = preset.small is not None and (needs_small or small is True or not large)
        small_model = models.load_model(preset.small, "small") if want_small else None
        settings = preset.settings
        if large or small_model is None:
            large_model = backend.load(preset.large, "large", preset.large.vllm)
        else:
            large_model = TransformersLarge(small_model)  # stands in: same family, same processor and token layout
            settings = dataclasses.replace(settings, prune_layer=0)
        return cls(settings, small_model, large_model, preset, fetch)

    def with_settings(self, **changes: Any) -> "Engine":
        """An engine over the same loaded models with other settings (another guide, retain, threshold...)."""
        return Engine(dataclasses.replace(self.settings, **changes), self.small, self.large, self.preset, self.fetch)

    @property
    def random_weights(self) -> bool:
        return (self.small is not None and self.small.random_weights) or self.large.random_weights

    def prune_layer(self, guide: Guide | None = None) -> int:
        return (guide or self.guide).prune_layer(self.settings, self.large.num_layers)

    def close(self) -> None:
        """Free the large backend's engine (vLLM's processes and their shared memory; nothing on transformers, whose
        models the garbage collector frees). The engine, and every `with_settings` copy, cannot run after."""
        self.large.close()

    # -- streaming -------------------------------------------------------------------------------------------
    def run(self, items: Iterable[Item]) -> Iterator[dict]:
        """Yield one record per item, in input order, as each batch of `batch_size` runnable items completes.
        Image URLs of the items ahead are fetched while the current batch computes."""
        for batch in batches(self._prefetching(items), self.settings.batch_size, lambda item: item.error is None):
            yield from self.process(batch)

    def _prefetching(self, items: Iterable[Item]) -> Iterator[Item]:
        """The items, read `4 x batch_size` ahead, each one's URLs submitted to the fetcher as it is read."""
        ahead: collections.deque[Item] = collections.deque()
        window = 4 * self.settings.batch_size
        for item in items:
            if item.error is None:
                for ref in item.images:
                    if ref.kind == "url":
                        self.fetcher.submit(ref.value)
            ahead.append(item)
            if len(ahead) > window:
                yield ahead.popleft()
        yield from ahead

    @torch.inference_mode()
    def process(self, items: list[Item]) -> list[dict]:
        """Run a batch of items through every stage; failures are confined to their own records."""
        t0 = time.perf_counter()
        works = self.prepare(items)
        self.small_pass(works)
        todo = [w for w in works if w.ok and not self.exits(w)]
        if todo:
            t1 = time.perf_counter()
            # A guide that reduces the large model's input encodes it itself: the full rows are not needed.
            reduces = self.guide.reduces_input
            self._stage(todo, lambda group: self.large_pass(group, None if reduces else self.large_inputs(group)),
                        "large stage")
            _share(todo, "large", t1)
        total_ms = (time.perf_counter() - t0) * 1000 / max(1, len(works))
        return [self.record(w, total_ms) for w in works]

    # -- stages ----------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def prepare(self, items: list[Item]) -> list[Work]:
        """Encode each item for both models (images loaded, chat template applied); a bad item fails alone."""
        works = [Work(item, error=item.error) for item in items]
        for w in works:
            if w.ok:
                self._stage([w], lambda group: self._encode(group[0]), "encode")
        return works

    @torch.inference_mode()
    def small_pass(self, works: list[Work]) -> None:
        """The small model's answer with its SGP importance, then the SEE consistency re-read (`Work.small`)."""
        if self.small is None:
            return
        live = [w for w in works if w.ok]
        self._stage(live, self.small_answer, "small stage")
        self._stage([w for w in live if w.ok], self.consistency, "consistency stage")

    def analyze(self, items: list[Item]) -> list[Work]:
        """The small model's part for a batch: `prepare`, then `small_pass`."""
        works = self.prepare(items)
        self.small_pass(works)
        return works

    def exits(self, work: Work) -> bool:
        return exits(work, self.guide, self.settings.threshold)

    @torch.inference_mode()
    def large_inputs(self, works: list[Work], guides: Iterable[Guide] | None = None) -> LargeInputs:
        """The large model's rows for `works` (one vision-tower call, under each guide's `watch_vision`), and the
        scores of every guide in `guides` (default: the engine's) that ranks before the language model."""
        guides = list(guides) if guides is not None else [self.guide]
        return self.large.inputs(works, guides)

    @torch.inference_mode()
    def large_pass(self, works: list[Work], inputs: LargeInputs | None, guide: Guide | None = None,
                   retain: float | None = None, max_new_tokens: int | None = None) -> list[LargeAnswer]:
        """The large model's answers from the top `retain` of each item's visual tokens as `guide` ranks them
        (defaults: the engine's), dropped at the guide's prune layer; also stored in `Work.large` when the guide
        and retain are the engine's own. `max_new_tokens` caps every answer (1: a guide's ranking alone).
        A guide that reduces the input (`reduces_input`) needs no `inputs`: the backend's `generate_reduced`
        answers from all of its input."""
        own = guide is None and retain is None
        guide = guide or self.guide
        retain = self.settings.retain if retain is None else retain
        m = self.large
        k = self.prune_layer(guide)
        check(type(guide), type(m), k)  # another guide or layer than the engine's (sgl eval's comparison)
        limits = [min(w.item.max_new_tokens or self.settings.max_new_tokens, max_new_tokens or 1 << 30)
                  for w in works]
        if guide.reduces_input:
            gen, seen = m.generate_reduced(works, guide, retain, limits)
            answers = [LargeAnswer(tokens, m.decode(tokens), guide.name, torch.ones(r.n_visual),
                                   torch.arange(r.n_visual), 0, r) for tokens, r in zip(gen.tokens, seen)]
            if own:
                for w, a in zip(works, answers):
                    w.large = a
            return answers
        if [id(w) for w in inputs.works] != [id(w) for w in works]:
            inputs = inputs.select(works)
        if k > 0:
            m.check_prune_layer(k)
        if guide.ranks_in_prefill:
            gen, scores, kept = m.rank_in_prefill(guide, inputs, retain, k, limits)
        else:
            scores = inputs.scores.get(guide.name)
            if scores is None:  # a guide large_inputs was not asked for (it must not need watch_vision)
                scores = guide.scores(GuideBatch(m, inputs.items))
            kept = [guide.keep(m, item, s, retain) for item, s in zip(inputs.items, scores)]
            gen = m.generate(works, inputs, kept, k, limits)
        answers = [LargeAnswer(tokens, m.decode(tokens), guide.name, s, idx, k)
                   for tokens, s, idx in zip(gen.tokens, scores, kept)]
        if own:
            for w, a in zip(works, answers):
                w.large = a
        return answers

    def generate_kept(self, works: list[Work], rows: list[Row], kept: list[torch.Tensor], k: int,
                      limits: list[int]) -> Generation:
        """Greedy answers from the `kept` visual tokens of each row, dropping the others at layer k (the backend's
        `generate`, for drivers that hold rows of their own: `sgl bench`)."""
        return self.large.generate(works, LargeInputs(list(works), list(rows), [None] * len(works), {}), kept, k,
                                   limits)

    # -- the stages' work ------------------------------------------------------------------------------------
    def context(self) -> int:
        """The models' context: the longest prompt plus answer both can take (`max_position_embeddings`)."""
        limits = [m.context for m in (self.small, self.large) if m is not None]
        return min([n for n in limits if n > 0] or [1 << 31])

    def _check_length(self, item: Item, enc: dict) -> None:
        """An item too long for the models is an error before any model work (a 40,000-token question would take
        tens of GB to run, and fail)."""
        n = int(enc["input_ids"].shape[1])
        answer = item.max_new_tokens or self.settings.max_new_tokens
        cap = self.settings.max_prompt_tokens
        if cap is not None and n > cap:
            raise ItemError(item.fail(f"the prompt is {n:,} tokens, over max_prompt_tokens {cap:,}"))
        if n + answer > self.context():
            raise ItemError(item.fail(f"the prompt is {n:,} tokens; with up to {answer} answer tokens that is over "
                                      f"the models' context of {self.context():,} tokens"))

    def _encode(self, w: Work) -> None:
        fam = self.large.family
        if fam.max_images is not None and len(w.item.images) > fam.max_images:
            raise ItemError(w.item.fail(f"{fam.name} models take {fam.max_images} image per item; this item has "
                                        f"{len(w.item.images)}"))
        check_text(w.item, getattr(self.large.processor, "tokenizer", self.large.processor), self.context(),
                   self.settings)  # before tokenizing it whole
        images = load_images(w.item, self.fetcher, fam.max_image_pixels(self.large.processor))
        prompt = w.item.messages(self.settings.prompt_suffix.strip())
        large = fam.encode(self.large.processor, images, prompt)
        self._check_length(w.item, large)
        sizes = [im.size for im in images]
        if self.small is None:
            visual = self.large.visual_mask(large)
            small = None
        else:
            small = large if self.large.processor is self.small.processor \
                else self.small.family.encode(self.small.processor, images, prompt)
            ids_s, ids_l = small["input_ids"][0], large["input_ids"][0]
            n_s = int((ids_s == self.small.image_token_id).sum())
            n_l = int((ids_l == self.large.image_token_id).sum())
            if n_s != n_l or not torch.equal(ids_s, ids_l):
                raise ItemError(w.item.fail(
                    f"small and large processors disagree on this image ({n_s} vs {n_l} visual tokens"
                    + (")" if n_s != n_l else ", different input_ids)") + "; the models are not a pair"
                ))
            visual = self.small.family.visual_mask(self.small.model, small)
        if not visual.any():
            raise ItemError(w.item.fail("the prompt has no visual tokens (check the chat template)"))
        w.encoded = Encoded(large, small, visual, sizes, images, prompt)

    def _limits(self, works: list[Work]) -> list[int]:
        return [w.item.max_new_tokens or self.settings.max_new_tokens for w in works]

    def small_answer(self, works: list[Work]) -> None:
        """The small model's greedy answers with the SGP importance captured (`Work.small`, consistency unset)."""
        m = self.small
        t0 = time.perf_counter()
        rows = m.family.rows(m.model, [w.encoded.small for w in works])
        batch = collate(rows, m.pad_id, rows_device(m.model))
        width = batch.input_ids.shape[1]
        # SGP's prompt rows: every position after the row's last visual token (left padding shifts rows).
        prompt_rows = torch.zeros_like(batch.input_ids, dtype=torch.bool)
        starts = []
        for i, w in enumerate(works):
            visual = w.encoded.visual
            starts.append(width - len(visual) + int(visual.nonzero().max()) + 1)  # `visual` is on the host
            prompt_rows[i, starts[-1]:] = True
        span = (min(starts), width)

        with ImportanceCapture(m.model, n_keys=width) as cap:
            def observe(step: int, active: torch.Tensor, key_valid: torch.Tensor) -> None:
                # greedy observes a decode step only while some row is active: its one query row is marked
                cap.set_rows(prompt_rows if step == 0 else active[:, None], key_valid, span if step == 0 else (0, 1))

            gen = greedy(m.model, batch, self._limits(works), m.eos_ids, m.pad_id, observe=observe)
        scores = cap.scores.float().cpu()
        for i, (w, row) in enumerate(zip(works, rows)):
            visual = w.encoded.visual
            w.small = SmallPass(gen.tokens[i], gen.probs[i], self.decode(m, gen.tokens[i]),
                                scores[i, width - len(visual):][visual], consistency=float("nan"), row=row)
        _share(works, "small", t0)

    def consistency(self, works: list[Work]) -> None:
        """SEE's consistency: the small answer's probability re-read with its top `consistency_retain` tokens."""
        m = self.small
        t0 = time.perf_counter()
        rows = [w.small.row.keep(w.encoded.visual, top_k_in_order(
            w.small.importance, n_keep(len(w.small.importance), self.settings.consistency_retain))) for w in works]
        probs = answer_probs(m.model, rows, [w.small.tokens for w in works], m.pad_id)
        for w, p in zip(works, probs):
            w.small.consistency = float(math.prod(p))
        _share(works, "small", t0)
        _share(works, "reread", t0)  # also kept apart, for `sgl eval`'s small-alone speed

    def _stage(self, works: list[Work], fn: Callable[[list[Work]], Any], what: str) -> None:
        """Run `fn` on the live works; a failure fails its items (one by one, so one bad item does not fail its
        batch), never the run."""
        live = [w for w in works if w.ok]
        if not live:
            return
        try:
            fn(live)
        except ItemError as exc:
            for w in live:
                w.error = str(exc)
        except Exception as exc:  # noqa: BLE001 - a model failure fails its items, not the run
            if len(live) > 1:
                for w in live:
                    self._stage([w], fn, what)
                return
            detail = traceback.format_exception_only(type(exc), exc)[-1].strip()
            for w in live:
                w.error = w.item.fail(f"{what} failed: {detail}")

    @staticmethod
    def decode(m: LoadedModel, tokens: list[int]) -> str:
        return m.processor.tokenizer.decode(tokens, skip_special_tokens=True).strip()

    # -- records ---------------------------------------------------------------------------------------------
    def record(self, w: Work, total_ms: float = 0.0) -> dict:
        """The output record of one item (docs/cli.md: `sgl run`'s output fields)."""
        return make_record(self, w, total_ms)


def _share(works: list[Work], stage: str, t0: float) -> None:
    """Charge the time since t0 to `stage`, shared equally by the batch's items."""
    share = (time.perf_counter() - t0) * 1000 / len(works)
    for w in works:
        w.charge(stage, share)
