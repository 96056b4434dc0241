"""Model-family adapters: the only code that knows how a family lays out prompts, images and positions.

A new family is one subclass of `Family` (see `base.py` for the questions it answers) in a module here, added to
`FAMILIES`; the engine, the guides and the views stay family-agnostic.
"""

from __future__ import annotations

from ..errors import ModelLoadError
from .base import Family, TokenGrid
from .internvl import InternVL
from .llava import Llava, LlavaNext, LlavaOnevision
from .qwen import Qwen3VL, QwenVL

__all__ = ["FAMILIES", "Family", "InternVL", "Llava", "LlavaNext", "LlavaOnevision", "Qwen3VL", "QwenVL", "TokenGrid",
           "family_for"]

FAMILIES: tuple[Family, ...] = (QwenVL(), Qwen3VL(), Llava(), LlavaNext(), LlavaOnevision(), InternVL())


def family_for(model) -> Family:
    model_type = model.config.model_type
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    supported = ", ".join(t for f in FAMILIES for t in f.model_types)
    raise ModelLoadError(f"model type {model_type!r} is not supported by sgl; supported: {supported}")
