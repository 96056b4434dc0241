"""The model seams: what the engine asks of each model of the pair, whatever runs it.

Two roles, two interfaces, declared here (the pipeline, the comparison of guides, the records and the bench read
nothing else of a model: tests/test_contract.py checks that with `ast`):

- `LargeBackend`: the large model. It answers from the visual tokens a guide kept (`generate`), and, for guides of
  the other kinds (`guides.base.Kind`), ranks inside its own prefill or answers from a reduced input; `answer` is
  the one place a guide's kind is dispatched on.
- `SmallModel`: the small model. It answers greedily while SGP's importance is captured (`answer`), and re-reads
  its answer from a subset of the visual tokens (`reread`, SEE's consistency).

Both are `Model`s: a `name`, declared engine `options` (validated before anything loads), classmethods
`check_installed`, `check_spec`, `check_options` and `load(spec, role, options)`, and, once loaded, the facts sgl
reads of a checkpoint (`ModelFacts`: family, processor, config, visual-token layout, decoding). A backend is one
module with a subclass and one line in the registry (`backends/__init__.py`), or a package of its own under the
entry-point groups `sgl.backends` (large) and `sgl.small_backends` (small): examples/backend-plugin has both.

Capabilities are declared, not inferred: a guide declares what it `needs` (guides/base.py), a large backend what it
`offers`, and `check` refuses a mismatch before any model loads.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any, ClassVar

# The seam's parts, in modules of their own, named here too (what backends import).
from .checks import (  # noqa: F401
    CAPABILITIES, CapabilityError, bad_token_id, check, check_quantize, needs, refuse_reduced_video)
from .options import Option, check_options  # noqa: F401
from .results import Answer, LargeInputs, Reduced, SmallAnswer  # noqa: F401
from .stream import LargeStream

if TYPE_CHECKING:
    import torch

    from ..core.generate import Generation
    from ..guides.base import Guide
    from ..preset import ModelSpec


# -- what every model is ---------------------------------------------------------------------------------------
class ModelFacts:
    """What sgl reads of a checkpoint from its `family` (sgl's adapter), `processor` (its own: sgl encodes every
    item with it, whatever runs the weights) and `model` (the transformers module, or an object holding its
    `config` alone)."""

    family: Any
    processor: Any
    model: Any

    @property
    def image_token_id(self) -> int:
        return self.family.image_token_id(self.model)

    @property
    def num_layers(self) -> int:
        return int(self.model.config.get_text_config().num_hidden_layers)

    @property
    def context(self) -> int:
        """The longest prompt plus answer the model takes (`max_position_embeddings`; 0: not said)."""
        return int(getattr(self.model.config.get_text_config(), "max_position_embeddings", 0) or 0)

    def visual_mask(self, encoding: dict) -> "torch.Tensor":
        """(S,) bool: the visual-token columns of one encoded item."""
        return self.family.visual_mask(self.model, encoding)

    def decode(self, tokens: list[int]) -> str:
        """Generated ids as the answer's text (special tokens skipped, stripped)."""
        return self.processor.tokenizer.decode(tokens, skip_special_tokens=True).strip()


