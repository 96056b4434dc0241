"""The large-model backend seam: what the engine asks of the large model, whatever runs it.

A backend is a class with a `name`, the capabilities it `offers` (a frozenset of CAPABILITIES), classmethods
`check_installed()`, `check_spec(spec)` and `load(spec, role, options)`, and, once loaded: `family` (sgl's family
adapter for the checkpoint), `processor` (the checkpoint's HF processor, which sgl encodes with), `model` (what the family's methods take: the transformers
module, or an object with its `config` only), `device`, `inputs(works, guides) -> LargeInputs`,
`generate(works, inputs, kept, k, limits)` (a `core.generate.Generation`: tokens per item), `decode(tokens)`,
`describe()` (the record's fields) and `close()`. `image_token_id`, `num_layers`, `context` and `visual_mask(enc)`
have defaults here, read from `family` and `model.config`.

A backend that offers "lm_attention" also has `rank_in_prefill(guide, inputs, retain, k, limits)`. One that offers
"reduced_input" also has, for a guide that reduces the large model's input (`Guide.reduces_input`: downsample),
`reduced(works, guide, retain) -> list[Reduced]` (what the large model would see of each item, no answer: `sgl
inspect` and `sgl eval` without answers) and `generate_reduced(works, guide, retain, limits) -> (Generation,
list[Reduced])` (its greedy answers from that input, every token of it kept). Each item's images and prompt are
`Work.encoded.images` and `.prompt`.

Capabilities are declared, not inferred: a guide declares what it `needs` (guides/base.py), a backend what it
`offers`, and `check` refuses a mismatch before any model loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ..errors import ItemError, SettingError

# What a guide (or a run's settings) may need of the large model's backend.
CAPABILITIES = frozenset({
    "large_features",  # the large model's image features after its projector (GuideItem.features)
    "vision_attention",  # hooks inside its vision tower (the cls guide's [CLS] attention)
    "lm_attention",  # hooks inside its language model's prefill (fastv)
    "prune_inside_lm",  # dropping tokens at a decoder layer K > 0
    "reduced_input",  # answering from an input a guide reduced (downsample: images resized, LLaVA-1.5 rows pooled)
})


class CapabilityError(SettingError):
    """A guide or setting the chosen large backend cannot run (the setting named: `large_backend`)."""


@dataclass
class LargeInputs:
    """What the large model's pass needs for a batch: its rows (for transformers: ids, positions, image features:
    the vision tower ran once; a backend without sgl-side rows: None per item), the guides' view of each item, and,
    per guide that ranks before the language model, each item's scores."""

    works: list
    rows: list
    items: list  # GuideItem per work
    scores: dict[str, list]  # guide name -> per item (guides that rank in the prefill: absent)

    @classmethod
    def join(cls, parts: list["LargeInputs"]) -> "LargeInputs":
        """The inputs of several calls as one, in order (the scores of the guides every part has)."""
        names = [g for g in (parts[0].scores if parts else {}) if all(g in p.scores for p in parts)]
        return cls([w for p in parts for w in p.works], [r for p in parts for r in p.rows],
                   [i for p in parts for i in p.items], {g: [s for p in parts for s in p.scores[g]] for g in names})

    def select(self, works: list) -> "LargeInputs":
        """The inputs of a subset of the works (same objects), in the subset's order."""
        index = {id(w): i for i, w in enumerate(self.works)}
        picked = [index[id(w)] for w in works]
        return LargeInputs(list(works), [self.rows[i] for i in picked], [self.items[i] for i in picked],
                           {g: [s[i] for i in picked] for g, s in self.scores.items()})


@dataclass
class Reduced:
    """What the large model saw of one item under a guide that reduces its input (`Guide.reduces_input`)."""

    encoding: dict  # the large model's processor output of the images it was given (the item's own when unchanged)
    image_sizes: list[tuple[int, int]]  # (width, height) of each image as encoded
    n_visual: int  # the visual tokens the large model received (all kept)
    pooled: tuple[int, int] | None = None  # (rows, cols) of the pooled feature grid (fixed-resolution towers)
    pooled_from: tuple[int, int] | None = None  # (rows, cols) of the grid it was pooled from

    def grids(self, model) -> list:
        """The token grids of what the large model saw (`model`: the large backend), as `sgl inspect` draws
        them."""
        from ..families.base import one_grid

        if self.pooled is not None:
            (r, c), (r0, c0) = self.pooled, self.pooled_from
            return [one_grid("pooled", r, c, f"the {r0} x {c0} feature grid average-pooled to {r} x {c}")]
        return model.family.token_grids(model.model, self.encoding, self.image_sizes, model.processor)


