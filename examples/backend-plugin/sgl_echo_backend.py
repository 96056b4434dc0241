"""An sgl backend plugin, both roles, no model run: `echo`.

- The large backend answers "kept N of M: i,j,..." (the kept visual tokens of each item, and how many it had),
  deterministically. It offers no capability (no image features, no hooks inside a vision tower or language model,
  pruning only before the language model: guides that need more are refused before anything loads), and takes two
  options, to show how a backend declares them: `prefix` (the answer's first word) and `jitter_ms` (in the streaming
  pipeline, each item is answered after a random delay of up to that many milliseconds, seeded by the item, so
  answers finish out of order, as in an engine that batches continuously).
- The small model answers "small: <the question's first word>" with token probabilities, an SGP importance and a
  re-read all computed by a rule from the item (its line, question and visual tokens), so items differ in
  confidence and some exit early.

Both load the checkpoint's processor and config (sgl encodes with them, and the family reads the config), never its
weights. They show what a backend must provide (sgl_cli/engine/backends/base.py) and let Run, the CLI, resume and
Ray be tested with no model at all.
"""

from __future__ import annotations

import zlib
from typing import ClassVar

import torch

from sgl_cli.engine.backends.base import LargeBackend, LargeInputs, LargeStream, Option, SmallAnswer, SmallModel
from sgl_cli.engine.core.generate import Generation


class EchoBackend(LargeBackend):
    name: ClassVar[str] = "echo"
    offers: ClassVar[frozenset[str]] = frozenset()
    options: ClassVar[dict[str, Option]] = {
        "prefix": Option((str,), "kept", lambda v: bool(v.strip()), "a non-empty word", "the answer's first word"),
        "jitter_ms": Option((int,), 0, lambda v: v >= 0, "an integer >= 0", "answers finish after random delays"),
    }

    def __init__(self, spec, processor, config, family, eos_ids, prefix: str = "kept", jitter_ms: int = 0):
        from types import SimpleNamespace

        self.spec = spec
        self.processor, self.family, self.eos_ids = processor, family, eos_ids
        self.model = SimpleNamespace(config=config)  # what the family's methods read: the config only
        self.prefix = prefix
        self.jitter_ms = jitter_ms
        self.closed = False

    @classmethod
    def load(cls, spec, role: str = "large", options: dict | None = None) -> "EchoBackend":
        processor, config, family, eos_ids = cls.read_checkpoint(spec)
        return cls(spec, processor, config, family, eos_ids, **(options or {}))

    # image_token_id, num_layers, context, visual_mask, decode and inputs: LargeBackend's, read from the family,
    # the config and the processor.

    def generate(self, works: list, inputs: LargeInputs, kept: list, k: int, limits: list[int]) -> Generation:
        tokens = []
        for w, idx, limit in zip(works, kept, limits):
            text = f"{self.prefix} {len(idx)} of {int(w.encoded.visual.sum())}: " + ",".join(str(int(i))
                                                                                           for i in idx[:4])
            tokens.append(_tokens(self.processor, text, limit, self.eos_ids))
        return Generation(tokens, [[1.0] * len(t) for t in tokens])

    def stream(self) -> LargeStream:
        return JitterStream(self) if self.jitter_ms else super().stream()

    def default_in_flight(self, batch_size: int) -> int:
        return 4 * batch_size if self.jitter_ms else batch_size

    def close(self) -> None:
        self.closed = True


class JitterStream(LargeStream):
    """Each item answered after its own random delay: answers finish in another order than they were added."""

    def __init__(self, backend: EchoBackend):
        super().__init__(backend)
        self.due: list[tuple[float, int, object, object]] = []  # (when, order, work, answer)

    def add(self, works, inputs, guide, retain, k, limits) -> None:
        import time

        now = time.monotonic()
        for w, a in zip(works, self.backend.answer(works, inputs, guide, retain, k, limits)):
            delay = _unit(f"jitter:{w.item.line}") * self.backend.jitter_ms / 1000
            self.due.append((now + delay, len(self.due), w, a))

    def ready(self, wait: bool) -> list:
        import time

        if wait and self.due:
            time.sleep(max(0.0, min(d[0] for d in self.due) - time.monotonic()))
        now = time.monotonic()
        out = [(w, a) for when, _, w, a in self.due if when <= now]
        self.due = [d for d in self.due if d[0] > now]
        return out

    def close(self) -> None:
        self.due = []


class EchoSmall(SmallModel):
    name: ClassVar[str] = "echo"

    def __init__(self, spec, processor, config, family, eos_ids):
        from types import SimpleNamespace

        self.spec = spec
        self.processor, self.family, self.eos_ids = processor, family, eos_ids
        self.model = SimpleNamespace(config=config)

    @classmethod
    def load(cls, spec, role: str = "small", options: dict | None = None) -> "EchoSmall":
        return cls(spec, *cls.read_checkpoint(spec))

    def answer(self, works: list, limits: list[int], capture: bool = True) -> list[SmallAnswer]:
        out = []
        for w, limit in zip(works, limits):
            word = (w.item.question.split() or ["?"])[0]
            tokens = _tokens(self.processor, f"small: {word}", limit, self.eos_ids)
            sure = _unit(f"{w.item.line}:{w.item.question}")  # per item: some are sure enough to exit
            probs = [0.5 + 0.5 * sure] * len(tokens)
            n = int(w.encoded.visual.sum())
            importance = torch.tensor([_unit(f"{w.item.line}:{i}") for i in range(n)]) if capture else None
            out.append(SmallAnswer(tokens, probs, importance, sure))
        return out

    def reread(self, works: list, kept: list) -> list[list[float]]:
        # The answer re-read: its last token as likely as the item is sure (consistency = `sure`).
        return [[1.0] * (len(w.small.tokens) - 1) + [w.small.state] for w in works]


def _tokens(processor, text: str, limit: int, eos_ids) -> list[int]:
    ids = processor.tokenizer.encode(text, add_special_tokens=False)[:limit]
    return ids + sorted(eos_ids)[:1] if len(ids) < limit else ids


def _unit(text: str) -> float:
    """A number in [0, 1) fixed by `text`."""
    return (zlib.crc32(text.encode()) % 10_000) / 10_000
