"""Greedy generation as a stack of small functions (prefill, decode one token, decode n, teacher-forced scoring).

Every call takes a list of `Row`s (ids, explicit position ids, image features for its placeholders), so the
same code serves the full input, a pruned input (kept visual columns, original positions) and a batch of
either: rows are left-padded, new tokens continue each row's own position numbering.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import hf


@dataclass
class Row:
    """One sequence: `ids` (S,), `pos` (P, S) position ids (P = 3 for M-RoPE), `feats` (n_slots, hidden).

    `slots` (S,) marks the columns the feature rows fill, in order (None: the visual columns; families with marker
    placeholders such as LLaVA-NeXT's newlines have more slots than visual tokens). `deepstack` holds extra
    per-slot features that travel with them (Qwen3-VL), and `pack(feats, deepstack)` builds the family's encoder
    output for `mm_encoder_outputs` (None: `pooler_output=(feats,)`).
    """

    ids: torch.Tensor
    pos: torch.Tensor
    feats: torch.Tensor
    slots: torch.Tensor | None = None
    deepstack: tuple = ()
    pack: Callable | None = None
    # (rows, cols) of the image's visual tokens when they no longer follow the model's own layout (a pooled grid)
    grid: tuple[int, int] | None = None
    # (n_slots,) bool: the slots a video's features fill (the model takes them as `mm_encoder_outputs["video"]`,
    # the others as "image"); None: no video
    video: torch.Tensor | None = None
    # The position of the first generated token: the full sequence's largest position + 1, as the model's own rope
    # deltas give it (a Qwen2.5-VL video's time-scaled ids can pass the text after it); None: after the last column
    next_pos: int | None = None

    def next_position(self) -> torch.Tensor:
        """(P, 1): where the first generated token goes."""
        if self.next_pos is None:
            return self.pos[:, -1:] + 1
        return torch.full((self.pos.shape[0], 1), self.next_pos, dtype=self.pos.dtype)

    @staticmethod
    def columns(visual: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        """(S,) bool: every text column and the visual columns in `kept` (indices into the visual tokens)."""
        columns = ~visual
        columns[visual.nonzero()[kept, 0]] = True
        return columns

    def keep(self, visual: torch.Tensor, kept: torch.Tensor) -> "Row":
        """Drop the visual columns not in `kept`; text columns stay."""
        columns = self.columns(visual, kept)
        slots = visual if self.slots is None else self.slots
        rows = columns[slots]  # the feature rows of the slots that stay
        return Row(self.ids[columns], self.pos[:, columns], self.feats[rows], slots[columns],
                   tuple(d[rows] for d in self.deepstack), self.pack,
                   video=self.video[rows] if self.video is not None else None, next_pos=self.next_pos)


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, S), left-padded
    attention_mask: torch.Tensor  # (B, S)
    position_ids: torch.Tensor  # (P, B, S)
    feats: torch.Tensor  # (sum n_slots, hidden), in row-major placeholder order
    deepstack: tuple = ()  # per level, (sum n_slots, hidden)
    pack: Callable | None = None
    video: torch.Tensor | None = None  # (sum n_slots,) bool: video slots (None: none)
    next_pos: torch.Tensor | None = None  # (P, B, 1): each row's first generated token's position

    def _encoded(self, rows: torch.Tensor | None):
        feats = self.feats if rows is None else self.feats[rows]
        deepstack = self.deepstack if rows is None else tuple(d[rows] for d in self.deepstack)
        return self.pack(feats, deepstack) if self.pack is not None else hf.pooled_output((feats,))

    def model_kwargs(self) -> dict:
        pos = self.position_ids if self.position_ids.shape[0] > 1 else self.position_ids[0]
        if self.video is None or not self.video.any():
            encoded = {"image": self._encoded(None)}
        else:  # the model fills image and video placeholders from separate outputs, each in sequence order
            video = self.video.to(self.feats.device)
            encoded = {"video": self._encoded(video)}
            if not video.all():
                encoded["image"] = self._encoded(~video)
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "position_ids": pos,
            "mm_encoder_outputs": encoded,
        }


def collate(rows: list[Row], pad_id: int, device) -> Batch:
    width = max(len(r.ids) for r in rows)
    b, p = len(rows), rows[0].pos.shape[0]
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    mask = torch.zeros((b, width), dtype=torch.long)
    pos = torch.ones((p, b, width), dtype=torch.long)  # pad positions are never attended
    for i, r in enumerate(rows):
        n = len(r.ids)
        ids[i, width - n :] = r.ids
        mask[i, width - n :] = 1
        pos[:, i, width - n :] = r.pos
    feats = torch.cat([r.feats for r in rows]).to(device)
    deepstack = tuple(torch.cat(level).to(device) for level in zip(*(r.deepstack for r in rows)))
    video = None
    if any(r.video is not None for r in rows):
        video = torch.cat([r.video if r.video is not None else torch.zeros(len(r.feats), dtype=torch.bool)
                           for r in rows])
    next_pos = torch.stack([r.next_position() for r in rows], dim=1)
    return Batch(ids.to(device), mask.to(device), pos.to(device), feats, deepstack, rows[0].pack, video,
                 next_pos.to(device))


@dataclass
class Generation:
    tokens: list[list[int]]  # per row, generated ids including the final EOS when one was produced
    probs: list[list[float]]  # per row, probability of each generated token under the model
    # per row, why it failed alone (None: it did not), for engines that answer each request on its own (vLLM);
    # None: no row failed
    errors: list[str | None] | None = None

    @property
    def item_errors(self) -> list[str | None]:
        return self.errors if self.errors is not None else [None] * len(self.tokens)


def _forward(model, cache=None, logits_to_keep: int = 1, use_cache: bool = True, **kwargs):
    out, cache = hf.forward(model, cache, **kwargs, use_cache=use_cache, logits_to_keep=logits_to_keep)
    return out.logits, cache


def prefill(model, batch: Batch):
    """Run the prompt; returns the last position's logits (B, V) and the cache."""
    logits, cache = _forward(model, **batch.model_kwargs())
    return logits[:, -1], cache


def decode_one(model, token: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, cache):
    """Feed one token per row at the given positions (P, B, 1); returns logits (B, V)."""
    pos = position_ids if position_ids.shape[0] > 1 else position_ids[0]
    logits, cache = _forward(model, cache, input_ids=token[:, None], attention_mask=attention_mask, position_ids=pos)
    return logits[:, -1], cache


# observe(step, active, key_valid) before every forward: step 0 is the prefill; `active` (B,) bool marks the rows
# still generating (all at step 0), `key_valid` (B, kv_len) the keys that are not padding.
Observer = Callable[[int, torch.Tensor, torch.Tensor], None]


def greedy(model, batch: Batch, max_new_tokens: list[int], eos_ids: set[int], pad_id: int,
           observe: Observer | None = None) -> Generation:
    """Greedy decoding of every row to its EOS or its `max_new_tokens`. `observe` sees every forward (capture).

    One device-to-host transfer per step: the EOS and length checks run on the model's device, and each step's
    tokens, their probabilities and the rows still generating come back together (a per-row read would stall the
    GPU once per row and step)."""
    b = batch.input_ids.shape[0]
    device = batch.input_ids.device
    active = torch.ones(b, dtype=torch.bool, device=device)
    if observe is not None:
        observe(0, active, batch.attention_mask.bool())
    logits, cache = prefill(model, batch)
    limits = torch.tensor(max_new_tokens, device=device)
    eos = torch.tensor(sorted(eos_ids), dtype=torch.long, device=device)
    lengths = torch.zeros(b, dtype=torch.long, device=device)
    mask = batch.attention_mask
    # Left padding: the last column is every row's last token; a row may say its next position (`Row.next_pos`).
    next_pos = batch.position_ids[:, :, -1:] + 1 if batch.next_pos is None else batch.next_pos
    steps: list[torch.Tensor] = []  # per step, (3, B) on the host: token, its probability, still active after it
    step = 0
    while True:
        token = logits.argmax(dim=-1)
        token_p = torch.softmax(logits.float(), dim=-1).gather(1, token[:, None])[:, 0]
        lengths += active
        active = active & ~torch.isin(token, eos) & (lengths < limits)
        # float64 holds every token id exactly, and each fp32 probability as it is.
        steps.append(torch.stack([token.double(), token_p.double(), active.double()]).cpu())
        if not steps[-1][2].any():
            return _collect(steps)
        # Finished rows keep feeding padding; their rows are excluded from capture and their tokens ignored.
        token = torch.where(active, token, torch.full_like(token, pad_id))
        mask = torch.cat([mask, torch.ones((b, 1), dtype=mask.dtype, device=device)], dim=1)
        step += 1
        if observe is not None:
            observe(step, active, mask.bool())
        logits, cache = decode_one(model, token, mask, next_pos, cache)
        next_pos = next_pos + 1


def _collect(steps: list[torch.Tensor]) -> Generation:
    """Each row's tokens and probabilities: the steps up to and including the one that finished it."""
    table = torch.stack(steps)  # (steps, 3, B)
    was_active = torch.cat([torch.ones_like(table[:1, 2]), table[:-1, 2]]).bool()  # before each step
    counts = was_active.sum(0).tolist()
    tokens, probs = table[:, 0].t().tolist(), table[:, 1].t().tolist()
    return Generation([[int(t) for t in row[:n]] for row, n in zip(tokens, counts)],
                      [row[:n] for row, n in zip(probs, counts)])


@torch.no_grad()
def answer_probs(model, rows: list[Row], answers: list[list[int]], pad_id: int) -> list[list[float]]:
    """Teacher forcing: the probability of each answer token given the row and the answer before it, one pass."""
    fed = []
    for r, a in zip(rows, answers):
        extra = torch.tensor(a[:-1], dtype=torch.long)
        steps = torch.arange(len(extra), dtype=torch.long)
        fed.append(Row(torch.cat([r.ids, extra]), torch.cat([r.pos, r.next_position() + steps], dim=1), r.feats,
                       deepstack=r.deepstack, pack=r.pack, video=r.video))
    batch = collate(fed, pad_id, rows_device(model))
    width = max(len(a) for a in answers)
    logits, _ = _forward(model, logits_to_keep=width, use_cache=False, **batch.model_kwargs())
    p = torch.softmax(logits.float(), dim=-1)
    out = []
    for i, a in enumerate(answers):
        # Row i is right-aligned: the logits predicting its answer are its last len(a) positions.
        rows_p = p[i, width - len(a) :]
        out.append(rows_p.gather(1, torch.tensor(a, device=p.device)[:, None])[:, 0].tolist())
    return out


def rows_device(model) -> torch.device:
    return model.get_input_embeddings().weight.device