class ModelFacts:
    """What sgl reads of a model from its `family` and `model.config`: shared by a loaded transformers model
    (`LoadedModel`, small or large) and every large backend."""

    family: Any
    model: Any  # what the family's methods read (at least `.config`)

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


class LargeBackend(ModelFacts):
    """Base class of large-model backends (see the module's docstring for the interface)."""

    name: ClassVar[str] = ""
    offers: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def load(cls, spec, role: str = "large", options: Any = None) -> "LargeBackend":
        raise NotImplementedError

    @classmethod
    def check_installed(cls) -> None:
        """Refuse, before anything is built or loaded, a backend whose engine cannot be imported (one line)."""

    @classmethod
    def check_spec(cls, spec) -> None:
        """Refuse, before any model loads, a model this backend cannot run (its family) or a missing engine."""

    def visual_mask(self, encoding: dict):
        """(S,) bool: the visual-token columns of one encoded item."""
        return self.family.visual_mask(self.model, encoding)

    @property
    def device(self) -> str:
        """Where the large model runs, as calibration caches record the conditions of their stage times."""
        return self.name

    def describe(self) -> dict:
        """Fields every record of a run on this backend carries."""
        return {"large_backend": self.name}

    def engine_options(self) -> dict:
        """The options its engine runs with, as `sgl bench` reports them (a backend that says none: empty)."""
        return {}

    def close(self) -> None:
        """Free the engine's resources (a no-op where the garbage collector does it)."""


def needs(guide_cls, prune_layer: int) -> frozenset[str]:
    """What running `guide_cls` at `prune_layer` needs of the large backend: the guide's own `needs`, and
    "prune_inside_lm" for a decoder layer K > 0 (a guide that ranks in the prefill always prunes inside)."""
    extra = {"prune_inside_lm"} if prune_layer > 0 or getattr(guide_cls, "ranks_in_prefill", False) else set()
    return frozenset(getattr(guide_cls, "needs", frozenset())) | extra


def check(guide_cls, backend_cls, prune_layer: int) -> None:
    """Refuse, before any model loads, a guide or prune layer the backend does not offer: one line naming the
    guide, the backend and what is missing."""
    missing = sorted(needs(guide_cls, prune_layer) - backend_cls.offers)
    if not missing:
        return
    what = ", ".join(missing)
    guide = getattr(guide_cls, "name", "") or guide_cls.__name__
    at = f" at prune_layer {prune_layer}" if prune_layer > 0 else ""
    raise CapabilityError("the " + guide + " guide" + at + " needs " + what + ", which the "
                          + backend_cls.name.replace("{", "{{").replace("}", "}}")
                          + " large backend ({}) does not offer", "large_backend")


def decode_answer(backend: LargeBackend, tokens, item, batch: int = 1) -> str:
    """One item's answer as text (`backend.decode`), its token ids checked first: a backend's id that is not an
    integer or is outside the vocabulary is said naming the backend and the item, not as the tokenizer's "while
    processing 'ids'". `batch`: how many items the call answered (over one, the error is not an ItemError, so that
    the engine retries the batch item by item and only this item fails, as for any other model failure)."""
    problem = bad_token_id(backend, tokens)
    if problem is None:
        return backend.decode(tokens)
    message = item.fail(f"the {backend.name} backend returned {problem}")
    raise (ValueError if batch > 1 else ItemError)(message)


def bad_token_id(backend: LargeBackend, tokens) -> str | None:
    """What is wrong with the first bad id of `tokens` ("token id -5, outside the vocabulary of 151,936"), or None.
    The vocabulary is the larger of the tokenizer's (added tokens included) and the model's embedding rows: a model
    may emit an id of an unused row, which decodes to nothing."""
    import operator

    processor = backend.processor
    tokenizer = getattr(processor, "tokenizer", processor)
    try:
        rows = int(getattr(backend.model.config.get_text_config(), "vocab_size", 0) or 0)
    except (AttributeError, TypeError, ValueError):
        rows = 0
    vocab = max(len(tokenizer), rows)
    for token in tokens:
        try:
            if isinstance(token, bool):
                raise TypeError
            i = operator.index(token)
        except TypeError:
            return f"token id {token!r} (a {type(token).__name__}, not an integer)"
        if not 0 <= i < vocab:
            return f"token id {i}, outside the vocabulary of {vocab:,}"
    return None
