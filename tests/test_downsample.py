"""The downsample guide (no ranking: the image reduced to the token budget) against independent references.

- the visual tokens the large model receives: by hand for the built-in pair (Qwen2-VL, 28-pixel merged patches),
  and on every family of tests/families.py equal to what the processor itself makes of the image the guide
  chose (encoded here from a PIL image resized by hand), at most n_keep where the processor allows it, and the
  closest to n_keep from below among the sizes that a brute-force search here finds (Qwen: every grid of
  merged patches within one token of the image's aspect; InternVL: every tile canvas);
- the reduced image's encoding equals the processor's encoding of that hand-resized image, and the answer equals
  plain `generate` on it; at retain 1.0 the answer equals plain `generate` on the original image;
- LLaVA-1.5: the language model's input equals torch's adaptive_avg_pool2d over the projected 8 x 8 grid, with
  positions 0..S'-1, and the answer equals a cache-free greedy decode from those embeddings;
- a batch of mixed image sizes equals batch size one; records field by field; never a small model;
- `sgl eval --guide downsample,sgl,random` has its row (equal to `sgl run`'s records); `sgl inspect` shows the
  grid of what the large model saw (terminal and --json); a preset can name it.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
import yaml
from PIL import Image
from transformers import AutoModelForImageTextToText
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
from typer.testing import CliRunner

from sgl_cli.cli import app
from sgl_cli.engine.io.images import load_image
from sgl_cli.engine.io.formats import read_items
from tests.conftest import make_images, write_jsonl, write_preset
from tests.families import FAMILIES, build_family

SUFFIX = "Answer with one word."
MAX_NEW = 4
runner = CliRunner()


def n_keep(n: int, retain: float) -> int:
    return max(1, math.floor(n * retain + 1e-9))


def engine(large, small=None, **settings):
    from sgl_cli.engine.pipeline.engine import Engine
    from sgl_cli.engine.preset import Settings

    base = dict(threshold=None, max_new_tokens=MAX_NEW, prompt_suffix=SUFFIX, guide="downsample")
    base.update(settings)
    return Engine(Settings(**base), small, large)


def encode(processor, image, question):
    """The prompt as a user builds it with the processor's own chat template."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"{question}\n{SUFFIX}"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return processor(text=[text], images=[image], return_tensors="pt")


class first_call_kwargs:
    """A forward pre-hook keeping the keyword arguments of the first call (the prefill)."""

    def __init__(self):
        self.kwargs = None

    def hook(self, module, args, kwargs):
        if self.kwargs is None:
            self.kwargs = dict(kwargs)


def visual_count(model, enc) -> int:
    """Visual tokens of an encoding: image placeholders, minus LLaVA-NeXT/OneVision's newline rows (one per row of
    the high-res grid: found here as the placeholders the model fills with its `image_newline`)."""
    ids = enc["input_ids"][0]
    slots = ids == model.config.image_token_id
    newline = getattr(model.model, "image_newline", None)
    if newline is None:
        return int(slots.sum())
    captured = first_call_kwargs()
    handle = model.model.language_model.register_forward_pre_hook(captured.hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**enc)
    finally:
        handle.remove()
    rows = captured.kwargs["inputs_embeds"][0][slots]
    return int((~(rows == newline.to(rows.dtype)).all(-1)).sum())


@torch.no_grad()
def generate(model, enc) -> list[int]:
    out = model.generate(**enc, max_new_tokens=MAX_NEW, do_sample=False)
    return out[0, enc["input_ids"].shape[1]:].tolist()


def items_for(folder, sizes):
    imgs = make_images(folder, sizes=sizes)
    rows = [{"id": f"q{i}", "image": str(p), "question": "What color is the square?", "answer": "red"}
            for i, p in enumerate(imgs)]
    return list(read_items(write_jsonl(folder / "batch.jsonl", rows)))


# -- the built-in pair (Qwen2-VL: patch 14, merge 2) ---------------------------------------------------------------
@pytest.fixture(scope="module")
def pair(tiny_pair):
    from sgl_cli.engine.backends.transformers import load_model
    from sgl_cli.engine.preset import ModelSpec

    large = load_model(ModelSpec(str(tiny_pair["large"]), dtype="float32"), "large")
    small = load_model(ModelSpec(str(tiny_pair["small"]), dtype="float32"), "small")
    plain = AutoModelForImageTextToText.from_pretrained(tiny_pair["large"], dtype=torch.float32).eval()
    return SimpleNamespace(paths=tiny_pair, large=large, small=small, plain=plain)


