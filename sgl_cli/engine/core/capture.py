"""SGP importance capture without eager attention maps.

`with ImportanceCapture(model) as cap:` switches this one model's language model to a registered attention
function that, before delegating to the model's own backend (sdpa, eager, flash, ...), computes the attention
probabilities of the rows SGP needs (the query rows the engine marks: prompt rows after the image during
prefill, the new row of every decode step) from the layer's own post-RoPE queries and keys, sums them over
heads and rows, and adds them into an fp32 accumulator over key positions. Peak extra memory is one layer's
(batch x heads x rows x keys); nothing of size seq x seq is kept. On exit the model's backend is restored.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from . import hf

_PREFIX = "sgl_capture_"
# attention module -> the observer it reports to (only modules of models inside a `with` block).
_WATCHED: "weakref.WeakKeyDictionary[torch.nn.Module, list[Any]]" = weakref.WeakKeyDictionary()


def observing_backend(base: str) -> str:
    """The name of a registered attention function that shows each watched module's post-RoPE queries and keys
    to its observer (`observer.observe(query, key, kwargs)`) and then runs backend `base` (with `base`'s mask
    format) for the output. Modules no observer watches just run `base`."""
    base = base_backend(base)  # already observing (a second watch on the same model): the same wrapper
    functions = hf.attention_functions()
    name = _PREFIX + base
    if name in functions:
        return name

    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        for observer in _WATCHED.get(module, ()):
            observer.observe(query, key, kwargs)
        fn = hf.eager_attention_for(module) if base == "eager" else functions[base]
        return fn(module, query, key, value, attention_mask, *args, **kwargs)

    hf.register_attention(name, attention, mask_like=base)
    return name


def base_backend(name: str | None) -> str | None:
    """The backend an observing attention function delegates to (`name` itself when it is not one)."""
    return name.removeprefix(_PREFIX) if name else name


def watch(module: torch.nn.Module, observer) -> None:
    """Show `module`'s queries and keys to `observer` while its model runs an observing backend."""
    _WATCHED.setdefault(module, []).append(observer)


def unwatch(module: torch.nn.Module, observer) -> None:
    rest = [o for o in _WATCHED.get(module, []) if o is not observer]  # by identity: observers hold tensors
    if rest:
        _WATCHED[module] = rest
    else:
        _WATCHED.pop(module, None)


def watched_modules() -> list[torch.nn.Module]:
    """Every module an observer watches now (none outside a `with` block: the hooks are scoped)."""
    return list(_WATCHED.keys())


@dataclass
class ImportanceCapture:
    """Accumulates, per batch row and key position, attention received from the marked query rows.

    Before each forward, `set_rows(rows, key_valid, span)`: `rows` (B, q_len) marks the query rows that count (None:
    none), `key_valid` (B, kv_len) the keys that are not padding, `span` the (first, last + 1) query rows any batch
    row marks, when the caller knows it on the host (else it is read from `rows` once per forward, not per layer:
    every read of a device value stalls a GPU). `scores` (B, n_keys) is the running sum over
    layers, heads and marked rows; only the first `n_keys` key positions (the prompt) are kept. `layers` limits
    the capture to those decoder layers (FastV: layer K-1 only).
    """

    model: torch.nn.Module
    n_keys: int
    layers: frozenset[int] | None = None
    scores: torch.Tensor | None = None
    _rows: torch.Tensor | None = field(default=None, repr=False)
    _key_valid: torch.Tensor | None = field(default=None, repr=False)
    _span: tuple[int, int] | None = field(default=None, repr=False)
    _saved: str | None = field(default=None, repr=False)

    def __enter__(self) -> "ImportanceCapture":
        text_config = self.model.config.get_text_config()
        self._saved = hf.attn_implementation(text_config)
        base = self._saved or "eager"
        self.model.set_attn_implementation({"text_config": observing_backend(base)})
        for module in _attention_modules(self.model):
            if self.layers is None or module.layer_idx in self.layers:
                watch(module, self)
        return self

    def __exit__(self, *exc) -> None:
        for module in _attention_modules(self.model):
            unwatch(module, self)
        self.model.set_attn_implementation({"text_config": self._saved})
        self._rows = self._key_valid = self._span = None

    def set_rows(self, rows: torch.Tensor | None, key_valid: torch.Tensor,
                 span: tuple[int, int] | None = None) -> None:
        if rows is not None and span is None:
            marked = rows.any(0).nonzero()[:, 0].tolist()  # one host read per forward
            span = (marked[0], marked[-1] + 1) if marked else None
        if span is not None and span[0] >= span[1]:
            span = None
        self._rows = rows if span is not None else None
        self._key_valid = key_valid
        self._span = span

    def observe(self, query, key, kwargs) -> None:
        self._observe(query, key, kwargs.get("scaling"), kwargs.get("sliding_window"), kwargs.get("softcap"))

    @torch.no_grad()
    def _observe(self, query, key, scaling, sliding_window, softcap) -> None:
        rows = self._rows
        if rows is None:
            return
        b, h, q_len, d = query.shape
        kv_heads, kv_len = key.shape[1], key.shape[-2]
        # Only the span of marked rows is multiplied: O(heads x rows x keys) for this layer.
        first, last = self._span
        rows_n = last - first
        # GQA: each key head serves h / kv_heads query heads; grouping the queries reads each key head once (no
        # repeated copy of the cache per layer and step).
        q = query[:, :, first:last].float().reshape(b, kv_heads, h // kv_heads * rows_n, d)
        logits = torch.matmul(q, key.float().transpose(-1, -2)).view(b, h, rows_n, kv_len)
        logits = logits * (scaling if scaling is not None else d**-0.5)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        valid = self._key_valid[:, None, :kv_len]
        if q_len == 1 and not sliding_window:  # a decode step's one row sees every key that is not padding
            allowed = valid
        else:
            # Query row i sits at cache position kv_len - q_len + i; it sees keys up to there (within the window).
            qpos = torch.arange(first, last, device=q.device) + (kv_len - q_len)
            kpos = torch.arange(kv_len, device=q.device)
            allowed = kpos[None, :] <= qpos[:, None]
            if sliding_window:
                allowed &= kpos[None, :] > qpos[:, None] - sliding_window
            allowed = allowed[None] & valid
        logits = logits.masked_fill(~allowed[:, None], float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        probs = torch.nan_to_num(probs)  # rows with every key masked (padding rows) give 0, not NaN
        weight = rows[:, first:last].to(probs.dtype)
        received = torch.einsum("bhqk,bq->bk", probs, weight)[:, : self.n_keys]
        if self.scores is None:
            self.scores = torch.zeros(b, self.n_keys, dtype=torch.float32, device=received.device)
        self.scores[:, : received.shape[1]] += received.to(self.scores.device)


def _attention_modules(model: torch.nn.Module):
    """The language model's attention modules: those that dispatch on the text config."""
    text_config = model.config.get_text_config()
    for module in model.modules():
        if type(module).__name__.endswith("Attention") and getattr(module, "config", None) is text_config:
            yield module
