"""An sgl large-model backend plugin: `echo` answers "kept N of M" (the kept visual tokens of each item, and how
many it had), deterministically, without running a large model.

It shows what a backend must provide (sgl_cli/engine/backends/base.py) and lets Run, the CLI, resume and Ray be
tested without a large model's engine: the checkpoint's processor and config are loaded (sgl encodes with them, and
the family reads the config), never its weights. It offers no capability: no image features, no hooks inside a
vision tower or language model, pruning only before the language model (guides that need more are refused before
anything loads).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import ClassVar

from sgl_cli.engine.backends.base import LargeBackend, LargeInputs
from sgl_cli.engine.core.generate import Generation
from sgl_cli.engine.guides.base import GuideBatch, GuideItem


class EchoBackend(LargeBackend):
    name: ClassVar[str] = "echo"
    offers: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, spec, processor, config, family):
        self.spec = spec
        self.processor = processor
        self.model = SimpleNamespace(config=config)  # what the family's methods read: the config only
        self.family = family
        self.random_weights = False
        tokenizer = processor.tokenizer
        self.eos_ids = frozenset([tokenizer.eos_token_id]) if tokenizer.eos_token_id is not None else frozenset()
        self.closed = False

    @classmethod
    def load(cls, spec, role: str = "large", options=None) -> "EchoBackend":
        from transformers import AutoConfig

        from sgl_cli.engine.builtin.locate import resolve_path
        from sgl_cli.engine.core.processors import load_processor
        from sgl_cli.engine.families import family_for

        path = resolve_path(spec.model)
        processor = load_processor(path, revision=spec.revision, trust_remote_code=spec.trust_remote_code)
        config = AutoConfig.from_pretrained(path, revision=spec.revision, trust_remote_code=spec.trust_remote_code)
        return cls(spec, processor, config, family_for(SimpleNamespace(config=config)))

    # image_token_id, num_layers, context and visual_mask: LargeBackend's defaults, read from the family and config.

    def inputs(self, works: list, guides: list) -> LargeInputs:
        items = [GuideItem(id=w.item.id, line=w.item.line, question=w.item.question, visual=w.encoded.visual,
                           features=None, encoding=w.encoded.large,
                           small_importance=w.small.importance if w.small is not None else None) for w in works]
        scores = {g.name: g.scores(GuideBatch(self, items)) for g in guides if not g.reduces_input}
        return LargeInputs(list(works), [None] * len(works), items, scores)

    def generate(self, works: list, inputs: LargeInputs, kept: list, k: int, limits: list[int]) -> Generation:
        tokenizer = self.processor.tokenizer
        tokens = []
        for w, idx, limit in zip(works, kept, limits):
            text = f"kept {len(idx)} of {int(w.encoded.visual.sum())}: " + ",".join(str(int(i)) for i in idx[:4])
            ids = tokenizer.encode(text, add_special_tokens=False)[:limit]
            tokens.append(ids + sorted(self.eos_ids)[:1] if len(ids) < limit else ids)
        return Generation(tokens, [[1.0] * len(t) for t in tokens])

    def decode(self, tokens: list[int]) -> str:
        return self.processor.tokenizer.decode(tokens, skip_special_tokens=True).strip()

    def close(self) -> None:
        self.closed = True
