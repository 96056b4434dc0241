"""Every supported family, on tiny offline models (tests/families.py), against references built from plain
transformers calls (no sgl code in the references):

- the sgl guide at retain 1.0 gives the small and the large model's `generate` tokens, token for token;
- the SGP importance equals eager `output_attentions` summed over the prompt rows after the image and every
  decode row, at the visual tokens (placeholders minus LLaVA-NeXT/OneVision newline rows, which are found here
  as the rows whose language-model input equals the model's `image_newline`);
- pruned (retain 0.25), the large model's tokens equal a cache-free reference that drops the unkept visual
  columns from the model's own merged `inputs_embeds` (Qwen3-VL: and from its deepstack features), keeping
  original positions; a batch of two different image sizes equals batch size one;
- the cls guide's scores equal the eager vision tower's attention ([CLS] row, or the mean over rows without
  [CLS]) at the layer feeding the projector, summed over merged patches, packed in placeholder order;
- an unsupported model type fails with the list of supported ones.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForImageTextToText

from sgl_cli.engine.io.images import load_image
from sgl_cli.engine.io.formats import read_items
from tests.conftest import analyze, make_images, write_jsonl
from tests.families import FAMILIES, PINPOINTS_MAX9, build_family

SUFFIX = "Answer with one word."
MAX_NEW = 4


# Every family, plus LLaVA-OneVision with a crop grid large enough for anyres_max_9 to resize it (with a large
# square image among the items).
VARIANTS = {name: (name, {}) for name in FAMILIES}
VARIANTS["llava_onevision_max9"] = ("llava_onevision", {"pinpoints": PINPOINTS_MAX9})


@pytest.fixture(scope="module", params=list(VARIANTS))
def fam(request, tmp_path_factory):
    from sgl_cli.engine.backends.transformers import load_model
    from sgl_cli.engine.preset import ModelSpec

    name, options = VARIANTS[request.param]
    paths = build_family(name, tmp_path_factory.mktemp(request.param), **options)
    small = load_model(ModelSpec(str(paths["small"]), dtype="float32"), "small")
    large = load_model(ModelSpec(str(paths["large"]), dtype="float32"), "large")
    assert large.model.config.model_type == name

    def eager(role):
        return AutoModelForImageTextToText.from_pretrained(paths[role], attn_implementation="eager",
                                                           dtype=torch.float32).eval()

    return SimpleNamespace(name=name, variant=request.param, paths=paths, small=small, large=large,
                           eager_small=eager("small"), eager_large=eager("large"))


@pytest.fixture(scope="module")
def items(fam, tmp_path_factory):
    """Two non-square images of different sizes (different token counts, crop grids and unpadding); for the
    anyres_max_9 variant a large square one (4x4 crops, resized) and a small one."""
    folder = tmp_path_factory.mktemp("family-items")
    sizes = ((300, 300), (168, 280)) if fam.variant == "llava_onevision_max9" else ((168, 280), (336, 224))
    imgs = make_images(folder, sizes=sizes)
    rows = [{"id": f"q{i}", "image": p.name, "question": q}
            for i, (p, q) in enumerate(zip(imgs, ["What color is the square?", "How many circles?"]))]
    return list(read_items(write_jsonl(folder / "batch.jsonl", rows)))


def engine(fam, guide="sgl", **settings):
    from sgl_cli.engine.pipeline.engine import Engine
    from sgl_cli.engine.preset import Settings

    base = dict(threshold=None, max_new_tokens=MAX_NEW, prompt_suffix=SUFFIX, guide=guide)
    base.update(settings)
    return Engine(Settings(**base), fam.small if guide == "sgl" else None, fam.large)


def run_works(eng, items):
    with torch.inference_mode():
        works = analyze(eng, items)
        assert all(w.error is None for w in works), [w.error for w in works]
        eng.large_pass(works, eng.large_inputs(works))
        assert all(w.error is None for w in works), [w.error for w in works]
    return works


def encode(processor, item):
    """The prompt as a user builds it with the processor's own chat template."""
    messages = [{"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": f"{item.question}\n{SUFFIX}"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return processor(text=[text], images=[load_image(item)], return_tensors="pt")


def top_k(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    k = max(1, math.floor(len(scores) * ratio + 1e-9))
    return torch.sort(torch.sort(scores, descending=True, stable=True).indices[:k]).values


def rel_err(a, ref) -> float:
    assert a.shape == ref.shape, (a.shape, ref.shape)
    return float((a.double() - ref.double()).abs().max() / ref.double().abs().max())


class LMInputs:
    """Captures what the wrapper hands its language model on the first call (the prefill)."""

    def __init__(self, model):
        self.model, self.kwargs = model, None

    def __enter__(self):
        def hook(module, args, kwargs):
            if self.kwargs is None:
                self.kwargs = dict(kwargs)

        self.handle = self.model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def reference_visual(model, enc, lm_inputs: dict) -> torch.Tensor:
    """Visual tokens: image placeholders, minus those the model fills with its `image_newline` vector."""
    ids = enc["input_ids"][0]
    visual = ids == model.config.image_token_id
    newline = getattr(model.model, "image_newline", None)
    if newline is not None:
        embeds = lm_inputs["inputs_embeds"][0]
        visual &= ~(embeds == newline.to(embeds.dtype)).all(-1)
    return visual


@torch.no_grad()
def reference_generate(model, enc, max_new: int):
    """Plain greedy generate with eager attention maps: tokens, SGP importance at the visual tokens, visual mask."""
    with LMInputs(model) as cap:
        out = model.generate(**enc, max_new_tokens=max_new, do_sample=False, output_attentions=True,
                             return_dict_in_generate=True)
    visual = reference_visual(model, enc, cap.kwargs)
    s = enc["input_ids"].shape[1]
    last = int(visual.nonzero().max())
    total = torch.zeros(s, dtype=torch.float64)
    for step, layers in enumerate(out.attentions):
        assert layers and layers[0] is not None, "eager attention maps expected"
        for attn in layers:  # (1, heads, q, k)
            rows = attn[0, :, last + 1:, :s] if step == 0 else attn[0, :, -1:, :s]
            total += rows.double().sum(dim=(0, 1))
    return out.sequences[0, s:].tolist(), total[visual], visual


@torch.no_grad()
def reference_pruned(model, enc, kept: torch.Tensor, max_new: int, eos: set[int]) -> list[int]:
    """Greedy, without a cache: the model's own merged language-model inputs of the full prompt (and Qwen3-VL's
    deepstack features), the unkept visual columns dropped, original position ids kept."""
    with LMInputs(model) as cap:
        model(**enc)
    kw = cap.kwargs
    ids = enc["input_ids"][0]
    visual = reference_visual(model, enc, kw)
    keep = ~visual
    keep[visual.nonzero()[kept, 0]] = True
    embeds = kw["inputs_embeds"][:, keep]
    pos = kw.get("position_ids")
    pos = torch.arange(len(ids))[None] if pos is None else pos
    pos = pos[..., keep]
    masks, deep = kw.get("visual_pos_masks"), kw.get("deepstack_visual_embeds")
    if deep is not None:
        deep = [d[keep[masks[0]]] for d in deep]
        masks = masks[:, keep]
    lm = model.model.language_model
    out: list[int] = []
    for _ in range(max_new):
        extra = {} if deep is None else {"visual_pos_masks": masks, "deepstack_visual_embeds": deep}
        h = lm(inputs_embeds=embeds, position_ids=pos, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
               use_cache=False, **extra).last_hidden_state
        token = int(model.lm_head(h[:, -1]).argmax(-1))
        out.append(token)
        if token in eos:
            break
        embeds = torch.cat([embeds, model.get_input_embeddings()(torch.tensor([[token]]))], dim=1)
        pos = torch.cat([pos, pos[..., -1:] + 1], dim=-1)
        if deep is not None:
            masks = torch.cat([masks, torch.zeros((1, 1), dtype=torch.bool)], dim=1)
    return out


# -- the sgl guide ------------------------------------------------------------------------------------------------
def test_retain_one_equals_generate_and_importance_equals_eager(fam, items):
    eng = engine(fam, retain=1.0, batch_size=2)
    works = run_works(eng, items)
    for item, w in zip(items, works):
        enc = encode(fam.small.processor, item)
        tokens, ref, visual = reference_generate(fam.eager_small, enc, MAX_NEW)
        assert torch.equal(w.encoded.visual, visual)
        assert w.small.tokens == tokens
        err = rel_err(w.small.importance, ref)
        print(f"{fam.name} {item.id}: {int(visual.sum())} visual tokens, importance max rel err {err:.1e}")
        assert err < 1e-5
        k = max(1, math.floor(0.25 * len(ref)))
        assert set(torch.topk(w.small.importance, k).indices.tolist()) == set(torch.topk(ref, k).indices.tolist())
        # The large model at retain 1.0: exactly its plain generate.
        enc_l = encode(fam.large.processor, item)
        assert torch.equal(enc_l["input_ids"], enc["input_ids"])  # a pair: byte-identical input_ids
        with torch.no_grad():
            out = fam.large.model.generate(**enc_l, max_new_tokens=MAX_NEW, do_sample=False)
        assert w.large.tokens == out[0, enc_l["input_ids"].shape[1]:].tolist()
        assert len(w.large.kept) == int(visual.sum())


def test_pruned_equals_reference_and_batch_equals_batch_one(fam, items):
    one = [run_works(engine(fam, retain=0.25), [it])[0] for it in items]
    many = run_works(engine(fam, retain=0.25, batch_size=2), items)
    for item, a, b in zip(items, one, many):
        assert torch.allclose(a.small.importance, b.small.importance, rtol=1e-4, atol=1e-6)
        assert torch.equal(a.large.kept, b.large.kept)
        assert a.small.tokens == b.small.tokens and a.large.tokens == b.large.tokens
        assert len(b.large.kept) == max(1, math.floor(0.25 * int(b.encoded.visual.sum())))
        ref = reference_pruned(fam.large.model, encode(fam.large.processor, item), b.large.kept, MAX_NEW,
                               fam.large.eos_ids)
        assert b.large.tokens == ref
    recs = engine(fam, retain=0.25, batch_size=2).process(items)
    assert [r["error"] for r in recs] == [None, None]
    assert [r["retained_tokens"] for r in recs] == [len(w.large.kept) for w in many]


# -- the cls guide ------------------------------------------------------------------------------------------------
@torch.no_grad()
def cls_reference(fam, enc) -> torch.Tensor:
    """(N,) fp64 scores of one item's visual tokens, from the eager vision tower's attention maps."""
    model = fam.eager_large
    if fam.name.startswith("qwen"):
        from tests.test_guides import cls_reference as qwen_reference

        return qwen_reference(model, enc)[0]
    cfg = model.config
    pixels = enc["pixel_values"]
    pixels = pixels.flatten(0, pixels.dim() - 4)
    tower = model.model.vision_tower
    out = tower(pixel_values=pixels, output_attentions=True, return_dict=True)
    n_layers = cfg.vision_config.num_hidden_layers
    layer = cfg.vision_feature_layer
    index = n_layers - 1 if layer == -1 else layer % (n_layers + 1) - 1
    attn = out.attentions[index].double()  # (crops, heads, n, n)
    has_cls = cfg.vision_config.model_type in ("clip_vision_model", "internvl_vision")
    scores = attn[:, :, 0, :].mean(1) if has_cls else attn.mean(dim=(1, 2))  # (crops, n)
    if has_cls and cfg.vision_feature_select_strategy == "default":
        scores = scores[:, 1:]
    if fam.name == "llava":
        return scores.reshape(-1)
    if fam.name == "internvl":
        side = int(math.isqrt(scores.shape[1]))
        shuffled = model.model.pixel_shuffle(scores.view(-1, side, side, 1), scale_factor=cfg.downsample_ratio)
        return shuffled.sum(-1).reshape(-1)
    # anyres: packed by the model's own function, the newline vector marked NaN.
    nan = torch.full((1,), math.nan, dtype=torch.double)
    if fam.name == "llava_next":
        packed, _ = model.model.pack_image_features([scores[..., None]], enc["image_sizes"],
                                                    cfg.vision_feature_select_strategy, image_newline=nan)
    else:
        packed, _ = model.model.pack_image_features([scores[..., None]], enc["image_sizes"], image_newline=nan,
                                                    vision_aspect_ratio=cfg.vision_aspect_ratio)
    packed = packed[0][:, 0]
    return packed[~packed.isnan()]


def cls_kept(fam, w, scores: torch.Tensor, retain: float) -> torch.Tensor:
    """FasterVLM's choice from `scores`: the top `retain` of the image, or of each crop for multi-crop families."""
    family = fam.large.family
    if not hasattr(family, "token_crops"):
        return top_k(scores, retain)
    crops = family.token_crops(fam.large.model, w.encoded.large)
    picked = [m[top_k(scores[m], retain)] for m in (torch.nonzero(crops == c).squeeze(-1) for c in crops.unique())]
    return torch.sort(torch.cat(picked)).values


def hooks(model) -> dict:
    return {name: (len(m._forward_pre_hooks), len(m._forward_hooks)) for name, m in model.named_modules()}


def test_cls_scores_equal_eager_vision_attention(fam, items):
    from sgl_cli.engine.core import capture

    run_works(engine(fam, "cls", retain=0.25), items[:1])  # transformers installs its own capture hooks once
    before = hooks(fam.large.model)
    many = run_works(engine(fam, "cls", retain=0.25, batch_size=2), items)
    for item, w in zip(items, many):
        enc = encode(fam.large.processor, item)
        ref = cls_reference(fam, enc)
        s = w.large.scores
        assert s.dtype == torch.float32 and s.shape == (int(w.encoded.visual.sum()),)
        err = rel_err(s, ref)
        print(f"cls {fam.name} {item.id}: max rel err {err:.1e}")
        assert err < 1e-4
        assert torch.equal(w.large.kept, cls_kept(fam, w, ref, 0.25))
        ref_tokens = reference_pruned(fam.large.model, enc, w.large.kept, MAX_NEW, fam.large.eos_ids)
        assert w.large.tokens == ref_tokens
    one = [run_works(engine(fam, "cls", retain=0.25), [it])[0] for it in items]
    for a, b in zip(one, many):
        assert torch.allclose(a.large.scores, b.large.scores, rtol=1e-5, atol=1e-7)
        assert torch.equal(a.large.kept, b.large.kept) and a.large.tokens == b.large.tokens
    # Nothing of sgl's is left behind: no hooks, no capture backend.
    assert hooks(fam.large.model) == before
    assert not any(m in capture.watched_modules() for m in fam.large.model.modules())
    assert fam.large.model.config.vision_config._attn_implementation == "sdpa"
    assert fam.large.model.config.get_text_config()._attn_implementation == "sdpa"


def test_cls_retain_one_equals_plain_generate(fam, items):
    recs = engine(fam, "cls", retain=1.0, batch_size=2).process(items)
    for item, r in zip(items, recs):
        assert r["error"] is None and r["retained_tokens"] == r["visual_tokens"]
        enc = encode(fam.large.processor, item)
        with torch.no_grad():
            out = fam.large.model.generate(**enc, max_new_tokens=MAX_NEW, do_sample=False)
        text = fam.large.processor.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        assert r["answer"] == text.strip()


def test_cls_budget_is_per_crop_for_multi_crop_families(fam, items):
    """FasterVLM keeps the top `retain` of each crop; other families keep the top `retain` of the image."""
    retain = 0.3
    works = run_works(engine(fam, "cls", retain=retain), items)
    family = fam.large.family
    for w in works:
        s = w.large.scores
        if not hasattr(family, "token_crops"):
            assert torch.equal(w.large.kept, top_k(s, retain))
            continue
        crops = family.token_crops(fam.large.model, w.encoded.large)
        assert len(torch.unique(crops)) > 1
        for c in torch.unique(crops):
            members = torch.nonzero(crops == c).squeeze(-1)
            in_crop = w.large.kept[torch.isin(w.large.kept, members)]
            assert torch.equal(in_crop, members[top_k(s[members], retain)]), f"crop {int(c)}"


# -- regions: each score lands on the token its patch feeds -------------------------------------------------------
def _zero_vision_attention(model, module_type):
    """Hooks that zero every vision attention output: each feature then depends on its own patch(es) only."""
    def zero(module, args, out):
        return (torch.zeros_like(out[0]), *out[1:]) if isinstance(out, tuple) else torch.zeros_like(out)

    return [m.register_forward_hook(zero) for m in model.modules() if type(m) is module_type]


@torch.no_grad()
def test_patch_scores_land_on_the_tokens_their_patches_feed(fam, items):
    """Independent of how sgl lays tokens out: with the vision tower's attention outputs zeroed, a visual token's
    language-model input depends only on the patches it is made of. Perturbing one patch of one crop changes
    exactly the tokens that `merge_patch_scores` sends that patch's score to (merged groups, pixel shuffle,
    unpadding, newlines, anyres_max_9 resizing)."""
    if fam.name == "qwen2_5_vl":
        pytest.skip("the windowed tower's key order is checked against the window permutation in test_guides")
    model, family = fam.eager_large, fam.large.family
    module, _ = family.cls_layer(model)
    keys = []
    handle = module.register_forward_hook(lambda m, a, k, out: keys.append(
        (a[0] if a else k["hidden_states"]).shape), with_kwargs=True)
    hooks = _zero_vision_attention(model, type(module))
    try:
        for item in items:
            enc = encode(fam.large.processor, item)
            keys.clear()
            with LMInputs(model) as cap:
                model(**enc)
            base_inputs = cap.kwargs["inputs_embeds"][0]
            visual = reference_visual(model, enc, cap.kwargs)
            base = base_inputs[visual]
            shape = keys[0]  # (crops, keys, d), or (patches, d) for the Qwen tower (one image)
            crops, n_keys = (1, shape[0]) if len(shape) == 2 else (shape[0], shape[1])
            pixels = enc["pixel_values"]
            g = torch.Generator().manual_seed(0)
            picks = [(int(torch.randint(crops, (1,), generator=g)), int(torch.randint(n_keys, (1,), generator=g)))
                     for _ in range(6)]
            for crop, key in picks:
                one_hot = [torch.zeros(n_keys) for _ in range(crops)]
                one_hot[crop][key] = 1.0
                expected = family.merge_patch_scores(model, one_hot, [enc])[0].nonzero().flatten().tolist()
                perturbed = dict(enc)
                perturbed["pixel_values"] = _perturb_patch(fam, model, pixels, crop, key, n_keys)
                if perturbed["pixel_values"] is None:  # the [CLS] key: no pixels of its own
                    assert expected == []
                    continue
                with LMInputs(model) as cap2:
                    model(**perturbed)
                feats = cap2.kwargs["inputs_embeds"][0][visual]
                changed = ((feats - base).abs().amax(-1) > 1e-5).nonzero().flatten().tolist()
                assert changed == expected, (item.id, crop, key)
    finally:
        handle.remove()
        for h in hooks:
            h.remove()


def _perturb_patch(fam, model, pixels, crop, key, n_keys):
    """pixel_values with the pixels of key `key` of crop `crop` (in the attention layer's order) changed."""
    out = pixels.clone()
    if fam.name.startswith("qwen"):  # one row of flattened patches per key, in the tower's (raster) order
        out[key] += 3.0
        return out
    vc = model.config.vision_config
    patch = vc.patch_size[0] if isinstance(vc.patch_size, (list, tuple)) else vc.patch_size
    size = vc.image_size[0] if isinstance(vc.image_size, (list, tuple)) else vc.image_size
    side = size // patch
    key -= n_keys - side * side  # a leading [CLS] key
    if key < 0:
        return None
    r, c = divmod(key, side)
    view = out.flatten(0, out.dim() - 4)  # (crops, C, H, W), a view of `out`
    view[crop, :, r * patch:(r + 1) * patch, c * patch:(c + 1) * patch] += 3.0
    return out


# -- Qwen3-VL: deepstack with pruning inside the language model --------------------------------------------------
@pytest.fixture(scope="module")
def qwen3_deep(tmp_path_factory):
    """Qwen3-VL with 3 decoder layers and one deepstack level (added after layer 0): K = 1, 2 are valid."""
    from sgl_cli.engine.backends.transformers import load_model
    from sgl_cli.engine.preset import ModelSpec

    paths = build_family("qwen3_vl", tmp_path_factory.mktemp("qwen3-deep"), deepstack=(0,), layers=3)
    return SimpleNamespace(small=load_model(ModelSpec(str(paths["small"]), dtype="float32"), "small"),
                           large=load_model(ModelSpec(str(paths["large"]), dtype="float32"), "large"))


@torch.no_grad()
def reference_qwen3_at_layer(model, enc, kept, k: int, max_new: int, eos) -> list[int]:
    """Greedy without a cache, the decoder layers run by hand: the model's own merged inputs, its deepstack
    features added after their layers (all before k here), the unkept visual columns dropped before layer k."""
    with LMInputs(model) as cap:
        model(**enc)
    kw = cap.kwargs
    lm = model.model.language_model
    visual = enc["input_ids"][0] == model.config.image_token_id
    keep = ~visual
    keep[visual.nonzero()[kept, 0]] = True
    embeds, pos = kw["inputs_embeds"], kw["position_ids"]
    masks, deep = kw["visual_pos_masks"], kw["deepstack_visual_embeds"]
    assert len(deep) <= k  # every deepstack layer runs before the pruning
    out: list[int] = []
    for _ in range(max_new):
        rope = pos[1:] if pos.shape[0] == 4 else pos
        cos, sin = lm.rotary_emb(embeds, rope)
        h, col = embeds, keep
        for idx, layer in enumerate(lm.layers):
            if idx == k:
                h, cos, sin = h[:, col], cos[:, col], sin[:, col]
            h = layer(h, attention_mask=None, position_embeddings=(cos, sin), position_ids=None,
                      use_cache=False)
            if idx < len(deep):
                h = lm._deepstack_process(h, masks, deep[idx])
        token = int(model.lm_head(lm.norm(h[:, -1])).argmax(-1))
        out.append(token)
        if token in eos:
            break
        embeds = torch.cat([embeds, model.get_input_embeddings()(torch.tensor([[token]]))], dim=1)
        pos = torch.cat([pos, pos[..., -1:] + 1], dim=-1)
        masks = torch.cat([masks, torch.zeros((1, 1), dtype=torch.bool)], dim=1)
        keep = torch.cat([keep, torch.tensor([True])])
    return out


@pytest.mark.parametrize("k", [1, 2])
def test_qwen3_deepstack_then_prune_inside_the_lm(qwen3_deep, tmp_path, k):
    imgs = make_images(tmp_path, sizes=((168, 280), (336, 224)))
    rows = [{"id": f"q{i}", "image": p.name, "question": "What is red?"} for i, p in enumerate(imgs)]
    items = list(read_items(write_jsonl(tmp_path / "b.jsonl", rows)))
    fam = SimpleNamespace(small=qwen3_deep.small, large=qwen3_deep.large)
    works = run_works(engine(fam, retain=0.25, prune_layer=k, batch_size=2), items)
    for item, w in zip(items, works):
        enc = encode(fam.large.processor, item)
        ref = reference_qwen3_at_layer(fam.large.model, enc, w.large.kept, k, MAX_NEW, fam.large.eos_ids)
        assert w.large.tokens == ref


def test_qwen3_prune_layer_inside_the_deepstack_layers_fails_clearly(fam, items):
    if fam.variant != "qwen3_vl":
        pytest.skip("Qwen3-VL only")
    recs = engine(fam, retain=0.25, prune_layer=1).process(items[:1])  # deepstack after layers 0 and 1
    assert recs[0]["answer"] is None
    assert "deepstack features after decoder layers 0..1" in recs[0]["error"]


# -- unsupported ---------------------------------------------------------------------------------------------------
def test_unsupported_family_lists_the_supported_ones():
    from sgl_cli.engine.errors import ModelLoadError
    from sgl_cli.engine.families import family_for

    model = SimpleNamespace(config=SimpleNamespace(model_type="gemma3"))
    with pytest.raises(ModelLoadError) as exc:
        family_for(model)
    msg = str(exc.value)
    assert "'gemma3' is not supported" in msg
    for t in FAMILIES:
        assert t in msg