# (width, height), retain -> the merged-patch grid (rows, cols) by hand: 336 x 224 is 8 x 12 = 96 tokens (aspect
# 1.5), 168 x 280 is 10 x 6 = 60 (aspect 0.6), 700 x 90 is 3 x 25 = 75 (smart_resize rounds 90/28 to 3).
BY_HAND = [
    ((336, 224), 0.5, (6, 8)),  # budget 48: 6 x 8 (|8 - 6 x 1.5| <= 1)
    ((336, 224), 0.25, (4, 6)),  # budget 24: 4 x 6
    ((336, 224), 0.09, (2, 4)),  # budget 8: 2 x 4 (|4 - 2 x 1.5| <= 1)
    ((168, 280), 0.25, (5, 3)),  # budget 15: 5 x 3
    ((700, 90), 0.25, (1, 8)),  # budget 18: 1 x 8 (|8 - 7.8| <= 1); 2 rows need 15 or 16 columns: 30 > 18
]


@pytest.mark.parametrize("size,retain,grid", BY_HAND)
def test_builtin_pair_tokens_equal_the_hand_arithmetic(pair, tmp_path, size, retain, grid):
    (item,) = items_for(tmp_path, (size,))
    (rec,) = engine(pair.large, retain=retain).process([item])
    rows, cols = grid
    assert rec["error"] is None
    assert rec["retained_tokens"] == rows * cols <= n_keep(rec["visual_tokens"], retain)
    # The processor keeps a size of whole merged patches as it is.
    assert smart_resize(rows * 28, cols * 28, 28, 56 * 56, 28 * 28 * 256) == (rows * 28, cols * 28)


def test_builtin_pair_records_field_by_field_and_no_small_model(pair, tmp_path):
    items = items_for(tmp_path, ((336, 224), (168, 280)))
    from sgl_cli.engine.pipeline.engine import Engine
    from sgl_cli.engine.preset import load_preset

    preset = load_preset(str(write_preset(tmp_path, pair.paths, guide="downsample", retain=0.25)))
    eng = Engine.from_preset(preset)
    assert eng.small is None  # the guide needs no small model: it is never loaded
    recs = list(eng.run(items))
    for rec, (n, kept) in zip(recs, [(96, 24), (60, 15)]):
        assert rec["guide"] == "downsample" and rec["error"] is None
        assert rec["visual_tokens"] == n and rec["retained_tokens"] == kept
        assert rec["exit"] == "large" and rec["exit_score"] is None and rec["confidence"] is None
        assert rec["consistency"] is None and rec["small_answer"] is None
        assert rec["prune_layer"] == 0 and rec["token_ratio"] == round(kept / n, 6)
        assert rec["ms"]["small"] == 0.0


def test_builtin_pair_retain_one_equals_plain_generate(pair, tmp_path):
    items = items_for(tmp_path, ((336, 224), (168, 280)))
    eng = engine(pair.large, retain=1.0)
    for item, rec in zip(items, eng.process(items)):
        enc = encode(pair.large.processor, load_image(item), item.question)
        want = pair.large.processor.tokenizer.decode(generate(pair.plain, enc), skip_special_tokens=True).strip()
        assert rec["answer"] == want and rec["retained_tokens"] == rec["visual_tokens"]


def test_builtin_pair_reduced_encoding_and_answer_equal_a_hand_resized_image(pair, tmp_path):
    items = items_for(tmp_path, ((336, 224),))
    eng = engine(pair.large, retain=0.25)
    (work,) = eng.prepare(items)
    eng.large_pass([work], None)
    seen = work.large.reduced
    assert seen.image_sizes == [(168, 112)]  # 6 x 4 merged patches of 28 pixels
    by_hand = load_image(items[0]).resize((168, 112), Image.Resampling.BICUBIC)
    enc = encode(pair.large.processor, by_hand, items[0].question)
    assert torch.equal(seen.encoding["input_ids"], enc["input_ids"])
    assert torch.equal(seen.encoding["pixel_values"], enc["pixel_values"])
    assert work.large.tokens == generate(pair.plain, enc)


