"""Guides: what ranks the visual tokens the large model keeps. One module per guide; this is their registry.

Built-in: `sgl` (the small model's attention, SGP), `cls` ([CLS] attention in the vision encoder, FasterVLM),
`fastv` (the large model's own attention at layer K-1), `random`, and `downsample` (no ranking: the image
reduced to the token budget before the large model's vision tower, or its feature grid pooled). Any installed
package can add one under the entry-point group `sgl.guides` (`name = "module:GuideClass"`): it then works in
presets and every command's `--guide` like a built-in one. docs/guides.md says how to write one.

Importing this package is cheap: names come from the registry and the entry-point metadata; a guide's module
(and torch) is imported only when the guide is made. A guide plugin that cannot be loaded is left out of "every
guide" (`usable_guides`: `sgl eval`'s default, `sgl inspect --guide all`) with a warning, and is an error only
when named; what a guide gives back is checked by the engine (`plugins.py`; docs/guides.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..plugins import Registry

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
           "guide_label", "make_guide", "n_keep", "refresh", "top_k_in_order", "usable_guides"]


_REGISTRY = Registry(ENTRY_POINT_GROUP, BUILTIN, noun="guide")


def _fail(problem: str, name: str, spec: str | None, exc: BaseException | None) -> Exception:
    from ..errors import PresetError

    if problem == "unknown":
        return PresetError(f"unknown guide {name!r}; choose one of {', '.join(guide_names())}")
    if problem == "import":  # a broken plugin is named, not a traceback
        return PresetError(f"guide {name!r} ({spec}) cannot be loaded: {type(exc).__name__}: {exc}")
    return PresetError(f"guide {name!r} ({spec}) is not a subclass of sgl_cli.engine.guides.Guide")


def guide_names() -> list[str]:
    """Every guide this installation knows, built-ins first (from the metadata: a plugin that cannot be loaded is
    among them)."""
    return _REGISTRY.names()


def usable_guides() -> list[str]:
    """Every guide that can be made, built-ins first: a plugin that cannot be loaded is left out, with a
    PluginWarning naming it (what "every guide" means: `sgl eval`'s default, `sgl inspect --guide all`)."""
    from .base import Guide

    return _REGISTRY.usable(Guide)


def guide_label(guide) -> str:
    """How messages name a guide (an instance): "guide 'sgl'", "guide plugin 'norm'"."""
    return _REGISTRY.label(guide.name or type(guide).__name__, type(guide))


def refresh() -> None:
    """Look the installed guides up again (after installing a plugin in this process)."""
    _REGISTRY.refresh()


def guide_class(name: str) -> type["Guide"]:
    """The class of guide `name` (imports its module)."""
    from .base import Guide

    return _REGISTRY.load(name, Guide, _fail)


def make_guide(name: str, settings=None) -> "Guide":
    """Guide `name`, configured from the run's settings (the random guide's seed)."""
    from .base import Guide

    cls = guide_class(name)
    guide = _REGISTRY.call(name, cls, "from_settings", cls.from_settings, settings)
    if not isinstance(guide, Guide):
        from ..errors import PluginError

        raise PluginError(f"{_REGISTRY.label(name, cls)}: from_settings gave a {type(guide).__name__}, not a Guide")
    return guide


def __getattr__(name: str):
    if name in ("Guide", "GuideBatch", "GuideItem", "n_keep", "top_k_in_order"):
        from . import base

        return getattr(base, name)
    raise AttributeError(name)
