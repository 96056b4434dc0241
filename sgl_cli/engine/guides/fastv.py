"""`fastv`: FastV, a single-model baseline. The large model's own attention from the last prompt token at decoder
layer K-1, averaged over heads, ranks the visual tokens, which are dropped at layer K of the same forward
(K = the run's prune layer; 2 when that is 0, since K-1 must exist; below the model's depth).

`watch_prefill` captures layer K-1's attention rows during the prefill only (`core.capture.ImportanceCapture`
scoped to that one layer); the engine asks for the scores when layer K starts (`core.prune.PruneAtLayer` with a
deferred selection), so ranking and pruning happen in one pass.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from ..core.capture import ImportanceCapture
from .base import Guide, GuideBatch, Kind

DEFAULT_LAYER = 2  # FastV's K when the run prunes at the LM input (K = 0)


class FastVGuide(Guide):
    name: ClassVar[str] = "fastv"
    description: ClassVar[str] = ("the large model's attention from the last prompt token at layer {k_1} "
                                  "(pruned at layer {k})")
    score_noun: ClassVar[str] = "attention"
    kind: ClassVar[Kind] = Kind.PREFILL
    needs: ClassVar[frozenset[str]] = frozenset({"lm_attention", "prune_inside_lm"})

    def prune_layer(self, settings, num_layers: int) -> int:
        # At least one layer must run on the kept tokens, so K < L (a 2-layer test model prunes at 1).
        return settings.prune_layer or min(DEFAULT_LAYER, num_layers - 1)

    def watch_prefill(self, model, layer: int, width: int) -> "_LastTokenAttention":
        if not 1 <= layer < model.num_layers:
            raise ValueError(f"the fastv guide prunes at a layer K in 1..{model.num_layers - 1} (it ranks with layer "
                             f"K-1's attention), got prune_layer {layer}")
        return _LastTokenAttention(ImportanceCapture(model.model, n_keys=width, layers=frozenset({layer - 1})))

    def scores(self, batch: GuideBatch) -> list[torch.Tensor]:
        watch: _LastTokenAttention = batch.prefill
        heads = batch.model.model.config.get_text_config().num_attention_heads
        sums = watch.capture.scores.float().cpu()
        return [sums[i][item.visual_columns] / heads for i, item in enumerate(batch.items)]


class _LastTokenAttention:
    """The capture of layer K-1, reading only the prefill's last column (left padding: every row's last prompt
    token)."""

    def __init__(self, capture: ImportanceCapture):
        self.capture = capture

    def __enter__(self) -> "_LastTokenAttention":
        self.capture.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.capture.__exit__(*exc)

    def observe(self, step: int, active: torch.Tensor, key_valid: torch.Tensor) -> None:
        if step == 0:
            rows = torch.zeros_like(key_valid)
            rows[:, -1] = True
            self.capture.set_rows(rows, key_valid, (rows.shape[1] - 1, rows.shape[1]))
        else:
            self.capture.set_rows(None, key_valid)
