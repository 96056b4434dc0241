"""Published VLM architectures, built offline with random weights at their exact sizes (`sgl bench --arch`).

Each `ModelArch` holds the values of one checkpoint's published `config.json` (language model, vision tower,
projector) and its published parameter count; `backends/transformers.py`'s `from_arch(pair, ...)` turns a pair of
them into two `LoadedModel`s with random weights created directly on the target device and dtype (the model is laid
out on the `meta` device first, so no fp32 copy of 7B parameters is ever made on the CPU), a byte-level tokenizer
holding the family's special tokens at their published ids and sized to the published vocabulary, and the family's
own processor with its published pixel settings, shared by both models (identical `input_ids`: a real pair).
`layers` cuts both language models (and `vision_layers` both vision towers) so that CPU runs and tests stay small.

Sources (read through a search index of stored public pages and repositories; the hub itself is not reachable
here). Every full model's parameter count on the `meta` device equals the published total (tests/test_arch.py).
- Qwen2.5-VL-3B/7B/72B-Instruct: the 3B's config.json verbatim (LM 2048 x 36, 16 heads, 2 KV, MLP 11008, vocab
  151936, tied; ViT 32 x 1280, 16 heads, MLP 3420, patch 14, merge 2, window 112, full attention in blocks 7, 15,
  23, 31); the 7B's module printout (3584 x 28, 4 KV, MLP 18944, vocab 152064, merger to 3584); the 72B's LM =
  Qwen2.5-72B's config.json (8192 x 80, 64 heads, 8 KV, MLP 29568, vocab 152064, untied), its ViT MLP 3456.
  Published totals 3.75 B, 8.29 B, 73.4 B. Processor: min_pixels 3136, max_pixels 12845056, CLIP mean/std.
- LLaVA-OneVision-qwen2-0.5b/7b-ov-hf: transformers' conversion script (convert_llava_onevision_weights_to_hf.py):
  SigLIP-so400m 384 px, patch 14, 1152 x 26 (last layer dropped), MLP 4304, 16 heads, no head; 729 tokens per
  crop, "full" features, anyres_max_9, vocab = the Qwen2 vocab + 2 rounded up to 64 (152000, 152128); Qwen2-0.5B
  (896 x 24, 14 heads, 2 KV, MLP 4864, tied) and Qwen2-7B (3584 x 28, 4 KV, MLP 18944). Pinpoints 384..2304
  (presets/llava-onevision-0.5b-7b.yaml). Published 0.89 B and 8.03 B.
- InternVL3-1B/8B-hf: InternVL3-1B's model printout and config (InternViT-300M-448px-V2.5: 1024 x 24, 16 heads,
  MLP 4096, qkv bias, LayerNorm, patch 14, 448 px tiles, pixel shuffle 0.5; projector LayerNorm(4096) -> Linear
  -> GELU -> Linear; Qwen2.5-0.5B 896 x 24, vocab 151674, untied; <img> 151665, </img> 151666, <IMG_CONTEXT>
  151667); the 8B's LM is Qwen2.5-7B's (3584 x 28, 4 KV, MLP 18944) at the same vocab. Published 0.94 B, 7.94 B.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
QWEN_TOKENS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}


@dataclass(frozen=True)
class TextSpec:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    mlp: int
    vocab: int
    tied: bool  # output head shares the input embedding
    rope_theta: float = 1e6


@dataclass(frozen=True)
class VisionSpec:
    depth: int
    hidden: int
    heads: int
    mlp: int
    patch: int
    merge: int  # tokens merged per side into one visual token (Qwen's merger, InternVL's pixel shuffle); 1: none
    image: int  # crop or tile side in px; 0: native resolution (Qwen)
    full_attention: tuple[int, ...] = ()  # Qwen2.5-VL: the blocks that attend globally (others: 112 px windows)


@dataclass(frozen=True)
class ModelArch:
    name: str  # the published checkpoint
    family: str  # transformers model_type
    text: TextSpec
    vision: VisionSpec
    params_b: float  # published total, billions


@dataclass(frozen=True)
class ArchPair:
    name: str
    small: ModelArch
    large: ModelArch


_QWEN_VIT = VisionSpec(depth=32, hidden=1280, heads=16, mlp=3420, patch=14, merge=2, image=0,
                       full_attention=(7, 15, 23, 31))
QWEN25_VL_3B = ModelArch("Qwen/Qwen2.5-VL-3B-Instruct", "qwen2_5_vl",
                         TextSpec(2048, 36, 16, 2, 11008, 151936, tied=True), _QWEN_VIT, 3.75)
QWEN25_VL_7B = ModelArch("Qwen/Qwen2.5-VL-7B-Instruct", "qwen2_5_vl",
                         TextSpec(3584, 28, 28, 4, 18944, 152064, tied=False), _QWEN_VIT, 8.29)
QWEN25_VL_72B = ModelArch("Qwen/Qwen2.5-VL-72B-Instruct", "qwen2_5_vl",
                          TextSpec(8192, 80, 64, 8, 29568, 152064, tied=False),
                          dataclasses.replace(_QWEN_VIT, mlp=3456), 73.4)
_SIGLIP = VisionSpec(depth=26, hidden=1152, heads=16, mlp=4304, patch=14, merge=1, image=384)
LLAVA_OV_05B = ModelArch("llava-hf/llava-onevision-qwen2-0.5b-ov-hf", "llava_onevision",
                         TextSpec(896, 24, 14, 2, 4864, 152000, tied=True), _SIGLIP, 0.89)
LLAVA_OV_7B = ModelArch("llava-hf/llava-onevision-qwen2-7b-ov-hf", "llava_onevision",
                        TextSpec(3584, 28, 28, 4, 18944, 152128, tied=False), _SIGLIP, 8.03)
_INTERNVIT = VisionSpec(depth=24, hidden=1024, heads=16, mlp=4096, patch=14, merge=2, image=448)
INTERNVL3_1B = ModelArch("OpenGVLab/InternVL3-1B-hf", "internvl",
                         TextSpec(896, 24, 14, 2, 4864, 151674, tied=False), _INTERNVIT, 0.94)
INTERNVL3_8B = ModelArch("OpenGVLab/InternVL3-8B-hf", "internvl",
                         TextSpec(3584, 28, 28, 4, 18944, 151674, tied=False), _INTERNVIT, 7.94)

MODELS = (QWEN25_VL_3B, QWEN25_VL_7B, QWEN25_VL_72B, LLAVA_OV_05B, LLAVA_OV_7B, INTERNVL3_1B, INTERNVL3_8B)
PAIRS = {p.name: p for p in (
    ArchPair("qwen2.5-vl-3b-7b", QWEN25_VL_3B, QWEN25_VL_7B),
    ArchPair("qwen2.5-vl-7b-72b", QWEN25_VL_7B, QWEN25_VL_72B),
    ArchPair("llava-onevision-0.5b-7b", LLAVA_OV_05B, LLAVA_OV_7B),
    ArchPair("internvl3-1b-8b", INTERNVL3_1B, INTERNVL3_8B),
)}


# -- tokenizer and processor (one per pair, shared) ---------------------------------------------------------------
def _template(user: str, image: str, system: str = "") -> str:
    """ChatML: an optional default system turn, then each message with its images before its text."""
    head = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\n" + system + "<|im_end|>\n{% endif %}"
            if system else "")
    return (head + "{% for message in messages %}<|im_start|>{{ message['role'] }}" + user +
            "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
            "{% for part in message['content'] %}{% if part['type'] == 'image' %}" + image + "{% endif %}{% endfor %}"
            "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
            "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


# Per family: special tokens at their published ids, named tokens the processor looks up, the chat template.
_FAMILY_TOKENS = {
    "qwen2_5_vl": ({**QWEN_TOKENS, "<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|image_pad|>": 151655,
                    "<|video_pad|>": 151656},
                   {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
                   _template("\n", "<|vision_start|><|image_pad|><|vision_end|>", "You are a helpful assistant.")),
    "llava_onevision": ({**QWEN_TOKENS, "<image>": 151646, "<video>": 151647},
                        {"image_token": "<image>", "video_token": "<video>"}, _template("\n", "<image>\n")),
    "internvl": ({**QWEN_TOKENS, "<|video_pad|>": 151656, "<img>": 151665, "</img>": 151666, "<IMG_CONTEXT>": 151667},
                 {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                  "video_token": "<|video_pad|>"}, _template("\n", "<IMG_CONTEXT>\n")),
}


def build_tokenizer(family: str, vocab: int):
    """Byte-level BPE without merges (any text encodes), the family's special tokens at their published ids, and
    a filler token at every other id up to `vocab`, so any id a random model generates decodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials, named, template = _FAMILY_TOKENS[family]
    by_id = dict(enumerate(sorted(pre_tokenizers.ByteLevel.alphabet())))
    by_id.update({i: t for t, i in specials.items()})
    table = {by_id.get(i, f"<|x{i}|>"): i for i in range(vocab)}
    tok = Tokenizer(models.BPE(vocab=table, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(specials))  # already in the vocabulary: marked special at their own ids
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   extra_special_tokens=named)
    fast.chat_template = template
    return fast


