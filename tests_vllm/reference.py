"""sgl's transformers path as the reference the vLLM backend must equal: the same encoding, rows, kept columns and
greedy decoding the engine's `generate_kept` runs at prune layer 0, through public calls."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sgl_cli.engine.core.generate import Row, collate, greedy
from sgl_cli.engine.backends.transformers import load_model
from sgl_cli.engine.preset import ModelSpec


@dataclass
class Reference:
    tokens: list[int]
    text: str
    positions: torch.Tensor  # (3, S_kept) the pruned row's M-RoPE ids
    logits: torch.Tensor  # (n_answer, V) the logits before each answer token (teacher-forced)
    n_visual: int
    prompt: str


class Transformers:
    def __init__(self, path):
        self.lm = load_model(ModelSpec(str(path), dtype="float32"), "large")

    def encode(self, images, question):
        fam, proc = self.lm.family, self.lm.processor
        return fam.encode(proc, images, question)

    def prompt(self, images, question) -> str:
        messages = [{"role": "user", "content": [{"type": "image"} for _ in images] + [{"type": "text",
                                                                                       "text": question}]}]
        return self.lm.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def n_visual(self, images, question) -> int:
        enc = self.encode(images, question)
        return int(self.lm.family.visual_mask(self.lm.model, enc).sum())

    @torch.inference_mode()
    def run(self, items: list[tuple[list, str, list[int] | None]], max_new_tokens: int) -> list[Reference]:
        """Greedy answers of a batch of (images, question, kept or None), as `Engine.generate_kept` at k = 0."""
        m, fam = self.lm, self.lm.family
        encs = [self.encode(images, q) for images, q, _ in items]
        rows = fam.rows(m.model, encs)
        kept_rows = []
        for enc, row, (_, _, kept) in zip(encs, rows, items):
            visual = fam.visual_mask(m.model, enc)
            idx = torch.arange(int(visual.sum())) if kept is None else torch.tensor(kept)
            kept_rows.append(row.keep(visual, idx))
        batch = collate(kept_rows, m.pad_id, "cpu")
        gen = greedy(m.model, batch, [max_new_tokens] * len(items), m.eos_ids, m.pad_id)
        out = []
        for enc, row, tokens, (images, q, _) in zip(encs, kept_rows, gen.tokens, items):
            out.append(Reference(tokens, m.processor.tokenizer.decode(tokens, skip_special_tokens=True).strip(),
                                 row.pos, self._teacher_logits(row, tokens),
                                 int(fam.visual_mask(m.model, enc).sum()), self.prompt(images, q)))
        return out

    def _teacher_logits(self, row: Row, tokens: list[int]) -> torch.Tensor:
        """(len(tokens), V): the logits predicting each answer token, one forward over prompt + answer."""
        m = self.lm
        extra = torch.tensor(tokens[:-1], dtype=torch.long)
        steps = torch.arange(1, len(extra) + 1)
        fed = Row(torch.cat([row.ids, extra]), torch.cat([row.pos, row.pos[:, -1:] + steps], dim=1), row.feats,
                  row.slots if row.slots is None else torch.cat([row.slots, torch.zeros(len(extra), dtype=torch.bool)]),
                  row.deepstack, row.pack)
        batch = collate([fed], m.pad_id, "cpu")
        logits = m.model(**batch.model_kwargs(), use_cache=False).logits[0]
        return logits[-len(tokens):].float()
