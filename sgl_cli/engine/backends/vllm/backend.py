"""The vLLM backend: the seam's interface (backends/base.py) over `VllmLarge`.

sgl still encodes every item with the checkpoint's own processor (the visual-token layout the guides rank, the
lengths checked against the context), but runs no large vision tower: `inputs` gives the guides no image features
(`GuideItem.features` is None; guides that need them, or hooks inside the large model, are refused by the capability
check), and `generate` sends vLLM each item's decoded images, its chat-template prompt and the kept indices.
Items that exit early never reach vLLM; the small model stays on transformers.

A guide that reduces the input (downsample) resizes each image before the request (`guide.prepare_images`, on the
processor's arithmetic): vLLM is sent the resized images with every token kept, and the `Reduced` record counts the
visual tokens from sgl's encoding of them. Pooling rows after the vision tower (a fixed-resolution tower,
LLaVA-1.5) cannot be done before a request: refused (no such family runs on vLLM today).

Every image must keep at least one visual token (vLLM's plugin has no way to drop an image whole). One image per
item (Qwen-VL's usual case) always does (`n_keep` >= 1); an item of several images whose kept set leaves one out
fails alone, with an error record naming it (`large stage failed: ...`), the rest of its batch answered.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Any, ClassVar

from ...errors import ItemError, SglError
from ...preset import VLLM_KEYS
from ..base import LargeBackend, LargeInputs, Reduced
from .large import Offers, VllmLarge

# A preset's `large.vllm` keys (preset.VLLM_KEYS), and `load_format`, which drivers give (`sgl bench --arch`: "dummy",
# vLLM's own random weights for a folder that holds only a config and a processor). Any other key is refused.
OPTIONS = (*VLLM_KEYS, "load_format")


def _offers(o: Offers) -> frozenset[str]:
    return frozenset(name for name, on in (("vision_attention", o.vision_attention), ("lm_attention", o.lm_attention),
                                           ("prune_inside_lm", o.prune_inside_lm), ("reduced_input", o.reduced_input))
                     if on)


def check_options(options: dict | None) -> dict:
    """The backend's engine options, each key one of OPTIONS (a preset's keys typed as a preset checks them):
    anything else is refused in one line, never dropped."""
    import difflib

    from ...preset import validate_vllm

    opts = dict(options or {})
    for key in opts:
        if key not in OPTIONS:
            close = difflib.get_close_matches(str(key), OPTIONS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise SglError(f"vLLM option {key!r}: the vllm large backend does not take it{hint}; it takes "
                           f"{', '.join(OPTIONS)}")
    validate_vllm({k: v for k, v in opts.items() if k in VLLM_KEYS}, "vLLM options")
    return opts


class VllmBackend(LargeBackend):
    name: ClassVar[str] = "vllm"
    offers: ClassVar[frozenset[str]] = _offers(VllmLarge.offers)  # pre-LM pruning and downsample's images

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
        """vLLM's engine for `spec` (the options, the family and vLLM's presence checked before anything loads),
        and the checkpoint's processor and config (not its weights) for sgl's encoding. `options`: OPTIONS' keys
        only (`check_options`)."""
        from pathlib import Path

        from transformers import AutoConfig, GenerationConfig

        from ...builtin.locate import resolve_path
        from ...builtin.pair import is_random
        from ...core.processors import load_processor
        from ...families import family_for

        opts = check_options(options)
        cls.check_spec(spec)
        path = resolve_path(spec.model)
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
        """Qwen2/2.5/3-VL only, no bitsandbytes quantization, and vLLM importable: each said in one line before
        anything loads."""
        from pathlib import Path

        from ...builtin.locate import resolve_path
        from ...preset import check_quantize
        from .large import read_model_type, check_family, import_vllm

        check_quantize(dataclasses.replace(spec, backend=cls.name))
        check_family(read_model_type(Path(resolve_path(spec.model))), spec.model)
        import_vllm()

    @property
    def context(self) -> int:
        """The config's context, capped by vLLM's `max_model_len` when one is set."""
        n = super().context
        cap = self.large.settings.max_model_len
        return min(n, cap) if n and cap else (n or cap or 0)

    @property
    def device(self) -> str:
        import torch

        return f"vllm:{'cuda' if torch.cuda.is_available() else 'cpu'} x{self.large.settings.tensor_parallel_size}"

    def engine_options(self) -> dict:
        """What vLLM's engine runs with: the options sgl gave it, then the values the engine resolved (those
        left to vLLM's defaults included: `enable_prefix_caching`, the batched-token budget, the encoder cache)."""
        import os

        import torch

        s = self.large.settings
        out = {"engine": "vllm", "device": "cuda" if torch.cuda.is_available() else "cpu",
               **{k: v for k, v in dataclasses.asdict(s).items() if k != "extra"}, **s.extra}
        config = getattr(getattr(getattr(self.large, "llm", None), "llm_engine", None), "vllm_config", None)
        resolved = {
            "dtype": ("model_config", "dtype"), "max_model_len": ("model_config", "max_model_len"),
            "enforce_eager": ("model_config", "enforce_eager"),
            "enable_prefix_caching": ("cache_config", "enable_prefix_caching"),
            "block_size": ("cache_config", "block_size"),
            "gpu_memory_utilization": ("cache_config", "gpu_memory_utilization"),
            "max_num_seqs": ("scheduler_config", "max_num_seqs"),
            "max_num_batched_tokens": ("scheduler_config", "max_num_batched_tokens"),
            "enable_chunked_prefill": ("scheduler_config", "enable_chunked_prefill"),
            "encoder_cache_size": ("scheduler_config", "encoder_cache_size"),
            "tensor_parallel_size": ("parallel_config", "tensor_parallel_size"),
            "mm_processor_cache_gb": ("model_config", "multimodal_config", "mm_processor_cache_gb"),
        }
        for key, path in resolved.items():
            value = config
            for name in path:
                value = getattr(value, name, None)
            if value is not None:
                out[key] = value if isinstance(value, (bool, int, float, str)) else str(value).removeprefix("torch.")
        if config is not None:
            import vllm

            out["vllm_version"] = vllm.__version__
        if out["device"] == "cpu" and os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            out["VLLM_CPU_KVCACHE_SPACE"] = os.environ["VLLM_CPU_KVCACHE_SPACE"]  # vLLM's own: its KV cache, GiB
        return out

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

    def reduced(self, works: list, guide, retain: float) -> list[Reduced]:
        """What the large model would see of each item under `guide` (`reduces_input`) at `retain`."""
        return [seen for _, seen in self._reduce(works, guide, retain)]

    def generate_reduced(self, works: list, guide, retain: float, limits: list[int]) -> tuple[Any, list[Reduced]]:
        """Greedy answers from each item's images as `guide` reduced them, every visual token kept."""
        from ...core.generate import Generation
        from .large import LargeRequest

        reduced = self._reduce(works, guide, retain)
        requests = [LargeRequest(images, self.large.prompt(images, w.encoded.prompt), kept=None, max_new_tokens=limit)
                    for w, (images, _), limit in zip(works, reduced, limits)]
        try:
            replies = self.large.generate(requests)
        except ItemError as exc:
            raise ValueError(str(exc)) from None  # as in `generate`: retried item by item
        return (Generation([r.tokens for r in replies], [[1.0] * len(r.tokens) for r in replies]),
                [seen for _, seen in reduced])

    def _reduce(self, works: list, guide, retain: float) -> list[tuple[list, Reduced]]:
        """Per item, the images `guide.prepare_images` gives (the item's own where unchanged) and what the large
        model receives of them (sgl's encoding: the same processor as vLLM's)."""
        if self.family.fixed_resolution:  # pooling happens after the vision tower, inside vLLM
            raise ValueError(f"the vLLM backend cannot pool {self.family.name} image features (the {guide.name} "
                             "guide on a fixed-resolution tower): use the transformers backend")
        out = []
        for w in works:
            images = guide.prepare_images(self, list(w.encoded.images), retain)
            same = len(images) == len(w.encoded.images) and all(a is b for a, b in zip(images, w.encoded.images))
            enc = w.encoded.large if same else self.family.encode(self.processor, images, w.encoded.prompt)
            out.append((images, Reduced(enc, [im.size for im in images], int(self.visual_mask(enc).sum()))))
        return out

    def decode(self, tokens: list[int]) -> str:
        return self.processor.tokenizer.decode(tokens, skip_special_tokens=True).strip()

    def close(self) -> None:
        self.large.close()
