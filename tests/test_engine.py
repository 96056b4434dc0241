"""The method, checked against independent references built from plain transformers calls."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForImageTextToText

from sgl_cli.engine.guides.base import n_keep
from sgl_cli.engine.io.images import load_image
from sgl_cli.engine.io.formats import read_items
from tests.conftest import analyze


def _encode(loaded, item, suffix="Answer with one word."):
    """The prompt as a user would build it with the processor's own chat template (no sgl code)."""
    proc = loaded.processor
    messages = [{"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": f"{item.question}\n{suffix}"}]}]
    text = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return proc(text=[text], images=[load_image(item)], return_tensors="pt")


@pytest.fixture(scope="module")
def eager_small(tiny_pair):
    return AutoModelForImageTextToText.from_pretrained(tiny_pair["small"], attn_implementation="eager").eval()


def reference_importance(model, enc, max_new_tokens=5):
    """SGP from eager `output_attentions` of a plain generate: prompt rows after the image + every decode row."""
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, output_attentions=True,
                             return_dict_in_generate=True, output_scores=True)
    ids = enc["input_ids"][0]
    visual = ids == model.config.image_token_id
    last = int(visual.nonzero().max())
    s = len(ids)
    total = torch.zeros(s, dtype=torch.float64)
    for step, layers in enumerate(out.attentions):
        for attn in layers:  # (1, heads, q, k)
            rows = attn[0, :, last + 1 :, :s] if step == 0 else attn[0, :, -1:, :s]
            total += rows.double().sum(dim=(0, 1))
    return total[visual], out


def test_retain_one_equals_plain_generate_on_large(engine_factory, batch):
    eng = engine_factory(retain=1.0, threshold=None)
    items = list(read_items(batch))
    records = eng.process(items)
    for item, rec in zip(items, records):
        assert rec["error"] is None
        enc = _encode(eng.large, item)
        with torch.no_grad():
            out = eng.large.model.generate(**enc, max_new_tokens=5, do_sample=False)
        expected = eng.large.processor.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        assert rec["answer"] == expected.strip()
        assert rec["exit"] == "large"
        assert rec["retained_tokens"] == rec["visual_tokens"] == int(
            (enc["input_ids"] == eng.large.image_token_id).sum())


def test_greedy_tokens_equal_generate(engine_factory, batch, monkeypatch):
    """Token for token (not only decoded text) for the large model's generation at retain 1.0."""
    import sgl_cli.engine.backends.transformers as hf_backend

    seen = []
    real = hf_backend.greedy

    def spy(model, *a, **k):
        gen = real(model, *a, **k)
        seen.append((model, gen))
        return gen

    monkeypatch.setattr(hf_backend, "greedy", spy)  # both models' generation: their backend's
    eng = engine_factory(retain=1.0, threshold=None, max_new_tokens=7)
    item = next(read_items(batch))
    eng.process([item])
    (large_gen,) = [g for m, g in seen if m is eng.large.model]
    (small_gen,) = [g for m, g in seen if m is eng.small.model]
    enc = _encode(eng.large, item)
    for loaded, gen in ((eng.large, large_gen), (eng.small, small_gen)):
        with torch.no_grad():
            out = loaded.model.generate(**enc, max_new_tokens=7, do_sample=False)
        assert gen.tokens[0] == out[0, enc["input_ids"].shape[1]:].tolist()


def test_importance_equals_eager_reference(engine_factory, eager_small, batch):
    eng = engine_factory()
    items = list(read_items(batch))
    works = analyze(eng, items)
    for item, w in zip(items, works):
        ref, _ = reference_importance(eager_small, _encode(eng.small, item))
        assert w.small.importance.dtype == torch.float32
        assert w.small.importance.shape == ref.shape
        rel = (w.small.importance.double() - ref).abs().max() / ref.abs().max()
        assert rel < 1e-5
        k = n_keep(len(ref), 0.09)
        assert set(torch.topk(w.small.importance, k).indices.tolist()) == set(torch.topk(ref, k).indices.tolist())


def test_importance_does_not_depend_on_attention_backend(engine_factory, eager_small, batch):
    """The capture wrapper delegates to the model's own backend: with eager, sdpa's numbers are reproduced."""
    from sgl_cli.engine.core.capture import ImportanceCapture

    assert eager_small.config.text_config._attn_implementation == "eager"
    with ImportanceCapture(eager_small, n_keys=4):
        assert eager_small.config.text_config._attn_implementation == "sgl_capture_eager"
    assert eager_small.config.text_config._attn_implementation == "eager"


