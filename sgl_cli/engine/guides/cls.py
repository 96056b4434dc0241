"""`cls`: [CLS] guidance (FasterVLM). The attention the vision encoder's [CLS] query pays each patch in the layer
whose output feeds the projector, averaged over heads; encoders without [CLS] (SigLIP, the Qwen ViT) use the mean
attention each patch receives from all patches in that layer (for Qwen2.5-VL, its last full-attention block).
Patches merged into one token (Qwen's 2x2 merger, InternVL's pixel shuffle) sum their scores; multi-crop images
keep the top `retain` of each crop. Pruned before the language model, as FasterVLM does.

The scores are computed inside an observing attention function registered for the one layer that matters, while
the large model's vision tower runs (`watch_vision`); the tower keeps its own backend for its outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..core import capture, hf
from .base import Guide, GuideBatch, GuideItem, n_keep, top_k_in_order


@dataclass
class VisionAttentionScores:
    """`with VisionAttentionScores(model, module, cls_index):` collects, per image (crop, tile), the attention that
    each key (patch) of `module`'s layer receives, averaged over heads: from the [CLS] query (`cls_index`) when
    the encoder has one, else the mean over all queries of the image. Only this layer's scores are computed, a
    block of queries at a time; on exit the tower's backend is restored.
    """

    model: torch.nn.Module
    module: torch.nn.Module
    cls_index: int | None = None
    per_image: list[torch.Tensor] = field(default_factory=list)
    _saved: str | None = field(default=None, repr=False)

    def __enter__(self) -> "VisionAttentionScores":
        vision_config = self.model.config.vision_config
        self._saved = hf.attn_implementation(vision_config)
        self.model.set_attn_implementation({"vision_config": capture.observing_backend(self._saved or "eager")})
        capture.watch(self.module, self)
        self.per_image = []
        return self

    def __exit__(self, *exc) -> None:
        capture.unwatch(self.module, self)
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


class ClsGuide(Guide):
    name: ClassVar[str] = "cls"
    description: ClassVar[str] = "the large model's vision-encoder attention (the layer feeding the projector)"
    score_noun: ClassVar[str] = "attention"
    needs: ClassVar[frozenset[str]] = frozenset({"vision_attention"})

    def prune_layer(self, settings, num_layers: int) -> int:
        return 0  # FasterVLM prunes before the language model

    def watch_vision(self, model) -> VisionAttentionScores:
        module, cls_index = model.family.cls_layer(model.model)
        return VisionAttentionScores(model.model, module, cls_index)

    def scores(self, batch: GuideBatch) -> list[torch.Tensor]:
        m = batch.model
        return m.family.merge_patch_scores(m.model, batch.vision.per_image, [it.encoding for it in batch.items])

    def keep(self, model, item: GuideItem, scores: torch.Tensor, retain: float) -> torch.Tensor:
        if not hasattr(model.family, "token_crops"):
            return super().keep(model, item, scores, retain)
        # Multi-crop images (LLaVA-NeXT anyres): FasterVLM keeps the top `retain` of each crop.
        crops = model.family.token_crops(model.model, item.encoding)
        idx = [c_idx[top_k_in_order(scores[c_idx], n_keep(len(c_idx), retain))]
               for c_idx in (torch.nonzero(crops == c).squeeze(-1) for c in torch.unique(crops))]
        return torch.sort(torch.cat(idx)).values