def build_processor(arch: ModelArch, vocab: int | None = None):
    """The family's processor with the published pixel settings (PIL image processors: no torchvision)."""
    from ..core.processors import image_only

    tok = build_tokenizer(arch.family, vocab or arch.text.vocab)
    v = arch.vision
    if arch.family == "qwen2_5_vl":
        from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        ip = Qwen2VLImageProcessorPil(size={"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 16384},
                                      patch_size=v.patch, merge_size=v.merge, temporal_patch_size=2,
                                      image_mean=CLIP_MEAN, image_std=CLIP_STD)
        return image_only(Qwen2_5_VLProcessor)(image_processor=ip, tokenizer=tok, chat_template=tok.chat_template)
    if arch.family == "llava_onevision":
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
            LlavaOnevisionImageProcessorPil,
        )
        from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor

        ip = LlavaOnevisionImageProcessorPil(size={"height": v.image, "width": v.image}, image_grid_pinpoints=PINPOINTS,
                                             image_mean=[0.5] * 3, image_std=[0.5] * 3, resample=3)
        return image_only(LlavaOnevisionProcessor)(
            image_processor=ip, tokenizer=tok, num_image_tokens=(v.image // v.patch) ** 2,
            vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9", chat_template=tok.chat_template)
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
    from transformers.models.internvl.processing_internvl import InternVLProcessor

    ip = GotOcr2ImageProcessorPil(size={"height": v.image, "width": v.image}, crop_to_patches=True, min_patches=1,
                                  max_patches=12, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
    return image_only(InternVLProcessor)(image_processor=ip, tokenizer=tok, image_seq_length=TILE_TOKENS,
                                         chat_template=tok.chat_template)


PINPOINTS = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]  # LLaVA-OneVision: 1x1 .. 6x6 crops
TILE_TOKENS = 256  # InternVL: (448 / 14 / 2) ** 2 tokens per tile after pixel shuffle


# -- configs ----------------------------------------------------------------------------------------------------
def build_config(arch: ModelArch, tokenizer, layers: int | None = None, vision_layers: int | None = None):
    """The transformers config of `arch`, its language model cut to `layers` and its tower to `vision_layers`."""
    t, v = arch.text, arch.vision
    depth = min(vision_layers or v.depth, v.depth)
    ids = tokenizer.convert_tokens_to_ids
    text = {"vocab_size": t.vocab, "hidden_size": t.hidden, "intermediate_size": t.mlp,
            "num_hidden_layers": min(layers or t.layers, t.layers), "num_attention_heads": t.heads,
            "num_key_value_heads": t.kv_heads, "rms_norm_eps": 1e-6, "tie_word_embeddings": t.tied,
            "bos_token_id": ids("<|endoftext|>"), "eos_token_id": ids("<|im_end|>"),
            "pad_token_id": ids("<|endoftext|>"), "max_position_embeddings": 32768}
    if arch.family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig

        # A cut tower keeps the full-attention blocks that remain (the last block if none does).
        full = [i for i in v.full_attention if i < depth] or [depth - 1]
        text.update(max_position_embeddings=128000,
                    rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta, "mrope_section": [16, 24, 24]})
        vision = {"depth": depth, "hidden_size": v.hidden, "intermediate_size": v.mlp, "num_heads": v.heads,
                  "out_hidden_size": t.hidden, "patch_size": v.patch, "spatial_merge_size": v.merge,
                  "temporal_patch_size": 2, "window_size": 112, "fullatt_block_indexes": full,
                  "tokens_per_second": 2}
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=t.tied,
                                image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                                vision_start_token_id=ids("<|vision_start|>"),
                                vision_end_token_id=ids("<|vision_end|>"))
    from transformers import Qwen2Config

    text["rope_theta"] = t.rope_theta
    if arch.family == "llava_onevision":
        from transformers import LlavaOnevisionConfig, SiglipVisionConfig

        vision = SiglipVisionConfig(hidden_size=v.hidden, intermediate_size=v.mlp, num_hidden_layers=depth,
                                    num_attention_heads=v.heads, image_size=v.image, patch_size=v.patch,
                                    vision_use_head=False)
        return LlavaOnevisionConfig(text_config=Qwen2Config(**text), vision_config=vision, tie_word_embeddings=t.tied,
                                    image_token_id=ids("<image>"), video_token_id=ids("<video>"),
                                    image_grid_pinpoints=PINPOINTS, vision_aspect_ratio="anyres_max_9",
                                    vision_feature_layer=-1, vision_feature_select_strategy="full")
    from transformers import InternVLConfig, InternVLVisionConfig

    vision = InternVLVisionConfig(hidden_size=v.hidden, intermediate_size=v.mlp, num_hidden_layers=depth,
                                  num_attention_heads=v.heads, image_size=[v.image] * 2, patch_size=[v.patch] * 2,
                                  attention_bias=True, use_qk_norm=False, norm_type="layer_norm",
                                  layer_scale_init_value=0.1, use_mean_pooling=True)
    return InternVLConfig(vision_config=vision, text_config=Qwen2Config(**text), tie_word_embeddings=t.tied,
                          image_token_id=ids("<IMG_CONTEXT>"), image_seq_length=TILE_TOKENS,
                          downsample_ratio=1 / v.merge, projector_hidden_act="gelu", vision_feature_layer=-1,
                          vision_feature_select_strategy="default")


