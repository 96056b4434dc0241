"""The built-in model pair, built offline.

No model hub is reachable on the machines sgl is developed and tested on, so the default pair is built here
from code: a byte-level tokenizer with the Qwen special tokens and chat template, a Qwen2-VL image processor,
a config per size and seeded random weights, saved with `save_pretrained` so that it is loaded by exactly the
same `from_pretrained` code as a real checkpoint. Built once and cached; tests build the same pair at tiny size.

Both sizes share one processor config, which is what makes them a pair (identical `input_ids` per image).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

# Bump when the builder's output changes, so stale caches are rebuilt.
BUILDER_VERSION = 1

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen-style template; an image content part becomes the vision span the processor expands.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class LMSize:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    mlp: int


@dataclass(frozen=True)
class PairSpec:
    """Everything that determines the built pair's files."""

    small: LMSize
    large: LMSize
    vision_embed: int = 64
    vision_depth: int = 2
    vision_heads: int = 4
    patch_size: int = 14
    merge_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 448 * 448  # at most 256 visual tokens per image
    seed: int = 0
    arch: str = "qwen2_vl"  # or "qwen2_5_vl" (windowed vision attention, different vision config)
    # Rotary frequencies (radians per row / per column) for the first pairs of M-RoPE's h and w sections; the
    # rest keep rope theta's. Theta 1e4 at head_dim 32 turns by at most 0.1 rad per row and 0.003 per column,
    # too little for a head to single out a neighbouring cell. Empty: theta's spectrum throughout.
    spatial_freqs: tuple[float, ...] = ()

    def key(self) -> str:
        blob = json.dumps({"v": BUILDER_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


# The shipped default (trained by scripts/train_pair.py on the shapes task): 1.0M vs 3.3M language-model
# parameters, one shared vision tower, a word-level tokenizer. Rows and columns turn by 1.6-0.2 rad per cell in
# the first four pairs of their sections, so attention can single out a neighbouring cell (two-hop questions).
TRAINED_SPEC = PairSpec(small=LMSize(128, 4, 4, 2, 512), large=LMSize(192, 6, 6, 2, 768), vision_embed=128,
                        spatial_freqs=(1.6, 0.8, 0.4, 0.2))
# Random-weight pairs built on demand: `random` at the default's size, `tiny` for tests (hidden 64, 2 layers;
# still a real pair of different sizes).
RANDOM_SPEC = TRAINED_SPEC
# The tiny pair turns by 1.6 rad per row and column (a longrope spectrum), so a wrong row or column position id
# changes its logits clearly; at theta's own frequencies (head_dim 16) it would barely move them.
TINY_SPEC = PairSpec(small=LMSize(64, 2, 4, 2, 128), large=LMSize(128, 2, 4, 2, 256), vision_embed=32,
                     spatial_freqs=(1.6, 0.8, 0.4))  # head_dim 16: three pairs per spatial section

SPECS = {"random": RANDOM_SPEC, "tiny": TINY_SPEC}
# Pairs that ship inside the package, trained: name -> folder holding small/ and large/.
SHIPPED = {"default": Path(__file__).resolve().parents[2] / "weights" / "default"}


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sgl"


def build_tokenizer(words: list[str] | None = None):
    """Byte-level by default; word-level over `words` (lower-cased, punctuation split off) when given."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if words is None:
        # Byte alphabet, no merges: encodes any text losslessly, needs no trained vocabulary.
        alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
        tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
    else:
        # A model trained from scratch on a closed task learns far faster from one token per word.
        vocab = {w: i for i, w in enumerate(["[UNK]", *words])}
        tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
        tok.normalizer = normalizers.Lowercase()
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        unk_token="[UNK]" if words is not None else None,
        pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_processor(spec: PairSpec, words: list[str] | None = None):
    from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor

    from ..core.processors import image_only

    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": spec.min_pixels, "longest_edge": spec.max_pixels},
        patch_size=spec.patch_size,
        merge_size=spec.merge_size,
        temporal_patch_size=2,
    )
    tokenizer = build_tokenizer(words)
    processor_class = Qwen2_5_VLProcessor if spec.arch == "qwen2_5_vl" else Qwen2VLProcessor
    return image_only(processor_class)(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE
    )


def build_config(spec: PairSpec, lm: LMSize, tokenizer):
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    head_dim = lm.hidden // lm.heads
    # M-RoPE splits head_dim/2 rotary frequencies over (t, h, w); the sections must add up to it.
    half = head_dim // 2
    section = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]
    vocab = -(-len(tokenizer) // 64) * 64
    ids = tokenizer.convert_tokens_to_ids
    vision = {
        "depth": spec.vision_depth,
        "hidden_size": lm.hidden,
        "num_heads": spec.vision_heads,
        "patch_size": spec.patch_size,
        "spatial_merge_size": spec.merge_size,
        "temporal_patch_size": 2,
        "embed_dim": spec.vision_embed,
    }
    config_class = Qwen2VLConfig
    if spec.arch == "qwen2_5_vl":
        config_class = Qwen2_5_VLConfig
        vision.pop("embed_dim")
        vision.update(hidden_size=spec.vision_embed, intermediate_size=2 * spec.vision_embed,
                      out_hidden_size=lm.hidden, fullatt_block_indexes=[spec.vision_depth - 1])
    return config_class(
        text_config={
            "vocab_size": vocab,
            "hidden_size": lm.hidden,
            "intermediate_size": lm.mlp,
            "num_hidden_layers": lm.layers,
            "num_attention_heads": lm.heads,
            "num_key_value_heads": lm.kv_heads,
            "max_position_embeddings": 4096,
            "rope_parameters": rope_parameters(spec, head_dim, section),
            "bos_token_id": ids("<|endoftext|>"),
            "eos_token_id": ids("<|im_end|>"),
            "pad_token_id": ids("<|endoftext|>"),
        },
        vision_config=vision,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )


def rope_parameters(spec: PairSpec, head_dim: int, section: list[int]) -> dict:
    """Default RoPE (theta 1e4), or with `spec.spatial_freqs` the same spectrum with the first pairs of the h
    and w sections set to those frequencies: a per-pair rescaling, which transformers' `longrope` type
    expresses exactly (factor 1, so no attention rescaling and the same frequencies at every length)."""
    theta = 10000.0
    if not spec.spatial_freqs:
        return {"rope_type": "default", "rope_theta": theta, "mrope_section": section}
    if len(spec.spatial_freqs) > min(section[1:]):
        raise ValueError(f"spatial_freqs has {len(spec.spatial_freqs)} entries, more than the {min(section[1:])} "
                         f"rotary pairs of an M-RoPE spatial section at head_dim {head_dim}")
    base = [theta ** (-2 * i / head_dim) for i in range(head_dim // 2)]
    wanted = list(base)
    for start in (section[0], section[0] + section[1]):  # the h and w sections
        for j, f in enumerate(spec.spatial_freqs):
            wanted[start + j] = f
    factors = [b / w for b, w in zip(base, wanted)]  # longrope: inv_freq = base_freq / factor
    return {"rope_type": "longrope", "rope_theta": theta, "mrope_section": section, "short_factor": factors,
            "long_factor": factors, "factor": 1.0, "attention_factor": 1.0, "original_max_position_embeddings": 4096}


def build_pair(spec: PairSpec, out: Path) -> dict[str, Path]:
    """Write `small/` and `large/` checkpoint folders (config, safetensors, processor) into `out`."""
    import torch
    from transformers import AutoModelForImageTextToText, GenerationConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    processor = build_processor(spec)
    paths = {}
    for i, (role, lm) in enumerate((("small", spec.small), ("large", spec.large))):
        config = build_config(spec, lm, processor.tokenizer)
        torch.manual_seed(spec.seed + i)
        model = AutoModelForImageTextToText.from_config(config).eval()
        model.generation_config = GenerationConfig(
            eos_token_id=config.text_config.eos_token_id,
            pad_token_id=config.text_config.pad_token_id,
            do_sample=False,
        )
        folder = out / role
        model.save_pretrained(folder, safe_serialization=True)
        processor.save_pretrained(folder)
        (folder / "SGL_BUILTIN.json").write_text(
            json.dumps({"role": role, "random_weights": True, "spec": asdict(spec)}, indent=1)
        )
        paths[role] = folder
    return paths


def pair_names() -> list[str]:
    return [*SHIPPED, *SPECS]


def ensure_pair(name: str = "default", root: Path | None = None) -> dict[str, Path]:
    """The named built-in pair's `{"small": path, "large": path}`: shipped, or built once and cached."""
    if name in SHIPPED:
        paths = {role: SHIPPED[name] / role for role in ("small", "large")}
        missing = [str(p) for p in paths.values() if not (p / "model.safetensors").is_file()]
        if missing:
            raise FileNotFoundError(f"the shipped pair {name!r} is missing its weights ({', '.join(missing)}); "
                                    "reinstall sgl, or rebuild them with scripts/train_pair.py")
        return paths
    spec = SPECS[name]
    root = (root or cache_root()) / "builtin" / f"{name}-{spec.key()}"
    paths = {role: root / role for role in ("small", "large")}
    if all((p / "config.json").exists() for p in paths.values()):
        return paths
    root.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename, so an interrupted build never leaves a half-written pair.
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        build_pair(spec, tmp)
        try:
            tmp.rename(root)
        except OSError:  # another process finished first
            if not all((p / "config.json").exists() for p in paths.values()):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return paths


def random_weights_warning(what: str = "answers") -> str:
    """The one warning for a preset whose models have random weights (the built-in random pairs)."""
    return (f"warning: a model of this preset has random weights: its {what} are noise; use a trained pair (the "
            "default preset, or real checkpoints).")


def is_random(path: Path) -> bool:
    marker = Path(path) / "SGL_BUILTIN.json"
    return marker.exists() and json.loads(marker.read_text()).get("random_weights", False)
