"""The sgl engine as a library. Importing this package is cheap; torch loads with the engine itself."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import ItemError, ModelLoadError, PresetError, SglError
from .items import Item, read_items
from .preset import ModelSpec, Preset, Settings, load_preset

if TYPE_CHECKING:
    from .engine import Engine

__all__ = ["Engine", "Item", "ItemError", "ModelLoadError", "ModelSpec", "Preset", "PresetError", "Settings",
           "SglError", "load_preset", "read_items"]


def __getattr__(name: str):
    if name == "Engine":  # torch and transformers load only when the engine is asked for
        from .engine import Engine

        return Engine
    raise AttributeError(name)
