"""The guide contract: what a guide reads, the hooks it may scope, and how its ranking becomes kept tokens.

A guide ranks the visual tokens of each item; the large model keeps the top `retain` fraction, in sequence order,
with their original positions, and drops the rest at the guide's prune layer K (0: before the language model).
Most guides implement one method, `score(item)`: the scores of one item's visual tokens from what `GuideItem`
carries (the large model's image features, the small model's SGP importance, the encoding). A guide that needs to
see inside the large model scopes hooks to one of two moments, each a context manager on that one model:

- `watch_vision(model)`: while the large model's vision tower encodes the batch (the cls guide's [CLS]
  attention); what it yields is `GuideBatch.vision` when `scores` is called.
- `watch_prefill(model, layer, batch)`: while the large model's language model reads the prompt, for guides
  that rank from its own layers < K (`Kind.PREFILL`, FastV); what it yields is `GuideBatch.prefill`, and it
  may observe every forward (`observe(step, rows, key_valid)`); `scores` is then called when layer K starts.

A guide's `kind` says how its ranking reaches the large model (one field, dispatched on in one place:
`LargeBackend.answer`): `Kind.RANKS` (scores before the language model), `Kind.PREFILL` (scores from the large
model's own layers < K, during its prefill) or `Kind.REDUCES`: the guide ranks nothing and reduces what the large
model sees (the downsample guide), which keeps every token of the reduced input; it has two hooks, both called once
per item and retain:

- `prepare_images(model, images, retain)`: the images the large model encodes (resized before the vision tower);
- `pool_rows(model, rows, retain)`: the large model's rows after its vision tower (features pooled, for
  fixed-resolution towers; the transformers backend only).

The contract every hook keeps: scoped (registered in `__enter__` on the given model instance only, removed in
`__exit__`, also on an error; no process-wide patching), and batch-invariant (an item's scores do not depend on
the other items of its batch or on its place in it: padding is masked, seeds are per item).
"""

from __future__ import annotations

import contextlib
import enum
import math
from dataclasses import dataclass
from typing import Any, ClassVar, ContextManager

import torch


class Kind(enum.Enum):
    """How a guide's ranking reaches the large model."""

    RANKS = "ranks"  # scores per visual token before the language model (`scores`)
    PREFILL = "ranks_in_prefill"  # scores from the large model's own layers < K, read when layer K starts
    REDUCES = "reduces_input"  # no ranking: the large model's input reduced (`prepare_images`, `pool_rows`)


def n_keep(n_visual: int, ratio: float) -> int:
    """How many of `n_visual` tokens a retain ratio keeps: floor(n * ratio), at least 1."""
    return max(1, math.floor(n_visual * ratio + 1e-9))


