"""sgl's out-of-tree vLLM models: vLLM's Qwen2-VL, Qwen2.5-VL and Qwen3-VL, taking the visual tokens sgl kept.

Imported by vLLM only (registered lazily by `plugin.register`, selected with
`hf_overrides={"architectures": ["SglQwen2VLForConditionalGeneration"]}`), so the checkpoint folder is unchanged.
Each class subclasses vLLM's in-tree model and its multimodal processor and overrides only this:

- the request's `mm_processor_kwargs={"sgl_kept": [...]}` (indices into the item's visual tokens, all images
  concatenated in sequence order) is split per image by the processor and travels with each image's multimodal
  kwargs (`sgl_kept`, `sgl_kept_count`); the prompt gets only that many image placeholders per image;
- after the vision tower and merger, the kept embeddings are gathered (`embed_multimodal`);
- the M-RoPE position ids are the original ones at the kept columns, text after an image continuing from the
  image's original maximum position + 1 (`get_mrope_input_positions`, positions.py), exactly as sgl's transformers
  path numbers a pruned row.

The kept set is known when the request arrives, so the positions are computed once, for the whole prompt, when
vLLM adds the request: unlike vLLM's EVS (which picks video tokens after the vision tower and so must rewrite the
positions chunk by chunk through `recompute_mrope_positions`), nothing depends on where prefill chunks fall. EVS's
rewrite also continues the text after a medium at `base + grid width` (not `max(h, w)`), which differs from the
transformers numbering for images taller than wide; that path is not used here.

Caches: the kept list is a processor kwarg, and vLLM hashes processor kwargs into each image's multimodal hash, so
two requests with the same image and different kept sets get different hashes: different encoder-cache and
prefix-cache entries (tests_vllm/test_vllm_backend.py asserts it). vLLM's multimodal *processor* cache is turned
off by `VllmLarge` (`mm_processor_cache_gb=0`): on a partial hit it re-runs the processor on the missing images
alone, which would split the item-level kept list against the wrong images.

The built-in pair's config gives M-RoPE a `longrope` spectrum (sgl's per-pair rotary frequencies); stock vLLM
maps `longrope` to its Phi-3 rotary embedding, which cannot take 3-D positions. Here each attention layer's
rotary embedding is replaced by an M-RoPE one built from the same spectrum. A checkpoint folder that saves no video
processor (sgl's built-in pairs) gets the processor built from its image processor and tokenizer with a default
video processor, which such a folder's items never reach (sgl refuses their videos: no video processor to encode
them with).

Videos (Qwen2-VL, Qwen2.5-VL): `sgl_kept_video` does for a request's video what `sgl_kept` does for its images, and
its positions step in time as the models' own (`tokens_per_second x second_per_grid_ts` on Qwen2.5-VL). Qwen3-VL
writes a timestamp before each frame's tokens, which the plugin does not lay out yet: it refuses Qwen3-VL videos.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from vllm.model_executor.layers.rotary_embedding.mrope import MRotaryEmbedding
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.model_executor.models.qwen2_vl import (
    Qwen2VLDummyInputsBuilder,
    Qwen2VLForConditionalGeneration,
    Qwen2VLMultiModalProcessor,
    Qwen2VLProcessingInfo,
)
from vllm.model_executor.models.qwen3_vl import (
    Qwen3VLDummyInputsBuilder,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMultiModalProcessor,
    Qwen3VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.processing import PromptReplacement

from .positions import ImageSpan, pruned_mrope_positions, split_kept

KEPT = "sgl_kept"  # request mm_processor_kwargs key; also the per-image multimodal field
COUNT = "sgl_kept_count"  # per image: how many of its visual tokens are kept
KEPT_VIDEO = "sgl_kept_video"  # the same for the request's videos (indices over their tokens, videos in order)
COUNT_VIDEO = "sgl_kept_video_count"
OWN = (KEPT, KEPT_VIDEO)  # never passed on to the HF processor


# -- processing (runs where vLLM renders prompts) ---------------------------------------------------------------
class _SglInfo:
    """The processing info: `sgl_kept` is never passed on to the HF processor; a folder without a video processor
    config gets an image-only build of the processor."""

    def get_hf_processor(self, **kwargs: object):
        kwargs = {k: v for k, v in kwargs.items() if k not in OWN}
        root = Path(self.ctx.model_config.model)
        if not root.is_dir() or _saves_video_processor(root):
            return super().get_hf_processor(**kwargs)
        key = tuple(sorted((k, repr(v)) for k, v in kwargs.items()))
        built = self.__dict__.setdefault("_sgl_processors", {})
        if key not in built:
            built[key] = self._sgl_build_processor(root, kwargs)
        return built[key]

    def _sgl_build_processor(self, root: Path, kwargs: dict):
        from transformers import AutoImageProcessor

        image_processor = AutoImageProcessor.from_pretrained(str(root), **kwargs)
        template = root / "chat_template.jinja"
        return self._sgl_processor_class(
            image_processor=image_processor,
            tokenizer=self.get_tokenizer(),
            # Never called: videos are refused (limit_mm_per_prompt video 0); vLLM only reads its settings' names.
            video_processor=self._sgl_video_processor_class(
                patch_size=image_processor.patch_size, merge_size=image_processor.merge_size,
                temporal_patch_size=image_processor.temporal_patch_size),
            chat_template=template.read_text() if template.exists() else None,
        )


def _saves_video_processor(root: Path) -> bool:
    """Whether a checkpoint folder holds a video processor's settings: a file of its own, or (as transformers 5
    saves it) an entry of processor_config.json."""
    import json

    if (root / "video_preprocessor_config.json").exists():
        return True
    try:
        return "video_processor" in json.loads((root / "processor_config.json").read_text())
    except (OSError, ValueError):
        return False


class _SglProcessor:
    """The multimodal processor: per image, its kept indices and only that many placeholders."""

    # Whether a video's kept tokens can be placed as one run of placeholders (Qwen2-VL, Qwen2.5-VL); Qwen3-VL
    # writes a timestamp before each frame's tokens, which this plugin does not lay out yet.
    sgl_video = True

    def _apply_hf_processor_main(self, mm_items, hf_kwargs: Mapping[str, object]):
        out = super()._apply_hf_processor_main(mm_items, {k: v for k, v in hf_kwargs.items() if k not in OWN})
        merge = int(self.info.get_hf_config().vision_config.spatial_merge_size)
        for modality, kept_key, count_key in (("image", KEPT, COUNT), ("video", KEPT_VIDEO, COUNT_VIDEO)):
            kept = hf_kwargs.get(kept_key)
            grid = out.get(f"{modality}_grid_thw")
            if grid is not None:
                if modality == "video" and not self.sgl_video:
                    raise ValueError("sgl's vLLM plugin takes no video for this family yet")
                per_item = split_kept(kept, [int(n) for n in grid.prod(-1) // merge**2])
                out[kept_key] = torch.cat(per_item)
                out[count_key] = torch.tensor([len(p) for p in per_item], dtype=torch.long)
            elif kept is not None:
                raise ValueError(f"{kept_key} was given for a request without a {modality}")
        return out

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs: Mapping[str, object]):
        fields = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
        for modality, kept_key, count_key in (("image", KEPT, COUNT), ("video", KEPT_VIDEO, COUNT_VIDEO)):
            counts = hf_inputs.get(count_key, torch.empty(0, dtype=torch.long))
            fields[kept_key] = MultiModalFieldConfig.flat_from_sizes(modality, counts, keep_on_cpu=True)
            fields[count_key] = MultiModalFieldConfig.batched(modality, keep_on_cpu=True)
        return fields

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs: Mapping[str, Any], out_mm_kwargs):
        mine = ("image", "video") if self.sgl_video else ("image",)
        updates = [u for u in super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
                   if u.modality not in mine]
        hf_processor = self.info.get_hf_processor(**hf_processor_mm_kwargs)
        vocab = self.info.get_tokenizer().get_vocab()
        replacements = []
        for modality, count_key in (("image", COUNT), ("video", COUNT_VIDEO))[:len(mine)]:
            token = vocab[getattr(hf_processor, f"{modality}_token")]

            def kept_placeholders(item_idx: int, modality=modality, count_key=count_key, token=token):
                return [token] * int(out_mm_kwargs[modality][item_idx][count_key].data)

            replacements.append(PromptReplacement(modality=modality, target=[token], replacement=kept_placeholders))
        return [*replacements, *updates]


# -- the model (runs in vLLM's workers) -------------------------------------------------------------------------
class SglMRotaryEmbedding(MRotaryEmbedding):
    """M-RoPE over a per-pair rescaled spectrum: transformers' `longrope` at factor 1 (inv_freq = theta's / factor,
    the same at every length), which is how sgl writes its spatial frequencies (builtin/pair.py)."""

    def __init__(self, *args, factors: Sequence[float], **kwargs) -> None:
        self._sgl_factors = torch.tensor(list(factors), dtype=torch.float)
        super().__init__(*args, **kwargs)

    def _compute_inv_freq(self, base: float) -> torch.Tensor:
        # transformers' longrope: 1 / (factor * base ** (2i / dim)), in float32 as there.
        exponent = torch.arange(0, self.rotary_dim, 2, dtype=torch.int64).float() / self.rotary_dim
        return 1.0 / (self._sgl_factors * base**exponent)


def _longrope_factors(text_config, max_model_len: int) -> list[float] | None:
    """The spectrum of an M-RoPE `longrope` config (None: another rope type, left to vLLM). Only what sgl writes
    is taken: one set of factors at every length and no attention scaling."""
    rope = dict(getattr(text_config, "rope_parameters", None) or {})
    if rope.get("rope_type") != "longrope" or "mrope_section" not in rope:
        return None
    short, long = list(rope.get("short_factor") or []), list(rope.get("long_factor") or [])
    original = int(rope.get("original_max_position_embeddings") or 0)
    factors = long if original and max_model_len > original else short
    if short != long and original and max_model_len > original:
        raise ValueError("sgl's vLLM plugin takes an M-RoPE longrope spectrum with long_factor equal to "
                         "short_factor, or max_model_len within original_max_position_embeddings")
    if float(rope.get("attention_factor", 1.0) or 1.0) != 1.0 or float(rope.get("factor", 1.0) or 1.0) != 1.0:
        raise ValueError("sgl's vLLM plugin takes an M-RoPE longrope spectrum at factor 1 and attention_factor 1 "
                         f"(this config: factor {rope.get('factor')}, attention_factor {rope.get('attention_factor')})")
    return factors


class _SglModel:
    """The model: sgl's rotary spectrum, the kept embeddings, their original positions."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        text = self.config.get_text_config()
        factors = _longrope_factors(text, vllm_config.model_config.max_model_len)
        if factors is not None:
            self._sgl_rotary(text, factors)

    def _sgl_rotary(self, text, factors: list[float]) -> None:
        rope = text.rope_parameters
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        rotary = SglMRotaryEmbedding(
            head_dim, head_dim, int(text.max_position_embeddings), float(rope.get("rope_theta", 10000.0)), True,
            torch.get_default_dtype(), mrope_section=list(rope["mrope_section"]), factors=factors)
        if len(factors) != head_dim // 2:
            raise ValueError(f"the longrope spectrum has {len(factors)} factors; head_dim {head_dim} needs "
                             f"{head_dim // 2}")
        replaced = 0
        for module in self.language_model.modules():
            if hasattr(module, "rotary_emb") and hasattr(module, "qkv_proj"):
                module.rotary_emb = rotary
                replaced += 1
        if replaced != text.num_hidden_layers:
            raise RuntimeError(f"sgl's vLLM plugin replaced the rotary embedding of {replaced} attention layers, "
                               f"not {text.num_hidden_layers}")

    def embed_multimodal(self, **kwargs: object):
        embeddings = super().embed_multimodal(**kwargs)
        if not embeddings or (kwargs.get(KEPT) is None and kwargs.get(KEPT_VIDEO) is None):
            return embeddings
        # vLLM's models give the images' embeddings and the videos' in the order their inputs come in kwargs.
        order = []
        for key in kwargs:
            modality = {"pixel_values": "image", "image_embeds": "image", "pixel_values_videos": "video",
                        "video_embeds": "video"}.get(key)
            if modality is not None and modality not in order:
                order.append(modality)
        kept = []
        for modality in order:
            kept_key, count_key = (KEPT, COUNT) if modality == "image" else (KEPT_VIDEO, COUNT_VIDEO)
            n = len(kwargs[f"{modality}_grid_thw"])
            kept += (_per_image(kwargs[kept_key], kwargs[count_key]) if kwargs.get(kept_key) is not None
                     else [None] * n)
        if len(kept) != len(embeddings):
            raise RuntimeError(f"{len(embeddings)} embeddings but {len(kept)} kept sets")
        return tuple(e if idx is None else e[idx.to(e.device)] for e, idx in zip(embeddings, kept))

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features) -> tuple[torch.Tensor, int]:
        return mrope_positions(self.config, len(input_tokens), mm_features)


