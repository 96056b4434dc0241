"""The streaming pipeline: the small stage and the large stage run at once, joined by a bounded queue.

    small stage (a thread)     items read, encoded and answered by the small model a batch at a time (`batch_size`);
                               an item that exits (or fails) is done, the others go on the queue at once
    large stage (a thread)     the large backend's stream (`LargeBackend.stream`): on vLLM each item is a request
                               added to its running batch (continuous batching, up to `large_batch_size` in flight),
                               answered when vLLM finishes it; on transformers a batch of up to `large_batch_size`
                               taken from the queue at a time
    the caller                 records in input order: a reorder buffer flushed as soon as they are contiguous

What bounds memory whatever the input's length: at most `window` items between being read and being recorded (the
small stage waits for a slot before reading the next, and hands over a partial batch rather than wait with one),
so decoded images, queued items and finished records waiting for an earlier one are all bounded.

The records are the serial pipeline's (`Engine.process`, batch by batch), timings aside: an item's answers do not
depend on the other items of its batch (tested), nor does the order the large stage finishes in. `ms` says, per
item: `small`, its share of its small batch's time; `large`, the time from its hand-over to its answer (concurrent
with other items'); `total`, from its small batch's start to its answer.

Interrupts: the caller's thread is the one Python interrupts (Ctrl-C, SIGTERM made KeyboardInterrupt by the CLI);
closing the generator stops both stages (the large stream drops what it had in flight) and waits for them briefly.
An exception that is not an item's failure (a bug, a broken engine) is raised in the caller's thread.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch

from ..guides.base import Kind
from ..io.items import Item
from .stages import Work

POLL = 0.05  # seconds between looks at the stop flag while waiting (how fast an interrupt is noticed)


@dataclass
class Busy:
    """How long each stage worked, over the pipeline's wall time (`sgl bench` reports the shares)."""

    wall: float = 0.0
    small: float = 0.0  # the small stage's time encoding and running the small model
    large: float = 0.0  # the large stage's time with at least one item in the large model's hands
    items: int = 0
    in_flight_max: int = 0  # the most items in the large stage at once
    _since: float = field(default=0.0, repr=False)

    def shares(self) -> dict[str, float]:
        wall = max(self.wall, 1e-9)
        return {"small": round(self.small / wall, 4), "large": round(self.large / wall, 4)}


class _Stop(Exception):
    """The pipeline is being closed: a stage stops where it is."""


