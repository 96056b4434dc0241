"""The large model's stage of the streaming pipeline (pipeline/stream.py): `LargeBackend.stream` gives one."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..guides.base import Guide
    from .base import LargeBackend
    from .results import Answer, LargeInputs


class LargeStream:
    """Items in the large model's stage of the streaming pipeline. This one answers each group when it is added
    (`LargeBackend.answer`, a batch at a time); subclasses keep items in flight in an engine of their own.

    Only the large stage's thread calls it; `ready` gives (work, Answer) pairs in any order."""

    def __init__(self, backend: LargeBackend):
        self.backend = backend
        self._ready: list[tuple[Any, Answer]] = []

    def add(self, works: list, inputs: LargeInputs | None, guide: "Guide", retain: float, k: int,
            limits: list[int]) -> None:
        """Hand `works` to the large model under `guide` at `retain` (their `inputs`: None for a guide that reduces
        the input)."""
        self._ready += zip(works, self.backend.answer(works, inputs, guide, retain, k, limits))

    def ready(self, wait: bool) -> list[tuple[Any, Answer]]:
        """The answers that finished since the last call; with `wait`, at least one when any is in flight."""
        out, self._ready = self._ready, []
        return out

    def close(self) -> None:
        """Drop what is still in flight (an interrupted run)."""
        self._ready = []