class Model(ModelFacts, abc.ABC):
    """A loaded model of the pair, in either role."""

    name: ClassVar[str] = ""
    options: ClassVar[dict[str, Option]] = {}  # the engine options it takes, declared

    spec: "ModelSpec"  # what was loaded (its quantize says how the weights ran)
    eos_ids: frozenset[int]
    random_weights: bool = False  # a built-in random pair's: its answers are noise
    takes_video: ClassVar[bool] = False  # whether it answers items with a video (its family must take them too)

    @classmethod
    @abc.abstractmethod
    def load(cls, spec: "ModelSpec", role: str, options: dict) -> "Model":
        """The model of `spec` in `role` ("small" or "large"), with `options` (checked by `check_options`)."""

    @classmethod
    def check_installed(cls) -> None:
        """Refuse, before anything is built or loaded, a backend whose engine cannot be imported (one line)."""

    @classmethod
    def check_spec(cls, spec: "ModelSpec") -> None:
        """Refuse, before any model loads, a model this backend cannot run (its family, its quantization)."""

    @classmethod
    def check_options(cls, options: dict | None, where: str = "options") -> dict:
        """`options` validated against `cls.options` (an unknown key or a bad value: one line)."""
        return check_options(cls.name, cls.options, options, where)

    @property
    def device(self) -> str:
        """Where the model runs, as calibration caches record the conditions of their stage times."""
        return self.name

    @property
    def on_cpu(self) -> bool:
        """Whether it computes on this machine's CPU cores, which a stage running beside it then competes for (the
        pipeline's `auto` runs the stages in turn where both do)."""
        return False

    def describe(self) -> dict:
        """Fields every record of a run on this backend carries."""
        return {}

    def engine_options(self) -> dict:
        """What its engine runs with (dtype, attention, device, caches...), as `sgl bench` reports it."""
        return {}

    def close(self) -> None:
        """Free the engine's resources (a no-op where the garbage collector does it)."""

    @staticmethod
    def read_checkpoint(spec: "ModelSpec") -> tuple[Any, Any, Any, frozenset[int]]:
        """(processor, config, family, EOS ids) of a checkpoint folder, its weights not loaded: what a backend
        whose engine holds the weights elsewhere (vLLM, a test's stand-in) needs to encode and lay out items."""
        from types import SimpleNamespace

        from transformers import AutoConfig, GenerationConfig

        from ..builtin.locate import resolve_path
        from ..core.processors import load_processor
        from ..families import family_for

        path = resolve_path(spec.model)
        processor = load_processor(path, revision=spec.revision, trust_remote_code=spec.trust_remote_code)
        config = AutoConfig.from_pretrained(path, revision=spec.revision, trust_remote_code=spec.trust_remote_code)
        try:
            eos = GenerationConfig.from_pretrained(path).eos_token_id
        except OSError:  # no generation config: the text config's
            eos = None
        if eos is None:
            eos = config.get_text_config().eos_token_id
        return (processor, config, family_for(SimpleNamespace(config=config)),
                frozenset([eos] if isinstance(eos, int) else (eos or [])))