def test_capture_leaves_nothing_behind(engine_factory, batch):
    from sgl_cli.engine.core import capture

    eng = engine_factory()
    eng.process(list(read_items(batch)))
    assert eng.small.model.config.text_config._attn_implementation == "sdpa"
    assert not any(m in capture.watched_modules() for m in eng.small.model.modules())


def test_capture_reads_nothing_back_from_the_device_per_layer(engine_factory, batch, monkeypatch):
    """Each layer's capture runs without a host read (each would stall a GPU once per layer and step): the span of
    marked rows comes from the host. Same scores as with the span read from the rows."""
    from sgl_cli.engine.core.capture import ImportanceCapture

    items = list(read_items(batch))
    eng = engine_factory(guide="sgl")
    expected = [w.small.importance for w in analyze(eng, items)]

    reads, observing = [], [False]
    for attr in ("__bool__", "__int__", "__float__", "item", "tolist", "nonzero", "cpu"):
        original = getattr(torch.Tensor, attr)

        def counted(self, *a, _original=original, _attr=attr, **k):
            if observing[0]:
                reads.append(_attr)
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, attr, counted)
    inner = ImportanceCapture._observe

    def watched(self, *args):
        observing[0] = True
        try:
            return inner(self, *args)
        finally:
            observing[0] = False

    monkeypatch.setattr(ImportanceCapture, "_observe", watched)
    got = [w.small.importance for w in analyze(eng, items)]
    monkeypatch.undo()
    assert reads == []
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_large_sees_top_k_in_order_with_original_positions(engine_factory, eager_small, batch):
    eng = engine_factory(retain=0.09, threshold=None)
    item = list(read_items(batch))[1]
    calls = []

    def hook(module, args, kwargs):
        calls.append({k: kwargs.get(k) for k in ("input_ids", "position_ids")})

    handle = eng.large.model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        (rec,) = eng.process([item])
    finally:
        handle.remove()

    enc = _encode(eng.large, item)
    ids = enc["input_ids"][0]
    visual = ids == eng.large.image_token_id
    ref, _ = reference_importance(eager_small, _encode(eng.small, item))
    k = max(1, math.floor(0.09 * len(ref)))
    assert rec["retained_tokens"] == k and rec["visual_tokens"] == len(ref)
    top = torch.sort(torch.topk(ref, k).indices).values
    keep_cols = (~visual).clone()
    keep_cols[visual.nonzero()[top, 0]] = True

    prefill = calls[0]
    assert prefill["input_ids"][0].tolist() == ids[keep_cols].tolist()
    full_pos, _ = eng.large.model.model.get_rope_index(
        enc["input_ids"], mm_token_type_ids=enc["mm_token_type_ids"], image_grid_thw=enc["image_grid_thw"])
    assert torch.equal(prefill["position_ids"][:, 0], full_pos[:, 0, keep_cols])
    # Generated tokens continue the unpruned numbering: last prompt position + 1, + 2, ...
    for step, call in enumerate(calls[1:], start=1):
        assert call["position_ids"][:, 0, 0].tolist() == [int(full_pos[0, 0, -1]) + step] * 3


