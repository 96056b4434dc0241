"""The one batching rule every loop over items uses (Engine.run, the Ray backend's input batches, evaluation,
calibration): a batch ends at its `size`-th counted item; the one retry rule: a batch that fails is run again item
by item (`alone_on_failure`); and the one rule for an input that fails part-way (`until_failure`): the items read
before the failure are run and recorded, then the failure is raised."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def alone_on_failure(items: list[T], run: Callable[[list[T]], R], failed: Callable[[T, BaseException], R],
                     catch: type[BaseException] | tuple[type[BaseException], ...] = Exception) -> list[R]:
    """`[run(items)]`; when it raises one of `catch` (others propagate), the exception names no item, so each item
    is run alone, and one that fails alone gets `failed(item, exception)`: one bad item never fails its
    neighbours."""
    try:
        return [run(items)]
    except catch as exc:
        if len(items) == 1:
            return [failed(items[0], exc)]
    out: list[Any] = []
    for item in items:
        out += alone_on_failure([item], run, failed, catch)
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


def until_failure(items: Iterable[T], failed: list[BaseException]) -> Iterator[T]:
    """`items` until reading the next one raises: the exception is appended to `failed` and the items end there,
    so that the caller runs (and records) every item read before it, then raises it. Reading ahead (the engine
    prefetches several batches) must not cost the records of the items already read."""
    try:
        yield from items
    except Exception as exc:  # noqa: BLE001 - raised by the caller once the items before it are done
        failed.append(exc)
