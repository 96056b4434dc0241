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
fails alone (`Generation.errors`: its record names it), the rest of its batch answered.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Any, ClassVar

from ...errors import ItemError
from ..base import Answer, LargeBackend, LargeInputs, LargeStream, Option, Reduced, refuse_reduced_video
from .large import Offers, VllmLarge

DTYPES = ("auto", "float32", "bfloat16", "float16")
# The engine options a preset's `large.options` (or `vllm:`), `--large-option` and `sgl bench --vllm` may give.
OPTIONS = {
    "tensor_parallel_size": Option((int,), 1, lambda v: v >= 1, "an integer >= 1", "GPUs the model is split over"),
    "gpu_memory_utilization": Option((int, float), 0.9, lambda v: 0 < v <= 1, "a fraction in (0, 1]",
                                     "the share of each GPU's memory vLLM takes (on a CPU: of the RAM)"),
    "max_model_len": Option((int, type(None)), None, lambda v: v is None or v >= 1, "an integer >= 1 or null",
                            "the longest prompt plus answer (default: the model's)"),
    "max_num_seqs": Option((int, type(None)), None, lambda v: v is None or v >= 1, "an integer >= 1 or null",
                           "the most requests in flight at once"),
    "enforce_eager": Option((bool,), False, said="true or false", help="no CUDA graphs or compilation"),
    "dtype": Option((str,), "auto", lambda v: v in DTYPES, "one of " + ", ".join(DTYPES)),
    "seed": Option((int,), 0, said="an integer"),
    "enable_prefix_caching": Option((bool,), None, said="true or false",
                                    help="vLLM's prefix cache (unset: vLLM's default, on; sgl bench: off)"),
    # Drivers give it (`sgl bench --arch`: "dummy", vLLM's own random weights for a folder with a config and a
    # processor only).
    "load_format": Option((str,), "auto", said="a vLLM load format (auto, safetensors, dummy)"),
}


def _offers(o: Offers) -> frozenset[str]:
    return frozenset(name for name, on in (("vision_attention", o.vision_attention), ("lm_attention", o.lm_attention),
                                           ("prune_inside_lm", o.prune_inside_lm), ("reduced_input", o.reduced_input))
                     if on)