# -- the large model -----------------------------------------------------------------------------------------------
class LargeBackend(Model):
    """The large model. Subclass it: set `name`, `offers` (only what it really provides), `options`; implement
    `load` and `generate`; and the methods of the capabilities it offers."""

    offers: ClassVar[frozenset[str]] = frozenset()
    # Its modules are in this process: `sgl bench` times its vision tower alone and samples its memory.
    in_process: ClassVar[bool] = False
    # It runs a spec's `quantize` (bitsandbytes weights); one that does not refuses it (its records would say it).
    quantizes: ClassVar[bool] = False

    @classmethod
    def check_spec(cls, spec: "ModelSpec") -> None:
        """Refuse, before any model loads, a model this backend cannot run: this default, a `quantize` it would
        not apply (a subclass adds its own checks after calling it)."""
        check_quantize(cls, spec)

    @classmethod
    def gpus_per_worker(cls, options: dict | None) -> float:
        """The GPUs one Ray worker holding this backend's engine asks for, on a cluster with GPUs."""
        return 1.0

    @classmethod
    def random_weights_options(cls) -> dict | None:
        """The options with which its engine loads a folder holding a config and a processor alone with random
        weights of its own (`sgl bench --arch`); None: it cannot."""
        return None

    @classmethod
    def bench_options(cls, max_batch: int) -> dict:
        """The options `sgl bench` gives the engine unless told otherwise (`max_batch`: the most items it sends
        at once)."""
        return {}

    def describe(self) -> dict:
        """Fields every record of a run on this backend carries: `large_backend`, its name."""
        return {"large_backend": self.name}

    # -- the pass ---------------------------------------------------------------------------------------------
    def inputs(self, works: list, guides: list["Guide"]) -> LargeInputs:
        """The guides' view of each item and the scores of every guide that ranks before the language model. This
        default runs nothing of the large model (no image features: `GuideItem.features` is None); a backend that
        offers "large_features" or "vision_attention" overrides it."""
        from ..guides.base import GuideBatch, Kind

        items = [self.guide_item(w, None) for w in works]
        scores = {g.name: g.scores(GuideBatch(self, items)) for g in guides if g.kind is Kind.RANKS}
        return LargeInputs(list(works), [None] * len(works), items, scores)

    @staticmethod
    def guide_item(w, features):
        """A guide's view of one item (`Work` `w`), with the large model's image features or None."""
        from ..guides.base import GuideItem

        return GuideItem(id=w.item.id, line=w.item.line, question=w.item.question, visual=w.encoded.visual,
                         features=features, encoding=w.encoded.large,
                         small_importance=w.small.importance if w.small is not None else None)

    @abc.abstractmethod
    def generate(self, works: list, inputs: LargeInputs, kept: list, k: int, limits: list[int]) -> "Generation":
        """Greedy tokens per item from the `kept` visual tokens of each (indices in sequence order), the others
        dropped at decoder layer `k` (0: before the language model). A request that fails alone is that item's
        entry in `Generation.errors`."""

    def answer(self, works: list, inputs: LargeInputs | None, guide: "Guide", retain: float, k: int,
               limits: list[int]) -> list[Answer]:
        """Each item's answer under `guide` at `retain`, dropped at layer `k`: the one place a guide's kind is
        dispatched on. `inputs` (aligned with `works`) is not needed by a guide that reduces the input."""
        from ..guides import guide_label
        from ..guides.base import Kind
        from ..plugins import check_answers, check_kept, check_reduced, check_scores
        from . import backend_label

        who, n = backend_label(self), len(works)
        if guide.kind is Kind.REDUCES:
            got = self.generate_reduced(works, guide, retain, limits)
            gen, seen = got if isinstance(got, (tuple, list)) and len(got) == 2 else (None, None)
            check_answers(who, "generate_reduced", gen, n)
            check_reduced(who, "generate_reduced", seen, n)
            return [Answer(tokens, reduced=r, error=e) for tokens, r, e in zip(gen.tokens, seen, _errors(gen))]
        if k > 0:
            self.check_prune_layer(k)
        n_visual = [item.n_visual for item in inputs.items]
        if guide.kind is Kind.PREFILL:
            got = self.rank_in_prefill(guide, inputs, retain, k, limits)
            gen, scores, kept = got if isinstance(got, (tuple, list)) and len(got) == 3 else (None, None, None)
            check_answers(who, "rank_in_prefill", gen, n)
            check_scores(guide_label(guide), scores, n_visual)
            check_kept(guide_label(guide), kept, n_visual)
        else:
            scores, kept = self.rank(inputs, guide, retain)  # checked before the engine is asked for anything
            gen = self.generate(works, inputs, kept, k, limits)
            check_answers(who, "generate", gen, n)
        return [Answer(tokens, s, idx, error=e) for tokens, s, idx, e in zip(gen.tokens, scores, kept, _errors(gen))]

    def rank(self, inputs: LargeInputs, guide: "Guide", retain: float) -> tuple[list, list]:
        """(scores, kept) of each item under a guide that ranks before the language model (`Kind.RANKS`): its
        scores from `inputs` (or asked for now), the top `retain` kept; both checked (a ContractError naming the
        guide)."""
        from ..guides import guide_label
        from ..guides.base import GuideBatch
        from ..plugins import check_kept, check_scores

        n_visual = [item.n_visual for item in inputs.items]
        scores = inputs.scores.get(guide.name)
        if scores is None:  # a guide `inputs` was not asked for (it must not need watch_vision)
            scores = guide.scores(GuideBatch(self, inputs.items))
            check_scores(guide_label(guide), scores, n_visual)
        kept = [guide.keep(self, item, s, retain) for item, s in zip(inputs.items, scores)]
        check_kept(guide_label(guide), kept, n_visual)
        return scores, kept

    def check_prune_layer(self, k: int) -> None:
        """Refuse a decoder layer `k` > 0 the model cannot drop tokens at."""
        if "prune_inside_lm" not in self.offers:
            raise CapabilityError(f"the {self.name} large backend prunes before the language model only, not at "
                                  "{} " + str(k), "prune_layer")
        self.family.check_prune_layer(self.model, k)

    # -- the streaming pipeline ---------------------------------------------------------------------------------
    def stream(self) -> "LargeStream":
        """A stream of items for the streaming pipeline (pipeline/stream.py): `add` hands it a group of items,
        `ready` gives answers as they finish. This default answers each group as it is added (`answer`); a backend
        with an engine of its own that batches continuously (vLLM) keeps many items in flight instead."""
        return LargeStream(self)

    def default_in_flight(self, batch_size: int) -> int:
        """How many items the streaming pipeline keeps in this backend's stage at once unless told: for this
        default (a batch at a time), a batch of the small stage's size."""
        return batch_size

    # -- capability "lm_attention" ----------------------------------------------------------------------------
    def rank_in_prefill(self, guide: "Guide", inputs: LargeInputs, retain: float, k: int,
                        limits: list[int]) -> tuple["Generation", list, list]:
        """A guide that ranks from the large model's own layers < k (`Kind.PREFILL`): its scores read when layer k
        starts, the unkept tokens dropped there, in the same forward. (generation, scores, kept)."""
        raise _lacks(self, "lm_attention", guide)

    # -- capability "reduced_input" ---------------------------------------------------------------------------
    def reduced(self, works: list, guide: "Guide", retain: float) -> list[Reduced]:
        """What the large model would see of each item under a guide that reduces its input (`Kind.REDUCES`), no
        answer (`sgl inspect`, `sgl eval` without answers)."""
        raise _lacks(self, "reduced_input", guide)

    def generate_reduced(self, works: list, guide: "Guide", retain: float,
                         limits: list[int]) -> tuple["Generation", list[Reduced]]:
        """Greedy answers from the input `guide` reduced, every token of it kept; and what was seen of each
        item."""
        raise _lacks(self, "reduced_input", guide)


