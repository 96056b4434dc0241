"""Published architectures (`sgl bench --arch`): every full model, laid out on the meta device, has exactly the
published parameter count; each pair is a real pair (one processor, identical input_ids, the family's tokens at
their published ids); a cut model keeps everything but its depth; weights are created where asked; NF4 of
in-memory weights quantizes the language model only and matches bitsandbytes' own quantization."""

from __future__ import annotations

import functools

import pytest
import torch

from sgl_cli.engine.builtin import arch

# Published totals (the model cards' parameter counts, in billions, to their printed precision). Tied embeddings
# (Qwen2.5-VL-3B, LLaVA-OneVision-0.5B) count once, as the checkpoints store them once.
PUBLISHED = {"Qwen/Qwen2.5-VL-3B-Instruct": 3.75, "Qwen/Qwen2.5-VL-7B-Instruct": 8.29,
             "Qwen/Qwen2.5-VL-72B-Instruct": 73.4, "llava-hf/llava-onevision-qwen2-0.5b-ov-hf": 0.89,
             "llava-hf/llava-onevision-qwen2-7b-ov-hf": 8.03, "OpenGVLab/InternVL3-1B-hf": 0.94,
             "OpenGVLab/InternVL3-8B-hf": 7.94}


@functools.cache
def _processor(spec):
    return arch.build_processor(spec)  # a 152k-token tokenizer takes a second: one per architecture


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())  # shared (tied) parameters once


@pytest.mark.parametrize("spec", arch.MODELS, ids=lambda a: a.name.split("/")[-1])
def test_full_model_has_the_published_parameter_count(spec):
    model = arch.build_model(spec, _processor(spec), device="meta")
    assert all(p.device.type == "meta" for p in model.parameters())
    published = PUBLISHED[spec.name]
    digits = len(str(published).split(".")[1])
    assert round(_count(model) / 1e9, digits) == published
    text = model.config.get_text_config()
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads,
            text.intermediate_size, text.vocab_size) == (spec.text.hidden, spec.text.layers, spec.text.heads,
                                                         spec.text.kv_heads, spec.text.mlp, spec.text.vocab)
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == spec.text.tied


def test_counts_by_hand_qwen25_vl_3b():
    """The 3B's total from its config values alone, independently of transformers' modules."""
    t, v = arch.QWEN25_VL_3B.text, arch.QWEN25_VL_3B.vision
    head = t.hidden // t.heads
    kv = head * t.kv_heads
    attn = t.hidden * t.hidden * 2 + 2 * t.hidden * kv + t.hidden + 2 * kv  # q, o; k, v; q/k/v biases
    layer = attn + 3 * t.hidden * t.mlp + 2 * t.hidden  # gated MLP, two RMSNorms
    lm = t.vocab * t.hidden + t.layers * layer + t.hidden  # tied head, final norm
    block = (3 * v.hidden * v.hidden + 3 * v.hidden) + (v.hidden * v.hidden + v.hidden) \
        + 2 * (v.hidden * v.mlp + v.mlp) + (v.mlp * v.hidden + v.hidden) + 2 * v.hidden
    merged = v.hidden * v.merge ** 2
    merger = v.hidden + merged * merged + merged + merged * t.hidden + t.hidden
    tower = 3 * 2 * v.patch * v.patch * v.hidden + v.depth * block + merger  # Conv3d (2 frames), no bias
    model = arch.build_model(arch.QWEN25_VL_3B, _processor(arch.QWEN25_VL_3B), device="meta")
    assert _count(model) == lm + tower


@pytest.mark.parametrize("name", list(arch.PAIRS))
def test_pairs_are_real_pairs(name, tmp_path):
    """Both models built (on meta) behind one processor: identical input_ids, visual tokens where the config says,
    the family's special tokens at their published ids, every model id decodable."""
    from sgl_cli.engine.pipeline.engine import Engine
    from sgl_cli.engine.evaluation.bench import write_noise_items
    from sgl_cli.engine.io.formats import read_items
    from sgl_cli.engine.backends.transformers import from_arch
    from sgl_cli.engine.preset import Settings

    pair = arch.PAIRS[name]
    small, large = from_arch(pair, layers=2, device="meta")
    assert small.processor is large.processor and small.random_weights
    assert small.num_layers == large.num_layers == 2
    tok = small.processor.tokenizer
    assert len(tok) == max(pair.small.text.vocab, pair.large.text.vocab)
    assert small.eos_ids == large.eos_ids == {151645} and small.pad_id == 151643
    assert small.image_token_id == large.image_token_id == {"qwen2_5_vl": 151655, "llava_onevision": 151646,
                                                            "internvl": 151667}[pair.small.family]
    assert tok.decode([len(tok) - 1]) != ""
    items = list(read_items(write_noise_items(tmp_path, 2, (448, 336))))
    works = Engine(Settings(threshold=None), small, large).prepare(items)
    for w in works:
        assert w.error is None
        assert torch.equal(w.encoded.small["input_ids"], w.encoded.large["input_ids"])
        assert w.encoded.n_visual > 0


