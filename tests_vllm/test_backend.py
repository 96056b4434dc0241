"""vLLM's large answers against sgl's transformers path, on tiny Qwen2-VL, Qwen2.5-VL and Qwen3-VL models
(float32, greedy).

Random weights can leave near-ties between the top two tokens, where float32 rounding in two different kernels
may pick either. So: vLLM's first-step log-probabilities equal transformers' within LOGPROB_TOL, and the tokens are
equal at every step up to the first one where transformers' top-two logit margin is below MARGIN (none of these
items has one; the check keeps the test honest if weights change).
"""

from __future__ import annotations

import pytest
import torch
from conftest import ENGINE, images, kept_at
from reference import Transformers

from sgl_cli.engine.backends.vllm import LargeRequest, VllmLarge
from sgl_cli.engine.errors import ItemError

LOGPROB_TOL = 1e-3
MARGIN = 2e-3
MAX_NEW = 8
QUESTIONS = ["What is in the image?", "Describe it.", "Which colour is at the top left?"]


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def models(request, tiny_models):
    path = tiny_models[request.param]
    ref = Transformers(path)
    large = VllmLarge(path, **ENGINE)
    yield request.param, ref, large
    large.close()


def assert_same(ref, reply, where: str) -> None:
    """Equal tokens wherever the reference's top-two margin allows a verdict; first-step log-probs close."""
    logits = ref.logits
    top2 = logits.topk(2, dim=-1).values
    margins = (top2[:, 0] - top2[:, 1]).tolist()
    n = len(ref.tokens)
    decided = next((i for i, m in enumerate(margins) if m < MARGIN), n)  # steps before a near-tie
    assert reply.tokens[:decided] == ref.tokens[:decided], where
    if decided == n:
        assert reply.tokens == ref.tokens, where
        assert reply.finish_reason == ("stop" if len(ref.tokens) < MAX_NEW else "length"), where
    first = torch.log_softmax(logits[0], dim=-1)
    assert reply.logprobs is not None and len(reply.logprobs[0]) >= 5, where
    for token, lp in reply.logprobs[0].items():
        assert abs(lp - float(first[token])) < LOGPROB_TOL, f"{where}: token {token}: {lp} vs {float(first[token])}"


def batch(ref: Transformers, retain: float, seed: int = 0):
    """The three images (wide, tall, square), one per item, with kept sets at `retain`."""
    out = []
    for i, (im, q) in enumerate(zip(images(), QUESTIONS)):
        out.append(([im], q, kept_at(ref.n_visual([im], q), retain, seed + i)))
    return out


def requests_for(items, refs, logprobs: int = 5):
    return [LargeRequest(images, r.prompt, kept, MAX_NEW, logprobs=logprobs) for (images, _, kept), r in
            zip(items, refs)]


@pytest.mark.parametrize("retain", [1.0, 0.25, 0.09])
def test_answers_equal_transformers_pruned_generation(models, retain):
    """A batch mixing image sizes, at each retain: vLLM's answers from the kept tokens equal sgl's pruned
    generation (the engine's generate_kept at layer 0) from the same indices; at 1.0, plain generation."""
    family, ref, large = models
    items = batch(ref, retain)
    refs = ref.run(items, MAX_NEW)
    replies = large.generate(requests_for(items, refs))
    assert len(replies) == len(items)
    for i, (r, reply) in enumerate(zip(refs, replies)):
        assert_same(r, reply, f"{family} retain {retain} item {i}")
        assert reply.prompt_tokens == r.positions.shape[1]
        assert reply.text == ref.lm.processor.tokenizer.decode(reply.tokens, skip_special_tokens=True).strip()


def test_retain_one_equals_plain_generate(models):
    """Unpruned, and with every index kept, vLLM answers as transformers' own `generate` (greedy) does."""
    family, ref, large = models
    items = batch(ref, 1.0)
    full = [(im, q, list(range(ref.n_visual(im, q)))) for im, q, _ in items]
    refs = ref.run(items, MAX_NEW)
    plain = large.generate(requests_for(items, refs))
    every = large.generate(requests_for(full, refs))
    generated = []
    for im, q, _ in items:
        enc = ref.encode(im, q)
        with torch.inference_mode():
            out = ref.lm.model.generate(**enc, max_new_tokens=MAX_NEW, do_sample=False)
        generated.append(out[0, enc["input_ids"].shape[1]:].tolist())
    assert [p.tokens for p in plain] == [e.tokens for e in every] == [r.tokens for r in refs] == generated


@pytest.mark.parametrize("retain", [1.0, 0.25, 0.09])
def test_positions_equal_transformers(models, retain):
    """The prompt vLLM runs is the transformers path's kept row (ids), and the M-RoPE ids the plugin gives it equal
    the full prompt's ids gathered at the kept columns, text after each image included."""
    family, ref, large = models
    items = batch(ref, retain, seed=7)
    refs = ref.run(items, 1)
    for (im, q, kept), r in zip(items, refs):
        enc = ref.encode(im, q)
        row = ref.lm.family.rows(ref.lm.model, [enc])[0]
        visual = ref.lm.family.visual_mask(ref.lm.model, enc)
        idx = torch.arange(int(visual.sum())) if kept is None else torch.tensor(kept)
        rendered = large.render(LargeRequest(im, r.prompt, kept))
        assert rendered.prompt_token_ids == row.keep(visual, idx).ids.tolist()
        assert torch.equal(rendered.positions, r.positions)