def _errors(gen) -> list:
    """A generation's per-item failures (`Generation.errors`; none for one that does not say)."""
    errors = getattr(gen, "errors", None)
    return list(errors) if errors is not None else [None] * len(gen.tokens)


def _lacks(backend: LargeBackend, capability: str, guide) -> CapabilityError:
    return CapabilityError(f"the {guide.name} guide needs {capability}, which the {backend.name} large backend "
                           "({}) does not offer", "large_backend")


class LayoutOnly(LargeBackend):
    """No large model: another model of the same family (the small one) lays out and ranks the visual tokens, for
    rankings that need no large model (`sgl inspect`'s sgl and random maps); nothing can be answered."""

    name: ClassVar[str] = "none"

    def __init__(self, facts: Model):
        self.facts = facts
        self.spec = facts.spec
        self.family, self.processor, self.model = facts.family, facts.processor, facts.model
        self.eos_ids = facts.eos_ids
        self.random_weights = facts.random_weights
        self.takes_video = facts.takes_video  # it lays out what the model it stands for takes

    @classmethod
    def load(cls, spec, role, options):  # noqa: D102 - made from a loaded model, never loaded
        raise TypeError("LayoutOnly is made from a loaded model, not loaded")

    def generate(self, works, inputs, kept, k, limits):
        raise RuntimeError("no large model is loaded: nothing can be answered")


# -- the small model -----------------------------------------------------------------------------------------------
class SmallModel(Model):
    """The small model: its greedy answer with the SGP importance (the attention each visual token receives, summed
    over its layers and heads, from the prompt after the image and every generated token), and SEE's re-read."""

    @abc.abstractmethod
    def answer(self, works: list, limits: list[int], capture: bool = True) -> list[SmallAnswer]:
        """Each item's greedy answer (`Work.encoded.small`), at most `limits[i]` tokens; with `capture`, the SGP
        importance of its visual tokens."""

    @abc.abstractmethod
    def reread(self, works: list, kept: list) -> list[list[float]]:
        """The probability of each token of each item's answer (`Work.small`, its `state`) when the small model
        reads it again from only the `kept` visual tokens (indices in sequence order): one teacher-forced pass."""


