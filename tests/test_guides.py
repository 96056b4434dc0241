"""Guides (cls, fastv, random; sgl for comparison) checked against independent references.

- cls: the vision tower's attention in the layer feeding the merger, recomputed here by hand from the inputs
  of that attention module (captured with a forward hook on a separately loaded copy, one image per call),
  summed per 2x2 merge group and put back in raster order (Qwen2.5-VL's window permutation undone here).
- fastv: eager `output_attentions` of the large model at layer K-1, last prompt row, mean over heads; the
  answer against a hand-run, cache-free decoder that drops tokens before layer K.
- random: batch-size independent, seeded, `n_keep` tokens.
- every guide at retain 1.0 equals plain `generate`; a preset with only `large` runs the single-model guides;
  no hooks or attention backends are left behind.
"""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch
import yaml
from transformers import AutoModelForImageTextToText

from sgl_cli.engine.io.formats import read_items
from tests.conftest import analyze, make_images, write_jsonl
from tests.test_engine import _encode
from tests.test_prune_layer import reference_generate

SUFFIX = "Answer with one word."
MAX_NEW = 5
SINGLE_MODEL_GUIDES = ("cls", "fastv", "random")


# -- fixtures ---------------------------------------------------------------------------------------------------
def _load(path):
    from sgl_cli.engine.backends.transformers import load_model
    from sgl_cli.engine.preset import ModelSpec

    return load_model(ModelSpec(str(path), dtype="float32"), "small" if path.name == "small" else "large")


def _eager(path):
    return AutoModelForImageTextToText.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()


@dataclasses.dataclass
class Pair:
    paths: dict
    small: object
    large: object
    eager_large: object

    def engine(self, with_small: bool = False, **settings):
        from sgl_cli.engine.pipeline.engine import Engine
        from sgl_cli.engine.preset import Settings

        base = dict(threshold=None, max_new_tokens=MAX_NEW, prompt_suffix=SUFFIX)
        base.update(settings)
        return Engine(Settings(**base), self.small if with_small else None, self.large)


@pytest.fixture(scope="module")
def qwen2(tiny_pair):
    """The tiny Qwen2-VL pair: a 2-layer large model (so FastV's default K = 2 is the last layer)."""
    return Pair(tiny_pair, _load(tiny_pair["small"]), _load(tiny_pair["large"]), _eager(tiny_pair["large"]))


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """A Qwen2-VL pair whose large model has 4 layers, so K = 1, 2, 3 have layers on both sides."""
    from sgl_cli.engine.builtin.pair import TINY_SPEC, LMSize, PairSpec, build_pair

    spec = PairSpec(small=TINY_SPEC.small, large=LMSize(128, 4, 4, 2, 256), vision_embed=32)
    paths = build_pair(spec, tmp_path_factory.mktemp("deep-guides"))
    return Pair(paths, _load(paths["small"]), _load(paths["large"]), _eager(paths["large"]))


@pytest.fixture(scope="module")
def qwen25(tmp_path_factory):
    """The tiny pair as Qwen2.5-VL: windowed vision attention, the tower runs in window-permuted order."""
    from sgl_cli.engine.builtin.pair import TINY_SPEC, build_pair

    paths = build_pair(dataclasses.replace(TINY_SPEC, arch="qwen2_5_vl"), tmp_path_factory.mktemp("q25-guides"))
    pair = Pair(paths, _load(paths["small"]), _load(paths["large"]), _eager(paths["large"]))
    assert pair.large.model.config.model_type == "qwen2_5_vl"
    return pair


@pytest.fixture
def items(tmp_path):
    """Three non-square images of different sizes (different visual-token counts)."""
    imgs = make_images(tmp_path, sizes=((168, 280), (336, 224), (224, 168)))
    questions = ["What color is the square?", "How many circles are there?", "What shape is red?"]
    rows = [{"id": f"q{i}", "image": p.name, "question": q} for i, (p, q) in enumerate(zip(imgs, questions))]
    return list(read_items(write_jsonl(tmp_path / "batch.jsonl", rows)))


