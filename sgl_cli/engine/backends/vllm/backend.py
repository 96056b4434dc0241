"""The vLLM backend: the seam's interface (backends/base.py) over `VllmLarge`.

sgl still encodes every item with the checkpoint's own processor (the visual-token layout the guides rank, the
lengths checked against the context), but runs no large vision tower: `inputs` gives the guides no image features
(`GuideItem.features` is None; guides that need them, or hooks inside the large model, are refused by the capability
check), and `generate` sends vLLM each item's decoded images, its chat-template prompt and the kept indices.
Items that exit early never reach vLLM; the small model stays on transformers.

Every image must keep at least one visual token (vLLM's plugin has no way to drop an image whole). One image per
item (Qwen-VL's usual case) always does (`n_keep` >= 1); an item of several images whose kept set leaves one out
fails alone, with an error record naming it (`large stage failed: ...`), the rest of its batch answered.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, ClassVar

from ...errors import ItemError
from ..base import LargeBackend, LargeInputs
from .large import Offers, VllmLarge

# A preset's `large.vllm` keys (preset.VLLM_KEYS), and `load_format`, which drivers give (`sgl bench --arch`: "dummy",
# vLLM's own random weights for a folder that holds only a config and a processor).
OPTIONS = ("tensor_parallel_size", "gpu_memory_utilization", "max_model_len", "max_num_seqs", "enforce_eager", "dtype",
           "seed", "load_format")


def _offers(o: Offers) -> frozenset[str]:
    return frozenset(name for name, on in (("vision_attention", o.vision_attention), ("lm_attention", o.lm_attention),
                                           ("prune_inside_lm", o.prune_inside_lm)) if on)


class VllmBackend(LargeBackend):
    name: ClassVar[str] = "vllm"
    offers: ClassVar[frozenset[str]] = _offers(VllmLarge.offers)  # pre-LM pruning only

    def __init__(self, spec, large: VllmLarge, processor, config, family, eos_ids: frozenset[int]):
        self.spec = spec
        self.large = large
        self.processor = processor
        self.model = SimpleNamespace(config=config)  # what the family's methods read: the config only
        self.family = family
        self.eos_ids = eos_ids
        self.random_weights = False

    @classmethod
    def load(cls, spec, role: str = "large", options: dict | None = None) -> "VllmBackend":
        """vLLM's engine for `spec` (the family checked, and vLLM's presence, before anything loads), and the
        checkpoint's processor and config (not its weights) for sgl's encoding."""
        from pathlib import Path

        from transformers import AutoConfig, GenerationConfig

        from ...builtin.locate import resolve_path
        from ...builtin.pair import is_random
        from ...core.processors import load_processor
        from ...families import family_for

        cls.check_spec(spec)
        path = resolve_path(spec.model)
        opts = {k: v for k, v in (options or {}).items() if k in OPTIONS}
        opts.setdefault("dtype", spec.dtype)
        large = VllmLarge(spec, **opts)
        processor = load_processor(path, revision=spec.revision, trust_remote_code=spec.trust_remote_code)
        config = AutoConfig.from_pretrained(path, revision=spec.revision, trust_remote_code=spec.trust_remote_code)
        gen = GenerationConfig.from_pretrained(path)
        eos = gen.eos_token_id if gen.eos_token_id is not None else config.get_text_config().eos_token_id
        backend = cls(spec, large, processor, config, family_for(SimpleNamespace(config=config)),
                      frozenset([eos] if isinstance(eos, int) else (eos or [])))
        backend.random_weights = is_random(Path(path))
        return backend

    @classmethod
    def check_installed(cls) -> None:
        from .large import import_vllm

        import_vllm()

    @classmethod
    def check_spec(cls, spec) -> None:
        """Qwen2/2.5/3-VL only, and vLLM importable: both said in one line before anything loads."""
        from pathlib import Path

        from ...builtin.locate import resolve_path
        from .large import read_model_type, check_family, import_vllm

        check_family(read_model_type(Path(resolve_path(spec.model))), spec.model)
        import_vllm()

    @property
    def image_token_id(self) -> int:
        return self.family.image_token_id(self.model)

    @property
    def num_layers(self) -> int:
        return int(self.model.config.get_text_config().num_hidden_layers)

    @property
    def context(self) -> int:
        n = int(getattr(self.model.config.get_text_config(), "max_position_embeddings", 0) or 0)
        cap = self.large.settings.max_model_len
        return min(n, cap) if n and cap else (n or cap or 0)

    @property
    def device(self) -> str:
        import torch

        return f"vllm:{'cuda' if torch.cuda.is_available() else 'cpu'} x{self.large.settings.tensor_parallel_size}"

    def visual_mask(self, encoding: dict):
        return self.family.visual_mask(self.model, encoding)

    def inputs(self, works: list, guides: list) -> LargeInputs:
        from ...guides.base import GuideBatch, GuideItem

        items = [GuideItem(id=w.item.id, line=w.item.line, question=w.item.question, visual=w.encoded.visual,
                           features=None, encoding=w.encoded.large,
                           small_importance=w.small.importance if w.small is not None else None) for w in works]
        scores = {g.name: g.scores(GuideBatch(self, items)) for g in guides if not (g.ranks_in_prefill or g.reduces_input)}
        return LargeInputs(list(works), [None] * len(works), items, scores)

    def check_prune_layer(self, k: int) -> None:
        raise ValueError(f"the vLLM backend prunes before the language model only, not at layer {k}")

    def generate(self, works: list, inputs: LargeInputs, kept: list, k: int, limits: list[int]) -> Any:
        from ...core.generate import Generation
        from .large import LargeRequest

        if k != 0:
            self.check_prune_layer(k)
        requests = [LargeRequest(w.encoded.images, self.large.prompt(w.encoded.images, w.encoded.prompt),
                                 kept=[int(i) for i in idx], max_new_tokens=limit)
                    for w, idx, limit in zip(works, kept, limits)]
        try:
            replies = self.large.generate(requests)
        except ItemError as exc:
            # Not an ItemError: the engine then retries the batch item by item, so that only this item fails.
            raise ValueError(str(exc)) from None
        return Generation([r.tokens for r in replies], [[1.0] * len(r.tokens) for r in replies])

    def decode(self, tokens: list[int]) -> str:
        return self.processor.tokenizer.decode(tokens, skip_special_tokens=True).strip()

    def close(self) -> None:
        self.large.close()