# -- images for a number of visual tokens -------------------------------------------------------------------------
def image_size_for(arch: ModelArch, tokens: int) -> tuple[int, int]:
    """(width, height) of an image that gives exactly `tokens` visual tokens, as near square as the family allows.
    Raises ValueError (with the sizes that do work) when no image gives that many."""
    v = arch.vision
    if arch.family == "qwen2_5_vl":  # one token per merged 28 x 28 px cell
        if not 4 <= tokens <= 16384:
            raise ValueError(f"{arch.name} takes 4..16384 visual tokens per image, not {tokens}")
        rows = max(r for r in range(1, int(tokens ** 0.5) + 1) if tokens % r == 0)
        cell = v.patch * v.merge
        return tokens // rows * cell, rows * cell
    if arch.family == "internvl":  # 256 per tile, plus a thumbnail tile when there are several
        tiles = 1 if tokens == TILE_TOKENS else tokens // TILE_TOKENS - 1
        if tokens % TILE_TOKENS or not 1 <= tiles <= 12 or tiles == 1 and tokens != TILE_TOKENS:
            raise ValueError(f"{arch.name} gives 256 visual tokens per 448 px tile plus a thumbnail tile when there "
                             f"are several (256, 768, 1024, ..., 3328), not {tokens}; or give --image-size")
        return tiles * v.image, v.image  # one row of tiles: its aspect ratio picks exactly that grid
    raise ValueError(f"{arch.name}'s visual tokens follow its anyres crops and are not set by a count; give "
                     "--image-size instead")


