"""Guides: what ranks the visual tokens the large model keeps.

Each guide is a small object; the model-side work is done by context managers that hook one model instance
and restore it on exit (the kvpress pattern):

- `sgl` (`SGLGuide`): the small VLM's attention, captured while it answers (`ImportanceCapture`).
- `cls` (`ClsGuide`): FasterVLM. The vision encoder's [CLS]-to-patch attention in the layer that feeds the
  projector, averaged over heads (`VisionAttentionScores`); encoders without [CLS] use the mean attention
  each patch receives from all patches. Merged patches sum their group's scores. Pruned before the LM.
- `fastv` (`FastVGuide`): the large model's own attention from the last prompt token at layer K-1,
  averaged over heads, pruned at layer K in the same forward (`ImportanceCapture` on one layer plus
  `PruneAtLayer` with a deferred selection).
- `random` (`RandomGuide`): uniform, seeded per item, so a batch gives the same choice as one item alone.

Only `sgl` needs a small model, and only it can exit early.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from . import hf
from .capture import _ACTIVE, ImportanceCapture, _register
from .generate import Generation, Row, collate, greedy, rows_device
from .prune import PruneAtLayer

FASTV_DEFAULT_LAYER = 2  # FastV's K when the preset prunes at the LM input (K = 0)


def n_keep(n_visual: int, ratio: float) -> int:
    return max(1, math.floor(n_visual * ratio + 1e-9))


def top_k_in_order(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores, in sequence order. Ties go to the earlier token (stable sort)."""
    order = torch.sort(scores, descending=True, stable=True).indices[:k]
    return torch.sort(order).values


# -- [CLS] / vision-encoder attention ---------------------------------------------------------------------------
@dataclass
class VisionAttentionScores:
    """`with VisionAttentionScores(model, module, cls_index):` collects, per image, the attention that each key
    (patch) of `module`'s layer receives, averaged over heads: from the [CLS] query (`cls_index`) when the
    encoder has one, else the mean over all queries of the image. The vision tower keeps its own backend
    for its outputs; only this layer's scores are computed, a block of queries at a time.
    """

    model: torch.nn.Module
    module: torch.nn.Module
    cls_index: int | None = None
    per_image: list[torch.Tensor] = field(default_factory=list)
    _saved: str | None = field(default=None, repr=False)

    def __enter__(self) -> "VisionAttentionScores":
        vision_config = self.model.config.vision_config
        self._saved = hf.attn_implementation(vision_config)
        self.model.set_attn_implementation({"vision_config": _register(self._saved or "eager")})
        _ACTIVE[self.module] = self
        self.per_image = []
        return self

    def __exit__(self, *exc) -> None:
        _ACTIVE.pop(self.module, None)
        self.model.set_attn_implementation({"vision_config": self._saved})

    @torch.no_grad()
    def observe(self, query, key, kwargs) -> None:
        # Batched calls (flash attention) carry the image boundaries; the others are one image per call, or one
        # crop per batch row (CLIP, SigLIP, InternViT towers take every crop of every image as a batch).
        bounds = kwargs.get("cu_seq_lens_q")
        if query.dim() == 3:
            query, key = query[None], key[None]
        scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
        edges = bounds.tolist() if bounds is not None else [0, query.shape[-2]]
        for row in range(query.shape[0]):
            for a, b in zip(edges[:-1], edges[1:]):
                self.per_image.append(_received(query[row, :, a:b], key[row, :, a:b], scaling, self.cls_index))


def _received(q: torch.Tensor, k: torch.Tensor, scaling: float, cls_index: int | None, block: int = 1024):
    """(keys,) attention received, averaged over heads and (without [CLS]) over query rows."""
    heads, n, _ = q.shape
    k = k.float()
    rows = range(cls_index, cls_index + 1) if cls_index is not None else range(n)
    total = torch.zeros(n, dtype=torch.float32, device=q.device)
    for start in range(rows.start, rows.stop, block):
        stop = min(start + block, rows.stop)
        probs = torch.softmax(torch.matmul(q[:, start:stop].float(), k.transpose(-1, -2)) * scaling, dim=-1)
        total += probs.sum(dim=(0, 1))
    return (total / (heads * len(rows))).cpu()


