"""The one batching rule every loop over items uses (Engine.run, the Ray backend's input batches, evaluation,
calibration): a batch ends at its `size`-th counted item."""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")


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