# -- building ---------------------------------------------------------------------------------------------------
def build_model(arch: ModelArch, processor, *, layers: int | None = None, vision_layers: int | None = None,
                dtype: str = "bfloat16", device: str = "cpu", seed: int = 0):
    """A random-weight model of `arch` with its weights created on `device` in `dtype` (none on the CPU first);
    `device="meta"`: the layout alone (no memory, no time)."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForImageTextToText, GenerationConfig

    config = build_config(arch, processor.tokenizer, layers, vision_layers)
    with init_empty_weights(include_buffers=False):  # parameters on meta; buffers (rotary tables) computed
        model = AutoModelForImageTextToText.from_config(config, dtype=getattr(torch, dtype))
    if device != "meta":
        materialize(model, torch.device(device), seed, config.get_text_config().initializer_range)
    model.tie_weights()  # accelerate's empty init gives tied parameters separate meta copies: tie them again
    text = config.get_text_config()
    model.generation_config = GenerationConfig(eos_token_id=text.eos_token_id, pad_token_id=text.pad_token_id,
                                               do_sample=False)
    return model.eval()


def materialize(model, device, seed: int, std: float) -> None:
    """Create every parameter on `device` in its dtype: normal(0, std) matrices, ones for norm weights, zeros for
    biases (transformers' own initialisation, in one pass); tied parameters stay tied. Buffers follow."""
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)
    made: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if id(p) not in made:
                t = torch.empty(p.shape, dtype=p.dtype, device=device)
                if name.endswith("bias"):
                    t.zero_()
                elif p.dim() == 1 and "norm" in type(module).__name__.lower():
                    t.fill_(1.0)
                else:
                    _normal(t, std, gen)
                made[id(p)] = torch.nn.Parameter(t, requires_grad=False)
            setattr(module, name, made[id(p)])
    model.to(device)  # the buffers


