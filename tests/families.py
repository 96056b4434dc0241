"""Tiny offline builders for every family sgl supports (tests only; nothing touches the model hub).

`build_family(name, out)` writes `small/` and `large/` checkpoint folders (config, safetensors weights,
processor, tokenizer with the family's chat template) into `out` and returns `{"small": path, "large": path}`.
Both sizes share one processor, so they are a pair. Each family uses its own transformers classes (config,
model, PIL image processor, processor) at tiny sizes: text hidden 64 or 96, 2 layers; vision hidden 32.

The families and their image geometry here:
- qwen2_vl, qwen2_5_vl: the built-in builder (`sgl_cli.engine.builtin.pair`), patch 14, merge 2.
- qwen3_vl: patch 16, merge 2, deepstack features from both vision blocks.
- llava (1.5): CLIP tower (with [CLS]) 64x64, patch 8: 64 tokens; features from layer -2 without [CLS].
- llava_next: the same tower, anyres crops over tiny pinpoints, unpadding and `image_newline` placeholders.
- llava_onevision: SigLIP tower (no [CLS]) 64x64, patch 8, anyres_max_9 crops and newline placeholders.
- internvl: InternViT (with [CLS]) 64x64, patch 8, pixel shuffle 0.5: 16 tokens per tile, dynamic tiling
  (up to 4 tiles plus a thumbnail), `<img>`/`</img>` around the placeholders.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava", "llava_next", "llava_onevision", "internvl")
SIZES = {"small": dict(hidden=64, layers=2, heads=4, kv_heads=2, mlp=128),
         "large": dict(hidden=96, layers=2, heads=4, kv_heads=2, mlp=192)}
# Pinpoints are multiples of the tower's 64-pixel crops; 1x1 up to 3x3 crops (anyres_max_9 never interpolates).
PINPOINTS = [[64, 128], [128, 64], [128, 128], [64, 192], [192, 64], [128, 192], [192, 128], [192, 192]]
# With a 4x4 grid too: a large square image gets 32x32 patches, which OneVision's anyres_max_9 resizes to 24x24.
PINPOINTS_MAX9 = PINPOINTS + [[256, 256]]


def _tokenizer(specials: list[str], named: dict[str, str], template: str, eos: str, pad: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=pad, extra_special_tokens=named)
    fast.chat_template = template
    return fast


def _template(user: str, image: str, assistant: str, end: str = "") -> str:
    """One user turn: `user`, the image part as `image`, the text parts, `end`; then `assistant` to generate."""
    return (
        "{% for message in messages %}" + user +
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for part in message['content'] %}"
        "{% if part['type'] == 'image' %}" + image +
        "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
        "{% endfor %}{% endif %}" + end + "{% endfor %}"
        "{% if add_generation_prompt %}" + assistant + "{% endif %}"
    )


QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]
CHATML = dict(user="<|im_start|>user\n", end="<|im_end|>\n", assistant="<|im_start|>assistant\n")


def _text_config(size: dict, tok, family: str, **extra) -> dict:
    ids = tok.convert_tokens_to_ids
    cfg = {
        "vocab_size": -(-len(tok) // 64) * 64,
        "hidden_size": size["hidden"],
        "intermediate_size": size["mlp"],
        "num_hidden_layers": size["layers"],
        "num_attention_heads": size["heads"],
        "num_key_value_heads": size["kv_heads"],
        "max_position_embeddings": 4096,
        "eos_token_id": ids(tok.eos_token),
        "pad_token_id": ids(tok.pad_token),
        "bos_token_id": ids(tok.pad_token),
    }
    cfg.update(extra)
    return cfg


# -- per family: (processor, config(size)) -----------------------------------------------------------------------
def _llama_tokenizer(template: str):
    """The LLaVA-1.5 / LLaVA-NeXT tokenizer: Llama specials and one <image> placeholder."""
    return _tokenizer(["<unk>", "<s>", "</s>", "<pad>", "<image>"], {"image_token": "<image>"}, template, "</s>",
                      "<pad>")


def _clip_vision():
    """The tiny CLIP tower both LLaVA-1.5 and LLaVA-NeXT use: 64 px, 8 px patches, an 8 x 8 grid plus [CLS]."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                            image_size=64, patch_size=8, projection_dim=32)


def _llava(size_name: str):
    from transformers import LlamaConfig, LlavaConfig
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.llava.processing_llava import LlavaProcessor

    template = _template("USER: ", "<image>\n", "ASSISTANT:", end=" ")
    tok = _llama_tokenizer(template)
    ip = CLIPImageProcessorPil(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, chat_template=template)

    def config(size):
        return LlavaConfig(
            vision_config=_clip_vision(),
            text_config=LlamaConfig(**_text_config(size, tok, "llava")),
            image_token_id=tok.convert_tokens_to_ids("<image>"),
            vision_feature_layer=-2, vision_feature_select_strategy="default",
        )

    return proc, config


def _llava_next(size_name: str):
    from transformers import LlamaConfig, LlavaNextConfig
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
    from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor

    template = _template("[INST] ", "<image>\n", " [/INST]")
    tok = _llama_tokenizer(template)
    ip = LlavaNextImageProcessorPil(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64},
                                    image_grid_pinpoints=PINPOINTS)
    proc = LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                              num_additional_image_tokens=1, chat_template=template)

    def config(size):
        return LlavaNextConfig(
            vision_config=_clip_vision(),
            text_config=LlamaConfig(**_text_config(size, tok, "llava_next")),
            image_token_id=tok.convert_tokens_to_ids("<image>"),
            vision_feature_layer=-2, vision_feature_select_strategy="default", image_grid_pinpoints=PINPOINTS,
        )

    return proc, config