@pytest.mark.parametrize("spec,tokens", [(arch.QWEN25_VL_3B, 1024), (arch.QWEN25_VL_3B, 2048),
                                         (arch.QWEN25_VL_3B, 90), (arch.INTERNVL3_1B, 1024),
                                         (arch.INTERNVL3_1B, 2048), (arch.INTERNVL3_1B, 256)])
def test_image_size_for_gives_exactly_that_many_visual_tokens(spec, tokens, tmp_path):
    from PIL import Image

    from sgl_cli.engine.backends.transformers import from_memory
    from sgl_cli.engine.preset import ModelSpec

    w, h = arch.image_size_for(spec, tokens)
    processor = _processor(spec)
    m = from_memory(arch.build_model(spec, processor, layers=1, device="meta"), processor,
                    ModelSpec("meta"), "large")
    enc = m.family.encode(processor, Image.new("RGB", (w, h)), "q")
    assert int(m.family.visual_mask(m.model, enc).sum()) == tokens


def test_image_size_for_refuses_counts_no_image_gives():
    with pytest.raises(ValueError, match="256 visual tokens per 448 px tile"):
        arch.image_size_for(arch.INTERNVL3_1B, 1000)
    with pytest.raises(ValueError, match="--image-size"):
        arch.image_size_for(arch.LLAVA_OV_05B, 1024)


def test_cut_model_weights_on_the_device_in_the_dtype():
    spec = arch.INTERNVL3_1B
    processor = arch.build_processor(spec)
    model = arch.build_model(spec, processor, layers=1, vision_layers=1, dtype="bfloat16", device="cpu")
    params = dict(model.named_parameters())
    assert {p.dtype for p in params.values()} == {torch.bfloat16}
    assert all(p.device.type == "cpu" for p in params.values())
    assert model.config.get_text_config().num_hidden_layers == 1
    assert model.config.vision_config.num_hidden_layers == 1
    emb = model.get_input_embeddings().weight.float()
    assert abs(emb.std().item() - 0.02) < 0.002 and abs(emb.mean().item()) < 1e-3
    assert not torch.equal(emb[0], emb[1])  # rows differ
    norm = model.model.language_model.norm.weight
    assert torch.equal(norm, torch.ones_like(norm))
    bias = model.model.language_model.layers[0].self_attn.q_proj.bias
    assert torch.equal(bias, torch.zeros_like(bias))
    inv = model.model.language_model.rotary_emb.inv_freq  # a buffer: computed, not left empty
    assert torch.allclose(inv, 1.0 / (1e6 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64)))


def test_nf4_in_memory_quantizes_the_language_model_like_bitsandbytes():
    import bitsandbytes as bnb

    from sgl_cli.engine.backends.transformers import from_memory
    from sgl_cli.engine.preset import ModelSpec

    spec = arch.INTERNVL3_1B
    processor = arch.build_processor(spec)
    model = arch.build_model(spec, processor, layers=1, vision_layers=1, dtype="bfloat16", device="cpu")
    q_proj = model.model.language_model.layers[0].self_attn.q_proj
    weight = q_proj.weight.data.clone()
    m = from_memory(model, processor, ModelSpec("arch:test/large", dtype="bfloat16", quantize="4bit"), "large")
    kinds = {n: type(x).__name__ for n, x in m.model.named_modules()}
    lm = [n for n, k in kinds.items() if ".language_model.layers." in n and k.startswith("Linear")]
    assert lm and all(kinds[n] == "Linear4bit" for n in lm)
    assert not any(k == "Linear4bit" for n, k in kinds.items() if "vision_tower" in n or "projector" in n
                   or n == "lm_head")
    q = m.model.model.language_model.layers[0].self_attn.q_proj.weight
    packed, state = bnb.functional.quantize_4bit(weight, quant_type="nf4", compress_statistics=False)
    assert torch.equal(q.data, packed)
    assert torch.equal(bnb.functional.dequantize_4bit(q.data, q.quant_state), bnb.functional.dequantize_4bit(packed,
                                                                                                             state))
    assert m.model.config.quantization_config.bnb_4bit_quant_type == "nf4"