_BLOCK = (1 << 22) + 15  # odd: no hidden size divides it, so each row of a tiled matrix starts elsewhere in it


def _normal(t, std: float, gen) -> None:
    """normal(0, std) in place. On the CPU a large tensor repeats one block of `_BLOCK` draws (each row a different
    window of it): drawing 2 B normals takes ~20 s on two cores, and a timing benchmark needs no more randomness."""
    import torch

    n = t.numel()
    if t.device.type != "cpu" or n <= 2 * _BLOCK:
        t.normal_(0.0, std, generator=gen)
        return
    block = torch.empty(_BLOCK, dtype=t.dtype).normal_(0.0, std, generator=gen)
    flat, k = t.view(-1), n // _BLOCK
    flat[: k * _BLOCK].view(k, _BLOCK).copy_(block.expand(k, _BLOCK))
    flat[k * _BLOCK:].copy_(block[: n - k * _BLOCK])


def describe(arch: ModelArch, model: Any = None) -> dict:
    """The spec as a flat dict (the report's record of what ran), with the built model's layer counts."""
    out = {"name": arch.name, "family": arch.family,
           **{f"text_{k}": v for k, v in dataclasses.asdict(arch.text).items()},
           **{f"vision_{k}": v for k, v in dataclasses.asdict(arch.vision).items()},
           "published_params_b": arch.params_b}
    if model is not None:
        out["built_text_layers"] = int(model.config.get_text_config().num_hidden_layers)
        out["built_params_b"] = round(sum(p.numel() for p in model.parameters()) / 1e9, 4)
    return out
