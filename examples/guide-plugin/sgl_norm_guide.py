"""An sgl guide plugin: rank visual tokens by the L2 norm of their image features.

A training-free heuristic: visual tokens whose projected features are large tend to carry content, background
tokens small ones. It needs no attention and no small model, only the features the large model's vision tower and
projector already computed, so it ranks before the language model (prune layer 0 unless the run sets another).
"""

from typing import ClassVar

import torch

from sgl_cli.engine.guides import Guide, GuideItem


class NormGuide(Guide):
    name: ClassVar[str] = "norm"
    description: ClassVar[str] = "the L2 norm of each visual token's image features (the large model's projector)"
    needs: ClassVar[frozenset[str]] = frozenset({"large_features"})

    def score(self, item: GuideItem) -> torch.Tensor:
        # fp32 on the CPU, like every guide's scores: batch-invariant (one item's features, nothing else).
        return item.features.float().norm(dim=-1).cpu()