class Stream:
    """One pass of `items` through `engine`'s stages at once (see the module docstring)."""

    def __init__(self, engine, items: Iterable[Item]):
        s = engine.settings
        self.engine = engine
        self.items = items
        self.batch = s.batch_size
        self.in_flight = s.large_batch_size or engine.large.default_in_flight(s.batch_size)
        # Items between being read and being recorded: a small batch being answered, one waiting, the large stage's
        # items in flight and as many queued for it.
        self.window = 2 * self.batch + 2 * self.in_flight
        self.slots = threading.Semaphore(self.window)
        # Small batches' items for the large stage: as many as it keeps in flight, at least one batch.
        self.handover: queue.Queue = queue.Queue(maxsize=max(1, -(-self.in_flight // self.batch)))
        self.done: queue.Queue = queue.Queue()
        self.stop = threading.Event()
        self.busy = Busy()
        self.threads: list[threading.Thread] = []
        self.input_failed: BaseException | None = None

    # -- the caller's side -----------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        t0 = time.perf_counter()
        self._start()
        pending: dict[int, tuple[Work, float]] = {}  # finished, waiting for an earlier item
        finished_stages = 0
        nxt = 0
        try:
            while finished_stages < 2 or pending:
                if nxt in pending:
                    w, total = pending.pop(nxt)
                    nxt += 1
                    self.slots.release()
                    self.busy.items += 1
                    yield self.engine.record(w, total)
                    continue
                try:
                    got = self.done.get(timeout=POLL)
                except queue.Empty:
                    continue
                if got[0] == "item":
                    _, seq, w, total = got
                    pending[seq] = (w, total)
                elif got[0] == "end":
                    finished_stages += 1
                else:  # a stage failed outside any item: the run cannot go on
                    raise got[1]
        finally:
            self._close()
            self.busy.wall = time.perf_counter() - t0
        if self.input_failed is not None:
            raise self.input_failed

    def _start(self) -> None:
        for name, target in (("sgl-small-stage", self._small_stage), ("sgl-large-stage", self._large_stage)):
            thread = threading.Thread(target=self._guarded, args=(target,), name=name, daemon=True)
            thread.start()
            self.threads.append(thread)

    def _close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=30)  # a model call in progress is not interrupted; the threads are daemons

    def _guarded(self, target) -> None:
        try:
            with torch.inference_mode():
                target()
        except _Stop:
            pass
        except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread
            self.done.put(("error", exc))
        finally:
            self.done.put(("end",))

    # -- waiting, interruptibly ------------------------------------------------------------------------------
    def _acquire(self) -> None:
        while not self.slots.acquire(timeout=POLL):
            if self.stop.is_set():
                raise _Stop

    def _put(self, q: queue.Queue, value: Any) -> None:
        while True:
            if self.stop.is_set():
                raise _Stop
            try:
                q.put(value, timeout=POLL)
                return
            except queue.Full:
                continue

    # -- the small stage -------------------------------------------------------------------------------------
    def _small_stage(self) -> None:
        eng = self.engine
        failed: list[BaseException] = []
        pending: list[tuple[int, Item]] = []
        counted = 0
        seq = 0
        try:
            for item in eng.prefetched(self.items, failed):
                if not self.slots.acquire(blocking=False):
                    if pending:  # hand over what is read rather than hold a slot the caller waits for
                        self._small_batch(pending)
                        pending, counted = [], 0
                    self._acquire()
                pending.append((seq, item))
                seq += 1
                counted += item.error is None
                if counted >= self.batch:
                    self._small_batch(pending)
                    pending, counted = [], 0
            if pending:
                self._small_batch(pending)
        finally:
            self._put(self.handover, None)  # the large stage's end of input
        # The input broke (a format's reader): the items before it are recorded first, then it is raised.
        self.input_failed = failed[0] if failed else None

    def _small_batch(self, batch: list[tuple[int, Item]]) -> None:
        eng = self.engine
        t0 = time.perf_counter()
        works = eng.prepare([item for _, item in batch])
        eng.small_pass(works)
        t1 = time.perf_counter()
        self.busy.small += t1 - t0
        onward = []
        for (seq, _), w in zip(batch, works):
            w.started = t0
            goes_on = w.ok and not eng.exits(w)
            # What waits in the window keeps only what is still read: the memory of the items in flight is their
            # images and ids, not the small model's tensors (its re-read state, both encodings' pixels).
            if w.small is not None:
                w.small.state = None
            if w.encoded is not None:
                w.encoded = w.encoded.lean(pixels=goes_on and eng.large.in_process,
                                           frames=goes_on and not eng.large.in_process)
            if goes_on:
                onward.append((seq, w))
            else:
                self.done.put(("item", seq, w, (t1 - t0) * 1000 / len(works)))
        if onward:  # a batch's items together: the large stage takes them as one group where it batches
            self._put(self.handover, onward)

    # -- the large stage -------------------------------------------------------------------------------------
    def _large_stage(self) -> None:
        eng = self.engine
        stream = eng.large.stream()
        flight: dict[int, tuple[int, Work, float]] = {}  # id(work) -> (seq, work, handed over at)
        ended = False
        try:
            while not ended or flight:
                if self.stop.is_set():
                    raise _Stop
                group: list[tuple[int, Work]] = []
                while not ended and len(flight) + len(group) < self.in_flight:
                    try:  # wait for work only when there is none in flight
                        got = self.handover.get_nowait() if flight or group else self.handover.get(timeout=POLL)
                    except queue.Empty:
                        if flight or group:
                            break
                        if self.stop.is_set():
                            raise _Stop
                        continue
                    if got is None:
                        ended = True
                    else:
                        group += got
                if group:
                    now = time.perf_counter()
                    flight.update((id(w), (seq, w, now)) for seq, w in group)
                    self._add(stream, [w for _, w in group])
                    self.busy.large += time.perf_counter() - now
                    for seq, w in group:
                        if not w.ok:  # failed before the large model was asked (its inputs): done
                            flight.pop(id(w))
                            self.done.put(("item", seq, w, (now - w.started) * 1000))
                if not flight:
                    continue
                self.busy.in_flight_max = max(self.busy.in_flight_max, len(flight))
                t0 = time.perf_counter()
                answered = stream.ready(wait=True)
                now = time.perf_counter()
                self.busy.large += now - t0
                for w, a in answered:
                    seq, _, since = flight.pop(id(w))
                    eng.settle(w, a)
                    w.charge("large", (now - since) * 1000)
                    self.done.put(("item", seq, w, (now - w.started) * 1000))
        finally:
            stream.close()

    def _add(self, stream, works: list[Work]) -> None:
        """Hand `works` to the large stream (their inputs first: on transformers, the vision tower); a group that
        fails is retried item by item, and an item that fails alone has its error (`Engine.stage`)."""
        eng = self.engine
        guide = eng.guide
        k = eng.prune_layer(guide)

        def add(group: list[Work]) -> None:
            inputs = None if guide.kind is Kind.REDUCES else eng.large_inputs(group)
            stream.add(group, inputs, guide, eng.settings.retain, k, eng.limits(group))

        eng.stage(works, add, "large stage")
