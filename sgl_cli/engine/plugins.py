"""Registries that installed packages can add to: guides (`sgl.guides`), large backends (`sgl.backends`) and input
formats (`sgl.formats`); and the checks of what crosses the plugin boundary. One rule for all three:

- the built-ins first, then the entry points of the group sorted by name; a plugin cannot replace a built-in (nor
  an earlier plugin of the same name); a class is imported only when it is asked for;
- a plugin that cannot be loaded (its module raises anything when imported, or its class is not the registry's
  base) is an error worded by its registry, one line, when it is asked for by name (`load`), and is left out of
  every listing (`usable`: `sgl eval`'s default guides, `sgl inspect --guide all`, format recognition) with one
  `PluginWarning` naming it and why;
- an exception a plugin raises where the run cannot go on without it (`call`: a backend's `load`) is a
  `PluginError` naming it; a built-in's is raised as it is;
- what a guide, backend or format reader gives back is checked here (`check_scores`, `check_kept`,
  `check_answers`, `check_reduced`, `pair_problem`), built-ins included (the checks are cheap): a violation is a
  ContractError naming the member (`label`: "guide plugin 'norm'", a built-in "guide 'sgl'"), which the engine
  makes the error record of the item it concerns (a format's: an InputError ending the input there).

Importing this module is cheap: no entry-point lookup until a registry is first read, no torch.
"""

from __future__ import annotations

import importlib
import numbers
import warnings
from typing import Any, Callable, Iterable, Literal

from .errors import ContractError, PluginError, SglError

Problem = Literal["unknown", "import", "type"]
# (problem, name, "module:attr" or None when unknown, what importing raised or None) -> the error to raise
Fail = Callable[[Problem, str, "str | None", "BaseException | None"], Exception]


class PluginWarning(UserWarning):
    """A plugin left out (it cannot be loaded, or its `recognise` raised): sgl goes on without it. The CLI prints
    each one once on stderr (`sgl: warning: ...`)."""


def warn(message: str) -> None:
    warnings.warn(message, PluginWarning, stacklevel=3)


