"""The models' backends: the registry, by role. A backend runs a model of the pair behind the interface of
`base.py`: `LargeBackend` for the large model, `SmallModel` for the small one.

Built-in, large: `transformers` (the large model in this process, every capability) and `vllm` (vLLM's offline engine
with sgl's model plugin; its module imports vLLM only when the backend loads); small: `transformers`. Any installed
package can add one under the entry-point groups `sgl.backends` (large) and `sgl.small_backends` (small), `name =
"module:Class"`: presets (`large: {backend: name}`, `small: {backend: name}`) and `--large-backend` then choose it
like a built-in one. Importing this package is cheap: a backend's module is imported only when its class is asked
for. A plugin that cannot be imported, or whose `check_spec` or `load` raises, is one line naming it (`plugins.py`'s
rule); what a backend gives back is checked by the engine.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..plugins import Registry

if TYPE_CHECKING:
    from .base import Model

ENTRY_POINT_GROUP = "sgl.backends"
SMALL_ENTRY_POINT_GROUP = "sgl.small_backends"
DEFAULT = "transformers"
BUILTIN = {
    "transformers": "sgl_cli.engine.backends.transformers:TransformersLarge",
    "vllm": "sgl_cli.engine.backends.vllm.backend:VllmBackend",
}
SMALL_BUILTIN = {
    "transformers": "sgl_cli.engine.backends.transformers:TransformersSmall",
}

__all__ = ["BUILTIN", "DEFAULT", "ENTRY_POINT_GROUP", "SMALL_BUILTIN", "SMALL_ENTRY_POINT_GROUP", "backend_class",
           "backend_label", "backend_names", "check_preset", "check_spec", "load", "missing", "refresh", "seat"]


_REGISTRIES = {"large": Registry(ENTRY_POINT_GROUP, BUILTIN, noun="large backend"),
               "small": Registry(SMALL_ENTRY_POINT_GROUP, SMALL_BUILTIN, noun="small backend")}


def _escaped(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


def _failing(role: str):
    def fail(problem: str, name: str, spec: str | None, exc: BaseException | None) -> Exception:
        from ..errors import SettingError

        # The large backend has a flag (--large-backend); the small one is a preset's key alone.
        setting, said = ("large_backend", "{}") if role == "large" else ("small_backend", "small.backend")
        base = "LargeBackend" if role == "large" else "SmallModel"
        if problem == "unknown":
            return SettingError(said + ": unknown " + role + " backend " + _escaped(repr(name)) + "; choose one of "
                                + ", ".join(backend_names(role)), setting)
        if problem == "import":  # an ImportError says what is missing; anything else says what it is, too
            detail = str(exc) if isinstance(exc, ImportError) else f"{type(exc).__name__}: {exc}"
            return SettingError(said + ": cannot import " + role + " backend " + _escaped(repr(name)) + f" ({spec}): "
                                + _escaped(detail), setting)
        return SettingError(said + ": " + role + " backend " + _escaped(repr(name)) + f" ({spec}) is not a subclass "
                            f"of sgl_cli.engine.backends.base.{base}", setting)

    return fail


def backend_names(role: str = "large") -> list[str]:
    """Every backend of `role` ("large" or "small") this installation knows, built-ins first."""
    return _REGISTRIES[role].names()


def refresh() -> None:
    """Look the installed backends up again (after installing a plugin in this process)."""
    for registry in _REGISTRIES.values():
        registry.refresh()


def _base(role: str) -> type:
    from .base import LargeBackend, SmallModel

    return LargeBackend if role == "large" else SmallModel


def backend_class(name: str, role: str = "large") -> type["Model"]:
    """The class of backend `name` for `role` ("large": a LargeBackend, "small": a SmallModel; imports its module,
    not its engine)."""
    # only a built-in's import that fails is worded (anything else propagates as it is); a plugin's, whatever it is
    return _REGISTRIES[role].load(name, _base(role), _failing(role), catch=(ImportError, AttributeError))


def backend_label(backend, role: str = "large") -> str:
    """How messages name a backend (an instance): "large backend 'transformers'", "large backend plugin 'echo'"."""
    return _REGISTRIES[role].label(backend.name or type(backend).__name__, type(backend))


def check_spec(spec, role: str = "large") -> None:
    """The `check_spec(spec)` of the backend `spec` names for `role` (before any model loads); a plugin's that
    raises is one line naming it."""
    name = spec.backend or DEFAULT
    cls = backend_class(name, role)
    _REGISTRIES[role].call(name, cls, "check_spec", cls.check_spec, spec)


def load(spec, role: str) -> "Model":
    """The model of `spec` in `role`, loaded by its backend with the spec's options (checked); a plugin's `load`
    that raises, or gives something else than its role's model, is one line naming it."""
    from ..errors import PluginError

    name = spec.backend or DEFAULT
    cls = backend_class(name, role)
    registry = _REGISTRIES[role]
    model = registry.call(name, cls, "load", cls.load, spec, role, cls.check_options(spec.options, f"{role}.options"))
    if not isinstance(model, _base(role)):
        raise PluginError(f"{registry.label(name, cls)}: load gave a {type(model).__name__}, not a "
                          f"{_base(role).__name__}")
    return model


def seat(model, role: str) -> "Model":
    """`model` behind the interface of its role ("small" or "large"): a backend's model as it is; a transformers
    model loaded by hand (a `LoadedModel`: `load_model`, `from_arch`) behind the transformers backend."""
    want = _base(role)
    if isinstance(model, want):
        return model
    from .transformers import LoadedModel, TransformersLarge, TransformersSmall

    if isinstance(model, LoadedModel):
        return (TransformersLarge if role == "large" else TransformersSmall)(model)
    raise TypeError(f"the {role} model must be a {want.__name__} or a LoadedModel, not {type(model).__name__}")


def check_preset(preset, guides: list[str] | None = None) -> None:
    """What every command checks of `preset` before any model loads: each model's backend is known and takes the
    options given; each of `guides` (default: the preset's guide) can run on the large backend at the prune layer.
    """
    from ..errors import SettingError
    from ..guides import guide_class
    from .base import check, check_quantize

    where = f"{preset.source}: " if preset.source else ""
    backend = backend_class(preset.large.backend or DEFAULT)
    check_quantize(backend, preset.large, preset)
    backend.check_options(preset.large.options, f"{where}large.options")
    if preset.small is not None:
        try:
            small = backend_class(preset.small.backend or DEFAULT, "small")
        except SettingError as exc:  # said where: the preset's key
            raise SettingError(_escaped(where) + exc.template, *exc.settings) from None
        small.check_options(preset.small.options, f"{where}small.options")
    for name in guides or [preset.settings.guide]:
        check(guide_class(name), backend, preset.settings.prune_layer)


def missing(preset, guide: str) -> frozenset[str]:
    """What `guide` needs at the preset's prune layer that the preset's large backend does not offer (nothing: it
    can run); for commands that run every guide the pair can (`sgl eval`, `sgl inspect --guide all`)."""
    from ..guides import guide_class
    from .base import needs

    return (needs(guide_class(guide), preset.settings.prune_layer)
            - backend_class(preset.large.backend or DEFAULT).offers)
