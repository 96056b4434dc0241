"""The large model's backends: the registry. A backend runs the large model behind the interface of `base.py`.

Built-in: `transformers` (the large model in this process, every capability) and `vllm` (vLLM's offline engine with
sgl's model plugin; its module imports vLLM only when the backend loads). Any installed package can add one under the
entry-point group `sgl.backends` (`name = "module:BackendClass"`): presets (`large: {backend: name}`) and
`--large-backend` then choose it like a built-in one. Importing this package is cheap: a backend's module is
imported only when its class is asked for. A plugin that cannot be imported, or whose `check_spec` or `load`
raises, is one line naming it (`plugins.py`'s rule); what a backend gives back is checked by the engine.
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

__all__ = ["BUILTIN", "DEFAULT", "ENTRY_POINT_GROUP", "backend_class", "backend_label", "backend_names",
           "check_preset", "check_spec", "load_backend", "missing", "refresh"]


_REGISTRY = Registry(ENTRY_POINT_GROUP, BUILTIN, noun="large backend")


def _escaped(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


def _fail(problem: str, name: str, spec: str | None, exc: BaseException | None) -> Exception:
    from ..errors import SettingError

    if problem == "unknown":
        return SettingError("{}: unknown large backend " + _escaped(repr(name)) + "; choose one of "
                            + ", ".join(backend_names()), "large_backend")
    if problem == "import":  # an ImportError says what is missing; anything else says what it is, too
        detail = str(exc) if isinstance(exc, ImportError) else f"{type(exc).__name__}: {exc}"
        return SettingError("{}: cannot import large backend " + repr(name) + f" ({spec}): " + _escaped(detail),
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

    # only a built-in's import that fails is worded (anything else propagates as it is); a plugin's, whatever it is
    return _REGISTRY.load(name, LargeBackend, _fail, catch=(ImportError, AttributeError))


def backend_label(backend) -> str:
    """How messages name a backend (an instance): "large backend 'transformers'", "large backend plugin 'echo'"."""
    return _REGISTRY.label(backend.name or type(backend).__name__, type(backend))


def check_spec(name: str, spec) -> None:
    """Backend `name`'s `check_spec(spec)` (before any model loads); a plugin's that raises is one line naming it."""
    cls = backend_class(name)
    _REGISTRY.call(name, cls, "check_spec", cls.check_spec, spec)


def load_backend(name: str, spec, role: str = "large", options=None) -> "LargeBackend":
    """Backend `name` loaded for `spec`: a plugin whose `load` raises, or gives no LargeBackend, is one line naming
    it (a PluginError); a built-in's error propagates as it is."""
    from ..errors import PluginError
    from .base import LargeBackend

    cls = backend_class(name)
    backend = _REGISTRY.call(name, cls, "load", cls.load, spec, role, options)
    if not isinstance(backend, LargeBackend):
        raise PluginError(f"{_REGISTRY.label(name, cls)}: load gave a {type(backend).__name__}, not a LargeBackend")
    return backend


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
