"""The built-in pair on vLLM: its large model's config gives M-RoPE a longrope spectrum (stock vLLM picks its Phi-3
long-rope and fails) and its folder has no video processor config (stock vLLM's processor cannot load). For the
example batch, with the kept indices the transformers engine picks at the default retain (0.09), vLLM's large
answers equal the transformers engine's token for token."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import ENGINE

from sgl_cli.engine.backends.vllm import LargeRequest, VllmLarge
from sgl_cli.engine import Engine
from sgl_cli.engine.preset import load_preset

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def engine_answers():
    """The transformers engine's stages on the example batch: every item's large answer at retain 0.09 (exits
    ignored, so all eight reach the large model) and its kept indices."""
    from PIL import Image

    from sgl_cli.engine import read_items

    engine = Engine.from_preset(load_preset("default"))
    assert engine.settings.retain == 0.09 and engine.prune_layer() == 0
    works = engine.prepare(list(read_items(EXAMPLES / "batch.jsonl")))
    assert all(w.ok for w in works)
    engine.small_pass(works)
    answers = engine.large_pass(works, engine.large_inputs(works))
    rows = [json.loads(line) for line in (EXAMPLES / "batch.jsonl").read_text().splitlines() if line.strip()]
    images = [[Image.open(EXAMPLES / r["image"]).convert("RGB")] for r in rows]
    messages = [w.item.messages(engine.settings.prompt_suffix.strip()) for w in works]
    return engine, works, answers, images, messages


def test_builtin_pair_large_answers_equal_transformers(engine_answers):
    engine, works, answers, images, messages = engine_answers
    spec = engine.preset.large
    with VllmLarge(spec, **{**ENGINE, "dtype": None}) as large:
        assert large.llm.llm_engine.model_config.dtype == torch.float32  # the preset's dtype, not the folder's
        requests = [LargeRequest(ims, large.prompt(ims, m), a.kept.tolist(), engine.settings.max_new_tokens)
                    for ims, m, a in zip(images, messages, answers)]
        for w, a, r in zip(works, answers, requests):  # the prompt vLLM runs is the engine's kept row
            ids = w.encoded.large["input_ids"][0]
            keep = ~w.encoded.visual
            keep[w.encoded.visual.nonzero()[a.kept, 0]] = True
            assert large.render(r).prompt_token_ids == ids[keep].tolist()
        replies = large.generate(requests)
    assert len(replies) == len(answers) == 8
    for i, (a, reply) in enumerate(zip(answers, replies)):
        assert reply.tokens == a.tokens, f"item {i}"
        assert reply.text == a.answer, f"item {i}"
    assert sum(len(a.kept) for a in answers) < 0.1 * sum(w.encoded.n_visual for w in works)
