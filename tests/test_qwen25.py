"""Qwen2.5-VL (windowed vision attention, its own config and processor) through the same engine."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoModelForImageTextToText

from sgl_cli.engine.io.formats import read_items
from tests.test_engine import _encode, reference_importance
from tests.conftest import analyze


@pytest.fixture(scope="module")
def qwen25(tmp_path_factory):
    from sgl_cli.engine.builtin.pair import TINY_SPEC, build_pair
    from sgl_cli.engine.pipeline.engine import Engine
    from sgl_cli.engine.backends.transformers import load_model
    from sgl_cli.engine.preset import ModelSpec, Settings

    pair = build_pair(dataclasses.replace(TINY_SPEC, arch="qwen2_5_vl"), tmp_path_factory.mktemp("q25"))
    small = load_model(ModelSpec(str(pair["small"]), dtype="float32"), "small")
    large = load_model(ModelSpec(str(pair["large"]), dtype="float32"), "large")
    assert small.model.config.model_type == "qwen2_5_vl"
    eager = AutoModelForImageTextToText.from_pretrained(pair["small"], attn_implementation="eager").eval()

    def make(**settings):
        base = dict(threshold=None, max_new_tokens=5, prompt_suffix="Answer with one word.")
        base.update(settings)
        return Engine(Settings(**base), small, large)

    return make, eager


def test_qwen25_retain_one_equals_generate_and_importance_equals_eager(qwen25, batch):
    make, eager = qwen25
    eng = make(retain=1.0)
    items = list(read_items(batch))
    works = analyze(eng, items)
    for item, w, rec in zip(items, works, eng.process(items)):
        enc = _encode(eng.large, item)
        with torch.no_grad():
            out = eng.large.model.generate(**enc, max_new_tokens=5, do_sample=False)
        text = eng.large.processor.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        assert rec["answer"] == text.strip()
        ref, _ = reference_importance(eager, _encode(eng.small, item))
        assert (w.small.importance.double() - ref).abs().max() / ref.abs().max() < 1e-5


def test_qwen25_batch_and_prune_layer(qwen25, batch):
    make, _ = qwen25
    items = list(read_items(batch))
    for k in (0, 1):
        one = [r for it in items for r in make(retain=0.25, prune_layer=k).process([it])]
        many = make(retain=0.25, prune_layer=k, batch_size=3).process(items)
        assert [r["answer"] for r in one] == [r["answer"] for r in many]
        assert all(r["error"] is None for r in many)
