"""vLLM #48833: a prefill chunk boundary that falls at an image's start. The plugin fixes every position when the
request is added (not chunk by chunk, as EVS does), so chunking cannot move them; this runs prompts in chunks of
exactly the tokens before the first image placeholder, so one boundary falls at the image start and the next ones
inside the image, and checks the answers against the transformers path and against the unchunked engine."""

from __future__ import annotations

import pytest
from conftest import ENGINE, images, kept_at
from reference import Transformers
from test_backend import MAX_NEW, assert_same

from sgl_cli.engine.backends.vllm import LargeRequest, VllmLarge


@pytest.fixture(scope="module")
def chunked(tiny_models):
    path = tiny_models["qwen2_vl"]
    ref = Transformers(path)
    ids = ref.encode([images()[0]], "What is in the image?")["input_ids"][0]
    boundary = int((ids == ref.lm.image_token_id).nonzero().min())  # tokens before the first image placeholder
    with VllmLarge(path, **{**ENGINE, "max_num_seqs": 2}, max_num_batched_tokens=boundary,
                   enable_chunked_prefill=True) as large:
        config = large.llm.llm_engine.vllm_config.scheduler_config
        assert config.enable_chunked_prefill and config.max_num_batched_tokens == boundary
        yield ref, large, boundary


@pytest.mark.parametrize("retain", [1.0, 0.25])
def test_chunk_boundary_at_image_start(chunked, retain):
    ref, large, boundary = chunked
    items = [([im], "What is in the image?", None) for im in images()]
    items = [(ims, q, kept_at(ref.n_visual(ims, q), retain, seed=5 + i)) for i, (ims, q, _) in enumerate(items)]
    for ims, q, _ in items:  # the same text before every image
        assert int((ref.encode(ims, q)["input_ids"][0] == ref.lm.image_token_id).nonzero().min()) == boundary
    refs = ref.run(items, MAX_NEW)
    replies = large.generate([LargeRequest(ims, r.prompt, kept, MAX_NEW, logprobs=5)
                              for (ims, _, kept), r in zip(items, refs)])
    # Every prompt is longer than two chunks: the first ends at the image start, the next inside the image.
    assert all(reply.prompt_tokens > 2 * boundary for reply in replies)
    for i, (r, reply) in enumerate(zip(refs, replies)):
        assert_same(r, reply, f"chunked, retain {retain}, item {i}")