def test_tall_image_text_continues_from_max_of_rows_and_columns(models):
    """On the tall image (more merged rows than columns) the first text token after the image sits at the image's
    start + max(rows, cols): the number vLLM's EVS rewrite would get wrong (it adds the width)."""
    family, ref, large = models
    tall = images()[1]
    n = ref.n_visual([tall], "x")
    r = ref.run([([tall], "x", [0, n - 1])], 1)[0]
    rendered = large.render(LargeRequest([tall], r.prompt, [0, n - 1]))
    ids = torch.tensor(rendered.prompt_token_ids)
    image = int(ref.lm.image_token_id)
    last = int((ids == image).nonzero().max())
    grid = ref.lm.family.token_grid(ref.lm.model, ref.encode([tall], "x"))
    assert grid[0] > grid[1]
    start = int(rendered.positions[0, int((ids == image).nonzero().min()) - 1]) + 1
    assert int(rendered.positions[0, last + 1]) == start + max(grid)
    assert torch.equal(rendered.positions, r.positions)


def test_batch_equals_batch_one(models):
    """Each item of a mixed-size batch at retain 0.25 answers as it does alone."""
    family, ref, large = models
    items = batch(ref, 0.25, seed=3)
    refs = ref.run(items, MAX_NEW)
    together = large.generate(requests_for(items, refs, logprobs=0))
    alone = [large.generate(requests_for([it], [r], logprobs=0))[0] for it, r in zip(items, refs)]
    assert [t.tokens for t in together] == [a.tokens for a in alone]
    assert [t.text for t in together] == [a.text for a in alone]


def test_same_image_different_kept_sets(models):
    """Two requests with one image and question and different kept sets of one size: their multimodal hashes (the
    encoder- and prefix-cache key) differ, each answers as its own transformers reference, together or after the
    other has filled the caches; the same kept set gives the same hash."""
    family, ref, large = models
    im, q = [images()[2]], QUESTIONS[0]
    n = ref.n_visual(im, q)
    a, b = kept_at(n, 0.25, seed=11), kept_at(n, 0.25, seed=12)
    assert len(a) == len(b) and a != b
    refs = ref.run([(im, q, a), (im, q, b)], MAX_NEW)
    ra, rb = requests_for([(im, q, a), (im, q, b)], refs)
    assert large.render(ra).prompt_token_ids == large.render(rb).prompt_token_ids  # same tokens: only hashes differ
    assert large.render(ra).mm_hashes != large.render(rb).mm_hashes
    assert large.render(ra).mm_hashes == large.render(LargeRequest(im, refs[0].prompt, list(a))).mm_hashes
    together = large.generate([ra, rb])
    first, second = large.generate([ra])[0], large.generate([rb])[0]  # b right after a's cache entries
    for r, reply in zip(refs, together):
        assert_same(r, reply, f"{family} together")
    assert first.tokens == together[0].tokens and second.tokens == together[1].tokens
    assert_same(refs[1], second, f"{family} after the other")
    # The two kept sets move the first-step log-probs by far more than the tolerance: a shared cache entry shows.
    gap = torch.log_softmax(refs[0].logits[0], -1) - torch.log_softmax(refs[1].logits[0], -1)
    assert float(gap.abs().max()) > 10 * LOGPROB_TOL


@pytest.mark.parametrize("retain", [1.0, 0.25, 0.09])
def test_several_images_per_item(models, retain):
    """Items of two and three images (kept indices over all their visual tokens, concatenated) equal the
    transformers path, positions included."""
    family, ref, large = models
    ims = images()
    items = []
    for j, group in enumerate([[ims[0], ims[1]], [ims[2], ims[1], ims[0]]]):
        q = QUESTIONS[j]
        counts = [ref.n_visual([g], q) for g in group]
        kept = kept_at(sum(counts), retain, seed=20 + j)
        if kept is not None:  # at least one token of every image (the backend's rule)
            firsts = [sum(counts[:i]) for i in range(len(group))]
            kept = sorted(set(kept) | set(firsts))
        items.append((group, q, kept))
    refs = ref.run(items, MAX_NEW)
    replies = large.generate(requests_for(items, refs))
    for i, (item, r, reply) in enumerate(zip(items, refs, replies)):
        assert_same(r, reply, f"{family} several images, retain {retain}, item {i}")
        assert torch.equal(large.render(LargeRequest(item[0], r.prompt, item[2])).positions, r.positions)


def test_bad_requests_are_refused_by_item(models):
    family, ref, large = models
    im, q = [images()[0]], QUESTIONS[0]
    prompt = ref.prompt(im, q)
    n = ref.n_visual(im, q)
    cases = {
        f"large request 1: kept indices must lie in 0..{n - 1} (the item's {n} visual tokens)": [0, n],
        "large request 1: kept indices must be strictly increasing (the visual tokens in sequence order)": [3, 1],
        "large request 1: the kept indices must be a non-empty list of integers": [],
    }
    for message, kept in cases.items():
        with pytest.raises(ItemError) as err:
            large.generate([LargeRequest(im, prompt, kept)])
        assert str(err.value) == message
    two = [images()[0], images()[1]]
    with pytest.raises(ItemError, match=r"^large request 2: image 2 of 2 keeps none of its \d+ visual tokens; the "
                                        r"vLLM backend needs at least one per image$"):
        large.generate([LargeRequest(im, prompt, [0]), LargeRequest(two, ref.prompt(two, q), [0, 1])])
    with pytest.raises(ItemError, match="^large request 1: the vLLM backend decodes greedily only$"):
        large.generate([LargeRequest(im, prompt, None, greedy=False)])
