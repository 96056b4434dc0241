"""The large model's backends: the registry. A backend runs the large model behind the interface of `base.py`.

Built-in: `transformers` (the large model in this process, every capability) and `vllm` (vLLM's offline engine with
sgl's model plugin; its module imports vLLM only when the backend loads). Any installed package can add one under the
entry-point group `sgl.backends` (`name = "module:BackendClass"`): presets (`large: {backend: name}`) and
`--large-backend` then choose it like a built-in one. Importing this package is cheap: a backend's module is
imported only when its class is asked for.
"""

from __future__ import annotations

import functools
import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .base import LargeBackend

ENTRY_POINT_GROUP = "sgl.backends"
DEFAULT = "transformers"
BUILTIN = {
    "transformers": "sgl_cli.engine.backends.transformers:TransformersLarge",
    "vllm": "sgl_cli.engine.backends.vllm.backend:VllmBackend",
}

__all__ = ["BUILTIN", "DEFAULT", "ENTRY_POINT_GROUP", "backend_class", "backend_names", "check_preset", "missing"]


@functools.cache
def _registry() -> dict[str, str]:
    """name -> "module:attr", built-ins first; a plugin cannot replace a built-in."""
    from importlib.metadata import entry_points

    found = dict(BUILTIN)
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        found.setdefault(ep.name, ep.value)
    return found


def backend_names() -> list[str]:
    """Every large backend this installation knows, built-ins first."""
    return list(_registry())


def backend_class(name: str) -> type["LargeBackend"]:
    """The class of large backend `name` (imports its module, not its engine)."""
    from ..errors import SettingError
    from .base import LargeBackend

    registry = _registry()
    if name not in registry:
        raise SettingError("{}: unknown large backend " + repr(name).replace("{", "{{").replace("}", "}}")
                           + "; choose one of " + ", ".join(registry), "large_backend")
    module, _, attr = registry[name].partition(":")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise SettingError("{}: cannot import large backend " + repr(name) + f" ({registry[name]}): "
                           + str(exc).replace("{", "{{").replace("}", "}}"), "large_backend") from exc
    if not (isinstance(cls, type) and issubclass(cls, LargeBackend)):
        raise SettingError("{}: large backend " + repr(name) + f" ({registry[name]}) is not a subclass of "
                           "sgl_cli.engine.backends.base.LargeBackend", "large_backend")
    return cls


def check_preset(preset, guides: list[str] | None = None) -> None:
    """`base.check` for `preset` (its large backend and prune layer) and each of `guides` (default: the preset's
    guide): what every command calls before any model loads."""
    from ..guides import guide_class
    from .base import check

    backend = backend_class(preset.large.backend or DEFAULT)
    for name in guides or [preset.settings.guide]:
        check(guide_class(name), backend, preset.settings.prune_layer)


def missing(preset, guide: str) -> frozenset[str]:
    """What `guide` needs at the preset's prune layer that the preset's large backend does not offer (nothing: it
    can run); for commands that run every guide the pair can (`sgl eval`, `sgl inspect --guide all`)."""
    from ..guides import guide_class
    from .base import needs

    return needs(guide_class(guide), preset.settings.prune_layer) - backend_class(preset.large.backend or DEFAULT).offers