def test_scores_equal_hand_computation(engine_factory, eager_small, batch):
    """confidence = geometric mean of token probs; consistency = product of teacher-forced probs with the top
    5% visual tokens; computed here from logits through an independent path (inputs_embeds, no sgl code)."""
    eng = engine_factory(consistency_retain=0.05, threshold=None)
    item = list(read_items(batch))[2]
    (w,) = analyze(eng, [item])
    small = eng.small.model
    enc = _encode(eng.small, item)
    ref, out = reference_importance(eager_small, enc)
    answer = out.sequences[0, enc["input_ids"].shape[1]:].tolist()
    assert w.small.tokens == answer
    probs = [torch.softmax(s[0].float(), -1)[t].item() for s, t in zip(out.scores, answer)]
    confidence = math.exp(sum(math.log(p) for p in probs) / len(probs))

    ids = enc["input_ids"][0]
    visual = ids == small.config.image_token_id
    k = max(1, math.floor(0.05 * len(ref)))
    keep = (~visual).clone()
    keep[visual.nonzero()[torch.topk(ref, k).indices, 0]] = True
    with torch.no_grad():
        embeds = small.get_input_embeddings()(ids).clone()
        feats = torch.cat(small.model.get_image_features(enc["pixel_values"], enc["image_grid_thw"]).pooler_output)
        embeds[visual] = feats
        pos, _ = small.model.get_rope_index(enc["input_ids"], mm_token_type_ids=enc["mm_token_type_ids"],
                                            image_grid_thw=enc["image_grid_thw"])
        pos = pos[:, 0, keep]
        fed = torch.tensor(answer[:-1], dtype=torch.long)
        embeds = torch.cat([embeds[keep], small.get_input_embeddings()(fed)])
        pos = torch.cat([pos, pos[:, -1:] + torch.arange(1, len(fed) + 1)], dim=1)
        logits = small(inputs_embeds=embeds[None], position_ids=pos[:, None]).logits[0]
    p = torch.softmax(logits[-len(answer):].float(), -1)
    consistency = math.prod(p[i, t].item() for i, t in enumerate(answer))

    (rec,) = eng.process([item])
    assert rec["confidence"] == pytest.approx(confidence, rel=1e-4, abs=1e-9)
    assert rec["consistency"] == pytest.approx(consistency, rel=1e-4, abs=1e-9)
    assert rec["exit_score"] == pytest.approx((confidence + consistency) / 2, rel=1e-4, abs=1e-9)


def _count_calls(model):
    calls = []
    handle = model.register_forward_pre_hook(lambda m, a, k: calls.append(k["input_ids"].shape[0]), with_kwargs=True)
    return calls, handle


def test_exit_skips_the_large_model(engine_factory, batch):
    eng = engine_factory(threshold=0.0)
    calls, handle = _count_calls(eng.large.model)
    try:
        records = eng.process(list(read_items(batch)))
    finally:
        handle.remove()
    assert calls == []
    for rec in records:
        assert rec["exit"] == "small" and rec["answer"] == rec["small_answer"]
        assert rec["retained_tokens"] == 0 and rec["ms"]["large"] == 0.0


def test_mixed_exit_decisions_follow_the_threshold(engine_factory, batch):
    items = list(read_items(batch))
    scores = [r["exit_score"] for r in engine_factory(threshold=None).process(items)]
    assert len(set(scores)) == len(scores)
    t = sorted(scores)[1]  # exits the two highest-scoring items
    eng = engine_factory(threshold=t)
    calls, handle = _count_calls(eng.large.model)
    try:
        records = eng.process(items)
    finally:
        handle.remove()
    for rec, s in zip(records, scores):
        assert rec["exit"] == ("small" if s >= t else "large")
        if rec["exit"] == "large":
            assert rec["retained_tokens"] == max(1, math.floor(0.09 * rec["visual_tokens"]))
    assert sum(r["exit"] == "large" for r in records) == 1
    assert calls and all(b == 1 for b in calls)


def test_batch_equals_batch_one(engine_factory, batch):
    items = list(read_items(batch))
    scores = [r["exit_score"] for r in engine_factory(threshold=None).process(items)]
    low, mid, _ = sorted(scores)
    t = (low + mid) / 2  # mixed exit decisions within the batch, clear of float rounding between batch sizes
    one = [r for it in items for r in engine_factory(threshold=t, batch_size=1).process([it])]
    many = engine_factory(threshold=t, batch_size=3).process(items)
    assert len({r["visual_tokens"] for r in one}) == 3  # three image sizes share the batch
    for a, b in zip(one, many):
        for key in ("answer", "exit", "small_answer", "visual_tokens", "retained_tokens", "error"):
            assert a[key] == b[key], key
        for key in ("exit_score", "confidence", "consistency"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-7), key


def test_batched_importance_equals_single(engine_factory, batch):
    items = list(read_items(batch))
    eng = engine_factory()
    single = [analyze(eng, [it])[0].small.importance for it in items]
    batched = [w.small.importance for w in analyze(eng, items)]
    for a, b in zip(single, batched):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
        k = n_keep(len(a), 0.09)
        assert set(torch.topk(a, k).indices.tolist()) == set(torch.topk(b, k).indices.tolist())