class VllmBackend(LargeBackend):
    name: ClassVar[str] = "vllm"
    offers: ClassVar[frozenset[str]] = _offers(VllmLarge.offers)  # pre-LM pruning and downsample's images
    options: ClassVar[dict[str, Option]] = OPTIONS

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
        only (another is refused, never dropped)."""
        from pathlib import Path

        from ...builtin.locate import resolve_path
        from ...builtin.pair import is_random

        opts = {k: v for k, v in cls.check_options(options, "vLLM options").items() if v is not None}
        cls.check_spec(spec)
        opts.setdefault("dtype", spec.dtype)
        large = VllmLarge(spec, **opts)
        processor, config, family, eos_ids = cls.read_checkpoint(spec)
        backend = cls(spec, large, processor, config, family, eos_ids)
        backend.random_weights = is_random(Path(resolve_path(spec.model)))
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
        from .large import read_model_type, check_family, import_vllm

        super().check_spec(spec)  # quantize: vLLM would run the weights unquantized
        check_family(read_model_type(Path(resolve_path(spec.model))), spec.model)
        import_vllm()

    @classmethod
    def random_weights_options(cls) -> dict:
        """vLLM fills a folder with a config and a processor alone with random weights of its own."""
        return {"load_format": "dummy"}

    @classmethod
    def gpus_per_worker(cls, options: dict | None) -> float:
        """Each Ray worker holds one vLLM engine: its tensor-parallel size."""
        return float((options or {}).get("tensor_parallel_size") or 1)

    @classmethod
    def bench_options(cls, max_batch: int) -> dict:
        """`sgl bench`'s defaults: prefix caching off (a benchmark that times the same prompts again would time
        cache hits), `max_num_seqs` the largest batch (it never sends more at once); on a GPU, a share of the
        memory left free beside this process's models; on a CPU, a small share of the RAM (vLLM reserves
        `gpu_memory_utilization` of it there; VLLM_CPU_KVCACHE_SPACE sizes the KV cache) and eager mode (no
        compile: loads in about half the time)."""
        import torch

        if torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info()
            base = {"gpu_memory_utilization": round(0.9 * free / total, 3)}
        else:
            base = {"gpu_memory_utilization": 0.2, "enforce_eager": True}
        return {**base, "max_num_seqs": max_batch, "enable_prefix_caching": False}

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

    @property
    def on_cpu(self) -> bool:
        import torch

        return not torch.cuda.is_available()  # vLLM's CPU build: its worker is bound to the machine's cores

    def stream(self) -> "VllmStream":
        """Items in flight in vLLM's engine: added as the small stage hands them over, answered as they finish."""
        return VllmStream(self)

    def default_in_flight(self, batch_size: int) -> int:
        """vLLM batches continuously: keep it as full as it takes (its `max_num_seqs`, else 256: vLLM's own
        default on a GPU), and at least a small batch."""
        return max(batch_size, int(self.large.settings.max_num_seqs or 256))

    def requests(self, works: list, inputs: LargeInputs | None, guide, retain: float,
                 limits: list[int]) -> list[tuple[Any, Any]]:
        """Per item, its request to vLLM and what its answer carries besides tokens: (scores, kept, reduced)."""
        from ...guides.base import Kind
        from .large import LargeRequest

        if guide.kind is Kind.REDUCES:
            return [(LargeRequest(images, self.large.prompt(images, w.encoded.prompt), kept=None, max_new_tokens=n),
                     (None, None, seen)) for w, (images, seen), n in zip(works, self._reduce(works, guide, retain),
                                                                        limits)]
        scores, kept = self.rank(inputs, guide, retain)
        return [(self._request(w, idx, n), (s, idx, None)) for w, s, idx, n in zip(works, scores, kept, limits)]

    def _request(self, w, kept, limit: int):
        """The request of one item with its kept visual tokens: over the images' tokens and, for a video, over its
        own (the plugin places each medium's kept tokens in its own placeholders)."""
        from .large import LargeRequest

        kept = [int(i) for i in kept]
        video = w.encoded.video
        prompt = self.large.prompt(w.encoded.images, w.encoded.prompt)
        if video is None:
            return LargeRequest(w.encoded.images, prompt, kept=kept, max_new_tokens=limit)
        ids = w.encoded.large["input_ids"][0][w.encoded.visual]
        is_video = (ids == self.family.video_token_id(self.model)).tolist()
        rank = [0, 0]  # the next image token's and video token's index among their own
        index = []
        for v in is_video:
            index.append(rank[v])
            rank[v] += 1
        return LargeRequest(w.encoded.images, prompt, kept=[index[i] for i in kept if not is_video[i]],
                            max_new_tokens=limit, video=video, kept_video=[index[i] for i in kept if is_video[i]])

    @property
    def takes_video(self) -> bool:  # Qwen2-VL and Qwen2.5-VL; Qwen3-VL writes timestamps the plugin does not lay out
        return self.family.takes_video and self.family.name == "qwen-vl"

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

    def generate(self, works: list, inputs: LargeInputs, kept: list, k: int, limits: list[int]) -> Any:

        if k != 0:
            self.check_prune_layer(k)
        requests = [self._request(w, idx, limit) for w, idx, limit in zip(works, kept, limits)]
        return self._send(requests)

    def _send(self, requests: list) -> Any:
        """vLLM's answers to `requests`; one the plugin cannot take (an image left with no kept token) is that
        item's error, the others are answered."""
        from ...core.generate import Generation

        errors: list[str | None] = []
        for r in requests:
            try:
                self.large.check_request(None, r)
                errors.append(None)
            except ItemError as exc:
                errors.append(str(exc))
        good = [r for r, e in zip(requests, errors) if e is None]
        replies = iter(self.large.generate(good))
        tokens = [[] if e else next(replies).tokens for e in errors]
        return Generation(tokens, [[1.0] * len(t) for t in tokens], errors if any(errors) else None)

    def reduced(self, works: list, guide, retain: float) -> list[Reduced]:
        """What the large model would see of each item under `guide` (`Kind.REDUCES`) at `retain`."""
        return [seen for _, seen in self._reduce(works, guide, retain)]

    def generate_reduced(self, works: list, guide, retain: float, limits: list[int]) -> tuple[Any, list[Reduced]]:
        """Greedy answers from each item's images as `guide` reduced them, every visual token kept."""
        from .large import LargeRequest

        reduced = self._reduce(works, guide, retain)
        requests = [LargeRequest(images, self.large.prompt(images, w.encoded.prompt), kept=None, max_new_tokens=limit)
                    for w, (images, _), limit in zip(works, reduced, limits)]
        return self._send(requests), [seen for _, seen in reduced]

    def _reduce(self, works: list, guide, retain: float) -> list[tuple[list, Reduced]]:
        """Per item, the images `guide.prepare_images` gives (the item's own where unchanged) and what the large
        model receives of them (sgl's encoding: the same processor as vLLM's)."""
        if self.family.fixed_resolution:  # pooling happens after the vision tower, inside vLLM
            raise ValueError(f"the vLLM backend cannot pool {self.family.name} image features (the {guide.name} "
                             "guide on a fixed-resolution tower): use the transformers backend")
        out = []
        for w in works:
            refuse_reduced_video(w, guide)
            images = guide.prepare_images(self, list(w.encoded.images), retain)
            same = len(images) == len(w.encoded.images) and all(a is b for a, b in zip(images, w.encoded.images))
            enc = w.encoded.large if same else self.family.encode(self.processor, images, w.encoded.prompt)
            out.append((images, Reduced(enc, [im.size for im in images], int(self.visual_mask(enc).sum()))))
        return out

    def close(self) -> None:
        self.large.close()


class VllmStream(LargeStream):
    """Continuous batching: each item is a request added to vLLM's running batch as soon as the small stage hands it
    over (vLLM's `LLM.enqueue`), and answered when vLLM's scheduler finishes it (`step`), in any order."""

    def __init__(self, backend: VllmBackend):
        super().__init__(backend)
        self.flight: dict[str, tuple[Any, tuple]] = {}  # request id -> (work, (scores, kept, reduced))

    def add(self, works, inputs, guide, retain, k, limits) -> None:
        if k != 0:
            self.backend.check_prune_layer(k)
        large = self.backend.large
        for w, (request, carried) in zip(works, self.backend.requests(works, inputs, guide, retain, limits)):
            try:
                large.check_request(None, request)
            except ItemError as exc:  # fails alone, the others go on
                self._ready.append((w, Answer([], error=str(exc))))
                continue
            (rid,) = large.enqueue([request])
            self.flight[rid] = (w, carried)

    def ready(self, wait: bool) -> list:
        out, self._ready = self._ready, []
        while self.flight:
            for rid, reply in self.backend.large.step():
                w, (scores, kept, seen) = self.flight.pop(rid)
                out.append((w, Answer(reply.tokens, scores, kept, seen)))
            if out or not wait:
                break
        return out

    def close(self) -> None:
        self.backend.large.abort(list(self.flight))
        self.flight.clear()
        self._ready = []