def test_builtin_pair_batch_equals_batch_one_with_mixed_sizes(pair, tmp_path):
    items = items_for(tmp_path, ((336, 224), (168, 280), (700, 90)))
    batched = engine(pair.large, retain=0.25, batch_size=3).process(items)
    single = [engine(pair.large, retain=0.25, batch_size=1).process([it])[0] for it in items]
    for a, b in zip(batched, single):
        assert (a["answer"], a["retained_tokens"], a["visual_tokens"]) == (b["answer"], b["retained_tokens"],
                                                                           b["visual_tokens"])


# -- every family ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=FAMILIES)
def fam(request, tmp_path_factory):
    from sgl_cli.engine.backends.transformers import load_model
    from sgl_cli.engine.preset import ModelSpec

    paths = build_family(request.param, tmp_path_factory.mktemp(f"ds-{request.param}"))
    large = load_model(ModelSpec(str(paths["large"]), dtype="float32"), "large")
    plain = AutoModelForImageTextToText.from_pretrained(paths["large"], dtype=torch.float32).eval()
    return SimpleNamespace(name=request.param, large=large, plain=plain)


def brute_force_best(fam, size, budget) -> int | None:
    """The most visual tokens <= budget the processor gives any size a search by hand allows, else the fewest it
    gives any. Qwen: every grid of whole merged patches within one token of the image's aspect; InternVL: every
    canvas of whole tiles (one tile at the least); anyres: the image scaled down in 1% steps."""
    ip = fam.large.processor.image_processor
    w, h = size
    if fam.name.startswith("qwen"):
        f = ip.patch_size * ip.merge_size
        counts = set()
        for rows in range(1, 40):
            for cols in range(1, 200):
                if abs(cols - rows * w / h) <= 1:
                    hh, ww = smart_resize(rows * f, cols * f, f, ip.size["shortest_edge"], ip.size["longest_edge"])
                    counts.add(hh * ww // f ** 2)
        fits = [c for c in counts if c <= budget]
        return max(fits) if fits else min(counts)
    if fam.name == "internvl":
        tile = fam.large.model.config.vision_config.image_size[0]
        per_tile = (tile // 8 // 2) ** 2  # patch 8, pixel shuffle 0.5
        counts = [1 + (r * c if r * c > 1 else 0) for r in range(1, 5) for c in range(1, 5) if r * c <= 4]
        fits = [t * per_tile for t in counts if t * per_tile <= budget]
        return max(fits) if fits else per_tile
    if fam.name in ("llava_next", "llava_onevision"):  # the image scaled down in 1% steps, counted by the model
        image = Image.new("RGB", size)
        counts, scale = set(), 1.0
        while min(w, h) * scale >= 8:
            small = image.resize((max(1, round(w * scale)), max(1, round(h * scale))))
            counts.add(visual_count(fam.plain, encode(fam.large.processor, small, "?")))
            scale *= 0.99
        fits = [c for c in counts if c <= budget]
        return max(fits) if fits else min(counts)
    return None


@pytest.mark.parametrize("retain", [0.5, 0.25])
def test_every_family_receives_the_target_and_equals_the_hand_resized_image(fam, tmp_path, retain):
    items = items_for(tmp_path, ((168, 280), (336, 224), (300, 300)))
    eng = engine(fam.large, retain=retain)
    works = eng.prepare(items)
    with torch.inference_mode():
        eng.large_pass(works, None)
    for item, w in zip(items, works):
        assert w.error is None, w.error
        image = load_image(item)
        full = encode(fam.large.processor, image, item.question)
        n = visual_count(fam.plain, full)
        assert w.encoded.n_visual == n
        seen = w.large.reduced
        if fam.name == "llava":  # a fixed-resolution tower: pooled, not resized (below)
            assert seen.image_sizes == [image.size] and seen.pooled is not None
            continue
        (target,) = seen.image_sizes
        by_hand = image if target == image.size else image.resize(target, Image.Resampling.BICUBIC)
        enc = encode(fam.large.processor, by_hand, item.question)
        for key in ("input_ids", "pixel_values"):
            assert torch.equal(seen.encoding[key], enc[key]), key
        received = visual_count(fam.plain, enc)
        assert w.large.kept is None and w.large.n_kept == seen.n_visual == received  # all of it, unranked
        assert w.large.tokens == generate(fam.plain, enc)
        budget = n_keep(n, retain)
        best = brute_force_best(fam, image.size, budget)
        assert received == best  # the most within the budget, else the fewest the processor allows
        if fam.name.startswith("qwen"):
            assert received <= budget


def test_every_family_retain_one_equals_plain_generate(fam, tmp_path):
    items = items_for(tmp_path, ((168, 280), (336, 224)))
    for item, rec in zip(items, engine(fam.large, retain=1.0).process(items)):
        enc = encode(fam.large.processor, load_image(item), item.question)
        want = fam.large.processor.tokenizer.decode(generate(fam.plain, enc), skip_special_tokens=True).strip()
        assert rec["answer"] == want and rec["retained_tokens"] == rec["visual_tokens"] == visual_count(fam.plain, enc)


def test_every_family_batch_equals_batch_one(fam, tmp_path):
    items = items_for(tmp_path, ((168, 280), (336, 224), (300, 300)))
    batched = engine(fam.large, retain=0.25, batch_size=3).process(items)
    single = [engine(fam.large, retain=0.25, batch_size=1).process([it])[0] for it in items]
    assert [(r["answer"], r["retained_tokens"], r["error"]) for r in batched] == \
        [(r["answer"], r["retained_tokens"], r["error"]) for r in single]


def test_internvl_budget_below_one_tile_gives_one_tile(tmp_path):
    from sgl_cli.engine.backends.transformers import load_model
    from sgl_cli.engine.preset import ModelSpec

    paths = build_family("internvl", tmp_path / "m")
    large = load_model(ModelSpec(str(paths["large"]), dtype="float32"), "large")
    items = items_for(tmp_path, ((336, 224),))  # 2 x 2 tiles + thumbnail: 80 tokens
    (rec,) = engine(large, retain=0.09).process(items)
    # n_keep(80, 0.09) = 7 is under one tile's 16 tokens: the processor allows no fewer than one tile.
    assert (rec["visual_tokens"], rec["retained_tokens"]) == (80, 16)


# -- LLaVA-1.5: the projected grid pooled -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    from sgl_cli.engine.backends.transformers import load_model
    from sgl_cli.engine.preset import ModelSpec

    paths = build_family("llava", tmp_path_factory.mktemp("ds-llava"))
    large = load_model(ModelSpec(str(paths["large"]), dtype="float32"), "large")
    plain = AutoModelForImageTextToText.from_pretrained(paths["large"], dtype=torch.float32).eval()
    return SimpleNamespace(paths=paths, large=large, plain=plain)


@torch.no_grad()
def pooled_reference(model, enc, shape):
    """The prompt's embeddings with the 8 x 8 projected grid average-pooled to `shape` in the image's place,
    positions 0..S'-1, and a cache-free greedy decode from them."""
    ids = enc["input_ids"][0]
    slots = (ids == model.config.image_token_id).nonzero().flatten()
    feats = model.model.get_image_features(pixel_values=enc["pixel_values"], return_dict=True).pooler_output[0]
    grid = feats.reshape(8, 8, -1).permute(2, 0, 1)[None]
    pooled = torch.nn.functional.adaptive_avg_pool2d(grid, shape)[0].reshape(feats.shape[-1], -1).t()
    emb = model.get_input_embeddings()
    embeds = torch.cat([emb(ids[:slots[0]]), pooled, emb(ids[slots[-1] + 1:])])[None]
    out = []
    for _ in range(MAX_NEW):
        pos = torch.arange(embeds.shape[1])[None]
        h = model.model.language_model(inputs_embeds=embeds, position_ids=pos, use_cache=False).last_hidden_state
        token = int(model.lm_head(h[:, -1]).argmax(-1))
        out.append(token)
        if token == model.generation_config.eos_token_id:
            break
        embeds = torch.cat([embeds, emb(torch.tensor([[token]]))], dim=1)
    return pooled, out


@pytest.mark.parametrize("retain,shape", [(0.25, (4, 4)), (0.5, (5, 6)), (0.09, (2, 2))])
def test_llava_pooling_equals_adaptive_avg_pool_reference(llava, tmp_path, retain, shape):
    (item,) = items_for(tmp_path, ((168, 280),))
    eng = engine(llava.large, retain=retain)
    (work,) = eng.prepare([item])
    captured = first_call_kwargs()
    handle = llava.large.model.model.language_model.register_forward_pre_hook(captured.hook, with_kwargs=True)
    try:
        with torch.inference_mode():
            eng.large_pass([work], None)
    finally:
        handle.remove()
    enc = encode(llava.large.processor, load_image(item), item.question)
    pooled, want = pooled_reference(llava.plain, enc, shape)
    kw = captured.kwargs
    ids = work.large.reduced.encoding["input_ids"][0]
    first = int((ids == llava.plain.config.image_token_id).nonzero()[0])
    got = kw["inputs_embeds"][0, first:first + shape[0] * shape[1]]
    assert torch.allclose(got, pooled, atol=1e-5, rtol=1e-5)
    assert kw["position_ids"].flatten().tolist() == list(range(kw["inputs_embeds"].shape[1]))
    assert work.large.kept is None and work.large.n_kept == shape[0] * shape[1] <= n_keep(64, retain)
    assert work.large.reduced.pooled == shape and work.large.reduced.pooled_from == (8, 8)
    assert work.large.tokens == want


def test_llava_inspect_shows_the_pooled_grid(llava, tmp_path):
    image = make_images(tmp_path, sizes=((168, 280),))[0]
    preset = tmp_path / "llava.yaml"
    preset.write_text(yaml.safe_dump({"name": "llava-only", "large": {"model": str(llava.paths["large"]),
                                      "dtype": "float32"}, "retain": 0.25, "threshold": None}))
    res = runner.invoke(app, ["inspect", str(image), "--question", "What?", "-p", str(preset), "--guide",
                              "downsample"])
    assert res.exit_code == 0, res.output
    assert ("token grid pooled 4 x 4: the large model sees its 8 x 8 feature grid average-pooled: 16 visual tokens "
            "(the image has 64 at full size), all kept") in " ".join(res.stdout.split())
    got = json.loads(runner.invoke(app, ["inspect", str(image), "--question", "What?", "-p", str(preset),
                                         "--guide", "downsample", "--json"]).stdout)
    assert got["grid"] == [4, 4] and got["visual_tokens"] == 64 and got["retained_tokens"] == 16
    assert got["pooled_from"] == [8, 8] and got["kept"] == list(range(16))


# -- the commands ---------------------------------------------------------------------------------------------------
def test_eval_row_equals_the_engine_records(pair, tmp_path):
    items = items_for(tmp_path, ((336, 224), (168, 280), (700, 90)))
    preset = write_preset(tmp_path, pair.paths, max_new_tokens=MAX_NEW, prompt_suffix=SUFFIX)
    res = runner.invoke(app, ["eval", str(tmp_path / "batch.jsonl"), "-p", str(preset), "--guide",
                              "downsample,sgl,random", "--retain", "0.25", "--json", "-q"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    rows = {r["guide"]: r for r in out["results"]}
    assert list(rows) == ["downsample", "sgl", "random"]
    recs = engine(pair.large, retain=0.25).process(items)
    row = rows["downsample"]
    assert row["retained_tokens"] == round(sum(r["retained_tokens"] for r in recs) / 3, 1) == round(47 / 3, 1)
    assert row["visual_tokens"] == round((96 + 60 + 75) / 3, 1) and row["exit_rate"] == 0.0
    assert row["large_calls"] == 3 and row["prune_layer"] == 0
    from sgl_cli.engine.metrics import get_metric

    metric = get_metric("vqa")
    assert row["accuracy"] == round(sum(metric(r["answer"], ["red"]) for r in recs) / 3, 4)


def test_eval_details_carry_the_downsample_answers(pair, tmp_path):
    items = items_for(tmp_path, ((336, 224), (168, 280)))
    preset = write_preset(tmp_path, pair.paths, max_new_tokens=MAX_NEW, prompt_suffix=SUFFIX)
    res = runner.invoke(app, ["eval", str(tmp_path / "batch.jsonl"), "-p", str(preset), "--guide", "downsample",
                              "--retain", "0.25", "--json", "-q", "--details", str(tmp_path / "d.jsonl")])
    assert res.exit_code == 0, res.output
    details = [json.loads(line) for line in (tmp_path / "d.jsonl").read_text().splitlines()]
    recs = engine(pair.large, retain=0.25).process(items)
    for d, r in zip(details, recs):
        got = d["downsample@0.25"]
        assert (got["answer"], got["retained_tokens"], got["exit"]) == (r["answer"], r["retained_tokens"], "large")


def test_run_with_a_preset_that_names_the_guide(pair, tmp_path):
    items = items_for(tmp_path, ((336, 224), (168, 280)))
    preset = write_preset(tmp_path, pair.paths, guide="downsample", retain=0.25, max_new_tokens=MAX_NEW,
                          prompt_suffix=SUFFIX)
    out = tmp_path / "out.jsonl"
    res = runner.invoke(app, ["run", str(tmp_path / "batch.jsonl"), "-p", str(preset), "-o", str(out), "-q"])
    assert res.exit_code == 0, res.output
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    want = engine(pair.large, retain=0.25).process(items)
    assert [(r["guide"], r["answer"], r["visual_tokens"], r["retained_tokens"], r["exit"]) for r in recs] == \
        [("downsample", w["answer"], w["visual_tokens"], w["retained_tokens"], "large") for w in want]


def test_inspect_shows_the_reduced_grid(pair, tmp_path):
    image = make_images(tmp_path, sizes=((336, 224),))[0]
    preset = write_preset(tmp_path, pair.paths)
    res = runner.invoke(app, ["inspect", str(image), "--question", "What?", "-p", str(preset), "--guide",
                              "downsample", "--retain", "0.25"])
    assert res.exit_code == 0, res.output
    text = " ".join(res.stdout.split())
    assert ("token grid image 4 x 6: the large model sees the image resized to 168 x 112 px: 24 visual tokens (the "
            "image has 96 at full size), all kept") in text
    frame = [line for line in res.stdout.splitlines() if line.startswith("│")]
    assert len(frame) == 4 and all(line.count("[]") == 6 for line in frame)
    got = json.loads(runner.invoke(app, ["inspect", str(image), "--question", "What?", "-p", str(preset), "--guide",
                                         "downsample", "--retain", "0.25", "--json", "--answer-large"]).stdout)
    assert got["grid"] == [4, 6] and got["visual_tokens"] == 96 and got["retained_tokens"] == 24
    assert got["seen_image_sizes"] == [[168, 112]] and got["kept"] == list(range(24))
    assert got["exit"] == "large" and got["kept_by_sgl_too"] is None
    (item,) = read_items(write_jsonl(tmp_path / "one.jsonl", [{"image": str(image), "question": "What?"}]))
    assert got["large_answer"] == engine(pair.large, retain=0.25, prompt_suffix="Answer with one word.").process(
        [item])[0]["answer"]
    # `--guide all` compares the rankings of the image's own tokens: downsample is not among them.
    every = json.loads(runner.invoke(app, ["inspect", str(image), "--question", "What?", "-p", str(preset),
                                           "--guide", "all", "--json"]).stdout)
    assert "downsample" not in every["guides"]


def test_it_never_exits_early_and_calibrate_refuses_it(pair, tmp_path):
    items_for(tmp_path, ((336, 224), (168, 280)))
    preset = write_preset(tmp_path, pair.paths, max_new_tokens=MAX_NEW, prompt_suffix=SUFFIX)
    # A threshold every small answer clears: sgl's items all exit, downsample's all go to the large model.
    res = runner.invoke(app, ["eval", str(tmp_path / "batch.jsonl"), "-p", str(preset), "--guide",
                              "sgl,downsample", "--retain", "0.25", "--threshold", "0", "--json", "-q"])
    assert res.exit_code == 0, res.output
    sgl, down = json.loads(res.stdout)["results"]
    assert (sgl["exit_rate"], sgl["large_calls"]) == (1.0, 0)
    assert (down["exit_rate"], down["large_calls"], down["retained_tokens"]) == (0.0, 2, round((24 + 15) / 2, 1))
    preset = write_preset(tmp_path, pair.paths, guide="downsample")
    res = runner.invoke(app, ["calibrate", str(tmp_path / "batch.jsonl"), "-p", str(preset), "--target-accuracy",
                              "0.9"])
    assert res.exit_code == 2
    assert "only the sgl guide, with a small model, exits early" in res.output and "downsample" in res.output


def test_saved_scores_carry_the_grid_the_large_model_saw(pair, tmp_path):
    import pyarrow.ipc

    items_for(tmp_path, ((336, 224), (168, 280)))
    preset = write_preset(tmp_path, pair.paths, guide="downsample", retain=0.25)
    out = tmp_path / "out.jsonl"
    res = runner.invoke(app, ["run", str(tmp_path / "batch.jsonl"), "-p", str(preset), "-o", str(out), "-q",
                              "--save-scores"])
    assert res.exit_code == 0, res.output
    rows = pyarrow.ipc.open_stream(tmp_path / "out.scores.arrow").read_all().to_pylist()
    for row, (r, c) in zip(rows, [(4, 6), (5, 3)]):
        (grid,) = row["grids"]
        assert (grid["rows"], grid["cols"]) == (r, c) and sorted(grid["tokens"]) == list(range(r * c))
        assert row["kept"] == list(range(r * c)) and len(row["scores"]) == r * c
