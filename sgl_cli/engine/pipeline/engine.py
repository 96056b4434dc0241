"""The engine: items in, records out, as each batch completes.

Per item (docs/method.md): the small VLM answers greedily while SGP importance is captured; SEE scores its answer
(confidence, and consistency from one teacher-forced re-read with the top `consistency_retain` visual tokens); if
`exit_score >= threshold` the small answer is returned, otherwise the large VLM answers from the top `retain`
fraction of visual tokens as the guide ranks them, in original order with their original position ids.

    engine = Engine.from_preset(load_preset("default").with_settings(retain=0.09))
    for record in engine.run(read_items(Path("batch.jsonl"))):
        print(record["answer"])

The stages are public, each with a typed result (`pipeline.stages`), so that other drivers (`sgl eval`'s comparison
of guides, `sgl inspect`, `sgl bench`) compose them rather than re-orchestrate the models. What a guide or the
large backend gives back to a stage is checked (`plugins.py`'s checks: scores, kept indices, one answer per item); a
violation fails the items it concerns, naming the guide or backend (`stage`):

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
from types import SimpleNamespace
from typing import Any, Callable, Iterable, Iterator

import torch

from ..errors import ContractError, ItemError, ModelLoadError, SettingError
from .. import backends
from ..backends import backend_label
from ..backends.base import Answer, LargeBackend, LargeInputs, LayoutOnly, Reduced, SmallModel, bad_token_id, check
from ..guides import guide_class, guide_label, make_guide
from ..guides.base import Guide, Kind, n_keep, require_small, top_k_in_order
from ..io.batches import alone_on_failure, batches, until_failure
from ..io.fetch import Fetcher, FetchPolicy
from ..io.images import load_images
from ..io.items import Item
from ..preset import Preset, Settings
from ..core.limits import check_text
from ..plugins import check_answers, check_kept, check_reduced, check_scores
from .media import encode_item, item_video
from .record import make_record
from .stages import Encoded, LargeAnswer, SmallPass, Work

__all__ = ["Engine", "LargeInputs", "exits"]


def exits(work: Work, guide: Guide, threshold: float | None) -> bool:
    """SEE: the small answer is returned when its exit score reaches the threshold (only guides that run the small
    model can exit)."""
    return guide.needs_small and threshold is not None and work.small is not None \
        and work.small.exit_score >= threshold


class Engine:
    def __init__(self, settings: Settings, small: SmallModel | None, large: LargeBackend,
                 preset: Preset | None = None, fetch: FetchPolicy | None = None):
        self.settings = settings
        # A model loaded by hand (a transformers `LoadedModel`) is put behind its backend's interface.
        self.small: SmallModel | None = None if small is None else backends.seat(small, "small")
        self.large: LargeBackend = backends.seat(large, "large")
        small, large = self.small, self.large
        self.preset = preset
        self.fetch = fetch or FetchPolicy()
        self.fetcher = Fetcher(self.fetch)
        self.save_scores = False  # records carry each item's ranking for `--save-scores` (core/record.py)
        self.last_stream = None  # the streaming pipeline of the last `run`, with its busy times (`sgl bench`)
        self._same_processor: bool | None = None
        self.guide: Guide = make_guide(settings.guide, settings)
        check(type(self.guide), type(large), settings.prune_layer)
        require_small(type(self.guide), small is not None, preset.name if preset else None)
        if small is not None and small.family.name != large.family.name:
            raise ModelLoadError(
                f"small ({small.family.name}) and large ({large.family.name}) models are not of one family"
            )
        if settings.prune_layer > large.num_layers:
            raise ModelLoadError(
                f"prune_layer {settings.prune_layer} is beyond the large model's {large.num_layers} layers"
            )
        if settings.max_new_tokens >= self.context():  # every item would fail: refuse the run instead
            raise SettingError("{} " + f"{settings.max_new_tokens} leaves no room for a prompt in the models' context "
                               f"of {self.context():,} tokens", "max_new_tokens")

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
        """Load the models of a preset whose calibration is resolved already (`resolve_calibration`), as it is,
        each by its backend. `small`: None loads the small model when the guide needs it, True whenever the preset
        names one. `large=False` loads no large model: the small one lays out and ranks the tokens in its place
        (`LayoutOnly`: for rankings that need no large model, `sgl inspect`'s); the prune layer is then 0."""
        guide_cls = guide_class(preset.settings.guide)
        backends.check_preset(preset)  # backends, their options, the guide's needs: before any model loads
        if large:
            backends.check_spec(preset.large, "large")
        require_small(guide_cls, preset.small is not None, preset.name)
        want_small = preset.small is not None and (guide_cls.needs_small or small is True or not large)
        if want_small:
            backends.check_spec(preset.small, "small")
        small_model = backends.load(preset.small, "small") if want_small else None
        settings = preset.settings
        if large or small_model is None:
            large_model = backends.load(preset.large, "large")
        else:
            large_model = LayoutOnly(small_model)  # same family, same processor and token layout
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
        """Free both models' engines (vLLM's processes and their shared memory; nothing on transformers, whose
        models the garbage collector frees). The engine, and every `with_settings` copy, cannot run after."""
        self.large.close()
        if self.small is not None:
            self.small.close()

    # -- streaming -------------------------------------------------------------------------------------------
    def run(self, items: Iterable[Item]) -> Iterator[dict]:
        """Yield one record per item, in input order, as soon as it and every item before it are done. The
        streaming pipeline (`pipeline: streaming`: pipeline/stream.py) runs the small and the large stage at once;
        `serial` runs each batch of `batch_size` runnable items through both in turn (`process`); `auto`, the
        default, chooses (`pipeline_mode`). Image URLs of the items ahead are fetched while earlier items compute.
        If reading `items` raises (an input format's reader broke), the items read before it are run and
        recorded, then it is raised."""
        if self.pipeline_mode() == "streaming":
            from .stream import Stream

            self.last_stream = Stream(self, items)
            yield from self.last_stream
            return
        failed: list[BaseException] = []
        for batch in batches(self.prefetched(items, failed), self.settings.batch_size,
                             lambda item: item.error is None):
            yield from self.process(batch)
        if failed:
            raise failed[0]

    def pipeline_mode(self) -> str:
        """`settings.pipeline`, `auto` resolved: serial where every model computes on the CPU's cores (each stage
        alone keeps them all busy, so running both at once only makes them contend: on 2 cores streaming ran at
        0.81x the serial pipeline's rate on transformers and 0.94x on vLLM, docs/benchmark.md), else streaming
        (stages on devices of their own, or on a GPU, whose kernels run while the host prepares the other's)."""
        mode = self.settings.pipeline
        if mode != "auto":
            return mode
        models = [m for m in (self.small, self.large) if m is not None]
        return "serial" if all(m.on_cpu for m in models) else "streaming"

    def prefetched(self, items: Iterable[Item], failed: list[BaseException]) -> Iterator[Item]:
        """`items` read `4 x batch_size` ahead, each one's image URLs handed to the fetcher as it is read; if reading
        raises, the items before it, and the exception in `failed` (`io.batches.until_failure`)."""
        return self._prefetching(until_failure(items, failed))

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
            reduces = self.guide.kind is Kind.REDUCES
            self.stage(todo, lambda group: self.large_pass(group, None if reduces else self.large_inputs(group)),
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
                self.stage([w], lambda group: self._encode(group[0]), "encode")
        return works

    @torch.inference_mode()
    def small_pass(self, works: list[Work]) -> None:
        """The small model's answer with its SGP importance, then the SEE consistency re-read (`Work.small`)."""
        if self.small is None:
            return
        live = [w for w in works if w.ok]
        self.stage(live, self.small_answer, "small stage")
        self.stage([w for w in live if w.ok], self.consistency, "consistency stage")

    def exits(self, work: Work) -> bool:
        return exits(work, self.guide, self.settings.threshold)

    @torch.inference_mode()
    def large_inputs(self, works: list[Work], guides: Iterable[Guide] | None = None) -> LargeInputs:
        """The large model's rows for `works` (one vision-tower call, under each guide's `watch_vision`), and the
        scores of every guide in `guides` (default: the engine's) that ranks before the language model."""
        guides = list(guides) if guides is not None else [self.guide]
        inputs = self.large.inputs(works, guides)
        if not isinstance(inputs, LargeInputs) or len(inputs.items) != len(works) or len(inputs.works) != len(works):
            got = len(inputs.items) if isinstance(inputs, LargeInputs) else type(inputs).__name__
            raise ContractError(f"{backend_label(self.large)}: inputs gave {got} items for {len(works)}")
        for guide in guides:
            if guide.name in inputs.scores:
                check_scores(guide_label(guide), inputs.scores[guide.name], [w.encoded.n_visual for w in works])
        return inputs

    @torch.inference_mode()
    def large_pass(self, works: list[Work], inputs: LargeInputs | None, guide: Guide | None = None,
                   retain: float | None = None, max_new_tokens: int | None = None) -> list[LargeAnswer]:
        """The large model's answers from the top `retain` of each item's visual tokens as `guide` ranks them
        (defaults: the engine's), dropped at the guide's prune layer; also stored in `Work.large` when the guide
        and retain are the engine's own (an item the backend failed alone: its `Work.error`). `max_new_tokens`
        caps every answer (1: a guide's ranking alone). A guide that reduces the input (`Kind.REDUCES`) needs no
        `inputs`: the backend answers from all of its input."""
        own = guide is None and retain is None
        guide = guide or self.guide
        retain = self.settings.retain if retain is None else retain
        m = self.large
        k = self.prune_layer(guide)
        check(type(guide), type(m), k)  # another guide or layer than the engine's (sgl eval's comparison)
        limits = [min(n, max_new_tokens or 1 << 30) for n in self.limits(works)]
        if inputs is not None and [id(w) for w in inputs.works] != [id(w) for w in works]:
            inputs = inputs.select(works)
        answers = self.answers(works, m.answer(works, inputs, guide, retain, k, limits), guide, k)
        if own:
            for w, a in zip(works, answers):
                self._settle(w, a)
        return answers

    def answers(self, works: list[Work], got: Any, guide: Guide, k: int) -> list[LargeAnswer]:
        """The large backend's `Answer`s to `works` (from `answer`, or its stream), checked, decoded and typed:
        an item it failed alone, or answered with ids that are no tokens, has its error."""
        m = self.large
        who = backend_label(m)
        if not isinstance(got, list) or not all(isinstance(a, Answer) for a in got):
            raise ContractError(f"{who}: answer gave {type(got).__name__}, not a list of Answers")
        check_answers(who, "answer", SimpleNamespace(tokens=[a.tokens for a in got]), len(works))
        if guide.kind is Kind.REDUCES:
            check_reduced(who, "answer", [a.reduced for a in got if a.error is None],
                          sum(a.error is None for a in got))
        out = []
        for a in got:
            error = None if a.error is None else f"large stage failed: {a.error}"
            if error is None and (problem := bad_token_id(m, a.tokens)) is not None:
                error = f"the {m.name} backend returned {problem}"
            out.append(LargeAnswer(a.tokens, self._decode(a.tokens) if error is None else None, guide.name,
                                   a.scores, a.kept, k, a.reduced, error))
        return out

    def settle(self, w: Work, got: Answer) -> None:
        """One item's answer from the large backend's stream (the engine's guide and retain): checked as a batch's
        are (`answers`), then `Work.large`, or the item's error. A violation of the contract fails the item."""
        try:
            (a,) = self.answers([w], [got], self.guide, self.prune_layer())
        except ContractError as exc:
            w.error = w.item.fail(str(exc))
            return
        self._settle(w, a)

    @staticmethod
    def _settle(w: Work, a: LargeAnswer) -> None:
        if a.error is None:
            w.large = a
        else:
            w.error = w.item.fail(a.error)

    def keep(self, guide: Guide, item, scores: torch.Tensor, retain: float) -> torch.Tensor:
        """The visual tokens `guide` keeps of `item` (a GuideItem) at `retain`, checked: 1-D integer indices,
        strictly increasing, within the item's visual tokens, at least one (else a ContractError naming it)."""
        kept = guide.keep(self.large, item, scores, retain)
        check_kept(guide_label(guide), [kept], [item.n_visual])
        return kept

    def reduced(self, works: list[Work], guide: Guide, retain: float) -> list[Reduced]:
        """What the large model would see of each item under a guide that reduces its input (the backend's
        `reduced`), checked: one per item."""
        seen = self.large.reduced(works, guide, retain)
        check_reduced(backend_label(self.large), "reduced", seen, len(works))
        return seen

    def _decode(self, tokens: list[int]) -> str:
        text = self.large.decode(tokens)
        if not isinstance(text, str):
            raise ContractError(f"{backend_label(self.large)}: decode gave a {type(text).__name__}, not a string")
        return text

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
        video = item_video(w.item, (self.small, self.large), self.settings, self.fetcher)
        images = load_images(w.item, self.fetcher, fam.max_image_pixels(self.large.processor)) \
            if w.item.images else []
        prompt = w.item.messages(self.settings.prompt_suffix.strip())
        large = encode_item(w.item, fam, self.large.processor, images, prompt, video)
        self._check_length(w.item, large)
        sizes = [im.size for im in images]
        if self.small is None:
            visual = self.large.visual_mask(large)
            small = None
        else:
            small = large if self._one_encoding() else encode_item(
                w.item, self.small.family, self.small.processor, images, prompt, video)
            ids_s, ids_l = small["input_ids"][0], large["input_ids"][0]
            n_s = int(self.small.visual_mask(small).sum())
            n_l = int(self.large.visual_mask(large).sum())
            if n_s != n_l or not torch.equal(ids_s, ids_l):
                raise ItemError(w.item.fail(
                    f"small and large processors disagree on this image ({n_s} vs {n_l} visual tokens"
                    + (")" if n_s != n_l else ", different input_ids)") + "; the models are not a pair"
                ))
            visual = self.small.visual_mask(small)
        if not visual.any():
            raise ItemError(w.item.fail("the prompt has no visual tokens (check the chat template)"))
        w.encoded = Encoded(large, small, visual, sizes, images, prompt, video)

    def _one_encoding(self) -> bool:
        """Whether one encoding serves both models (their processors are equivalent: asked once)."""
        if self._same_processor is None:
            from ..core.processors import equivalent

            self._same_processor = equivalent(self.small.processor, self.large.processor)
        return self._same_processor

    def limits(self, works: list[Work]) -> list[int]:
        """Each item's answer length cap: its own `max_new_tokens`, else the run's."""
        return [w.item.max_new_tokens or self.settings.max_new_tokens for w in works]

    def small_answer(self, works: list[Work]) -> None:
        """The small model's greedy answers with the SGP importance captured (`Work.small`, consistency unset)."""
        m = self.small
        t0 = time.perf_counter()
        for w, a in zip(works, m.answer(works, self.limits(works))):
            w.small = SmallPass(a.tokens, a.probs, m.decode(a.tokens), a.importance, consistency=float("nan"),
                                state=a.state)
        _share(works, "small", t0)

    def consistency(self, works: list[Work]) -> None:
        """SEE's consistency: the small answer's probability re-read with its top `consistency_retain` tokens."""
        t0 = time.perf_counter()
        kept = [top_k_in_order(w.small.importance, n_keep(len(w.small.importance), self.settings.consistency_retain))
                for w in works]
        for w, p in zip(works, self.small.reread(works, kept)):
            w.small.consistency = float(math.prod(p))
        _share(works, "small", t0)
        _share(works, "reread", t0)  # also kept apart, for `sgl eval`'s small-alone speed

    def stage(self, works: list[Work], fn: Callable[[list[Work]], Any], what: str,
              catch: type[Exception] | tuple[type[Exception], ...] = Exception) -> None:
        """Run `fn` on the live works. An item that fails alone says so as data (`Work.error`); an exception of
        `catch` (others propagate) names no item, so the batch is run again item by item: only the items that fail
        alone get an error record, never the run. A ContractError (what a guide or backend gave back, checked) or
        an ItemError is the item's error as it says it."""
        def failed(w: Work, exc: BaseException) -> None:
            if isinstance(exc, ItemError):
                w.error = str(exc)
            elif isinstance(exc, ContractError):
                w.error = w.item.fail(str(exc))
            else:
                w.error = w.item.fail(f"{what} failed: {_one_line(exc)}")

        live = [w for w in works if w.ok]
        if live:
            alone_on_failure(live, fn, failed, catch)

    # -- records ---------------------------------------------------------------------------------------------
    def record(self, w: Work, total_ms: float = 0.0) -> dict:
        """The output record of one item (docs/cli.md: `sgl run`'s output fields)."""
        return make_record(self, w, total_ms)


def _one_line(exc: BaseException) -> str:
    """An exception as "Type: message", its notes after it in parentheses (tokenizers note "while processing 'ids'"
    after the error itself: alone, it says nothing)."""
    notes = [str(n) for n in getattr(exc, "__notes__", None) or []]
    lines = traceback.format_exception_only(type(exc), exc)
    detail = lines[-1 - len(notes)].strip() if len(lines) > len(notes) else type(exc).__name__
    return detail + (f" ({'; '.join(notes)})" if notes else "")


def _share(works: list[Work], stage: str, t0: float) -> None:
    """Charge the time since t0 to `stage`, shared equally by the batch's items."""
    share = (time.perf_counter() - t0) * 1000 / len(works)
    for w in works:
        w.charge(stage, share)
