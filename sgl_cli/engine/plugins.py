"""Registries that installed packages can add to: guides (`sgl.guides`), large backends (`sgl.backends`) and input
formats (`sgl.formats`). One rule for all three: the built-ins first, then the entry points of the group sorted by
name; a plugin cannot replace a built-in (nor an earlier plugin of the same name); a class is imported only when it
is asked for, and one that cannot be loaded is named in one error line, worded by its registry.

Importing this module is cheap (no entry-point lookup until a registry is first read).
"""

from __future__ import annotations

import importlib
from typing import Callable, Iterable, Literal

Problem = Literal["unknown", "import", "type"]
# (problem, name, "module:attr" or None when unknown, what importing raised or None) -> the error to raise
Fail = Callable[[Problem, str, "str | None", "BaseException | None"], Exception]


class Registry:
    """name -> "module:attr" of one entry-point group, and the classes they name.

    `last`: built-ins listed after the plugins (the input formats recognised by their content, the sgl JSONL
    fallback among them, must come after a plugin's format)."""

    def __init__(self, group: str, builtin: dict[str, str], *, last: Iterable[str] = ()):
        self.group = group
        self.builtin = dict(builtin)
        self.last = tuple(last)
        self._specs: dict[str, str] | None = None

    def specs(self) -> dict[str, str]:
        """name -> "module:attr" in order: built-ins (less `last`), plugins by name, then `last`."""
        if self._specs is None:
            from importlib.metadata import entry_points

            found = {k: v for k, v in self.builtin.items() if k not in self.last}
            for ep in sorted(entry_points(group=self.group), key=lambda e: e.name):
                if ep.name not in self.builtin:
                    found.setdefault(ep.name, ep.value)
            self._specs = {**found, **{k: self.builtin[k] for k in self.last}}
        return self._specs

    def names(self) -> list[str]:
        return list(self.specs())

    def refresh(self) -> None:
        """Look the entry points up again (after a plugin was installed in this process)."""
        self._specs = None

    def load(self, name: str, base: type, fail: Fail,
             catch: type[BaseException] | tuple[type[BaseException], ...] = Exception) -> type:
        """The class registered as `name`, a subclass of `base`; `fail` words the error when it is unknown, when
        importing it raises one of `catch`, or when it is not a subclass of `base`."""
        specs = self.specs()
        if name not in specs:
            raise fail("unknown", name, None, None)
        spec = specs[name]
        module, _, attr = spec.partition(":")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except catch as exc:
            raise fail("import", name, spec, exc) from exc
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise fail("type", name, spec, None)
        return cls
