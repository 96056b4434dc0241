"""The large-model backend seam: what the engine asks of the large model, whatever runs it.

A backend is a class with a `name`, the capabilities it `offers` (a frozenset of CAPABILITIES), classmethods
`check_installed()`, `check_spec(spec)` and `load(spec, role, options)`, and, once loaded: `family` (sgl's family
adapter for the checkpoint), `processor` (the checkpoint's HF processor, which sgl encodes with), `image_token_id`,
`num_layers`, `context`, `device`, `visual_mask(enc)`, `inputs(works, guides) -> LargeInputs`,
`generate(works, inputs, kept, k, limits)` (a `core.generate.Generation`: tokens per item), `decode(tokens)`,
`describe()` (the record's fields) and `close()`. A backend that offers "lm_attention" also has
`rank_in_prefill(guide, inputs, retain, k, limits)`.

Capabilities are declared, not inferred: a guide declares what it `needs` (guides/base.py), a backend what it
`offers`, and `check` refuses a mismatch before any model loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ..errors import SettingError

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

    def select(self, works: list) -> "LargeInputs":
        """The inputs of a subset of the works (same objects), in the subset's order."""
        index = {id(w): i for i, w in enumerate(self.works)}
        picked = [index[id(w)] for w in works]
        return LargeInputs(list(works), [self.rows[i] for i in picked], [self.items[i] for i in picked],
                           {g: [s[i] for i in picked] for g, s in self.scores.items()})


class LargeBackend:
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

    @property
    def device(self) -> str:
        """Where the large model runs, as calibration caches record the conditions of their stage times."""
        return self.name

    def describe(self) -> dict:
        """Fields every record of a run on this backend carries."""
        return {"large_backend": self.name}

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
