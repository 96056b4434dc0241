"""Guides: what ranks the visual tokens the large model keeps. One module per guide; this is their registry.

Built-in: `sgl` (the small model's attention, SGP), `cls` ([CLS] attention in the vision encoder, FasterVLM),
`fastv` (the large model's own attention at layer K-1), `random`, and `downsample` (no ranking: the image
reduced to the token budget before the large model's vision tower, or its feature grid pooled). Any installed package can add one under the
entry-point group `sgl.guides` (`name = "module:GuideClass"`): it then works in presets and every command's
`--guide` like a built-in one. docs/guides.md says how to write one.

Importing this package is cheap: names come from the registry and the entry-point metadata; a guide's module
(and torch) is imported only when the guide is made.
"""

from __future__ import annotations

import functools
import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .base import Guide

ENTRY_POINT_GROUP = "sgl.guides"
BUILTIN = {
    "sgl": "sgl_cli.engine.guides.sgl:SGLGuide",
    "cls": "sgl_cli.engine.guides.cls:ClsGuide",
    "fastv": "sgl_cli.engine.guides.fastv:FastVGuide",
    "random": "sgl_cli.engine.guides.random:RandomGuide",
    "downsample": "sgl_cli.engine.guides.downsample:DownsampleGuide",
}

__all__ = ["BUILTIN", "ENTRY_POINT_GROUP", "Guide", "GuideBatch", "GuideItem", "guide_class", "guide_names",
           "make_guide", "n_keep", "top_k_in_order"]


def _unknown(name: str, known) -> Exception:
    from ..errors import PresetError

    return PresetError(f"unknown guide {name!r}; choose one of {', '.join(known)}")


@functools.cache
def _registry() -> dict[str, str]:
    """name -> "module:attr", built-ins first; a plugin cannot replace a built-in."""
    from importlib.metadata import entry_points

    found = dict(BUILTIN)
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        found.setdefault(ep.name, ep.value)
    return found


def guide_names() -> list[str]:
    """Every guide this installation knows, built-ins first."""
    return list(_registry())


def guide_class(name: str) -> type["Guide"]:
    """The class of guide `name` (imports its module)."""
    from ..errors import PresetError
    from .base import Guide

    registry = _registry()
    if name not in registry:
        raise _unknown(name, registry)
    module, _, attr = registry[name].partition(":")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except Exception as exc:  # noqa: BLE001 - a broken plugin is named, not a traceback
        raise PresetError(f"guide {name!r} ({registry[name]}) cannot be loaded: {type(exc).__name__}: {exc}") from None
    if not (isinstance(cls, type) and issubclass(cls, Guide)):
        raise PresetError(f"guide {name!r} ({registry[name]}) is not a subclass of sgl_cli.engine.guides.Guide")
    return cls


def make_guide(name: str, settings=None) -> "Guide":
    """Guide `name`, configured from the run's settings (the random guide's seed)."""
    return guide_class(name).from_settings(settings)


def __getattr__(name: str):
    if name in ("Guide", "GuideBatch", "GuideItem", "n_keep", "top_k_in_order"):
        from . import base

        return getattr(base, name)
    raise AttributeError(name)