def run_works(eng, items):
    """The engine's own path (encode, then the large stage with the engine's guide); errors are raised."""
    with torch.inference_mode():
        works = analyze(eng, items)
        assert all(w.error is None for w in works), [w.error for w in works]
        eng.large_pass(works, eng.large_inputs(works))
    return works


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    assert a.shape == ref.shape, (a.shape, ref.shape)
    return float((a.double() - ref.double()).abs().max() / ref.double().abs().max())


def ref_top_k(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Top floor(n * ratio) (at least 1) indices, ties to the earlier token, in sequence order."""
    k = max(1, math.floor(len(scores) * ratio + 1e-9))
    return torch.sort(torch.sort(scores, descending=True, stable=True).indices[:k]).values


def plain_generate(loaded, item) -> str:
    enc = _encode(loaded, item, SUFFIX)
    with torch.no_grad():
        out = loaded.model.generate(**enc, max_new_tokens=MAX_NEW, do_sample=False)
    return loaded.processor.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


# -- 1. cls -----------------------------------------------------------------------------------------------------
def window_order(rows: int, cols: int, size: int) -> list[int]:
    """Raster indices of a rows x cols grid of merged tokens, listed window by window (size x size windows in
    raster order, raster order inside each; edge windows are smaller): the order the Qwen2.5-VL tower runs in."""
    order = []
    for wr in range(0, rows, size):
        for wc in range(0, cols, size):
            for r in range(wr, min(wr + size, rows)):
                order.extend(r * cols + c for c in range(wc, min(wc + size, cols)))
    return order


@torch.no_grad()
def cls_reference(model, enc) -> tuple[torch.Tensor, bool]:
    """(N,) fp64 scores of one image's merged visual tokens in raster order, and whether the tower's order was
    permuted. The attention inputs of the layer feeding the merger are captured by a forward hook, q and k are
    recomputed with the module's own qkv and transformers' rotary function, and each key's attention is
    averaged over heads and all query rows of the image."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

    vision = model.model.visual
    cfg = model.config.vision_config
    full = getattr(cfg, "fullatt_block_indexes", None)
    module = vision.blocks[max(full) if full else len(vision.blocks) - 1].attn
    seen = []

    def hook(mod, args, kwargs, output):
        seen.append((args[0] if args else kwargs["hidden_states"], kwargs["cu_seqlens"],
                     kwargs["position_embeddings"]))

    handle = module.register_forward_hook(hook, with_kwargs=True)
    try:
        model.model.get_image_features(enc["pixel_values"], enc["image_grid_thw"])
    finally:
        handle.remove()
    ((hidden, cu, (cos, sin)),) = seen
    n = hidden.shape[0]
    q, k, _ = module.qkv(hidden).reshape(n, 3, module.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
    assert cu.tolist() == [0, n]  # one image: one attention segment in a full-attention layer
    q, k = q.transpose(0, 1).double(), k.transpose(0, 1).double()  # (heads, n, d)
    probs = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
    received = probs.mean(dim=(0, 1))  # (n,) per patch, in the tower's order
    merge = int(cfg.spatial_merge_size)
    groups = received.view(-1, merge * merge).sum(1)  # consecutive merge x merge patches form one token
    _, gh, gw = (int(v) for v in enc["image_grid_thw"][0])
    rows, cols = gh // merge, gw // merge
    if full is None:  # Qwen2-VL: the tower runs in raster order of the merged tokens
        return groups, False
    order = window_order(rows, cols, cfg.window_size // merge // cfg.patch_size)
    raster = torch.empty_like(groups)
    raster[torch.tensor(order)] = groups  # tower position j holds raster token order[j]
    return raster, order != list(range(rows * cols))


@pytest.mark.parametrize("arch", ["qwen2", "qwen25"])
def test_cls_scores_equal_hand_computed_vision_attention(arch, request, items):
    pair = request.getfixturevalue(arch)
    eng = pair.engine(guide="cls", retain=0.25, batch_size=2)
    two = items[:2]  # 168x280 and 336x224: non-square, different sizes, one vision-tower call for both
    works = run_works(eng, two)
    permuted = []
    for item, w in zip(two, works):
        ref, was_permuted = cls_reference(pair.eager_large, _encode(pair.large, item, SUFFIX))
        permuted.append(was_permuted)
        s = w.large.scores
        assert s.dtype == torch.float32 and s.shape == (int(w.encoded.visual.sum()),)
        err = rel_err(s, ref)
        print(f"cls {arch} {item.id}: max rel err {err:.2e}")
        assert err < 1e-4
        # The kept tokens are the reference's top 25%, in order.
        assert torch.equal(w.large.kept, ref_top_k(ref, 0.25))
    if arch == "qwen25":
        assert all(permuted)  # the window permutation is not the identity for these images
    # The answer is the large model's from those tokens, pruned before the LM (K = 0).
    for item, w in zip(two, works):
        ref_tokens = reference_generate(pair.large, SimpleNamespace(item=item, kept=w.large.kept), 0, MAX_NEW)
        assert w.large.tokens == ref_tokens


def test_cls_batch_equals_batch_one(qwen25, items):
    single = [run_works(qwen25.engine(guide="cls", retain=0.25), [it])[0] for it in items]
    many = run_works(qwen25.engine(guide="cls", retain=0.25, batch_size=3), items)
    for a, b in zip(single, many):
        assert torch.allclose(a.large.scores, b.large.scores, rtol=1e-5, atol=1e-7)
        assert torch.equal(a.large.kept, b.large.kept) and a.large.tokens == b.large.tokens


# -- 2. fastv ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def fastv_reference(eager_model, enc, k: int) -> torch.Tensor:
    """(N,) fp64: eager attention of layer k-1 from the last prompt row, averaged over heads, at visual keys."""
    out = eager_model(**enc, output_attentions=True)
    attn = out.attentions[k - 1][0, :, -1, :]  # (heads, S)
    visual = enc["input_ids"][0] == eager_model.config.image_token_id
    return attn.double().mean(0)[visual]


@pytest.mark.parametrize("prune_layer,k", [(0, 2), (1, 1), (3, 3)])
def test_fastv_scores_and_answer_equal_eager_reference(deep, items, prune_layer, k):
    eng = deep.engine(guide="fastv", retain=0.25, prune_layer=prune_layer, batch_size=3, max_new_tokens=6)
    assert eng.prune_layer() == k
    works = run_works(eng, items)
    for item, w in zip(items, works):
        ref = fastv_reference(deep.eager_large, _encode(deep.large, item, SUFFIX), k)
        err = rel_err(w.large.scores, ref)
        print(f"fastv K={k} {item.id}: max rel err {err:.2e}")
        assert err < 1e-4
        kept = ref_top_k(ref, 0.25)
        assert torch.equal(w.large.kept, kept)
        # Hand-run, cache-free decoder that drops the unkept tokens before layer k.
        assert w.large.tokens == reference_generate(deep.large, SimpleNamespace(item=item, kept=kept), k, 6)
    # And the engine's own PruneAtLayer with the fixed keep mask from the reference scores.
    inputs = eng.large_inputs(works)
    refs = [ref_top_k(fastv_reference(deep.eager_large, _encode(deep.large, it, SUFFIX), k), 0.25) for it in items]
    with torch.inference_mode():
        gen = eng.large.generate(works, inputs, refs, k, [6] * len(works))
    assert gen.tokens == [w.large.tokens for w in works]
    recs = [eng.record(w, 0.0) for w in works]
    for r in recs:
        assert r["guide"] == "fastv" and r["prune_layer"] == k and r["error"] is None
        assert r["retained_tokens"] == max(1, math.floor(0.25 * r["visual_tokens"]))


def test_fastv_batch_of_three_equals_batch_of_one(deep, items):
    one = [run_works(deep.engine(guide="fastv", retain=0.25), [it])[0] for it in items]
    many = run_works(deep.engine(guide="fastv", retain=0.25, batch_size=3), items)
    assert len({int(w.encoded.visual.sum()) for w in one}) == 3
    for a, b in zip(one, many):
        assert torch.allclose(a.large.scores, b.large.scores, rtol=1e-4, atol=1e-7)
        assert torch.equal(a.large.kept, b.large.kept)
        assert a.large.tokens == b.large.tokens
    recs_one = [r for it in items for r in deep.engine(guide="fastv", retain=0.25).process([it])]
    recs_many = deep.engine(guide="fastv", retain=0.25, batch_size=3).process(items)
    assert [r["answer"] for r in recs_one] == [r["answer"] for r in recs_many]


def test_fastv_prunes_at_layer_k(deep, items):
    """Layers >= K compute only the kept tokens (prefill), layers < K the whole prompt."""
    eng = deep.engine(guide="fastv", retain=0.25)  # K = 2
    lengths = {}
    def record(i):
        def hook(module, args, output):  # the layer's output: what it computed; its first call is the prefill
            lengths.setdefault(i, (output[0] if isinstance(output, tuple) else output).shape[1])
        return hook

    handles = [layer.register_forward_hook(record(i))
               for i, layer in enumerate(deep.large.model.get_decoder().layers)]
    try:
        (w,) = run_works(eng, items[:1])
    finally:
        for h in handles:
            h.remove()
    full = len(w.encoded.visual)
    pruned = full - int(w.encoded.visual.sum()) + len(w.large.kept)
    assert lengths == {0: full, 1: full, 2: pruned, 3: pruned}


def test_fastv_at_the_last_layer_fails_clearly(deep, items):
    (rec,) = deep.engine(guide="fastv", prune_layer=4).process(items[:1])
    assert rec["answer"] is None and "1..3" in rec["error"]
    _assert_clean(deep.large.model)


# -- 3. random --------------------------------------------------------------------------------------------------
def test_random_guide_is_seeded_and_batch_independent(qwen2, items):
    one = [run_works(qwen2.engine(guide="random", retain=0.3), [it])[0] for it in items]
    many = run_works(qwen2.engine(guide="random", retain=0.3, batch_size=3), items)
    other = run_works(qwen2.engine(guide="random", retain=0.3, batch_size=3, seed=1), items)
    for a, b, c in zip(one, many, other):
        n = int(a.encoded.visual.sum())
        k = max(1, math.floor(n * 0.3))
        assert len(a.large.kept) == k and len(c.large.kept) == k
        assert torch.equal(a.large.kept, b.large.kept)
        assert torch.equal(a.large.kept, torch.sort(a.large.kept).values) and len(set(a.large.kept.tolist())) == k
        assert 0 <= int(a.large.kept.min()) and int(a.large.kept.max()) < n
        assert a.large.tokens == b.large.tokens
    assert any(not torch.equal(a.large.kept, c.large.kept) for a, c in zip(one, other))
    # Not a fixed pattern: the choice differs between items of the same size too (seeded by item).
    assert not torch.equal(one[0].large.kept[:5], torch.arange(5))
    # The answer is the large model's from the chosen tokens (pre-LM pruning at prune_layer 0).
    for item, w in zip(items, many):
        assert w.large.tokens == reference_generate(qwen2.large, SimpleNamespace(item=item, kept=w.large.kept), 0,
                                                    MAX_NEW)


def test_random_guide_respects_prune_layer(deep, items):
    (w,) = run_works(deep.engine(guide="random", retain=0.2, prune_layer=2), items[:1])
    assert w.large.tokens == reference_generate(deep.large, SimpleNamespace(item=items[0], kept=w.large.kept), 2,
                                                MAX_NEW)


@pytest.mark.parametrize("retain", [0.001, 0.5])
def test_random_guide_n_keep(qwen2, items, retain):
    recs = qwen2.engine(guide="random", retain=retain, batch_size=3).process(items)
    for r in recs:
        assert r["retained_tokens"] == max(1, math.floor(r["visual_tokens"] * retain))


# -- 4. retain 1.0 ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("guide", ["sgl", "cls", "fastv", "random"])
@pytest.mark.parametrize("arch", ["qwen2", "deep", "qwen25"])
def test_retain_one_equals_plain_generate(arch, guide, request, items):
    pair = request.getfixturevalue(arch)
    eng = pair.engine(with_small=guide == "sgl", guide=guide, retain=1.0, batch_size=3)
    recs = eng.process(items)
    for item, r in zip(items, recs):
        assert r["error"] is None, r["error"]
        assert r["guide"] == guide and r["exit"] == "large"
        assert r["retained_tokens"] == r["visual_tokens"]
        assert r["answer"] == plain_generate(pair.large, item)
        if guide == "fastv":  # K = 2, or L - 1 when the model is shorter: one layer must see the kept tokens
            assert r["prune_layer"] == min(2, pair.large.num_layers - 1)


# -- 5. a preset naming only `large` ----------------------------------------------------------------------------
def _large_only_preset(folder, pair, **settings):
    data = {"name": "large-only", "large": {"model": str(pair["large"]), "dtype": "float32", "attn": "sdpa"},
            "threshold": None, "max_new_tokens": MAX_NEW, "prompt_suffix": SUFFIX}
    data.update(settings)
    path = folder / "large-only.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_preset_without_small_parses_and_keeps_a_closed_schema(tmp_path, tiny_pair):
    from sgl_cli.engine.errors import PresetError
    from sgl_cli.engine.preset import load_preset

    p = load_preset(str(_large_only_preset(tmp_path, tiny_pair)))
    assert p.small is None and p.large.model == str(tiny_pair["large"])
    assert p.to_dict()["small"] is None
    p2 = load_preset(str(_large_only_preset(tmp_path, tiny_pair, small=None)))
    assert p2.small is None
    with pytest.raises(PresetError, match="unknown key 'smal'"):
        load_preset(str(_large_only_preset(tmp_path, tiny_pair, smal={"model": "x"})))
    with pytest.raises(PresetError, match="unknown key small.'modle'"):
        load_preset(str(_large_only_preset(tmp_path, tiny_pair, small={"modle": "x"})))
    bad = tmp_path / "no-large.yaml"
    bad.write_text(yaml.safe_dump({"name": "x", "small": {"model": str(tiny_pair["small"])}}))
    with pytest.raises(PresetError, match="missing key 'large'"):
        load_preset(str(bad))


@pytest.mark.parametrize("guide", SINGLE_MODEL_GUIDES)
def test_large_only_preset_runs_single_model_guides(tmp_path, tiny_pair, items, guide):
    from sgl_cli.engine.pipeline.engine import Engine
    from sgl_cli.engine.preset import load_preset

    preset = load_preset(str(_large_only_preset(tmp_path, tiny_pair))).with_settings(guide=guide, threshold=0.0,
                                                                                     retain=0.25)
    eng = Engine.from_preset(preset)
    assert eng.small is None
    recs = eng.process(items)
    for r in recs:
        assert r["error"] is None, r["error"]
        assert r["guide"] == guide and r["exit"] == "large"  # threshold 0 never exits without a small model
        for key in ("exit_score", "confidence", "consistency", "small_answer"):
            assert r[key] is None, key
        assert r["ms"]["small"] == 0.0
        assert r["retained_tokens"] == max(1, math.floor(0.25 * r["visual_tokens"]))


def test_large_only_preset_refuses_the_sgl_guide(tmp_path, tiny_pair):
    from sgl_cli.engine.pipeline.engine import Engine
    from sgl_cli.engine.errors import ModelLoadError
    from sgl_cli.engine.preset import load_preset

    preset = load_preset(str(_large_only_preset(tmp_path, tiny_pair)))
    assert preset.settings.guide == "sgl"
    with pytest.raises(ModelLoadError, match="names no small model.*sgl guide"):
        Engine.from_preset(preset)


@pytest.mark.parametrize("guide", SINGLE_MODEL_GUIDES)
def test_sgl_run_with_a_large_only_preset(tmp_path, tiny_pair, items, guide):
    import json

    from typer.testing import CliRunner

    from sgl_cli.cli import app

    preset = _large_only_preset(tmp_path, tiny_pair, guide=guide, threshold=0.0)
    src = tmp_path / "batch.jsonl"
    out = tmp_path / f"{guide}.jsonl"
    res = CliRunner().invoke(app, ["run", str(src), "-p", str(preset), "-o", str(out), "-q"])
    assert res.exit_code == 0, res.output
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(recs) == len(items)
    for r in recs:
        assert r["error"] is None and r["guide"] == guide and r["exit"] == "large"
        for key in ("exit_score", "confidence", "consistency", "small_answer"):
            assert r[key] is None, key
    saved = yaml.safe_load(out.with_name(f"{guide}.preset.yaml").read_text())
    assert saved["small"] is None and saved["guide"] == guide


def test_sgl_run_with_a_large_only_preset_and_the_sgl_guide_fails_clearly(tmp_path, tiny_pair, items):
    from typer.testing import CliRunner

    from sgl_cli.cli import app

    preset = _large_only_preset(tmp_path, tiny_pair)
    res = CliRunner().invoke(app, ["run", str(tmp_path / "batch.jsonl"), "-p", str(preset), "-q"])
    assert res.exit_code == 2
    assert "sgl guide" in res.output and "no small model" in res.output


# -- 6. nothing left behind -------------------------------------------------------------------------------------
def _assert_clean(model, text_attn="sdpa", vision_attn="sdpa"):
    from sgl_cli.engine.core import capture

    for name, module in model.named_modules():
        assert not module._forward_pre_hooks, name
        assert not module._forward_hooks, name
        assert module not in capture.watched_modules(), name
        cfg = getattr(module, "config", None)
        assert not str(getattr(cfg, "_attn_implementation", "")).startswith("sgl_capture"), name
    assert model.config.get_text_config()._attn_implementation == text_attn
    assert model.config.vision_config._attn_implementation == vision_attn


@pytest.mark.parametrize("guide", ["sgl", "cls", "fastv", "random"])
def test_no_hooks_or_backends_left_behind(deep, qwen25, items, guide, monkeypatch):
    for pair in (deep, qwen25):
        eng = pair.engine(with_small=guide == "sgl", guide=guide, retain=0.25, prune_layer=1)
        recs = eng.process(items)
        assert all(r["error"] is None for r in recs)
        _assert_clean(pair.large.model)
        _assert_clean(pair.small.model)

    # Also when a stage fails half-way, with the hooks in place: the items fail, the model is restored.
    import sgl_cli.engine.backends.transformers as hf_backend
    from sgl_cli.engine.families import QwenVL

    def boom(*a, **k):
        raise RuntimeError("boom")

    real_features = QwenVL.image_features

    def features_then_boom(self, model, encs):
        real_features(self, model, encs)  # the vision tower ran (with the cls capture active), then it fails
        raise RuntimeError("boom")

    phases = {"greedy": [(hf_backend, "greedy", boom)],  # both models' generation
              "vision": [(QwenVL, "image_features", features_then_boom)]}
    for phase, patches in phases.items():
        with monkeypatch.context() as mp:
            for target, name, fn in patches:
                mp.setattr(target, name, fn)
            eng = deep.engine(with_small=guide == "sgl", guide=guide, retain=0.25, prune_layer=1)
            recs = eng.process(items[:1])
        assert "boom" in (recs[0]["error"] or ""), (phase, recs[0])
        _assert_clean(deep.large.model)
        _assert_clean(deep.small.model)