def why(exc: BaseException) -> str:
    """What an exception says, on one line."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:297] + '...' if len(text) > 300 else text}".rstrip(": ")


class Registry:
    """name -> "module:attr" of one entry-point group, and the classes they name. `noun` names a member in
    messages ("guide", "large backend", "input format").

    `last`: built-ins listed after the plugins (the input formats recognised by their content, the sgl JSONL
    fallback among them, must come after a plugin's format)."""

    def __init__(self, group: str, builtin: dict[str, str], *, noun: str | None = None, last: Iterable[str] = ()):
        self.group = group
        self.builtin = dict(builtin)
        self.noun = noun or group
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
        """Every registered name, loadable or not (from the metadata alone: cheap, for --help and messages)."""
        return list(self.specs())

    def refresh(self) -> None:
        """Look the entry points up again (after a plugin was installed in this process)."""
        self._specs = None

    def is_builtin(self, name: str, cls: type | None = None) -> bool:
        """Whether `name` is a built-in (and `cls`, when given, its own class, not another of the same name)."""
        spec = self.builtin.get(name)
        return spec is not None and (cls is None or spec == f"{cls.__module__}:{cls.__qualname__}")

    def label(self, name: str, cls: type | None = None) -> str:
        """How messages name a member: "guide 'sgl'", "guide plugin 'norm'"."""
        return f"{self.noun}{'' if self.is_builtin(name, cls) else ' plugin'} {name!r}"

    @staticmethod
    def _import(spec: str) -> Any:
        module, _, attr = spec.partition(":")
        return getattr(importlib.import_module(module), attr)

    def load(self, name: str, base: type, fail: Fail,
             catch: type[BaseException] | tuple[type[BaseException], ...] = Exception) -> type:
        """The class registered as `name`, a subclass of `base`; `fail` words the error when it is unknown, when
        importing it raises (for a built-in: one of `catch`; for a plugin: anything), or when it is not a
        subclass of `base`."""
        specs = self.specs()
        if name not in specs:
            raise fail("unknown", name, None, None)
        spec = specs[name]
        try:
            cls = self._import(spec)
        except (catch if name in self.builtin else Exception) as exc:  # a plugin's module may raise anything
            raise fail("import", name, spec, exc) from exc
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise fail("type", name, spec, None)
        return cls

    def usable(self, base: type) -> list[str]:
        """The names to list, in order: the built-ins (not imported here), and each plugin whose class loads and is
        a subclass of `base`; one that is not is left out with a PluginWarning naming it and why (asked for by
        name, `load` says it as an error)."""
        names = []
        for name, spec in self.specs().items():
            if name in self.builtin:
                names.append(name)
                continue
            try:
                cls = self._import(spec)
            except Exception as exc:  # noqa: BLE001 - a plugin's module may raise anything
                warn(f"{self.noun} plugin {name!r} ({spec}) cannot be loaded, left out: {why(exc)}")
                continue
            if not (isinstance(cls, type) and issubclass(cls, base)):
                warn(f"{self.noun} plugin {name!r} ({spec}) is not a subclass of {base.__name__}, left out")
                continue
            names.append(name)
        return names

    def call(self, name: str, cls: type, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)`, a call into member `name` (class `cls`) that the run cannot go on without: an exception a
        plugin raises (an SglError aside, which says itself) is a PluginError naming it; a built-in's propagates."""
        try:
            return fn(*args)
        except SglError:
            raise
        except Exception as exc:
            if self.is_builtin(name, cls):
                raise
            raise PluginError(f"{self.label(name, cls)}: {what} raised {why(exc)}") from exc


# -- what crosses the boundary -------------------------------------------------------------------------------------
# `check_*` raise a ContractError prefixed with `who` (the member's label); `*_problem` say what is wrong with one
# value in a few words (None: nothing).

def check_scores(who: str, scores: Any, n_visual: list[int]) -> None:
    """A guide's scores of a batch: one ranking per item (`n_visual`: each item's visual tokens), each right."""
    _check_count(who, "scores", scores, len(n_visual), "rankings")
    for s, n in zip(scores, n_visual):
        _raise(who, scores_problem(s, n))


def check_kept(who: str, kept: Any, n_visual: list[int]) -> None:
    """The tokens a guide keeps of a batch: one set per item, each right."""
    _check_count(who, "keep", kept, len(n_visual), "sets of kept tokens")
    for idx, n in zip(kept, n_visual):
        _raise(who, kept_problem(idx, n))


def check_answers(who: str, what: str, generation: Any, n_items: int) -> list[list[int]]:
    """A backend's `what` (generate...) answers to `n_items` items (a `Generation`): their tokens."""
    tokens = getattr(generation, "tokens", None)
    problem = answers_problem(tokens, n_items)
    _raise(who, None if problem is None else f"{what} {problem}")
    return tokens


def check_reduced(who: str, what: str, seen: Any, n_items: int) -> None:
    """A backend's `what` (reduced...): one `Reduced` per item, each with at least one visual token."""
    _check_count(who, what, seen, n_items, "reduced inputs")
    for r in seen:
        n = getattr(r, "n_visual", None)
        if not isinstance(n, int) or n < 1:
            _raise(who, f"{what} gave a reduced input of {n!r} visual tokens")


def _check_count(who: str, what: str, values: Any, n_items: int, noun: str) -> None:
    if not isinstance(values, (list, tuple)) or len(values) != n_items:
        got = len(values) if isinstance(values, (list, tuple)) else f"a {type(values).__name__}, not"
        _raise(who, f"{what} gave {got} {noun} for {n_items} item{'' if n_items == 1 else 's'}")


def _raise(who: str, problem: str | None) -> None:
    if problem is not None:
        raise ContractError(f"{who}: {problem}")


def scores_problem(scores: Any, n_visual: int) -> str | None:
    """A guide's scores of one item: a 1-D tensor of real numbers, one per visual token, all finite (a NaN would
    sort as the highest score: it is an error, not a silent "keep this one first")."""
    import torch

    if not isinstance(scores, torch.Tensor):
        return f"scores are a {type(scores).__name__}, not a tensor"
    if scores.dim() != 1:
        return f"scores have shape {tuple(scores.shape)}; one per visual token is ({n_visual},)"
    if len(scores) != n_visual:
        return f"scores have {len(scores)} values for {n_visual} visual tokens"
    if scores.dtype == torch.bool or scores.is_complex():
        return f"scores are {scores.dtype}, not real numbers"
    bad = int((~torch.isfinite(scores)).sum())
    if bad:
        return f"scores are not finite (NaN or infinite) at {bad} of {n_visual} visual tokens"
    return None


def kept_problem(kept: Any, n_visual: int) -> str | None:
    """The visual tokens a guide keeps of one item: a 1-D integer tensor of indices in [0, n_visual), strictly
    increasing (so unique), at least one."""
    import torch

    if not isinstance(kept, torch.Tensor):
        return f"kept indices are a {type(kept).__name__}, not a tensor"
    if kept.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8):
        return f"kept indices are {kept.dtype}, not integers"
    if kept.dim() != 1:
        return f"kept indices have shape {tuple(kept.shape)}, not one list"
    if len(kept) == 0:
        return "kept no visual token (a guide keeps one at least)"
    outside = kept[(kept < 0) | (kept >= n_visual)]
    if len(outside):
        return f"kept index {int(outside[0])} is not one of the {n_visual} visual tokens (0 to {n_visual - 1})"
    steps = (kept[1:] - kept[:-1]).tolist()
    for i, step in enumerate(steps):
        if step == 0:
            return f"kept index {int(kept[i])} is kept twice"
        if step < 0:
            return f"kept indices are not in increasing order ({int(kept[i])} before {int(kept[i + 1])})"
    return None


def answers_problem(tokens: Any, n_items: int) -> str | None:
    """A backend's answers to `n_items` items (`Generation.tokens`): one per item, each a list of token ids."""
    if not isinstance(tokens, (list, tuple)):
        return f"gave a {type(tokens).__name__}, not a list of answers"
    if len(tokens) != n_items:
        return f"gave {len(tokens)} answers for {n_items} item{'' if n_items == 1 else 's'}"
    for answer in tokens:
        if not isinstance(answer, (list, tuple)) or not all(
                isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in answer):
            return f"gave an answer that is not a list of token ids ({_brief(answer)})"
    return None


def pair_problem(pair: Any, last: int, unit: str) -> str | None:
    """A format reader's next (number, payload) pair after the one numbered `last` (0: none yet): numbers are
    integers from 1, strictly increasing."""
    at = f"after {unit} {last}" if last else "first"
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and isinstance(pair[0], numbers.Integral)
            and not isinstance(pair[0], bool)):
        return f"{at} its reader gave {_brief(pair)}, not a ({unit} number, payload) pair"
    if pair[0] < 1:
        return f"its reader numbered an item {unit} {pair[0]} ({unit} numbers start at 1)"
    if pair[0] <= last:
        return f"{unit} {pair[0]} comes after {unit} {last} ({unit} numbers must increase)"
    return None


def _brief(value: Any) -> str:
    if value is None:
        return "None"
    text = repr(value)
    return f"{type(value).__name__} {text[:40] + '...' if len(text) > 40 else text}"