# -- guides -----------------------------------------------------------------------------------------------------
@dataclass
class Guide:
    """Ranks each item's visual tokens; `generate` runs the large model on the kept ones."""

    name: ClassVar[str] = ""
    needs_small: ClassVar[bool] = False

    def scores(self, engine, works) -> list[torch.Tensor]:
        raise NotImplementedError

    def prune_layer(self, engine) -> int:
        return engine.settings.prune_layer

    def kept(self, engine, work, scores: torch.Tensor, retain: float) -> torch.Tensor:
        """The visual tokens the large model keeps for one item: the top `retain` of the image, in order."""
        return top_k_in_order(scores, n_keep(len(scores), retain))

    def generate(self, engine, works, rows: list[Row], retain: float) -> tuple[Generation, list[torch.Tensor]]:
        kept = [self.kept(engine, w, s, retain) for w, s in zip(works, self.scores(engine, works))]
        return engine.large_generate(works, rows, kept, prune_layer=self.prune_layer(engine)), kept


@dataclass
class SGLGuide(Guide):
    name: ClassVar[str] = "sgl"
    needs_small: ClassVar[bool] = True

    def scores(self, engine, works):
        return [w.importance for w in works]


@dataclass
class ClsGuide(Guide):
    name: ClassVar[str] = "cls"

    def scores(self, engine, works):
        return [w.scores["cls"] for w in works]

    def prune_layer(self, engine) -> int:
        return 0  # FasterVLM prunes before the language model

    def kept(self, engine, work, scores, retain):
        m = engine.large
        if not hasattr(m.family, "token_crops"):
            return super().kept(engine, work, scores, retain)
        # Multi-crop images (LLaVA-NeXT anyres): FasterVLM keeps the top `retain` of each crop.
        crops = m.family.token_crops(m.model, work.enc_large)
        idx = [c_idx[top_k_in_order(scores[c_idx], n_keep(len(c_idx), retain))]
               for c_idx in (torch.nonzero(crops == c).squeeze(-1) for c in torch.unique(crops))]
        return torch.sort(torch.cat(idx)).values


@dataclass
class RandomGuide(Guide):
    name: ClassVar[str] = "random"
    seed: int = 0

    def scores(self, engine, works):
        out = []
        for w in works:
            # Seeded by item, not by position in the batch: batch size never changes the choice.
            g = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}:{w.item.line}:{w.item.id}".encode()))
            out.append(torch.rand(int(w.visual.sum()), generator=g))
        return out


@dataclass
class FastVGuide(Guide):
    name: ClassVar[str] = "fastv"

    def prune_layer(self, engine) -> int:
        # At least one layer must run on the kept tokens, so K < L (a 2-layer test model prunes at 1).
        return engine.settings.prune_layer or min(FASTV_DEFAULT_LAYER, engine.large.num_layers - 1)

    def generate(self, engine, works, rows, retain):
        m, k = engine.large, self.prune_layer(engine)
        if not 1 <= k < m.num_layers:
            raise ValueError(f"the fastv guide prunes at a layer K in 1..{m.num_layers - 1} (it ranks with layer "
                             f"K-1's attention), got prune_layer {k}")
        m.family.check_prune_layer(m.model, k)
        device = rows_device(m.model)
        batch = collate(rows, m.pad_id, device)
        width = batch.input_ids.shape[1]
        last = torch.zeros_like(batch.input_ids, dtype=torch.bool)
        last[:, -1] = True  # left padding: the last column is every row's last prompt token
        kept: list[torch.Tensor] = []
        heads = m.model.config.get_text_config().num_attention_heads

        def select() -> torch.Tensor:
            keep = torch.zeros((len(rows), width), dtype=torch.bool)
            for i, w in enumerate(works):
                offset = width - len(w.visual)
                s = cap.scores[i, offset:].float().cpu()[w.visual] / heads
                w.scores["fastv"] = s
                idx = top_k_in_order(s, n_keep(len(s), retain))
                kept.append(idx)
                keep[i, offset:] = Row.columns(w.visual, idx)
            return keep.to(device)

        limits = [w.item.max_new_tokens or engine.settings.max_new_tokens for w in works]
        with PruneAtLayer(m.model, k, select=select), \
                ImportanceCapture(m.model, n_keys=width, layers=frozenset({k - 1}), prefill_only=True) as cap:
            gen = greedy(m.model, batch, limits, m.eos_ids, m.pad_id, capture=cap, prompt_rows=last)
        if len(kept) != len(works):
            raise RuntimeError(f"fastv selected tokens for {len(kept)} of {len(works)} rows")
        return gen, kept


GUIDE_CLASSES = {g.name: g for g in (SGLGuide, ClsGuide, FastVGuide, RandomGuide)}


def make_guide(name: str, seed: int = 0) -> Guide:
    if name not in GUIDE_CLASSES:
        raise ValueError(f"unknown guide {name!r}; choose one of {', '.join(GUIDE_CLASSES)}")
    return RandomGuide(seed) if name == "random" else GUIDE_CLASSES[name]()