def mrope_positions(config, n_tokens: int, mm_features) -> tuple[torch.Tensor, int]:
    """The (3, n_tokens) M-RoPE ids and delta of a request from its multimodal features (each image's grid,
    kept indices and placeholder range): the original positions at the kept columns."""
    merge = int(config.vision_config.spatial_merge_size)
    tokens_per_second = float(getattr(config.vision_config, "tokens_per_second", 1.0))
    spans = []
    for feature in mm_features:
        if feature.modality not in ("image", "video"):
            raise ValueError(f"sgl's vLLM models take images and videos, not {feature.modality}")
        kept_key, t_factor = KEPT, 1.0
        if feature.modality == "video":  # temporal ids as vLLM's and transformers' models number them
            kept_key = KEPT_VIDEO
            seconds = feature.data.get("second_per_grid_ts")
            t_factor = (float(seconds.data.item()) if seconds is not None else 1.0) * tokens_per_second
        t, h, w = (int(v) for v in feature.data[f"{feature.modality}_grid_thw"].data.tolist())
        grid = (t, h // merge, w // merge)
        kept = feature.data[kept_key].data if kept_key in feature.data else torch.arange(t * grid[1] * grid[2])
        if len(kept) != feature.mm_position.length:
            raise RuntimeError(f"a{'n image' if feature.modality == 'image' else ' video'} has "
                               f"{feature.mm_position.length} placeholders but {len(kept)} kept")
        spans.append(ImageSpan(int(feature.mm_position.offset), grid, kept, t_factor))
    return pruned_mrope_positions(n_tokens, spans)


def _per_image(kept, counts) -> list[torch.Tensor]:
    """The batch's per-image kept indices from vLLM's reduced fields (a flat tensor with counts, or a list)."""
    if isinstance(kept, torch.Tensor):
        sizes = [int(n) for n in (counts.tolist() if isinstance(counts, torch.Tensor) else counts)]
        return list(kept.split(sizes))
    return [torch.as_tensor(k) for k in kept]


class _SglQwen2Info(_SglInfo):
    """Qwen2-VL's and Qwen2.5-VL's processing info (vLLM's Qwen2.5-VL one subclasses Qwen2-VL's): both processors
    take Qwen2-VL's video processor; each family names only its processor class."""

    from transformers.models.qwen2_vl.video_processing_qwen2_vl import \
        Qwen2VLVideoProcessor as _sgl_video_processor_class


class SglQwen2VLProcessingInfo(_SglQwen2Info, Qwen2VLProcessingInfo):
    from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor as _sgl_processor_class


class SglQwen2VLMultiModalProcessor(_SglProcessor, Qwen2VLMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(SglQwen2VLMultiModalProcessor, info=SglQwen2VLProcessingInfo,
                                        dummy_inputs=Qwen2VLDummyInputsBuilder)
class SglQwen2VLForConditionalGeneration(_SglModel, Qwen2VLForConditionalGeneration):
    pass


class SglQwen2_5_VLProcessingInfo(_SglQwen2Info, Qwen2_5_VLProcessingInfo):
    from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor as _sgl_processor_class


class SglQwen2_5_VLMultiModalProcessor(_SglProcessor, Qwen2_5_VLMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(SglQwen2_5_VLMultiModalProcessor, info=SglQwen2_5_VLProcessingInfo,
                                        dummy_inputs=Qwen2_5_VLDummyInputsBuilder)
class SglQwen2_5_VLForConditionalGeneration(_SglModel, Qwen2_5_VLForConditionalGeneration):
    pass


class SglQwen3VLProcessingInfo(_SglInfo, Qwen3VLProcessingInfo):
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor as _sgl_processor_class
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import \
        Qwen3VLVideoProcessor as _sgl_video_processor_class


class SglQwen3VLMultiModalProcessor(_SglProcessor, Qwen3VLMultiModalProcessor):
    sgl_video = False


@MULTIMODAL_REGISTRY.register_processor(SglQwen3VLMultiModalProcessor, info=SglQwen3VLProcessingInfo,
                                        dummy_inputs=Qwen3VLDummyInputsBuilder)
class SglQwen3VLForConditionalGeneration(_SglModel, Qwen3VLForConditionalGeneration):
    """Qwen3-VL: its deepstack features travel in the same rows as the main embeddings, so the gather keeps
    them with their tokens; images are numbered as Qwen2-VL's."""