def _llava_onevision(size_name: str, pinpoints=PINPOINTS):
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )
    from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor

    from sgl_cli.engine.core.processors import image_only

    template = _template(CHATML["user"], "<image>\n", CHATML["assistant"], CHATML["end"])
    tok = _tokenizer(QWEN_SPECIALS[:3] + ["<image>", "<video>"], {"image_token": "<image>", "video_token": "<video>"},
                     template, "<|im_end|>", "<|endoftext|>")
    ip = LlavaOnevisionImageProcessorPil(size={"height": 64, "width": 64}, image_grid_pinpoints=pinpoints)
    proc = image_only(LlavaOnevisionProcessor)(image_processor=ip, tokenizer=tok, num_image_tokens=64,
                                               vision_feature_select_strategy="full", chat_template=template,
                                               vision_aspect_ratio="anyres_max_9")

    def config(size):
        return LlavaOnevisionConfig(
            vision_config=SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, image_size=64, patch_size=8),
            text_config=Qwen2Config(**_text_config(size, tok, "llava_onevision")),
            image_token_id=tok.convert_tokens_to_ids("<image>"),
            video_token_id=tok.convert_tokens_to_ids("<video>"),
            vision_feature_layer=-1, vision_feature_select_strategy="full", image_grid_pinpoints=pinpoints,
            vision_aspect_ratio="anyres_max_9",
        )

    return proc, config


def _internvl(size_name: str):
    from transformers import InternVLConfig, InternVLVisionConfig, Qwen2Config
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
    from transformers.models.internvl.processing_internvl import InternVLProcessor

    from sgl_cli.engine.core.processors import image_only

    template = _template(CHATML["user"], "<IMG_CONTEXT>\n", CHATML["assistant"], CHATML["end"])
    named = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
             "video_token": "<video>"}
    tok = _tokenizer(QWEN_SPECIALS[:3] + ["<img>", "</img>", "<IMG_CONTEXT>", "<video>"], named, template,
                     "<|im_end|>", "<|endoftext|>")
    ip = GotOcr2ImageProcessorPil(size={"height": 64, "width": 64}, crop_to_patches=True, min_patches=1, max_patches=4)
    proc = image_only(InternVLProcessor)(image_processor=ip, tokenizer=tok, image_seq_length=16,
                                         chat_template=template)

    def config(size):
        return InternVLConfig(
            vision_config=InternVLVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                               num_attention_heads=4, image_size=[64, 64], patch_size=[8, 8]),
            text_config=Qwen2Config(**_text_config(size, tok, "internvl")),
            image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"),
            image_seq_length=16, downsample_ratio=0.5, vision_feature_layer=-1,
            vision_feature_select_strategy="default",
        )

    return proc, config


def _qwen3_vl(size_name: str, deepstack=(0, 1), layers: int | None = None):
    from transformers import Qwen3VLConfig
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    from sgl_cli.engine.core.processors import image_only

    template = _template(CHATML["user"], "<|vision_start|><|image_pad|><|vision_end|>", CHATML["assistant"],
                         CHATML["end"])
    tok = _tokenizer(QWEN_SPECIALS, {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"}, template,
                     "<|im_end|>", "<|endoftext|>")
    ip = Qwen2VLImageProcessorPil(size={"shortest_edge": 64 * 64, "longest_edge": 384 * 384}, patch_size=16,
                                  merge_size=2, temporal_patch_size=2)
    proc = image_only(Qwen3VLProcessor)(image_processor=ip, tokenizer=tok, chat_template=template)

    def config(size):
        ids = tok.convert_tokens_to_ids
        head_dim = size["hidden"] // size["heads"]
        half = head_dim // 2
        section = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]
        size = dict(size, layers=layers or size["layers"])
        text = _text_config(size, tok, "qwen3_vl", head_dim=head_dim,
                            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section,
                                             "mrope_interleaved": True})
        return Qwen3VLConfig(
            text_config=text,
            vision_config={"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 4, "patch_size": 16,
                           "spatial_merge_size": 2, "temporal_patch_size": 2, "out_hidden_size": size["hidden"],
                           "num_position_embeddings": 64, "deepstack_visual_indexes": list(deepstack)},
            image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
            vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        )

    return proc, config


BUILDERS = {"qwen3_vl": _qwen3_vl, "llava": _llava, "llava_next": _llava_next, "llava_onevision": _llava_onevision,
            "internvl": _internvl}


def build_family(name: str, out: Path, seed: int = 0, **options) -> dict[str, Path]:
    """Write a tiny small/large pair of family `name` into `out`; returns the two folders. `options` go to the
    family's builder (llava_onevision: `pinpoints`; qwen3_vl: `deepstack` vision layers, `layers` of both LMs)."""
    from transformers import AutoModelForImageTextToText, GenerationConfig
    from transformers.utils import logging as hf_logging

    out = Path(out)
    if name in ("qwen2_vl", "qwen2_5_vl"):
        from sgl_cli.engine.builtin.pair import TINY_SPEC, build_pair

        return build_pair(dataclasses.replace(TINY_SPEC, arch=name), out)
    hf_logging.disable_progress_bar()
    proc, make_config = BUILDERS[name]("small", **options)
    paths = {}
    for i, role in enumerate(("small", "large")):
        config = make_config(SIZES[role])
        torch.manual_seed(seed + i)
        model = AutoModelForImageTextToText.from_config(config).eval()
        text = config.get_text_config()
        model.generation_config = GenerationConfig(eos_token_id=text.eos_token_id, pad_token_id=text.pad_token_id,
                                                   do_sample=False)
        folder = out / role
        model.save_pretrained(folder, safe_serialization=True)
        proc.save_pretrained(folder)
        (folder / "SGL_BUILTIN.json").write_text(json.dumps({"role": role, "random_weights": True, "family": name}))
        paths[role] = folder
    return paths
