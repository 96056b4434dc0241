"""Pruning inside the language model (prune layer K > 0), as the SGL paper evaluates it.

`with PruneAtLayer(model, k, keep):` registers forward pre-hooks on this model's decoder layers K..L-1 only:
layers 0..K-1 see the full sequence; at layer K the hidden states of dropped tokens are removed, so layers
K..L-1 compute with, and cache, only the kept tokens (their KV caches are shorter than those of layers < K).
Rotary embeddings are gathered at the kept columns, so every token keeps its original position, and
generated tokens continue the original numbering. The hooks are removed on exit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from . import hf
from .capture import base_backend
from .hf import decoder_layers

SUPPORTED_BACKENDS = ("sdpa", "eager")


@dataclass
class PruneAtLayer:
    """`keep` (B, S) bool over the padded prompt columns: True for the columns layers >= k compute with.

    Without `keep`, `select()` is called when layer k's prefill starts and returns it (FastV decides from
    the attention of layer k-1 in the same forward).
    """

    model: torch.nn.Module
    k: int
    keep: torch.Tensor | None = None
    select: Callable[[], torch.Tensor] | None = None
    _handles: list = field(default_factory=list, repr=False)
    _index: torch.Tensor | None = field(default=None, repr=False)  # (B, S') gather index, left-padded
    _valid: torch.Tensor | None = field(default=None, repr=False)  # (B, S') real (not padding) columns
    _called: set = field(default_factory=set, repr=False)

    def __enter__(self) -> "PruneAtLayer":
        # Under an importance capture the backend is its observing wrapper, which takes the base's mask format.
        backend = base_backend(hf.attn_implementation(self.model.config.get_text_config()))
        if backend not in SUPPORTED_BACKENDS:
            raise ValueError(
                f"prune_layer > 0 needs the large model's attention to be one of {', '.join(SUPPORTED_BACKENDS)}, "
                f"not {backend}"
            )
        self._backend = backend
        self._called = set()  # a fresh generation: each hooked layer's next call is a prefill
        layers = decoder_layers(self.model)
        if not 0 <= self.k <= len(layers):
            raise ValueError(f"prune_layer {self.k} is outside 0..{len(layers)} for this model")
        if (self.keep is None) == (self.select is None):
            raise ValueError("PruneAtLayer needs exactly one of keep and select")
        self._index = self._valid = None
        if self.keep is not None:
            self._compact(self.keep)
        for idx, layer in enumerate(layers):
            if idx >= self.k:
                self._handles.append(layer.register_forward_pre_hook(self._hook(idx == self.k), with_kwargs=True))
        return self

    def _compact(self, keep: torch.Tensor) -> None:
        """Compact each row's kept columns to the right (left padding), keeping their order."""
        counts = keep.sum(1)
        width = int(counts.max())
        b, s = keep.shape
        self._index = torch.zeros((b, width), dtype=torch.long, device=keep.device)
        self._valid = torch.zeros((b, width), dtype=torch.bool, device=keep.device)
        for i in range(b):
            cols = keep[i].nonzero().squeeze(-1)
            self._index[i, width - len(cols):] = cols
            self._valid[i, width - len(cols):] = True

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, first: bool):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            layer = module.self_attn.layer_idx
            prefill = layer not in self._called  # each hooked layer's first call is the prompt
            self._called.add(layer)
            if prefill:
                if self._index is None:
                    self._compact(self.select())
                if first:
                    hidden = _gather(hidden, self._index)
                cos, sin = kwargs["position_embeddings"]
                kwargs["position_embeddings"] = (_gather(cos, self._index), _gather(sin, self._index))
                if kwargs.get("position_ids") is not None:
                    kwargs["position_ids"] = torch.gather(kwargs["position_ids"], 1, self._index)
                past = 0
            else:
                past = hf.layer_cache(kwargs).get_seq_length(layer)
            kwargs["attention_mask"] = self._mask(hidden.shape[1], past, hidden)
            if args:
                args = (hidden, *args[1:])
            else:
                kwargs["hidden_states"] = hidden
            return args, kwargs

        return hook

    def _mask(self, q_len: int, past: int, hidden: torch.Tensor) -> torch.Tensor:
        """Causal + padding mask over the compacted keys, in the backend's format."""
        device = hidden.device
        b, width = self._valid.shape
        kv_len = past + q_len
        valid = torch.cat([self._valid.to(device), torch.ones((b, kv_len - width), dtype=torch.bool, device=device)],
                          dim=1)
        qpos = torch.arange(past, kv_len, device=device)
        allowed = (torch.arange(kv_len, device=device)[None, :] <= qpos[:, None])[None] & valid[:, None, :]
        # Padding query rows see no key; let them see all so that no NaN is produced (their outputs are unused).
        allowed = allowed | ~allowed.any(-1, keepdim=True)
        allowed = allowed[:, None]  # (B, 1, q, kv)
        if self._backend == "sdpa":
            return allowed
        return torch.zeros(allowed.shape, dtype=hidden.dtype, device=device).masked_fill(
            ~allowed, torch.finfo(hidden.dtype).min)


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, S, ...) gathered along the sequence at index (B, S')."""
    idx = index.to(x.device).view(*index.shape, *([1] * (x.dim() - 2))).expand(*index.shape, *x.shape[2:])
    return torch.gather(x, 1, idx)
