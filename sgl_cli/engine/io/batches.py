"""The one batching rule every loop over items uses (Engine.run, the Ray backend's input batches, evaluation,
calibration): a batch ends at its `size`-th counted item; and the one retry rule: a batch that fails is run again
item by item."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def alone_on_failure(items: list[T], run: Callable[[list[T]], R],
                     failed: Callable[[T, BaseException], R]) -> list[R]:
    """`[run(items)]`; when it raises, the exception names no item, so each item is run alone, and one that fails
    alone gets `failed(item, exception)`: one bad item never fails its neighbours."""
    try:
        return [run(items)]
    except Exception as exc:  # noqa: BLE001 - a model failure fails its items, not the run
        if len(items) == 1:
            return [failed(items[0], exc)]
    out: list[Any] = []
    for item in items:
        out += alone_on_failure([item], run, failed)
    return out


def batches(items: Iterable[T], size: int, counts: Callable[[T], bool] | None = None) -> Iterator[list[T]]:
    """`items` in lists, each ending at its `size`-th item for which `counts` is true (default: every item), so
    that items that will not run (an error record) ride along without taking a place; the last list may be
    shorter."""
    pending: list[T] = []
    counted = 0
    for item in items:
        pending.append(item)
        counted += 1 if counts is None else bool(counts(item))
        if counted >= size:
            yield pending
            pending, counted = [], 0
    if pending:
        yield pending
