"""The engine options a backend declares (`Model.options`): names, types, defaults, validators; one check, one
wording, for every backend's options (a preset's `large.options`, `--large-option`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..errors import SettingError


@dataclass(frozen=True)
class Option:
    """One engine option a backend takes (a preset's `large.options`, `--large-option KEY=VALUE`)."""

    types: tuple[type, ...]
    default: Any = None
    ok: Callable[[Any], bool] = lambda value: True
    said: str = ""  # what a valid value is, for the error ("an integer >= 1")
    help: str = ""

    def valid(self, value: Any) -> bool:
        if isinstance(value, bool) and bool not in self.types:
            return False  # YAML's `yes` is not a number
        return isinstance(value, self.types) and bool(self.ok(value))


def check_options(backend: str, declared: dict[str, Option], options: Any, where: str) -> dict:
    """`options` as given, each key one `declared`, each value valid; else one line naming the key (and the
    nearest known one). `where` says where they were given (a preset's `large.options`, `--large-option`)."""
    import difflib

    if options is None:
        return {}
    if not isinstance(options, dict):
        raise SettingError(f"{where}: must be a mapping of the {backend} backend's options", "large_options")
    for key, value in options.items():
        if key not in declared:
            close = difflib.get_close_matches(str(key), list(declared), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            known = ", ".join(declared) if declared else "none"
            raise SettingError(f"{where}: unknown option {str(key)!r} of the {backend} large backend{hint}; it takes: "
                               f"{known}".replace("{", "{{").replace("}", "}}"), "large_options")
        if not declared[key].valid(value):
            raise SettingError(f"{where}.{key}: must be {declared[key].said}, got {value!r}"
                               .replace("{", "{{").replace("}", "}}"), "large_options")
    return dict(options)
