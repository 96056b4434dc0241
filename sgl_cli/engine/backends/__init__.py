"""The large model's backends: the registry. A backend runs the large model behind the interface of `base.py`.

Built-in: `transformers` (the large model in this process, every capability) and `vllm` (vLLM's offline engine with
sgl's model plugin; its module imports vLLM only when the backend loads). Any installed package can add one under the
entry-point group `sgl.backends` (`name = "module:BackendClass"`): presets (`large: {backend: name}`) and
`--large-backend` then choose it like a built-in one. Importing this package is cheap: a backend's module is
imported only when its class is asked for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..plugins import Registry

if TYPE_CHECKING:
    from .base import LargeBackend

ENTRY_POINT_GROUP = "sgl.backends"
DEFAULT = "transformers"
BUILTIN = {
    "transformers": "sgl_cli.engine.backends.transformers:TransformersLarge",
    "vllm": "sgl_cli.engine.backends.vllm.backend:VllmBackend",
}

__all__ = ["BUILTIN", "DEFAULT", "ENTRY_POINT_GROUP", "backend_class", "backend_names", "check_preset", "missing",
           "refresh"]


_REGISTRY = Registry(ENTRY_POINT_GROUP, BUILTIN)


def _escaped(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


def _fail(problem: str, name: str, spec: str | None, exc: BaseException | None) -> Exception:
    from ..errors import SettingError

    if problem == "unknown":
        return SettingError("{}: unknown large backend " + _escaped(repr(name)) + "; choose one of "
                            + ", ".join(backend_names()), "large_backend")
    if problem == "import":
        return SettingError("{}: cannot import large backend " + repr(name) + f" ({spec}): " + _escaped(str(exc)),
                            "large_backend")
    return SettingError("{}: large backend " + repr(name) + f" ({spec}) is not a subclass of "
                        "sgl_cli.engine.backends.base.LargeBackend", "large_backend")


def backend_names() -> list[str]:
    """Every large backend this installation knows, built-ins first."""
    return _REGISTRY.names()


def refresh() -> None:
    """Look the installed backends up again (after installing a plugin in this process)."""
    _REGISTRY.refresh()


def backend_class(name: str) -> type["LargeBackend"]:
    """The class of large backend `name` (imports its module, not its engine)."""
    from .base import LargeBackend

    # only an import that fails is worded; anything else a backend's module raises propagates as it is
    return _REGISTRY.load(name, LargeBackend, _fail, catch=(ImportError, AttributeError))


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
