"""What is checked of a run against its backends before any model loads (capabilities a guide needs, the
quantization a backend applies), and of a backend's answers (token ids)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import ItemError, SettingError

if TYPE_CHECKING:
    from ..preset import ModelSpec
    from .base import LargeBackend

# What a guide (or a run's settings) may need of the large model's backend.
CAPABILITIES = frozenset({
    "large_features",  # the large model's image features after its projector (GuideItem.features)
    "vision_attention",  # hooks inside its vision tower (the cls guide's [CLS] attention)
    "lm_attention",  # hooks inside its language model's prefill (fastv: `rank_in_prefill`)
    "prune_inside_lm",  # dropping tokens at a decoder layer K > 0
    "reduced_input",  # answering from an input a guide reduced (downsample: `reduced`, `generate_reduced`)
})


class CapabilityError(SettingError):
    """A guide or setting the chosen large backend cannot run (the setting named: `large_backend`)."""


def check_quantize(backend_cls, spec: "ModelSpec", preset=None) -> None:
    """Refuse bitsandbytes `quantize` on a large backend that does not apply it (every record would say
    `large_quantize` of an unquantized model). Named by the flags that gave them, or by `preset`'s file when it
    gave both."""
    if spec.quantize is None or backend_cls.quantizes:
        return
    if not _said_by_file(preset, spec):
        raise SettingError("{} " + spec.quantize + " (bitsandbytes) applies to the transformers large backend, not to "
                           + backend_cls.name + " ({}), which would run the weights unquantized", "large_quantize",
                           "large_backend")
    raise SettingError(f"{preset.source}: large.quantize: {spec.quantize} (bitsandbytes) applies to the transformers "
                       f"large backend, not to backend: {backend_cls.name}, which would run the weights unquantized"
                       .replace("{", "{{").replace("}", "}}"), "large_quantize")


def _said_by_file(preset, spec: "ModelSpec") -> bool:
    """Whether `preset`'s file itself gives the large model `spec`'s quantize and backend (not flags, not code)."""
    from pathlib import Path

    if preset is None or not preset.source or not Path(preset.source).is_file():
        return False
    try:
        from ..preset import load_preset

        own = load_preset(preset.source).large
    except Exception:  # noqa: BLE001 - a file changed since: the flags' wording
        return False
    return (own.quantize, own.backend) == (spec.quantize, spec.backend)


def needs(guide_cls, prune_layer: int) -> frozenset[str]:
    """What running `guide_cls` at `prune_layer` needs of the large backend: the guide's own `needs`, and
    "prune_inside_lm" for a decoder layer K > 0 (a guide that ranks in the prefill always prunes inside)."""
    from ..guides.base import Kind

    inside = prune_layer > 0 or getattr(guide_cls, "kind", Kind.RANKS) is Kind.PREFILL
    return frozenset(getattr(guide_cls, "needs", frozenset())) | ({"prune_inside_lm"} if inside else set())


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


def bad_token_id(backend: "LargeBackend", tokens) -> str | None:
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


def refuse_reduced_video(work, guide) -> None:
    """A guide that reduces the large model's input (downsample: smaller images) cannot reduce a video yet: the
    item's error (ItemError) on every backend, before its images are reduced."""
    if work.encoded.video is not None:
        raise ItemError(work.item.fail(f"the {guide.name} guide does not reduce videos yet (sgl, random and fastv "
                                       "rank a video's tokens)"))
