"""Pruning inside the language model (prune layer K > 0) against a hand-run, cache-free reference."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from sgl_cli.engine.io.images import load_image
from sgl_cli.engine.io.formats import read_items
from tests.conftest import analyze, make_images, write_jsonl


@pytest.fixture(scope="module")
def deep_engine_factory(tmp_path_factory):
    """A pair whose large model has 4 layers, so that K = 2 has layers on both sides."""
    from sgl_cli.engine.builtin.pair import TINY_SPEC, LMSize, PairSpec, build_pair
    from sgl_cli.engine.pipeline.engine import Engine
    from sgl_cli.engine.backends.transformers import load_model
    from sgl_cli.engine.preset import ModelSpec, Settings

    spec = PairSpec(small=TINY_SPEC.small, large=LMSize(128, 4, 4, 2, 256), vision_embed=32)
    pair = build_pair(spec, tmp_path_factory.mktemp("deep"))
    small = load_model(ModelSpec(str(pair["small"]), dtype="float32"), "small")
    large = load_model(ModelSpec(str(pair["large"]), dtype="float32"), "large")

    def make(**settings):
        base = dict(threshold=None, max_new_tokens=6, prompt_suffix="Answer with one word.")
        base.update(settings)
        return Engine(Settings(**base), small, large)

    return make


@pytest.fixture
def items(tmp_path):
    imgs = make_images(tmp_path)
    rows = [{"image": p.name, "question": q} for p, q in zip(imgs, ["What is red?", "Count the dots.", "Where?"])]
    return list(read_items(write_jsonl(tmp_path / "b.jsonl", rows)))


@torch.no_grad()
def reference_generate(loaded, work, k: int, max_new: int) -> list[int]:
    """Greedy decoding without a cache, running the decoder layers by hand, dropping tokens before layer k."""
    model = loaded.model
    lm = model.get_decoder()
    enc = loaded.family.encode(loaded.processor, load_image(work.item), f"{work.item.question}\nAnswer with one word.")
    ids = enc["input_ids"][0]
    visual = ids == model.config.image_token_id
    embeds = lm.embed_tokens(ids).clone()
    embeds[visual] = torch.cat(model.model.get_image_features(enc["pixel_values"], enc["image_grid_thw"]).pooler_output)
    pos, _ = model.model.get_rope_index(enc["input_ids"], mm_token_type_ids=enc["mm_token_type_ids"],
                                        image_grid_thw=enc["image_grid_thw"])
    pos = pos[:, 0]
    keep = ~visual
    keep[visual.nonzero()[work.kept, 0]] = True
    out: list[int] = []
    for _ in range(max_new):
        cos, sin = lm.rotary_emb(embeds[None], pos[:, None])
        x = embeds[None]
        for idx, layer in enumerate(lm.layers):
            if idx == k:
                x, cos, sin = x[:, keep], cos[:, keep], sin[:, keep]
            x = layer(x, attention_mask=None, position_embeddings=(cos, sin), position_ids=None,
                      use_cache=False)
        token = int(model.lm_head(lm.norm(x[:, -1])).argmax(-1))
        out.append(token)
        if token in loaded.eos_ids:
            break
        embeds = torch.cat([embeds, lm.embed_tokens(torch.tensor([token]))])
        pos = torch.cat([pos, pos[:, -1:] + 1], dim=1)
        keep = torch.cat([keep, torch.tensor([True])])
    return out


def _large_tokens(engine, items, monkeypatch):
    import sgl_cli.engine.backends.transformers as engine_mod  # the large model's generation: its backend's

    seen = []
    real = engine_mod.greedy

    def spy(model, *a, **kw):
        gen = real(model, *a, **kw)
        if model is engine.large.model:
            seen.extend(gen.tokens)
        return gen

    monkeypatch.setattr(engine_mod, "greedy", spy)
    records = engine.process(items)
    monkeypatch.setattr(engine_mod, "greedy", real)
    return seen, records


@pytest.mark.parametrize("k", [1, 2, 3])
def test_prune_at_layer_k_equals_reference(deep_engine_factory, items, monkeypatch, k):
    eng = deep_engine_factory(prune_layer=k, retain=0.25)
    tokens, records = _large_tokens(eng, items[:1], monkeypatch)
    (work,) = analyze(eng, items[:1])
    kept = torch.sort(torch.sort(work.small.importance, descending=True, stable=True).indices[
        : max(1, math.floor(0.25 * len(work.small.importance)))]).values
    assert tokens[0] == reference_generate(eng.large, SimpleNamespace(item=work.item, kept=kept), k, 6)
    rec = records[0]
    assert rec["prune_layer"] == k
    assert rec["token_ratio"] == pytest.approx((k + (4 - k) * rec["retained_tokens"] / rec["visual_tokens"]) / 4,
                                               abs=1e-6)


def test_prune_layer_zero_via_hooks_equals_pre_lm_pruning(deep_engine_factory, items, monkeypatch):
    """The hook path at K = 0 and the pre-LM path (features gathered before the LM) give the same tokens."""
    from sgl_cli.engine.core import generate
    from sgl_cli.engine.core.prune import PruneAtLayer

    eng = deep_engine_factory(prune_layer=0, retain=0.25)
    pre_lm, _ = _large_tokens(eng, items, monkeypatch)
    works = analyze(eng, items)
    m = eng.large
    rows = m.family.rows(m.model, [w.encoded.large for w in works])
    batch = generate.collate(rows, m.pad_id, "cpu")
    keep = torch.zeros_like(batch.input_ids, dtype=torch.bool)
    for i, (w, row) in enumerate(zip(works, rows)):
        kept = torch.sort(torch.sort(w.small.importance, descending=True, stable=True).indices[
            : max(1, math.floor(0.25 * len(w.small.importance)))]).values
        off = keep.shape[1] - len(row.ids)
        keep[i, off:] = ~w.encoded.visual
        keep[i, off + w.encoded.visual.nonzero()[kept, 0]] = True
    with torch.no_grad(), PruneAtLayer(m.model, 0, keep):
        hooked = generate.greedy(m.model, batch, [6] * len(works), m.eos_ids, m.pad_id)
    assert hooked.tokens == pre_lm


def test_prune_layer_l_equals_unpruned(deep_engine_factory, items):
    eng = deep_engine_factory(prune_layer=4, retain=0.09)
    for item, rec in zip(items, eng.process(items)):
        enc = eng.large.family.encode(eng.large.processor, load_image(item), f"{item.question}\nAnswer with one word.")
        with torch.no_grad():
            out = eng.large.model.generate(**enc, max_new_tokens=6, do_sample=False)
        text = eng.large.processor.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        assert rec["answer"] == text.strip()
        assert rec["token_ratio"] == 1.0


def test_prune_layer_batch_equals_batch_one(deep_engine_factory, items):
    one = [r for it in items for r in deep_engine_factory(prune_layer=2, retain=0.25).process([it])]
    many = deep_engine_factory(prune_layer=2, retain=0.25, batch_size=3).process(items)
    assert len({r["visual_tokens"] for r in one}) == 3
    assert [r["answer"] for r in one] == [r["answer"] for r in many]
    assert [r["retained_tokens"] for r in one] == [r["retained_tokens"] for r in many]


def test_hooks_are_removed(deep_engine_factory, items):
    eng = deep_engine_factory(prune_layer=2, retain=0.25)
    eng.process(items[:1])
    for layer in eng.large.model.get_decoder().layers:
        assert not layer._forward_pre_hooks


def test_prune_layer_beyond_model_is_refused(deep_engine_factory):
    from sgl_cli.engine.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="beyond the large model's 4 layers"):
        deep_engine_factory(prune_layer=5)