def top_k_in_order(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores, in sequence order. Ties go to the earlier token (stable sort)."""
    order = torch.sort(scores, descending=True, stable=True).indices[:k]
    return torch.sort(order).values


@dataclass
class GuideItem:
    """What a guide may read of one item."""

    id: Any  # the item's id
    line: int  # its line (or row) in the input
    question: str
    visual: torch.Tensor  # (S,) bool: the visual-token columns of the item's sequence (input_ids == image token)
    features: torch.Tensor  # (N, hidden): the large model's image features of its visual tokens, in order
    encoding: dict  # the large model's processor output for the item
    small_importance: torch.Tensor | None = None  # (N,) the small model's attention (SGP), when it ran
    offset: int = 0  # left padding before the item's row in the large model's batch (prefill guides)

    @property
    def n_visual(self) -> int:
        return int(self.visual.sum())

    @property
    def visual_columns(self) -> torch.Tensor:
        """(N,) the visual tokens' columns in the large model's padded batch."""
        return self.visual.nonzero().squeeze(-1) + self.offset


@dataclass
class GuideBatch:
    """A batch of items being ranked on the large model `model` (its backend: `family`, `processor`, and on the
    transformers backend `model`, the transformers module, for the hooks)."""

    model: Any
    items: list[GuideItem]
    vision: Any = None  # what `watch_vision` yielded, after the vision tower ran on this batch
    prefill: Any = None  # what `watch_prefill` yielded, after the layers below K read the prompt


class Guide:
    """A method of ranking visual tokens. Subclass it, set `name`, implement `score` (or `scores`)."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""  # a few words: what the scores are (shown by `sgl inspect` and --help)
    kind: ClassVar[Kind] = Kind.RANKS
    needs_small: ClassVar[bool] = False  # the small model's pass must run (`GuideItem.small_importance`)
    uses_large: ClassVar[bool] = True  # ranking reads the large model (its features, vision tower or layers)
    score_noun: ClassVar[str] = "score"  # what its scores are called in `sgl inspect`'s legends
    # What it needs of the large model's backend (backends/base.py's CAPABILITIES), checked before any model loads:
    # "large_features" (GuideItem.features), "vision_attention" (watch_vision), "lm_attention" (watch_prefill).
    needs: ClassVar[frozenset[str]] = frozenset()

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        # The flags `kind` replaced: a plugin written for them would silently rank as Kind.RANKS.
        for flag, kind in (("ranks_in_prefill", "Kind.PREFILL"), ("reduces_input", "Kind.REDUCES")):
            if flag in cls.__dict__:
                raise TypeError(f"{cls.__name__}: `{flag}` is replaced by `kind = {kind}` "
                                "(sgl_cli.engine.guides.base.Kind)")

    @classmethod
    def from_settings(cls, settings) -> "Guide":
        """The guide for a run's settings (a `Settings`, or None for the defaults)."""
        return cls()

    def prune_layer(self, settings, num_layers: int) -> int:
        """Where the large model drops the unkept tokens: 0 before its language model, K > 0 at decoder layer K."""
        return settings.prune_layer

    def watch_vision(self, model) -> ContextManager[Any]:
        """Scoped hooks on `model` (the large model's backend) while its vision tower encodes a batch."""
        return contextlib.nullcontext()

    def watch_prefill(self, model, layer: int, width: int) -> ContextManager[Any]:
        """Scoped hooks on `model`'s language model while layers < `layer` read a prompt batch `width` columns wide."""
        return contextlib.nullcontext()

    def prepare_images(self, model, images: list, retain: float) -> list:
        """The images the large model (its backend: `family`, `processor`, `model.config`) encodes for one item at
        `retain` (`Kind.REDUCES`)."""
        return images

    def pool_rows(self, model, rows: list, retain: float) -> list:
        """The large model's rows (`core.generate.Row`, one per item) after its vision tower (`Kind.REDUCES`; a
        backend whose vision tower runs elsewhere, vLLM, never calls it)."""
        return rows

    def scores(self, batch: GuideBatch) -> list[torch.Tensor]:
        """(N_i,) scores per item, higher is kept first."""
        return [self.score(item) for item in batch.items]

    def score(self, item: GuideItem) -> torch.Tensor:
        raise NotImplementedError(f"the {self.name or type(self).__name__} guide implements neither score nor scores")

    def keep(self, model, item: GuideItem, scores: torch.Tensor, retain: float) -> torch.Tensor:
        """The visual tokens the large model keeps, indices in sequence order: the top `retain` of the image."""
        return top_k_in_order(scores, n_keep(len(scores), retain))


def require_small(guide_cls, has_small: bool, preset: str | None, also: tuple[str, ...] = ()) -> None:
    """Refuse a guide that needs the small model where `preset` names none: one wording everywhere, the guides that
    can run instead from the registry (and `also`: `all` for `sgl inspect`)."""
    if guide_cls.needs_small and not has_small:
        from ..errors import NoSmallModel
        from . import guide_class, guide_names

        others = [g for g in guide_names() if g != guide_cls.name and not _needs_small(guide_class, g)] + list(also)
        listed = ", ".join(others[:-1]) + f" or {others[-1]}" if len(others) > 1 else "".join(others)
        where = "no small model is loaded" if preset is None else \
            f"preset {preset!r} names no small model".replace("{", "{{").replace("}", "}}")
        raise NoSmallModel(f"{where}, which the {guide_cls.name} guide needs (use {{}} {listed or 'another guide'})",
                           "guide")


def _needs_small(guide_class, name: str) -> bool:
    try:
        return guide_class(name).needs_small
    except Exception:  # noqa: BLE001 - a plugin that cannot load is not offered
        return True
